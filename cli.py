"""eventful-pl command line: LightningCLI (fit, validate, test, predict) plus ``count``.

    python cli.py count --config configs/count/vitdet_b_vid_672.yaml --r 128 256 --json
    python cli.py fit --config configs/<experiment>.yaml

``count`` prints the operation counts of the config's model (see
``eventful_pl/count_command.py``); every other subcommand is LightningCLI's.
"""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningCLI


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "count":
        from eventful_pl.count_command import main as count_main

        count_main(sys.argv[2:])
        return
    LightningCLI(subclass_mode_model=True, subclass_mode_data=True)


if __name__ == "__main__":
    main()
