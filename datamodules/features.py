"""Cache of the frozen eventful ViViT spatial model's outputs, for temporal fine-tuning.

During temporal fine-tuning (DESIGN section 6) the spatial model is frozen, so
its per-view outputs ``FactorizedViViT.spatial_features(video) -> (V, T', D)``
are computed once per (dataset, split, r) and read back as ``(features, label)``.

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
:data:`NONFINITE_STOP` videos it computes all give non-finite features (the
model is broken, not the videos). A video skipped as missing or unreadable
is tried again by the next run once its file changes (size, modification
time, or it now exists).

This module is the reader (no model is built or run here): the layout, the
manifest checks that need no model, entry checks, :class:`FeatureDataset` and
:class:`FeatureDataModule`. The writer, which runs the spatial model, and the
manifest's model fields (spatial config, weight hash) live in the Lightning
layer, :mod:`eventful_pl.lightning.feature_cache`; their old names here still
work but are deprecated.

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

import hashlib
import json
import os
import re
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
from datamodules.video import ClipItem, limit_items

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
