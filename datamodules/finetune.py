"""Data for ViViT temporal fine-tuning: cached spatial features for training, videos for evaluation.

Wraps a video data module (Kinetics-400, EPIC-Kitchens-100). Training reads
the frozen eventful spatial model's features from a cache
(:mod:`datamodules.features`), written on first use by the trainer's own model
(each rank writes its shard; an interrupted run resumes) and checked against
it (another model, r or weights is refused); without ``cache_root`` the
training items are whole videos and the spatial model runs on the fly (the
same items in the same order, so the same result). Validation and test are
whole videos, so the LightningModule can sweep test-time r::

    data:
      class_path: datamodules.finetune.ViViTFineTuneDataModule
      init_args:
        cache_root: outputs/features
        videos:
          class_path: datamodules.epic_kitchens.EpicKitchensDataModule
          init_args: {root: data/EPIC-KITCHENS, eval_short_side: 320}

The LightningModule must hold the network as ``.model`` (a FactorizedViViT)
and its training top-r as ``.r`` (:class:`eventful_pl.lightning.vivit_module.ViViTFineTuning`).
"""

from __future__ import annotations

from typing import Literal

import lightning as L
from torch.utils.data import DataLoader

from datamodules.common import training_loader
from datamodules.features import (
    DTYPES,
    FeatureDataset,
    feature_cache_dir,
    spatial_config,
    spatial_weights_hash,
    write_datamodule_features,
)
from datamodules.video import ClipDataModule
from eventful_pl.models.vivit import FactorizedViViT


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

    def _trainer_model(self) -> tuple[FactorizedViViT, int | None]:
        module = getattr(self.trainer, "lightning_module", None) if self.trainer else None
        model = getattr(module, "model", None)
        if not isinstance(model, FactorizedViViT):
            raise RuntimeError(
                "ViViTFineTuneDataModule: the trainer's LightningModule must hold a "
                "FactorizedViViT as .model (e.g. "
                "eventful_pl.lightning.vivit_module.ViViTFineTuning)"
            )
        return model, getattr(module, "r", None)

    def train_dataloader(self) -> DataLoader:
        """Writes what the cache lacks (this rank's shard), waits for every rank, reads it."""
        if self.cache_root is None:
            return self.videos.train_dataloader()
        model, r = self._trainer_model()
        split = self.videos.train_split
        write_datamodule_features(
            self.videos,
            split,
            model,
            r,
            self.cache_root,
            dtype=self.cache_dtype,
            num_workers=self.write_workers,
        )
        if self.trainer is not None:
            self.trainer.strategy.barrier("feature_cache")
        expect = {
            "dataset": self.videos.name,
            "split": split,
            "r": r,
            "spatial_config": spatial_config(model),
            "spatial_hash": spatial_weights_hash(model),
        }
        cache = feature_cache_dir(self.cache_root, self.videos.name, split, r)
        dataset = FeatureDataset(cache, self.train_views, expect)
        self.train_summary = dataset.summary()
        return training_loader(dataset, self.trainer, self.batch_size, self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self.videos.val_dataloader()

    def test_dataloader(self) -> DataLoader:
        return self.videos.test_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.videos.predict_dataloader()
