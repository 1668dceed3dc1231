"""Reading the spatial-feature cache: :class:`FeatureDataset` and :class:`FeatureDataModule`.

During temporal fine-tuning (docs/training-protocol.md) the spatial model is frozen, so
its per-view outputs ``FactorizedViViT.spatial_features(video) -> (V, T', D)``
are computed once per (dataset, split, r) and read back as ``(features, label)``.

This module is the reader (no model is built or run here). The on-disk format
(layout, manifest checks that need no model, entry checksums and checks, skip
records) lives in :mod:`datamodules.feature_entries`; its names are importable
from here too. The writer, which runs the spatial model, and the manifest's
model fields (spatial config, weight hash) live in the Lightning layer,
:mod:`eventful_pl.lightning.feature_cache`; their old names here still work
but are deprecated.

Usage::

    from datamodules.features import FeatureDataModule
    from datamodules.kinetics import KineticsDataModule
    from eventful_pl.lightning.feature_cache import write_datamodule_features
    from eventful_pl.models.vivit import create_vivit

    model = create_vivit("vivit_b_kinetics400", spatial_variant="full")  # + checkpoint
    data = KineticsDataModule("/data/kinetics400")
    write_datamodule_features(data, "val", model, r=24, cache_root="/cache")
    features = FeatureDataModule("/cache", "kinetics400", r=24, val_split="val")
    features.setup("validate")
    x, y = next(iter(features.val_dataloader()))  # (B, V, T', D) float32, (B,) int64

Command line (the same YAML config as ``fit``): ``python cli.py cache-features --help``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from datamodules.common import SkipLog, eval_loader, rank_and_world_size, shard, training_loader
from datamodules.feature_entries import (
    CHECKED,
    DTYPES,
    ENTRY_KEYS,
    FORMAT,
    MANIFEST,
    NONFINITE,
    REPAIR,
    SPATIAL_KEYS,
    FeatureCacheCorrupt,
    FeatureCacheIncomplete,
    FeatureCacheMismatch,
    _warn_list,
    check_entry,
    check_manifest,
    entry_key,
    feature_cache_dir,
    features_sha256,
    jsonable,
    make_entry,
    read_manifest,
    read_skip,
    video_state,
)
from datamodules.feature_entries import _load_skip as _load_skip
from datamodules.feature_entries import _short as _short
from datamodules.feature_entries import _skip_is_current as _skip_is_current
from datamodules.video import ClipItem as ClipItem
from datamodules.video import limit_items

#: The reader, and the cache format re-exported from :mod:`datamodules.feature_entries`
#: (names imported ``as`` themselves are kept importable from here as before the split).
__all__ = [
    "CHECKED",
    "DTYPES",
    "ENTRY_KEYS",
    "FORMAT",
    "MANIFEST",
    "MOVED",
    "NONFINITE",
    "REPAIR",
    "SPATIAL_KEYS",
    "FeatureCacheCorrupt",
    "FeatureCacheIncomplete",
    "FeatureCacheMismatch",
    "FeatureDataModule",
    "FeatureDataset",
    "check_entry",
    "check_manifest",
    "entry_key",
    "feature_cache_dir",
    "features_sha256",
    "jsonable",
    "make_entry",
    "read_manifest",
    "read_skip",
    "video_state",
]

#: Names that moved to :mod:`eventful_pl.lightning.feature_cache` (they need the model).
MOVED = frozenset(
    {
        "NONFINITE_STOP",
        "CacheReport",
        "check_model",
        "make_manifest",
        "spatial_config",
        "spatial_weights_hash",
        "write_datamodule_features",
        "write_feature_cache",
    }
)


def __getattr__(name: str) -> Any:
    """Deprecated aliases of the names that moved to the Lightning layer."""
    if name in MOVED:
        warnings.warn(
            f"datamodules.features.{name} moved to eventful_pl.lightning.feature_cache."
            f"{name} (data modules no longer run models); import it from there",
            DeprecationWarning,
            stacklevel=2,
        )
        from eventful_pl.lightning import feature_cache

        return getattr(feature_cache, name)
    if name == "main":
        warnings.warn(
            "datamodules.features.main is replaced by `python cli.py cache-features "
            "--config <fit config>`",
            DeprecationWarning,
            stacklevel=2,
        )
        return _main_moved
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _main_moved(argv: Sequence[str] | None = None) -> None:
    raise SystemExit(
        "python -m datamodules.features is replaced by `python cli.py cache-features "
        "--config <the fit config> [--splits ...]`: it reads the same YAML (model + data) "
        "as fit and writes the caches of the configured splits"
    )


# -------------------------------------------------------------------------- reader


class FeatureDataset(Dataset):
    """Cached spatial features: ``(features, label)`` per item.

    Args:
        cache_dir: A cache folder (see :func:`feature_cache_dir`).
        views: ``"all"``: features ``(V, T', D)``; ``"random"``: one random view
            ``(1, T', D)`` per access (an augmentation for training).
        expect: Manifest fields the cache must have (e.g. ``{"r": 24}``);
            FeatureCacheMismatch otherwise.
        rank: Keep this rank's shard of the items ...
        world_size: ... out of this many (1: every item).
        limit: Keep a fixed random subset of this many manifest items (as the
            video data modules' ``train_limit``; None: all).
        seed: Seed of that subset.

    Items: ``(features float32, label int)``, in manifest order (the order of
    the video data module's dataset of the split): the ``limit`` subset, then
    this rank's shard (:func:`datamodules.common.shard`), then without the
    skipped videos, as the video data modules do. Raises
    FeatureCacheIncomplete if an entry of the manifest was never written.

    Each entry is checked when read (:func:`check_entry`: checksum, shape,
    dtype, id, label, finite values); a bad one raises FeatureCacheCorrupt
    naming the file (rerun the writer: it rewrites bad entries). Setup warns
    when a skipped video's file changed since it was skipped (rerun the writer
    to add it); :meth:`summary` gives how many listed items are used.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        views: Literal["all", "random"] = "all",
        expect: Mapping[str, Any] | None = None,
        rank: int = 0,
        world_size: int = 1,
        limit: int | None = None,
        seed: int = 0,
    ) -> None:
        if views not in ("all", "random"):
            raise ValueError(f"views must be 'all' or 'random', got {views!r}")
        self.cache_dir = Path(cache_dir)
        self.views = views
        self.manifest = read_manifest(self.cache_dir)
        if expect:
            check_manifest(self.manifest, expect, self.cache_dir)
        names = set(os.listdir(self.cache_dir))
        absent = [
            item_id
            for item_id, _ in self.manifest["items"]
            if f"{entry_key(item_id)}.pt" not in names and f"{entry_key(item_id)}.skip" not in names
        ]
        if absent:
            raise FeatureCacheIncomplete(
                f"feature cache {self.cache_dir} is incomplete: {len(absent)} of "
                f"{len(self.manifest['items'])} entries not written (e.g. {absent[:3]}); "
                "run the writer again to finish it (it resumes)"
            )
        name = f"{self.manifest['dataset']} {self.manifest['split']} features"
        name += f" (r={self.manifest['r']})"
        self.skip_log = SkipLog(
            name + (f" (rank {rank} of {world_size})" if world_size > 1 else "")
        )
        shape = self.manifest.get("feature_shape")
        self._expected = (list(shape) if shape else None, self.manifest.get("dtype"))
        #: ``(entry key, label, item id)`` of each item, in dataset order.
        self.items: list[tuple[str, int, str]] = []
        listed = shard(limit_items(self.manifest["items"], limit, seed), rank, world_size)
        #: Items of the manifest this dataset lists (limit subset, rank shard).
        self.listed = len(listed)
        #: Videos skipped by the writer whose files changed since (rerun it to add them).
        self.changed_skips: list[str] = []
        for item_id, label in listed:
            key = entry_key(item_id)
            if f"{key}.pt" in names:
                self.items.append((key, int(label), item_id))
                continue
            record = read_skip(self.cache_dir / f"{key}.skip")
            self.skip_log.reasons[record["reason"]] += 1  # warned when written
            video = record.get("video")
            if isinstance(video, dict) and video != video_state(video.get("path", "")):
                self.changed_skips.append(str(video.get("path")))
        if self.changed_skips:
            _warn_list(
                f"{self.skip_log.dataset}: {len(self.changed_skips)} videos skipped by the "
                f"feature cache writer changed since; rerun the writer to add them to "
                f"{self.cache_dir}:",
                self.changed_skips,
                shown=3,
            )

    def __len__(self) -> int:
        return len(self.items)

    @property
    def ids(self) -> list[str]:
        """The item ids in dataset order."""
        return [item_id for _, _, item_id in self.items]

    def summary(self) -> str:
        """E.g. ``"kinetics400 val features (r=24): 10 of 12 listed items used, 2 skipped
        (missing: 1, unreadable: 1)"``."""
        detail = ", ".join(f"{k}: {n}" for k, n in sorted(self.skip_log.reasons.items()))
        text = f"{self.skip_log.dataset}: {len(self.items)} of {self.listed} listed items used, "
        text += f"{self.skip_log.total} skipped" + (f" ({detail})" if detail else "")
        if self.changed_skips:
            text += f"; {len(self.changed_skips)} skipped videos changed since: rerun the writer"
        return text

    def load(self, index: int) -> dict[str, Any]:
        """The checked entry of item ``index``; FeatureCacheCorrupt naming the file if bad."""
        key, label, item_id = self.items[index]
        path = self.cache_dir / f"{key}.pt"
        entry, problem = check_entry(path, item_id, label, *self._expected)
        if entry is None:
            raise FeatureCacheCorrupt(f"feature cache entry {path} {problem}; {REPAIR}", path)
        return entry

    def __getitem__(self, index: int) -> tuple[Tensor, int, str]:
        """``(features (V, T', D) float32, label, id)`` (V = 1 with ``views="random"``)."""
        item_id, label, _ = self.items[index]
        features = self.load(index)["features"].float()  # (V, T', D)
        if self.views == "random":
            view = int(torch.randint(features.shape[0], ()))
            features = features[view : view + 1]
        return features, label, item_id


class FeatureDataModule(L.LightningDataModule):
    """Cached spatial features for temporal fine-tuning (one cache per split and r).

    Batches: ``(features (B, V, T', D) float32, label (B,) int64, ids [B])`` (V = 1 in
    training with ``train_views="random"``). Evaluation splits are sharded by
    rank (nothing repeated); training uses Lightning's sampler. This data module
    runs no model: with ``check_trainer_model``, the LightningModule checks the
    caches against its spatial model (config and weights) once its weights are
    in place (:func:`eventful_pl.lightning.feature_cache.check_feature_datamodule`,
    called by :class:`~eventful_pl.lightning.vivit_module.ViViTFineTuning`), so
    features of another model are refused.

    The datasets list their items in the order of the video data module's
    datasets of the same splits (same ``train_limit``/``seed``, same rank
    shards), so with the same seed, training from the cache and from whole
    videos (``train_clips="whole"``) draws the same items in the same order.

    Args:
        cache_root: Root the caches were written under.
        dataset: Dataset name (e.g. ``kinetics400``, ``epic_kitchens100``).
        r: Top-r of the eventful spatial model that made the cache (None: dense).
        train_split: Training split.
        val_split: Validation split.
        test_split: Test split (None: the validation split).
        batch_size: Training items per batch.
        eval_batch_size: Evaluation items per batch.
        num_workers: DataLoader workers.
        train_views: ``"all"`` views or one ``"random"`` view per training item.
        train_limit: Use only this many training items: the same fixed random
            subset as a video data module's ``train_limit`` with the same
            ``seed`` (a cache written from such a data module already holds
            only that subset; then this is a no-op). None: all.
        seed: Seed of the training subset.
        check_trainer_model: Let the LightningModule check the caches against its model.
        pin_memory: DataLoader ``pin_memory``.
        rank: This process's rank (default: from torch.distributed).
        world_size: Number of ranks (default: from torch.distributed).
    """

    def __init__(
        self,
        cache_root: str,
        dataset: str,
        r: int | None,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str | None = None,
        batch_size: int = 16,
        eval_batch_size: int = 64,
        num_workers: int = 2,
        train_views: Literal["all", "random"] = "all",
        check_trainer_model: bool = True,
        pin_memory: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        train_limit: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.cache_root, self.dataset, self.r = Path(cache_root), dataset, r
        self.train_split, self.val_split = train_split, val_split
        self.test_split = test_split or val_split
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.train_views, self.check_trainer_model = train_views, check_trainer_model
        self.rank, self.world_size = rank, world_size
        self.train_limit, self.seed = train_limit, seed
        self.datasets: dict[str, FeatureDataset] = {}
        #: What setup found and skipped, by split.
        self.summaries: dict[str, str] = {}

    def cache_dir(self, split: str) -> Path:
        return feature_cache_dir(self.cache_root, self.dataset, split, self.r)

    def setup(self, stage: str | None = None) -> None:
        roles = {
            "fit": [("train", self.train_split), ("val", self.val_split)],
            "validate": [("val", self.val_split)],
            "test": [("test", self.test_split)],
            "predict": [("test", self.test_split)],
        }[stage or "fit"]
        if self.rank is not None or self.world_size is not None:
            rank, world = self.rank or 0, self.world_size or 1
        else:
            rank, world = rank_and_world_size()
        for role, split in roles:
            if role in self.datasets:
                continue
            expect = {"dataset": self.dataset, "split": split, "r": self.r}
            if role == "train":
                dataset = FeatureDataset(
                    self.cache_dir(split),
                    self.train_views,
                    expect,
                    limit=self.train_limit,
                    seed=self.seed,
                )
            else:
                dataset = FeatureDataset(self.cache_dir(split), "all", expect, rank, world)
            self.datasets[role] = dataset
            self.summaries[split] = dataset.summary()
            rank_zero_info(dataset.summary())

    def _dataset(self, role: str) -> FeatureDataset:
        if role not in self.datasets:
            raise RuntimeError(f"FeatureDataModule: call setup() before the {role} dataloader")
        return self.datasets[role]

    def train_dataloader(self) -> DataLoader:
        return training_loader(
            self._dataset("train"),
            self.trainer,
            self.batch_size,
            self.num_workers,
            pin_memory=self.pin_memory,
        )

    def _eval_loader(self, role: str) -> DataLoader:
        dataset = self._dataset(role)
        return eval_loader(
            dataset, self.eval_batch_size, self.num_workers, pin_memory=self.pin_memory
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")


if __name__ == "__main__":
    _main_moved()
