"""The on-disk format of the spatial-feature cache: layout, manifest, entries, skip records.

The cache holds the frozen eventful ViViT spatial model's per-view outputs
``FactorizedViViT.spatial_features(video) -> (V, T', D)``, one cache per
(dataset, split, r); :mod:`datamodules.features` reads it and
:mod:`eventful_pl.lightning.feature_cache` writes it. This module holds what
both sides share and that needs no model: the constants, the errors, the
folder layout, reading and checking the manifest, making and checking
entries (checksums) and reading skip records.

Layout of one cache (``feature_cache_dir(root, dataset, split, r)``)::

    <root>/<dataset>/<split>/r<r>/manifest.json   # model config, r, weight hash, items
    <root>/<dataset>/<split>/r<r>/<id>.pt         # {"features": (V, T', D), "label", "id",
                                                  #  "sha256", "shape", "dtype"}
    <root>/<dataset>/<split>/r<r>/<id>.skip       # JSON: why the video was skipped, and the
                                                  # video's size and mtime_ns at the time

Every entry is written to a temporary file and moved into place with
``os.replace``: a killed run leaves no half entry, and the next run resumes,
skipping the entries already there. The manifest records what made the
cache; a cache made by another model, r, weights, dataset, split, frame size
or item list is refused with :class:`FeatureCacheMismatch`. Under DDP each
rank writes its own shard (:func:`datamodules.common.shard`) of the entries.

Entries are verified, not trusted. Each records the SHA-256 of its features'
bytes, their shape and dtype; every read checks them, the manifest's feature
shape and dtype, the id and label, and that the features are finite. The
writer checks the entries it finds and rewrites a bad one (unreadable,
truncated, changed bytes, wrong shape, non-finite, or without a checksum:
written by an older version) from its video, warning with its path; a reader
meeting a bad entry raises :class:`FeatureCacheCorrupt` naming the file
(rerun the writer to repair the cache). Features that are not finite are
never cached: the video is recorded as skipped (reason ``non-finite
features``, warned and counted; re-tried by every run, as the model's
precision may have changed), and the writer stops if the first
``NONFINITE_STOP`` videos it computes all give non-finite features (the
model is broken, not the videos). A video skipped as missing or unreadable
is tried again by the next run once its file changes (size, modification
time, or it now exists).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from datamodules.video import ClipItem

FORMAT = 1
MANIFEST = "manifest.json"
#: Constructor arguments of FactorizedViViT that change the spatial outputs.
SPATIAL_KEYS = (
    "frames",
    "image_size",
    "tubelet",
    "dim",
    "spatial_depth",
    "heads",
    "mlp_ratio",
    "spatial_position_size",
    "temporal_stride",
    "temporal_views",
    "spatial_views",
    "mean",
    "std",
    "spatial_variant",
    "spatial_kwargs",
)
#: Manifest fields a cache must match to be reused or read.
CHECKED = ("format", "dataset", "split", "r", "spatial_config", "spatial_hash", "short_side")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
#: Keys of a cache entry.
ENTRY_KEYS = frozenset({"features", "label", "id", "sha256", "shape", "dtype"})
#: Skip reason of a video whose features are not finite.
NONFINITE = "non-finite features"
REPAIR = (
    "rerun the feature cache writer with the same settings (python cli.py cache-features, "
    "or eventful_pl.lightning.feature_cache.write_feature_cache): it checks every entry "
    "and rewrites bad ones from their videos"
)


class FeatureCacheMismatch(RuntimeError):
    """A feature cache was made with other settings than the ones asked for."""


class FeatureCacheIncomplete(RuntimeError):
    """A feature cache lacks entries (its writer was interrupted)."""


class FeatureCacheCorrupt(RuntimeError):
    """A file of a feature cache is unreadable or fails its checks; the message names it.

    ``path``: the file (None when the error was re-raised from a DataLoader worker).
    """

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = Path(path) if path is not None else None


# ------------------------------------------------------------------------ manifest


def feature_cache_dir(root: str | Path, dataset: str, split: str, r: int | None) -> Path:
    """``root/dataset/split/r<r>`` (``dense`` when r is None)."""
    return Path(root) / dataset / split / (f"r{r}" if r is not None else "dense")


def entry_key(item_id: str) -> str:
    """A file-name-safe key for an item id (unsafe ids get a hash suffix)."""
    key = re.sub(r"[^A-Za-z0-9_.-]", "_", item_id)
    if key != item_id or key.startswith("."):
        key = f"{key.lstrip('.')}-{hashlib.sha1(item_id.encode()).hexdigest()[:10]}"
    return key


def jsonable(value: Any) -> Any:
    """``value`` in JSON form (tensors as lists, other objects by ``repr``)."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Tensor):
        return value.tolist()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def read_manifest(cache_dir: str | Path) -> dict[str, Any]:
    """The manifest of a cache; FileNotFoundError if the folder holds no cache,
    FeatureCacheCorrupt (naming the file) if the manifest cannot be read."""
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"no feature cache at {cache_dir} ({MANIFEST} not found); write it first "
            "(python cli.py cache-features, or eventful_pl.lightning.feature_cache)"
        )
    problem = None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        problem = f"cannot be read ({error})"
    else:
        if not isinstance(manifest, dict):
            problem = f"is not a feature cache manifest (a JSON {type(manifest).__name__})"
        elif absent := [k for k in (*CHECKED, "items") if k not in manifest]:
            problem = f"is not a feature cache manifest (fields missing: {absent})"
        elif not isinstance(manifest["items"], list) or not all(
            isinstance(i, list) and len(i) == 2 for i in manifest["items"]
        ):
            problem = "is not a feature cache manifest (items must be [id, label] pairs)"
    if problem is not None:
        raise FeatureCacheCorrupt(
            f"feature cache manifest {path} {problem}. It records how the cache was made, "
            f"so the entries cannot be checked without it: delete the folder {cache_dir} "
            "and write the cache again",
            path,
        )
    return manifest


