"""The ``cache-features`` command: writes the spatial-feature caches of a fine-tuning config.

    python cli.py cache-features --config configs/demo.yaml
    python cli.py cache-features --config configs/vivit/kinetics400.yaml --splits train val
    python cli.py cache-features --config my.yaml --device cuda:1 --model.init_args.r 48

It reads the same YAML config as ``fit`` (LightningCLI: ``model``, ``data``,
``trainer``, ``seed_everything``; command-line overrides as for ``fit``). The
model must be a :class:`~eventful_pl.lightning.vivit_module.ViViTFineTuning`
and the data a :class:`~datamodules.finetune.ViViTFineTuneDataModule` with a
``cache_root``. The model's ``pretrained`` weights are loaded, then the
frozen eventful spatial model (top-r of ``model.r``) writes the caches of the
chosen splits exactly where ``fit`` reads them (``cache_root``, cache dtype
and writer workers of the data section), so a later ``fit`` finds the
training cache complete and only checks it. Like ``fit``, it resumes an
interrupted cache and rewrites bad entries (:mod:`eventful_pl.lightning.feature_cache`).

``--splits``: ``train``, ``val`` and ``test`` stand for the video data
module's configured splits of these roles; any other name is used as a split
name. Default: ``train`` (the one ``fit`` reads from the cache). One process
writes every entry (for several GPUs, ``fit`` writes the cache with every
rank sharing the work).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from eventful_pl.lightning.feature_cache import CacheReport, write_datamodule_features

USAGE = (
    "cli.py cache-features --config FIT_CONFIG [--splits SPLIT ...] [--device DEVICE] "
    "[LightningCLI options of fit, e.g. --model.init_args.r 48]"
)


def build_parser() -> argparse.ArgumentParser:
    """The options of ``cache-features`` itself (the rest go to LightningCLI)."""
    parser = argparse.ArgumentParser(
        prog="cli.py cache-features",
        usage=USAGE,
        description="Write the frozen spatial model's feature caches of a fine-tuning config.",
        add_help=False,
    )
    parser.add_argument(
        "--splits",
        nargs="+",
        default=["train"],
        help="train / val / test (the configured splits) or split names; default: train",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="device of the spatial model (default: cuda if available, else cpu)",
    )
    return parser


def split_names(videos: Any, splits: Sequence[str]) -> list[str]:
    """Roles (train, val, test) to the data module's split names; others kept; no repeats."""
    roles = {"train": videos.train_split, "val": videos.val_split, "test": videos.test_split}
    names: list[str] = []
    for split in splits:
        name = roles.get(split, split)
        if name not in names:
            names.append(name)
    return names


def main(args: Sequence[str] | None = None) -> list[CacheReport]:
    """Runs ``cache-features`` on ``args``; returns the writer's report per split."""
    args = list(sys.argv[1:] if args is None else args)
    if "-h" in args or "--help" in args:
        build_parser().print_help()
        print("\nThe fit config's options follow (LightningCLI):\n")
    own, rest = build_parser().parse_known_args(args)

    from datamodules.finetune import ViViTFineTuneDataModule
    from eventful_pl.lightning.cli import EventfulCLI
    from eventful_pl.lightning.vivit_module import ViViTFineTuning

    with warnings.catch_warnings():
        # The options after "cache-features" are LightningCLI's; it would warn
        # that they differ from sys.argv.
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run")
        cli = EventfulCLI(
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=None,
            run=False,
            args=rest,
        )
    lit, data = cli.model, cli.datamodule
    if not isinstance(lit, ViViTFineTuning):
        raise SystemExit(
            f"cache-features: the config's model is a {type(lit).__name__}; it needs "
            "eventful_pl.lightning.vivit_module.ViViTFineTuning (its frozen spatial model "
            "makes the features)"
        )
    if not isinstance(data, ViViTFineTuneDataModule) or data.cache_root is None:
        raise SystemExit(
            "cache-features: the config's data must be a "
            "datamodules.finetune.ViViTFineTuneDataModule with cache_root set (where the "
            f"caches go); got {type(data).__name__}"
            + (" without cache_root" if isinstance(data, ViViTFineTuneDataModule) else "")
        )
    device = own.device or ("cuda" if torch.cuda.is_available() else "cpu")
    lit.load_pretrained()
    lit.to(device)
    videos = data.videos
    videos.prepare_data()  # e.g. writes the demo's synthetic videos
    reports = []
    for split in split_names(videos, own.splits):
        report = write_datamodule_features(
            videos,
            split,
            lit.model,
            lit.r,
            data.cache_root,
            dtype=data.cache_dtype,
            num_workers=data.write_workers,
            rank=0,
            world_size=1,
        )
        print(report.summary())
        reports.append(report)
    return reports
