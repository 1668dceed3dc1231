"""eventful-pl command line (also installed as the ``eventful-pl`` console script).

    python cli.py fit --config configs/demo.yaml
    python cli.py validate --config configs/vitdet/vid.yaml --ckpt_path last.ckpt
    python cli.py count --config configs/vitdet/vid.yaml --r 512 1024
    python cli.py cache-features --config configs/demo.yaml --splits train

See :func:`eventful_pl.lightning.cli.main` (docs/configs.md for the configs).
"""

from __future__ import annotations

from collections.abc import Sequence

from eventful_pl.lightning.cli import EventfulCLI, main


def cli_main(args: Sequence[str] | None = None) -> EventfulCLI | dict | list:
    """Runs the command line on ``args`` (default: ``sys.argv[1:]``)."""
    return main(args)


if __name__ == "__main__":
    main()
