"""eventful-pl command line: LightningCLI (fit, validate, test, predict) plus ``count``.

    python cli.py fit --config configs/demo.yaml
    python cli.py validate --config configs/<experiment>.yaml --ckpt_path last.ckpt
    python cli.py count --config configs/count/vitdet_b_vid_672.yaml --r 128 256 --json

``count`` prints the operation counts of the config's model (see
``eventful_pl/count_command.py``); every other subcommand is LightningCLI's,
with the model and data given by ``class_path`` in the config.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from lightning.pytorch.cli import LightningCLI


def cli_main(args: Sequence[str] | None = None) -> LightningCLI | dict:
    """Runs the command line on ``args`` (default: ``sys.argv[1:]``)."""
    args = list(sys.argv[1:] if args is None else args)
    if args and args[0] == "count":
        from eventful_pl.count_command import main as count_main

        return count_main(args[1:])
    return LightningCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    cli_main()
