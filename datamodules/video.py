"""``ClipDataModule``: the shared base of the video data modules (Kinetics, EPIC-Kitchens).

It lists a split's items (subclass), skips unreadable videos, shards
evaluation splits by rank and makes the loaders. The pieces it uses live in

- :mod:`datamodules.video_io`: decord reading and probing (``VideoReadError``,
  ``VideoInfo``, ``open_video``, ``probe_video``, ``read_frames``,
  ``ReaderCache``, ``probe_videos``);
- :mod:`datamodules.clips`: clip items and datasets (``ClipItem``,
  ``filter_readable``, ``unique_items``, ``limit_items``,
  ``VideoClipDataset``, ``collate_train``, ``collate_eval``, ``CLIPPED``).

Every one of those names is re-exported here, so existing imports keep working::

    from datamodules.video import ClipItem, VideoClipDataset, probe_video, read_frames
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning as L
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import DataLoader

from datamodules.clips import (
    CLIPPED,
    ClipItem,
    Mode,
    VideoClipDataset,
    collate_eval,
    collate_train,
    filter_readable,
    limit_items,
    unique_items,
)
from datamodules.clips import T as T  # re-exported with the rest
from datamodules.common import (
    LocalShardSampler as LocalShardSampler,  # re-exported: it lived here before common.py
)
from datamodules.common import (
    SkipLog,
    check_start_method,
    eval_loader,
    rank_and_world_size,
    shard,
    training_loader,
)
from datamodules.transforms import ClipSampling
from datamodules.video_io import (
    ReaderCache,
    VideoInfo,
    VideoReadError,
    open_video,
    probe_video,
    probe_videos,
    read_frames,
)

__all__ = [
    "CLIPPED",
    "ClipDataModule",
    "ClipItem",
    "LocalShardSampler",
    "Mode",
    "ReaderCache",
    "TrainClips",
    "VideoClipDataset",
    "VideoInfo",
    "VideoReadError",
    "collate_eval",
    "collate_train",
    "filter_readable",
    "limit_items",
    "open_video",
    "probe_video",
    "probe_videos",
    "read_frames",
    "unique_items",
]

TrainClips = Literal["random", "whole"]


# ---------------------------------------------------------------------- data module


class ClipDataModule(L.LightningDataModule):
    """Shared machinery of the video data modules: setup, skipping, sharding, loaders.

    A subclass lists a split's items in :meth:`load_items`; this class skips
    missing/unreadable videos (``summaries`` says how many), shards evaluation
    splits by rank and makes the loaders. Train batches come from
    :func:`collate_train` (``train_clips="random"``) or, like evaluation
    batches, from :func:`collate_eval` (``train_clips="whole"``).

    Item order: a split's dataset lists :meth:`split_items` (the annotation
    order, repeated ids dropped, the ``train_limit`` subset for training) minus
    the unreadable items; an evaluation dataset holds this rank's shard of that
    list, taken before the unreadable items are dropped. The feature cache
    (:mod:`datamodules.features`) lists its items in the same order.

    The options below are those of every video data module: the subclasses
    (:class:`~datamodules.kinetics.KineticsDataModule`,
    :class:`~datamodules.epic_kitchens.EpicKitchensDataModule`) take them as
    ``**kwargs`` and pass them on, so they are listed and documented here once;
    LightningCLI (jsonargparse) follows the ``**kwargs`` and lists them under
    the subclass (``--help``, ``--print_config``, YAML ``init_args``). The
    defaults are the ViViT / Kinetics-400 ones; a subclass states its own where
    they differ (e.g. EPIC-Kitchens' ``val_split``, ``batch_size``, ``stride``,
    ``crop_size``).

    Args:
        root: Dataset root (see the data module's docstring for the layouts).
        train_split: Training split (folder / annotation name).
        val_split: Validation split.
        test_split: Test split (None: the validation split).
        batch_size: Training clips per batch.
        eval_batch_size: Evaluation clips per batch (>= 1; clips of other frame
            sizes may share a batch, see :func:`collate_eval`; 1 avoids
            padding).
        num_workers: DataLoader workers.
        frames: Frames per training clip.
        stride: Frame step within a training clip.
        crop_size: Training crop side.
        scale_range: Training short side = ``crop_size * s``, ``s ~ U(scale_range)``.
        flip_prob: Horizontal flip probability in training.
        eval_short_side: Short side of evaluation frames (None: ``crop_size``;
            0: keep the decoded size).
        train_limit: Use only this many training items (a fixed random subset,
            e.g. the paper's ~40k-video Kinetics subset); None: all.
        seed: Seed of the training subset.
        probe: Open every video at setup to skip unreadable ones (else only
            missing files are skipped at setup; a video failing later is
            replaced in training and reported in evaluation).
        probe_workers: Threads opening videos at setup.
        probe_cache: JSON file keeping probe results between runs (optional).
        decode_threads: decord threads per reader.
        open_readers: Videos kept open per worker (segments of one video share it).
        pin_memory: DataLoader ``pin_memory``.
        worker_start_method: How DataLoader workers start: ``"spawn"`` (default)
            or ``"forkserver"``. ``"fork"`` can deadlock: decord's reader and
            probe threads in the parent leave locks held in forked children.
        rank: This process's rank (default: from torch.distributed).
        world_size: Number of ranks (default: from torch.distributed).
        train_clips: ``"random"`` (default): training items are random clips of
            ``frames`` frames with a random crop and flip. ``"whole"``:
            training items are whole clips/segments exactly as in evaluation
            (short side ``eval_short_side``, no crop or flip, batches from
            :func:`collate_eval`), shuffled, from the whole training split
            (Lightning's DistributedSampler shards it under DDP), e.g. to train
            the temporal model on spatial features computed on the fly; they
            equal the items the feature cache is written from. Clips of one
            batch may differ in frame size (see :func:`collate_eval`).
    """

    name = "video"

    def __init__(
        self,
        root: str,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str | None = None,
        batch_size: int = 16,
        eval_batch_size: int = 1,
        num_workers: int = 4,
        frames: int = 32,
        stride: int = 2,
        crop_size: int = 224,
        scale_range: tuple[float, float] = (256 / 224, 320 / 224),
        flip_prob: float = 0.5,
        eval_short_side: int | None = None,
        train_limit: int | None = None,
        seed: int = 0,
        probe: bool = True,
        probe_workers: int = 8,
        probe_cache: str | None = None,
        decode_threads: int = 1,
        open_readers: int = 2,
        pin_memory: bool = False,
        worker_start_method: str = "spawn",
        rank: int | None = None,
        world_size: int | None = None,
        train_clips: TrainClips = "random",
    ) -> None:
        super().__init__()
        short = crop_size if eval_short_side is None else (eval_short_side or None)
        sampling = ClipSampling(frames, stride, crop_size, tuple(scale_range), flip_prob, short)
        for option, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"{type(self).__name__}: {option} must be a positive integer, got {value!r}"
                )
        if train_clips not in ("random", "whole"):
            raise ValueError(f"train_clips must be 'random' or 'whole', got {train_clips!r}")
        if train_limit is not None and train_limit < 0:
            raise ValueError(f"train_limit must be >= 0 or None, got {train_limit}")
        self.train_clips = train_clips
        self.root = Path(root)
        self.worker_start_method = check_start_method(worker_start_method, "worker_start_method")
        self.train_split, self.val_split = train_split, val_split
        self.test_split = test_split or val_split
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        #: Clip sampling settings (from ``frames`` ... ``eval_short_side``).
        self.sampling = sampling
        self.train_limit, self.seed = train_limit, seed
        self.probe, self.probe_workers, self.probe_cache = probe, probe_workers, probe_cache
        self.decode_threads, self.open_readers = decode_threads, open_readers
        self.rank, self.world_size = rank, world_size
        # The arguments of this constructor and of the subclass's that called it
        # (Lightning collects both frames): every option, as given or defaulted.
        self.save_hyperparameters()
        #: What setup found and skipped, by split (also logged on rank 0).
        self.summaries: dict[str, str] = {}
        #: Datasets by role: "train", "val", "test".
        self.datasets: dict[str, VideoClipDataset] = {}

    def load_items(self, split: str) -> list[ClipItem]:
        """Every item listed for ``split`` (videos may be missing or unreadable)."""
        raise NotImplementedError

    def rank_and_world_size(self) -> tuple[int, int]:
        """The explicit ``rank``/``world_size`` arguments, else torch.distributed's."""
        if self.rank is not None or self.world_size is not None:
            return self.rank or 0, self.world_size or 1
        return rank_and_world_size()

    def split_items(self, split: str, train: bool = False) -> list[ClipItem]:
        """The items of ``split`` in dataset order, before unreadable ones are dropped.

        :meth:`load_items` without repeated ids; with ``train``, the fixed
        ``train_limit`` subset (seeded by ``seed``).
        """
        items = unique_items(self.load_items(split))
        return limit_items(items, self.train_limit, self.seed) if train else items

    def build_dataset(self, split: str, mode: Mode) -> VideoClipDataset:
        """The dataset of ``split`` in the role ``mode``.

        ``"train"``: every item of the split (the ``train_limit`` subset), as
        random clips or, with ``train_clips="whole"``, as whole clips.
        ``"eval"``: this rank's shard of the split, as whole clips.
        """
        items = self.split_items(split, train=mode == "train")
        name = f"{self.name} {split}"
        if mode == "eval":
            rank, world = self.rank_and_world_size()
            items = shard(items, rank, world)
            if world > 1:
                name += f" (rank {rank} of {world})"
        log = SkipLog(name)
        items = filter_readable(items, log, self.probe, self.probe_workers, self.probe_cache)
        summary = log.summary(len(items))
        self.summaries[split if mode == "train" else f"{split} (eval)"] = summary
        rank_zero_info(summary)
        if not items:
            raise RuntimeError(f"{summary}: no readable videos under {self.root}")
        clips: Mode = "eval" if mode == "eval" or self.train_clips == "whole" else "train"
        return VideoClipDataset(
            items,
            clips,
            self.sampling,
            name,
            self.decode_threads,
            self.open_readers,
            report_clipped=not self.probe,
        )

    def setup(self, stage: str | None = None) -> None:
        roles = {
            "fit": [("train", self.train_split), ("val", self.val_split)],
            "validate": [("val", self.val_split)],
            "test": [("test", self.test_split)],
            "predict": [("test", self.test_split)],
        }.get(stage or "fit")
        if roles is None:
            raise ValueError(f"unknown stage {stage!r}")
        for role, split in roles:
            if role not in self.datasets:
                self.datasets[role] = self.build_dataset(
                    split, "train" if role == "train" else "eval"
                )

    def _dataset(self, role: str) -> VideoClipDataset:
        if role not in self.datasets:
            raise RuntimeError(f"{type(self).__name__}: call setup() before the {role} dataloader")
        return self.datasets[role]

    def train_dataloader(self) -> DataLoader:
        """Shuffled training clips; under DDP Lightning adds its DistributedSampler.

        Batches: :func:`collate_train` (random clips) or :func:`collate_eval`
        (``train_clips="whole"``).
        """
        whole = self.train_clips == "whole"
        return training_loader(
            self._dataset("train"),
            self.trainer,
            self.batch_size,
            self.num_workers,
            collate_fn=collate_eval if whole else collate_train,
            pin_memory=self.pin_memory,
            multiprocessing_context=self._worker_context(),
        )

    def eval_dataloader(self, role: str) -> DataLoader:
        """This rank's shard of an evaluation split, in order, each item once."""
        return eval_loader(
            self._dataset(role),
            self.eval_batch_size,
            self.num_workers,
            collate_fn=collate_eval,
            pin_memory=self.pin_memory,
            multiprocessing_context=self._worker_context(),
        )

    def _worker_context(self) -> str | None:
        return self.worker_start_method if self.num_workers > 0 else None

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader("test")

    def predict_dataloader(self) -> DataLoader:
        return self.eval_dataloader("test")