def check_manifest(
    found: Mapping[str, Any], expected: Mapping[str, Any], cache_dir: str | Path
) -> None:
    """Raises FeatureCacheMismatch naming every field of ``expected`` that differs."""
    differences = []
    for key, want in expected.items():
        have = found.get(key)
        if key == "items":
            have_ids = {i for i, _ in have or []}
            want_ids = {i for i, _ in want}
            if have != want:
                differences.append(
                    f"items: {len(want_ids - have_ids)} not in the cache, "
                    f"{len(have_ids - want_ids)} only in the cache"
                    + (", labels or order differ" if have_ids == want_ids else "")
                )
        elif key == "spatial_config" and have != want:
            keys = sorted(
                k for k in set(have or {}) | set(want) if (have or {}).get(k) != want.get(k)
            )
            detail = ", ".join(
                f"{k}: cache {(have or {}).get(k)!r} vs {want.get(k)!r}" for k in keys
            )
            differences.append(f"spatial_config ({detail})")
        elif have != want:
            differences.append(f"{key}: cache {have!r} vs {want!r}")
    if differences:
        raise FeatureCacheMismatch(
            f"feature cache {cache_dir} was made with other settings: "
            + "; ".join(differences)
            + ". Use another cache root or delete the folder to rebuild it."
        )


# ------------------------------------------------------------------------- entries


def features_sha256(features: Tensor) -> str:
    """SHA-256 of a tensor's bytes (as stored, in C order)."""
    value = features.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(value.view(torch.uint8).numpy()).hexdigest()


def make_entry(features: Tensor, label: int, item_id: str) -> dict[str, Any]:
    """A cache entry: the features with their checksum, shape and dtype."""
    features = features.contiguous()
    return {
        "features": features,
        "label": label,
        "id": item_id,
        "sha256": features_sha256(features),
        "shape": list(features.shape),
        "dtype": str(features.dtype).removeprefix("torch."),
    }


