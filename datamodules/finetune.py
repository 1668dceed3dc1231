"""Data for ViViT temporal fine-tuning: cached spatial features for training, videos for evaluation.

Wraps a video data module (Kinetics-400, EPIC-Kitchens-100). Training reads
the frozen eventful spatial model's features from a cache
(:mod:`datamodules.features`); without ``cache_root`` the training items are
whole videos and the spatial model runs on the fly (the same items in the same
order, so the same result). This data module never builds or runs a model: the
cache is written on first use from the Lightning layer, by the trainer's own
model once its weights are loaded
(:func:`eventful_pl.lightning.feature_cache.prepare_finetune_cache`, called by
:class:`~eventful_pl.lightning.vivit_module.ViViTFineTuning` at the start of
fit: each rank writes its shard, an interrupted run resumes, then every rank
waits), which then hands the cache over with
:meth:`ViViTFineTuneDataModule.use_train_cache`. The cache is checked against
the model (another model, r or weights is refused). Validation and test are
whole videos, so the LightningModule can sweep test-time r::

    data:
      class_path: datamodules.finetune.ViViTFineTuneDataModule
      init_args:
        cache_root: outputs/features
        videos:
          class_path: datamodules.epic_kitchens.EpicKitchensDataModule
          init_args: {root: data/EPIC-KITCHENS, eval_short_side: 320}

Outside such a LightningModule, write the cache first (``python cli.py
cache-features --config ...``) and call :meth:`ViViTFineTuneDataModule.use_train_cache`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import lightning as L
from torch.utils.data import DataLoader

from datamodules.common import training_loader
from datamodules.features import DTYPES, FeatureDataset, feature_cache_dir
from datamodules.video import ClipDataModule


class ViViTFineTuneDataModule(L.LightningDataModule):
    """Training from the spatial-feature cache (or whole videos), evaluation from whole videos.

    Training batches: ``(features (B, V, T', D) float32, labels (B,))`` from the
    cache, or ``{"video", "length", "label", ...}`` whole-clip batches without
    a cache. Evaluation batches: the video data module's whole clips.

    Args:
        videos: The video data module (its ``batch_size`` applies to on-the-fly
            training; ``eval_batch_size``, workers and splits are its own).
        cache_root: Root of the feature caches (None: no cache, features on the fly).
        cache_dtype: Storage dtype of cached features (``float32`` keeps them exact).
        batch_size: Training items per batch from the cache.
        num_workers: DataLoader workers reading the cache.
        train_views: ``"all"`` views per training item, or one ``"random"`` view
            (cache only).
        write_workers: Decoding workers while the cache is written.
    """

    def __init__(
        self,
        videos: ClipDataModule,
        cache_root: str | None = None,
        cache_dtype: Literal["float16", "bfloat16", "float32"] = "float32",
        batch_size: int = 8,
        num_workers: int = 0,
        train_views: Literal["all", "random"] = "all",
        write_workers: int = 0,
    ) -> None:
        super().__init__()
        if cache_dtype not in DTYPES:
            raise ValueError(f"cache_dtype must be one of {sorted(DTYPES)}, got {cache_dtype!r}")
        if train_views not in ("all", "random"):
            raise ValueError(f"train_views must be 'all' or 'random', got {train_views!r}")
        if batch_size < 1 or num_workers < 0 or write_workers < 0:
            raise ValueError(
                "batch_size must be >= 1 and num_workers, write_workers >= 0, got "
                f"{batch_size}, {num_workers}, {write_workers}"
            )
        if train_views == "random" and cache_root is None:
            raise ValueError("train_views='random' needs cache_root (views of cached features)")
        self.videos = videos
        self.cache_root = cache_root
        self.cache_dtype = cache_dtype
        self.batch_size, self.num_workers = batch_size, num_workers
        self.train_views, self.write_workers = train_views, write_workers
        if cache_root is None:
            videos.train_clips = "whole"
        #: What the training cache held (set when the training loader is made).
        self.train_summary: str | None = None
        #: The training cache to read and the manifest fields it must have
        #: (set by :meth:`use_train_cache`).
        self.train_cache: Path | None = None
        self.train_expect: dict[str, Any] = {}

    @property
    def num_classes(self) -> int | None:
        return getattr(self.videos, "num_classes", None)

    def prepare_data(self) -> None:
        self.videos.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        self.videos.trainer = self.trainer
        if stage in ("fit", None) and self.cache_root is not None:
            self.videos.setup("validate")  # training items come from the cache
        else:
            self.videos.setup(stage)

    def train_cache_dir(self, r: int | None) -> Path:
        """The training split's cache folder for top-``r`` features."""
        if self.cache_root is None:
            raise ValueError("ViViTFineTuneDataModule: no cache_root, so no feature cache")
        return feature_cache_dir(self.cache_root, self.videos.name, self.videos.train_split, r)

    def use_train_cache(
        self, cache_dir: str | Path, r: int | None, expect: Mapping[str, Any] | None = None
    ) -> None:
        """Training reads the cache in ``cache_dir`` (written for top-``r``), which
        must have the manifest fields ``expect`` (e.g. the model's spatial config
        and weight hash) besides this data's dataset, split and ``r``."""
        self.train_cache = Path(cache_dir)
        self.train_expect = {
            "dataset": self.videos.name,
            "split": self.videos.train_split,
            "r": r,
            **(expect or {}),
        }

    def train_dataloader(self) -> DataLoader:
        """The cache given to :meth:`use_train_cache` (whole videos without ``cache_root``)."""
        if self.cache_root is None:
            return self.videos.train_dataloader()
        if self.train_cache is None:
            raise RuntimeError(
                "ViViTFineTuneDataModule: the training feature cache was not prepared. "
                "eventful_pl.lightning.vivit_module.ViViTFineTuning writes it at the start "
                "of fit; with another LightningModule write it first (python cli.py "
                "cache-features --config ...) and call use_train_cache(cache_dir, r)"
            )
        dataset = FeatureDataset(self.train_cache, self.train_views, self.train_expect)
        self.train_summary = dataset.summary()
        return training_loader(dataset, self.trainer, self.batch_size, self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self.videos.val_dataloader()

    def test_dataloader(self) -> DataLoader:
        return self.videos.test_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.videos.predict_dataloader()
