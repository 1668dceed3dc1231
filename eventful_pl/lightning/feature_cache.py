"""Writing the spatial-feature cache: the Lightning-layer half of :mod:`datamodules.features`.

The frozen eventful spatial model of a :class:`~eventful_pl.models.vivit.FactorizedViViT`
computes each video's features once; this module runs it and writes them, in
the layout that :mod:`datamodules.features` documents and reads
(:class:`~datamodules.features.FeatureDataset`). What needs the model lives
here, so the data modules never build or run one:

- the manifest's model fields (:func:`spatial_config`, :func:`spatial_weights_hash`,
  :func:`make_manifest`) and the check of a cache against a model (:func:`check_model`);
- the writer (:func:`write_feature_cache`, :func:`write_datamodule_features`),
  which resumes, verifies what it finds and rewrites bad entries;
- the hooks of fine-tuning: :func:`prepare_finetune_cache` writes the
  training cache of a :class:`~datamodules.finetune.ViViTFineTuneDataModule`
  on first use (each DDP rank its shard, then a barrier) and hands it to the
  data module; :func:`check_feature_datamodule` checks the caches of a
  :class:`~datamodules.features.FeatureDataModule` against the trainer's model.
  :class:`~eventful_pl.lightning.vivit_module.ViViTFineTuning` calls both once
  its pretrained weights are in place.

From the command line (the same YAML config as ``fit``)::

    python cli.py cache-features --config configs/demo.yaml --splits train val

Usage from Python::

    from datamodules.features import FeatureDataModule
    from datamodules.kinetics import KineticsDataModule
    from eventful_pl.lightning.feature_cache import write_datamodule_features
    from eventful_pl.models.vivit import create_vivit

    model = create_vivit("vivit_b_kinetics400", spatial_variant="full")  # + checkpoint
    data = KineticsDataModule("/data/kinetics400")
    write_datamodule_features(data, "val", model, r=24, cache_root="/cache")
    features = FeatureDataModule("/cache", "kinetics400", r=24, val_split="val")
    features.setup("validate")
"""

from __future__ import annotations

import glob
import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader

from datamodules.common import SkipLog, rank_and_world_size, shard, write_atomic
from datamodules.features import (
    CHECKED,
    DTYPES,
    FORMAT,
    MANIFEST,
    NONFINITE,
    SPATIAL_KEYS,
    FeatureCacheMismatch,
    _load_skip,
    _skip_is_current,
    _warn_list,
    check_entry,
    check_manifest,
    entry_key,
    feature_cache_dir,
    jsonable,
    make_entry,
    read_manifest,
    video_state,
)
from datamodules.transforms import ClipSampling
from datamodules.video import (
    ClipDataModule,
    ClipItem,
    VideoClipDataset,
    filter_readable,
    unique_items,
)
from eventful_pl.models.vivit import FactorizedViViT
from eventful_pl.policies import TopRPolicy

#: The writer stops when this many videos it computes give non-finite features
#: before any gives finite ones.
NONFINITE_STOP = 8

__all__ = [
    "NONFINITE_STOP",
    "CacheReport",
    "FeatureCacheMismatch",
    "check_feature_datamodule",
    "check_model",
    "make_manifest",
    "prepare_finetune_cache",
    "spatial_config",
    "spatial_weights_hash",
    "write_datamodule_features",
    "write_feature_cache",
]

# ------------------------------------------------------------------------ manifest


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
    """What a cache records about how it was made (see module docstring)."""
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


# -------------------------------------------------------------------------- writer


