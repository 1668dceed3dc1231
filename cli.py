"""eventful-pl command line (also installed as the ``eventful-pl`` console script).

    python cli.py fit --config configs/demo.yaml
    python cli.py validate --config configs/vitdet/vid.yaml --ckpt_path last.ckpt
    python cli.py count --config configs/vitdet/vid.yaml --r 512 1024
    python cli.py cache-features --config configs/demo.yaml --splits train

See :func:`eventful_pl.lightning.cli.cli_main` (docs/configs.md for the configs).
"""

from __future__ import annotations

from eventful_pl.lightning.cli import cli_main, main

__all__ = ["cli_main", "main"]

if __name__ == "__main__":
    main()
