"""eventful-pl command line: LightningCLI (fit, validate, test, predict) plus
``count`` and ``cache-features``.

    python cli.py fit --config configs/demo.yaml
    python cli.py validate --config configs/<experiment>.yaml --ckpt_path last.ckpt
    python cli.py count --config configs/count/vitdet_b_vid_672.yaml --r 128 256 --json
    python cli.py cache-features --config configs/demo.yaml --splits train

``count`` prints the operation counts of the config's model (see
``eventful_pl/lightning/count_command.py``); ``cache-features`` writes the spatial-feature
caches of a fine-tuning config (the same YAML as ``fit``; see
``eventful_pl/lightning/cache_command.py``); every other subcommand is LightningCLI's,
with the model and data given by ``class_path`` in the config. Checkpoints
load with ``weights_only``, the command line wins over a checkpoint's stored
options, and no existing file is replaced by the saved config (see
``eventful_pl/lightning/cli.py``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from eventful_pl.lightning.cli import EventfulCLI


def cli_main(args: Sequence[str] | None = None) -> EventfulCLI | dict | list:
    """Runs the command line on ``args`` (default: ``sys.argv[1:]``)."""
    args = list(sys.argv[1:] if args is None else args)
    if args and args[0] == "count":
        from eventful_pl.lightning.count_command import main as count_main

        return count_main(args[1:])
    if args and args[0] == "cache-features":
        from eventful_pl.lightning.cache_command import main as cache_main

        return cache_main(args[1:])
    return EventfulCLI(subclass_mode_model=True, subclass_mode_data=True, args=args)


if __name__ == "__main__":
    cli_main()