@dataclass
class CacheReport:
    """What one rank's writer did and found.

    ``written``: entries written by this run (new, or replacing bad ones);
    ``rewritten``: of those, the ones that replaced a bad entry;
    ``existing``: entries found and verified; ``skipped``: this shard's
    skipped videos by reason (this run's and earlier runs'), of which
    ``skipped_earlier`` were recorded by earlier runs; ``retried``: videos
    skipped by an earlier run and tried again (changed since, or non-finite);
    ``bad``: ``"path: problem"`` of each bad entry or skip record found (removed).
    ``written + existing + sum(skipped.values()) == shard_size``.
    """

    path: Path
    shard_size: int
    written: int = 0
    existing: int = 0
    skipped: Counter = field(default_factory=Counter)
    rewritten: int = 0
    skipped_earlier: int = 0
    retried: int = 0
    bad: list[str] = field(default_factory=list)

    @property
    def with_features(self) -> int:
        """Items of this shard that have features in the cache."""
        return self.written + self.existing

    def summary(self) -> str:
        skipped = sum(self.skipped.values())
        detail = [f"{self.skipped_earlier} from earlier runs"] if self.skipped_earlier else []
        if self.skipped:
            detail.append(", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())))
        text = f"feature cache {self.path}: {self.shard_size} items in this shard, "
        text += f"{self.written} written"
        if self.rewritten:
            text += f" ({self.rewritten} rewritten: bad entries)"
        text += f", {self.existing} already there, {skipped} skipped"
        text += f" ({'; '.join(detail)})" if detail else ""
        if self.retried:
            text += f", {self.retried} earlier skips retried"
        return text + f"; {self.with_features} of {self.shard_size} items have features"


def write_feature_cache(
    model: FactorizedViViT,
    items: Sequence[ClipItem],
    cache_dir: str | Path,
    dataset: str,
    split: str,
    r: int | None,
    short_side: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    dtype: Literal["float16", "bfloat16", "float32"] = "float16",
    num_workers: int = 0,
    probe_workers: int = 8,
) -> CacheReport:
    """Writes this rank's share of ``items`` as spatial features ``(V, T', D)``.

    Args:
        model: The ViViT whose spatial half makes the features (it stays on its
            device and is left with the policy ``TopRPolicy(r)``).
        items: Every item of the split (all ranks pass the same list).
        cache_dir: The cache folder (see :func:`feature_cache_dir`).
        dataset: Dataset name recorded in the manifest.
        split: Split name recorded in the manifest.
        r: Tokens per frame of the eventful spatial model (None: leave the policy).
        short_side: Short side the whole clips are resized to before the model's
            preprocessing (None: the model's crop short side; 0: decoded size).
        rank: This rank (default: torch.distributed's).
        world_size: Number of ranks (default: torch.distributed's).
        dtype: Storage dtype of the features.
        num_workers: DataLoader workers decoding the videos.
        probe_workers: Threads opening videos (and checking entries) before decoding.

    Entries already written are checked (:func:`check_entry`) and kept; bad
    ones are removed (warned, with their paths, in ``report.bad``) and computed
    again. Videos recorded as skipped are not tried again unless their file
    changed (or the skip was for non-finite features). Non-finite features
    are never written: the video is recorded as skipped; RuntimeError if the
    first :data:`NONFINITE_STOP` videos computed all give non-finite features.
    Raises FeatureCacheMismatch if the folder holds a cache made otherwise.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if short_side is None:
        short_side = min(model.preprocessing.size)
    if rank is None and world_size is None:
        rank, world_size = rank_and_world_size()
    rank, world_size = rank or 0, world_size or 1
    cache_dir = Path(cache_dir)
    items = unique_items(items)  # the first of each id, as the data modules keep
    manifest = make_manifest(model, r, dataset, split, items, short_side, dtype)
    _ensure_manifest(cache_dir, manifest)

    mine = shard(items, rank, world_size)
    report = CacheReport(cache_dir, len(mine))
    todo: set[str] = set()  # ids to compute
    found = []  # items with an entry, to check
    for item in mine:
        key = entry_key(item.id)
        for suffix in ("pt", "skip"):  # temporary files of this shard left by a killed run
            for stale in cache_dir.glob(f".{glob.escape(key)}.{suffix}.*tmp"):
                stale.unlink(missing_ok=True)
        skip_path = cache_dir / f"{key}.skip"
        if (cache_dir / f"{key}.pt").is_file():
            found.append(item)
        elif skip_path.is_file():
            record, problem = _load_skip(skip_path)
            if record is None:
                report.bad.append(f"{skip_path}: skip record {problem}")
                skip_path.unlink(missing_ok=True)
                todo.add(item.id)
            elif _skip_is_current(record, item):
                report.skipped[record["reason"]] += 1
                report.skipped_earlier += 1
            else:  # the video changed since (or the skip was for non-finite features)
                report.retried += 1
                todo.add(item.id)
        else:
            todo.add(item.id)

    def check(item: ClipItem) -> str | None:
        path = cache_dir / f"{entry_key(item.id)}.pt"
        return check_entry(path, item.id, item.label, manifest["feature_shape"], dtype)[1]

    with ThreadPoolExecutor(max(1, probe_workers)) as pool:
        problems = list(pool.map(check, found))
    bad_entries = set()
    for item, problem in zip(found, problems):
        key = entry_key(item.id)
        if problem is None:
            report.existing += 1
            (cache_dir / f"{key}.skip").unlink(missing_ok=True)  # the entry supersedes it
            continue
        path = cache_dir / f"{key}.pt"
        report.bad.append(f"{path}: {problem}")
        path.unlink(missing_ok=True)
        bad_entries.add(item.id)
        todo.add(item.id)
    if report.bad:
        _warn_list(
            f"feature cache {cache_dir}: {len(report.bad)} bad entries or skip records "
            "removed; computing them again from their videos:",
            report.bad,
        )

    name = f"{dataset} {split} features"
    log = SkipLog(name)

    def record_skip(item: ClipItem, reason: str, message: str) -> None:
        record = {"id": item.id, "reason": reason, "message": message}
        text = json.dumps({**record, "video": video_state(item.path)}).encode()
        key = entry_key(item.id)
        write_atomic(cache_dir / f"{key}.skip", lambda f: f.write(text))
        (cache_dir / f"{key}.pt").unlink(missing_ok=True)
        report.skipped[reason] += 1

    todo_items = [item for item in mine if item.id in todo]
    readable = filter_readable(todo_items, log, True, probe_workers, on_skip=record_skip)
    if not readable:
        rank_zero_info(report.summary())
        return report
    sampling = ClipSampling(eval_short_side=short_side or None)
    videos = VideoClipDataset(readable, "eval", sampling, name, open_readers=2)
    # spawn: decord's probe threads in this process make forked workers deadlock.
    context = "spawn" if num_workers > 0 else None
    loader = DataLoader(
        videos, batch_size=None, num_workers=num_workers, multiprocessing_context=context
    )
    by_id = {item.id: item for item in readable}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    if r is not None:
        model.set_policy(TopRPolicy(r))
    nonfinite = 0  # videos of this run with non-finite features, before any finite
    try:
        with torch.inference_mode():
            for sample in loader:
                item = by_id[sample["id"]]
                if sample["video"] is None:
                    record_skip(item, "unreadable", f"{item.path}: cannot decode")
                    continue
                video = sample["video"].to(device)[None]  # (1, T, C, H, W) uint8
                computed = model.spatial_features(video)[0]
                features = computed.to(DTYPES[dtype]).cpu().contiguous()
                if not bool(torch.isfinite(features).all()):
                    message = _nonfinite_message(item, computed, dtype)
                    log.skip(NONFINITE, message)
                    record_skip(item, NONFINITE, message)
                    nonfinite += 1
                    if nonfinite >= NONFINITE_STOP and report.written == 0:
                        raise RuntimeError(
                            f"feature cache {cache_dir}: the spatial model gave non-finite "
                            f"features for each of the {nonfinite} videos computed so far "
                            f"(the last: {message}); none of them was cached. Check the "
                            "model's weights and precision (or the cache dtype), then run "
                            "the writer again (it tries these videos again)"
                        )
                    continue
                key = entry_key(item.id)
                entry = make_entry(features, item.label, item.id)
                write_atomic(cache_dir / f"{key}.pt", lambda f, e=entry: torch.save(e, f))
                (cache_dir / f"{key}.skip").unlink(missing_ok=True)  # a retried skip
                report.written += 1
                report.rewritten += item.id in bad_entries
    finally:
        model.train(was_training)
    rank_zero_info(report.summary())
    return report


def _nonfinite_message(item: ClipItem, computed: Tensor, dtype: str) -> str:
    finite = torch.isfinite(computed)
    if bool(finite.all()):  # finite in the model's precision, not in the storage dtype
        largest = float(computed.abs().max())
        return (
            f"{item.path}: features overflow {dtype} (largest |value| {largest:.4g}); "
            "write the cache with dtype float32 or bfloat16"
        )
    return (
        f"{item.path}: the spatial model gave {int((~finite).sum())} non-finite values "
        f"(NaN or inf) of {finite.numel()}"
    )


def write_datamodule_features(
    datamodule: ClipDataModule,
    split: str,
    model: FactorizedViViT,
    r: int | None,
    cache_root: str | Path,
    **kwargs: Any,
) -> CacheReport:
    """:func:`write_feature_cache` for a split of a video data module.

    The cache goes to ``feature_cache_dir(cache_root, datamodule.name, split, r)``;
    clips are resized like the data module's evaluation clips; the rank comes
    from the data module. The items are the data module's
    :meth:`~datamodules.video.ClipDataModule.split_items` in its order (for its
    training split, the ``train_limit`` subset), so a :class:`FeatureDataModule`
    lists them in the same order as the data module's datasets.
    ``kwargs`` go to :func:`write_feature_cache`.
    """
    rank, world = datamodule.rank_and_world_size()
    kwargs.setdefault("rank", rank)
    kwargs.setdefault("world_size", world)
    kwargs.setdefault("short_side", datamodule.sampling.eval_short_side or 0)
    return write_feature_cache(
        model,
        datamodule.split_items(split, train=split == datamodule.train_split),
        feature_cache_dir(cache_root, datamodule.name, split, r),
        datamodule.name,
        split,
        r,
        **kwargs,
    )


# ---------------------------------------------------------------- under a Trainer


def model_expectation(model: FactorizedViViT) -> dict[str, Any]:
    """The manifest fields a cache must have to hold ``model``'s spatial features."""
    return {"spatial_config": spatial_config(model), "spatial_hash": spatial_weights_hash(model)}


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
