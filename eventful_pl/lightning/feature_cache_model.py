"""The spatial model's side of a feature cache's manifest, and checks against a model.

A cache's manifest (format: :mod:`datamodules.feature_entries`) records which
spatial model made it. This module computes those fields from a
:class:`~eventful_pl.models.vivit.FactorizedViViT` (:func:`spatial_config`,
:func:`spatial_weights_hash`, :func:`make_manifest`, :func:`model_expectation`),
checks a cache against a model (:func:`check_model`), and writes or checks
the manifest of a cache about to be written (``_ensure_manifest``, used by
the writer, :mod:`eventful_pl.lightning.feature_cache`). All names are
importable from :mod:`eventful_pl.lightning.feature_cache` too.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from datamodules.common import write_atomic
from datamodules.feature_entries import (
    CHECKED,
    FORMAT,
    MANIFEST,
    SPATIAL_KEYS,
    check_manifest,
    jsonable,
    read_manifest,
)
from datamodules.video import ClipItem
from eventful_pl.models.vivit import FactorizedViViT


def spatial_config(model: FactorizedViViT) -> dict[str, Any]:
    """The constructor arguments that shape the spatial outputs (JSON form)."""
    return {key: jsonable(model.config.get(key)) for key in SPATIAL_KEYS}


def spatial_weights_hash(model: FactorizedViViT) -> str:
    """SHA-256 of the tubelet embedding and spatial ViT weights (names, shapes, values)."""
    digest = hashlib.sha256()
    for prefix, module in (("embedding.", model.embedding), ("spatial.", model.spatial)):
        for name, tensor in sorted(module.state_dict().items()):
            value = tensor.detach().cpu().contiguous()
            digest.update(f"{prefix}{name}:{value.dtype}:{tuple(value.shape)}".encode())
            digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def make_manifest(
    model: FactorizedViViT,
    r: int | None,
    dataset: str,
    split: str,
    items: Sequence[ClipItem],
    short_side: int | None,
    dtype: str,
) -> dict[str, Any]:
    """What a cache records about how it was made (see :mod:`datamodules.feature_entries`)."""
    return {
        "format": FORMAT,
        "dataset": dataset,
        "split": split,
        "r": r,
        "spatial_config": spatial_config(model),
        "spatial_hash": spatial_weights_hash(model),
        "short_side": short_side,
        "dtype": dtype,
        "feature_shape": [model.num_views, model.steps, model.dim],
        "model_config": jsonable(model.config),
        "items": [[item.id, item.label] for item in items],
    }


def check_model(cache_dir: str | Path, model: FactorizedViViT) -> None:
    """Refuses (FeatureCacheMismatch) a cache made by another spatial model or weights."""
    expected = {
        "spatial_config": spatial_config(model),
        "spatial_hash": spatial_weights_hash(model),
    }
    check_manifest(read_manifest(cache_dir), expected, cache_dir)


def _ensure_manifest(cache_dir: Path, manifest: dict[str, Any]) -> None:
    path = cache_dir / MANIFEST
    if path.is_file():
        wanted = {k: manifest[k] for k in (*CHECKED, "dtype", "items")}
        check_manifest(read_manifest(cache_dir), wanted, cache_dir)
        return
    cache_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(manifest, indent=1).encode()
    write_atomic(path, lambda f: f.write(text))


def model_expectation(model: FactorizedViViT) -> dict[str, Any]:
    """The manifest fields a cache must have to hold ``model``'s spatial features."""
    return {"spatial_config": spatial_config(model), "spatial_hash": spatial_weights_hash(model)}
