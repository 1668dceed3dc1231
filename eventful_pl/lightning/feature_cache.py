"""Writing the spatial-feature cache: the Lightning-layer half of :mod:`datamodules.features`.

The frozen eventful spatial model of a :class:`~eventful_pl.models.vivit.FactorizedViViT`
computes each video's features once; this module runs it and writes them, in
the format of :mod:`datamodules.feature_entries`, which
:class:`~datamodules.features.FeatureDataset` reads. What needs the model lives
in the Lightning layer, so the data modules never build or run one. This
module holds the writer (:func:`write_feature_cache`,
:func:`write_datamodule_features`, :class:`CacheReport`), which resumes,
verifies what it finds and rewrites bad entries; it is also the place to
import the rest of the model's side from:

- the manifest's model fields (:func:`spatial_config`, :func:`spatial_weights_hash`,
  :func:`make_manifest`) and the check of a cache against a model
  (:func:`check_model`): :mod:`eventful_pl.lightning.feature_cache_model`;
- the hooks of fine-tuning (:func:`prepare_finetune_cache`,
  :func:`check_feature_datamodule`), called by
  :class:`~eventful_pl.lightning.vivit_module.ViViTFineTuning` once its
  pretrained weights are in place: :mod:`eventful_pl.lightning.feature_cache_hooks`.

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
from tqdm import tqdm

from datamodules.common import SkipLog, rank_and_world_size, shard, write_atomic
from datamodules.feature_entries import CHECKED as CHECKED
from datamodules.feature_entries import (
    DTYPES,
    NONFINITE,
    FeatureCacheMismatch,
    _load_skip,
    _skip_is_current,
    _warn_list,
    check_entry,
    entry_key,
    feature_cache_dir,
    make_entry,
    video_state,
)
from datamodules.feature_entries import FORMAT as FORMAT
from datamodules.feature_entries import MANIFEST as MANIFEST
from datamodules.feature_entries import SPATIAL_KEYS as SPATIAL_KEYS
from datamodules.feature_entries import check_manifest as check_manifest
from datamodules.feature_entries import jsonable as jsonable
from datamodules.feature_entries import read_manifest as read_manifest
from datamodules.transforms import ClipSampling
from datamodules.video import (
    ClipDataModule,
    ClipItem,
    VideoClipDataset,
    filter_readable,
    unique_items,
)
from eventful_pl.lightning.feature_cache_hooks import (
    check_feature_datamodule,
    prepare_finetune_cache,
)
from eventful_pl.lightning.feature_cache_model import (
    _ensure_manifest,
    check_model,
    make_manifest,
    spatial_config,
    spatial_weights_hash,
)
from eventful_pl.lightning.feature_cache_model import model_expectation as model_expectation
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

    Rank 0 shows a progress bar (tqdm, on stderr) over the videos it computes
    and every rank ends with a one-line summary (:meth:`CacheReport.summary`).
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
    progress = tqdm(
        loader,
        desc=f"caching {name} (rank {rank})" if world_size > 1 else f"caching {name}",
        total=len(readable),
        unit="video",
        disable=rank != 0,  # one bar: rank 0's shard
        dynamic_ncols=True,
    )
    try:
        with torch.inference_mode():
            for sample in progress:
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
        progress.close()
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
