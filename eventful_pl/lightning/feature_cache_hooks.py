"""Hooks of fine-tuning under a Trainer: write the training feature cache, check caches.

:func:`prepare_finetune_cache` writes the training cache of a
:class:`~datamodules.finetune.ViViTFineTuneDataModule` on first use (each DDP
rank its shard, then a barrier) and hands it to the data module;
:func:`check_feature_datamodule` checks the caches of a
:class:`~datamodules.features.FeatureDataModule` against the trainer's model.
:class:`~eventful_pl.lightning.vivit_module.ViViTFineTuning` calls both once
its pretrained weights are in place. Both are importable from
:mod:`eventful_pl.lightning.feature_cache` too (the writer they use lives there).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datamodules.feature_entries import check_manifest
from eventful_pl.lightning.feature_cache_model import model_expectation
from eventful_pl.models.vivit import FactorizedViViT


def prepare_finetune_cache(trainer: Any, model: FactorizedViViT, r: int | None) -> Path | None:
    """Writes what the training cache of the trainer's fine-tuning data lacks, then hands it over.

    For a :class:`~datamodules.finetune.ViViTFineTuneDataModule` with a
    ``cache_root``: each rank writes its shard of the training split's entries
    (an interrupted run resumes; bad entries are rewritten), every rank waits
    at a barrier, and the data module is told to read the cache, which must
    hold ``model``'s features (another model, r or weights is refused with
    :class:`~datamodules.features.FeatureCacheMismatch`). Returns the cache
    folder; None (nothing done) for other data modules or without a cache.

    Call it once the model's final weights are in place (after ``pretrained``
    or a checkpoint was loaded) and the model is on its device.
    """
    from datamodules.finetune import ViViTFineTuneDataModule
    from eventful_pl.lightning.feature_cache import write_datamodule_features  # it imports us

    data = getattr(trainer, "datamodule", None) if trainer is not None else None
    if not isinstance(data, ViViTFineTuneDataModule) or data.cache_root is None:
        return None
    videos = data.videos
    split = videos.train_split
    write_datamodule_features(
        videos,
        split,
        model,
        r,
        data.cache_root,
        dtype=data.cache_dtype,
        num_workers=data.write_workers,
    )
    trainer.strategy.barrier("feature_cache")
    cache = data.train_cache_dir(r)
    data.use_train_cache(cache, r, model_expectation(model))
    return cache


def check_feature_datamodule(
    trainer: Any, model: FactorizedViViT, checked: set[Path] | None = None
) -> None:
    """Refuses (FeatureCacheMismatch) the caches of the trainer's
    :class:`~datamodules.features.FeatureDataModule` (when its
    ``check_trainer_model`` is on) if ``model``'s spatial config or weights
    did not make them. Nothing for other data modules. ``checked``: cache
    folders already checked (skipped; the ones checked now are added)."""
    from datamodules.features import FeatureDataModule

    data = getattr(trainer, "datamodule", None) if trainer is not None else None
    if not isinstance(data, FeatureDataModule) or not data.check_trainer_model:
        return
    expected = None
    for dataset in data.datasets.values():
        if checked is not None and dataset.cache_dir in checked:
            continue
        expected = expected or model_expectation(model)
        check_manifest(dataset.manifest, expected, dataset.cache_dir)
        if checked is not None:
            checked.add(dataset.cache_dir)