def _short(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__


def check_entry(
    path: str | Path,
    item_id: str | None = None,
    label: int | None = None,
    shape: Sequence[int] | None = None,
    dtype: str | None = None,
) -> tuple[dict[str, Any] | None, str | None]:
    """Loads one cache entry (``weights_only``) and checks it.

    Checks: it loads; it is an entry with a checksum; its id and label are
    ``item_id`` and ``label``; its features have the recorded and the expected
    ``shape`` and ``dtype`` (dtype name, e.g. ``"float16"``); their bytes have
    the recorded SHA-256; they are finite. (None: that check is left out.)

    Returns ``(entry, None)``, or ``(None, problem)`` with what is wrong.
    """
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, bad or unsafe pickle, I/O error
        return None, f"cannot be read ({_short(error)})"
    if not isinstance(entry, dict) or not {"features", "label", "id"} <= entry.keys():
        keys = sorted(map(str, entry)) if isinstance(entry, dict) else type(entry).__name__
        return None, f"is not a feature cache entry (holds {keys})"
    if not ENTRY_KEYS <= entry.keys():
        return None, "has no checksum (written by an older version of the writer): unverified"
    features = entry["features"]
    if not isinstance(features, Tensor):
        return None, f"holds features of type {type(features).__name__}, not a tensor"
    if item_id is not None and entry["id"] != item_id:
        return None, f"holds item {entry['id']!r}, not {item_id!r}"
    if label is not None and entry["label"] != label:
        return None, f"holds label {entry['label']!r}, not {label!r} (the manifest's)"
    have_shape, have_dtype = list(features.shape), str(features.dtype).removeprefix("torch.")
    if [have_shape, have_dtype] != [entry["shape"], entry["dtype"]]:
        return None, (
            f"holds features of shape {tuple(have_shape)} {have_dtype}, recorded as "
            f"{tuple(entry['shape'])} {entry['dtype']}"
        )
    if shape is not None and have_shape != list(shape):
        return None, f"holds features of shape {tuple(have_shape)}, not {tuple(shape)}"
    if dtype is not None and have_dtype != dtype:
        return None, f"holds {have_dtype} features, not {dtype}"
    if features_sha256(features) != entry["sha256"]:
        return None, "fails its checksum: its bytes changed after it was written"
    finite = torch.isfinite(features)
    if not bool(finite.all()):
        nan = int(features.isnan().sum())
        return None, f"holds non-finite features ({nan} NaN, {int((~finite).sum()) - nan} inf)"
    return entry, None


def video_state(path: str | Path) -> dict[str, Any]:
    """What a skip record keeps of its video: path, and size and mtime_ns, or absence."""
    try:
        stat = os.stat(path)
    except OSError:
        return {"path": str(path), "exists": False}
    return {"path": str(path), "exists": True, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _load_skip(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return None, f"cannot be read ({_short(error)})"
    if isinstance(record, dict) and isinstance(record.get("reason"), str):
        return record, None
    return None, "is not a skip record (no reason)"


def read_skip(path: str | Path) -> dict[str, Any]:
    """A skip record; FeatureCacheCorrupt naming the file if it cannot be read."""
    record, problem = _load_skip(Path(path))
    if record is None:
        raise FeatureCacheCorrupt(f"feature cache skip record {path} {problem}; {REPAIR}", path)
    return record


def _skip_is_current(record: Mapping[str, Any], item: ClipItem) -> bool:
    """Whether a skip still holds: same video (size, mtime) and not a non-finite skip."""
    return (
        record.get("id") == item.id
        and record["reason"] != NONFINITE
        and record.get("video") == video_state(item.path)
    )


def _warn_list(header: str, lines: Sequence[str], shown: int = 10) -> None:
    more = f"\n  ... and {len(lines) - shown} more" if len(lines) > shown else ""
    warnings.warn(header + "".join(f"\n  {line}" for line in lines[:shown]) + more, stacklevel=3)
