"""Reading videos with decord, and the clip dataset shared by Kinetics and EPIC-Kitchens.

Videos are read where they lie (no frame extraction): ``decord.VideoReader``
indexes the container and ``get_batch`` decodes only the frames a clip needs.

Usage::

    from datamodules.video import ClipItem, VideoClipDataset, probe_video, read_frames

    info = probe_video("clip.mp4")                 # VideoInfo(num_frames=300, fps=30.0)
    frames = read_frames("clip.mp4", [0, 2, 4])    # (3, C, H, W) uint8

    items = [ClipItem("abc_000010_000020", Path("clip.mp4"), label=3)]
    dataset = VideoClipDataset(items, "train", ClipSampling(frames=32, stride=2), "demo")
    dataset[0]  # {"video": (32, C, 224, 224) uint8, "label": 3, "id": "abc_000010_000020"}

An item is a whole video or a segment of one (``start``/``stop`` in frames or
seconds). Training items give ``frames`` frames at ``stride`` from a random
start inside the segment with a random crop/flip; evaluation items give every
frame of the segment, short side resized to ``eval_short_side``; evaluation
batches may mix frame sizes (:func:`collate_eval`). A segment that runs past
the end of its video is clipped to the video (counted, one warning). Items that
cannot be read are skipped (and counted) at setup by :func:`filter_readable`;
a video that fails later is replaced by another item in training and reported
in the batch's ``skipped`` list in evaluation, never dropped silently.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import decord
import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

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
    write_json_atomic,
)
from datamodules.transforms import (
    ClipSampling,
    TrainClipTransform,
    resize,
    short_side_size,
    train_clip_indices,
)

Mode = Literal["train", "eval"]
#: The reason counted for a segment that runs past the end of its video (kept, clipped).
CLIPPED = "segment clipped to video end"
TrainClips = Literal["random", "whole"]
T = TypeVar("T")


class VideoReadError(RuntimeError):
    """A video file is missing, cannot be opened or cannot be decoded (names the file)."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


@dataclass(frozen=True)
class VideoInfo:
    """Container facts read from the file: frame count and average frame rate."""

    num_frames: int
    fps: float


def open_video(path: str | Path, num_threads: int = 1) -> decord.VideoReader:
    """Opens ``path`` with ``decord.VideoReader`` on the CPU; raises VideoReadError."""
    path = Path(path)
    if not path.is_file():
        raise VideoReadError(path, "file not found")
    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=num_threads)
    except (RuntimeError, decord.DECORDError) as error:
        raise VideoReadError(path, f"cannot open video ({_first_line(error)})") from error
    if len(reader) == 0:
        raise VideoReadError(path, "video has no frames")
    return reader


def probe_video(path: str | Path) -> VideoInfo:
    """Frame count and fps of ``path`` (opens the container, decodes nothing)."""
    reader = open_video(path)
    return VideoInfo(num_frames=len(reader), fps=float(reader.get_avg_fps()))


def read_frames(
    video: str | Path | decord.VideoReader,
    indices: Sequence[int],
    short_side: int | None = None,
    chunk: int = 64,
    path: str | Path | None = None,
) -> Tensor:
    """Decodes the frames ``indices`` -> ``(len(indices), C, H, W) uint8``.

    Repeated indices are decoded once. With ``short_side`` the frames are
    resized (bilinear, antialiased) ``chunk`` frames at a time, so a long clip
    never holds all its full-size frames at once. ``path`` names an open
    reader's file in errors.
    """
    if isinstance(video, (str, Path)):
        path, reader = video, open_video(video)
    else:
        reader = video
    wanted = np.asarray(indices, dtype=np.int64)
    if wanted.size == 0:
        raise ValueError("read_frames needs at least one frame index")
    if wanted.min() < 0 or wanted.max() >= len(reader):
        raise IndexError(
            f"frame indices outside [0, {len(reader)}): {wanted.min()}..{wanted.max()}"
        )
    unique, inverse = np.unique(wanted, return_inverse=True)
    parts = []
    for begin in range(0, unique.size, chunk):
        wanted_chunk = unique[begin : begin + chunk].tolist()
        try:
            array = reader.get_batch(wanted_chunk).asnumpy()
        except (RuntimeError, decord.DECORDError):
            # decord 0.6 cannot batch some frame widths (e.g. 48, 72: it pads
            # rows to 4 bytes per pixel, dmlc/decord#336); read frame by frame.
            array = _read_one_by_one(reader, wanted_chunk, path)
        frames = torch.from_numpy(array).permute(0, 3, 1, 2)  # (t, C, H, W), channels-last
        if short_side is not None:
            frames = resize(frames, short_side_size(*frames.shape[-2:], short_side))
        parts.append(frames)
    frames = torch.cat(parts) if len(parts) > 1 else parts[0]
    if unique.size != wanted.size or not np.array_equal(unique, wanted):
        frames = frames[torch.from_numpy(inverse.reshape(-1))]
    return frames.contiguous()


def _read_one_by_one(
    reader: decord.VideoReader, indices: Sequence[int], path: str | Path | None
) -> np.ndarray:
    """Frames ``indices`` -> ``(T, H, W, 3) uint8``, one ``reader[i]`` call each.

    Undoes decord's row padding: a frame it reports as ``(H, W, 4)`` holds
    rows of ``W * 4`` bytes whose first ``W * 3`` are the RGB pixels.
    """
    frames = []
    for index in indices:
        try:
            frame = reader[index].asnumpy()
        except (RuntimeError, decord.DECORDError) as error:
            raise VideoReadError(
                path or "<video>", f"cannot decode frame {index} ({_first_line(error)})"
            ) from error
        if frame.shape[-1] == 4:
            height, width = frame.shape[:2]
            frame = frame.reshape(height, -1)[:, : width * 3].reshape(height, width, 3)
        frames.append(frame)
    return np.stack(frames)


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(error).__name__


class ReaderCache:
    """The last few opened readers of this process (segments of one long video share one).

    Args:
        size: Readers kept open.
        num_threads: Decoder threads per reader (1 suits DataLoader workers).
    """

    def __init__(self, size: int = 2, num_threads: int = 1) -> None:
        self.size = max(1, size)
        self.num_threads = num_threads
        self._readers: dict[Path, decord.VideoReader] = {}

    def get(self, path: Path) -> decord.VideoReader:
        reader = self._readers.pop(path, None)
        if reader is None:
            reader = open_video(path, self.num_threads)
        self._readers[path] = reader  # most recent last
        while len(self._readers) > self.size:
            self._readers.pop(next(iter(self._readers)))
        return reader

    def drop(self, path: Path) -> None:
        self._readers.pop(path, None)


# ---------------------------------------------------------------------------- items


@dataclass(frozen=True)
class ClipItem:
    """One dataset item: a video, or a segment of it.

    ``start``/``stop`` bound the segment: 0-based frame numbers (``stop``
    exclusive) when ``unit == "frame"``, seconds when ``unit == "second"``
    (converted with the video's real fps); None means the video's start/end.
    """

    id: str
    path: Path
    label: int
    start: float | None = None
    stop: float | None = None
    unit: Literal["frame", "second"] = "frame"

    def annotated_range(self, info: VideoInfo) -> tuple[int, int]:
        """The segment as frame numbers ``[first, stop)``, as annotated (it may
        run past the end of the video; :meth:`frame_range` clips it)."""
        scale = info.fps if self.unit == "second" else 1.0
        first = 0 if self.start is None else int(round(self.start * scale))
        stop = info.num_frames if self.stop is None else int(round(self.stop * scale))
        if self.unit == "second" and self.stop is not None:
            stop = max(stop, first + 1)  # a timestamp pair shorter than one frame
        return first, stop

    def frame_range(self, info: VideoInfo) -> tuple[int, int]:
        """The segment as frame numbers ``[first, stop)`` clipped to the video.

        Raises ValueError if the segment lies outside the video.
        """
        first, stop = self.annotated_range(info)
        first, stop = max(0, first), min(info.num_frames, stop)
        if stop <= first:
            raise ValueError(
                f"segment [{self.start}, {self.stop}) {self.unit}s lies outside the video "
                f"({info.num_frames} frames at {info.fps:g} fps)"
            )
        return first, stop

    def overrun(self, info: VideoInfo) -> str | None:
        """What :meth:`frame_range` cut off a segment that runs past the end of
        its video (to report it), or None if the segment ends inside the video."""
        first, stop = self.frame_range(info)
        annotated = self.annotated_range(info)[1]
        if annotated <= info.num_frames:
            return None
        return (
            f"{self.id} in {self.path}: segment [{self.start}, {self.stop}) {self.unit}s ends "
            f"at frame {annotated} of a {info.num_frames}-frame video; frames [{first}, {stop}) "
            "kept"
        )


def _probe_one(path: Path) -> VideoInfo | VideoReadError:
    try:
        return probe_video(path)
    except VideoReadError as error:
        return error


def probe_videos(
    paths: Iterable[Path], workers: int = 8, cache_file: str | Path | None = None
) -> dict[Path, VideoInfo | VideoReadError]:
    """Opens every video (in ``workers`` threads): its info, or the error it gave.

    With ``cache_file`` (JSON), results are kept by path, size and modification
    time, so a second run only opens new or changed files.
    """
    paths = list(dict.fromkeys(paths))
    cache = _load_probe_cache(cache_file)
    results: dict[Path, VideoInfo | VideoReadError] = {}
    todo: list[Path] = []
    stamps: dict[Path, list[int]] = {}
    for path in paths:
        try:
            stat = path.stat()
        except OSError:
            results[path] = VideoReadError(path, "file not found")
            continue
        stamps[path] = [stat.st_size, stat.st_mtime_ns]
        hit = cache.get(str(path))
        if hit is not None and hit[:2] == stamps[path]:
            value = hit[2]
            results[path] = (
                VideoInfo(int(value[0]), float(value[1]))
                if isinstance(value, list)
                else VideoReadError(path, value)
            )
        else:
            todo.append(path)
    if todo:
        with ThreadPoolExecutor(max(1, workers)) as pool:
            for path, result in zip(todo, pool.map(_probe_one, todo)):
                results[path] = result
        if cache_file is not None:
            for path in todo:
                result = results[path]
                value = (
                    [result.num_frames, result.fps]
                    if isinstance(result, VideoInfo)
                    else result.reason
                )
                cache[str(path)] = [*stamps[path], value]
            write_json_atomic(Path(cache_file), cache)
    return {path: results[path] for path in paths}


def _load_probe_cache(cache_file: str | Path | None) -> dict[str, Any]:
    if cache_file is None or not Path(cache_file).is_file():
        return {}
    try:
        data = json.loads(Path(cache_file).read_text())
    except (OSError, json.JSONDecodeError) as error:
        warnings.warn(f"ignoring unreadable probe cache {cache_file}: {error}", stacklevel=3)
        return {}
    return data if isinstance(data, dict) else {}


def filter_readable(
    items: Sequence[ClipItem],
    skip_log: SkipLog,
    probe: bool = True,
    workers: int = 8,
    cache_file: str | Path | None = None,
    on_skip: Callable[[ClipItem, str, str], None] | None = None,
) -> list[ClipItem]:
    """The items whose video exists (and, with ``probe``, opens and holds the segment).

    Every dropped item is counted in ``skip_log`` by reason (``missing``,
    ``unreadable``, ``segment outside video``: one that starts at or after the
    video's end); the log warns once per reason. ``on_skip(item, reason,
    message)`` is called for each dropped item. With ``probe``, a segment that
    starts inside its video but runs past its end is kept, clipped to the video
    (:meth:`ClipItem.frame_range`), and counted in ``skip_log`` as adjusted
    (:data:`CLIPPED`; one warning).
    """
    kept: list[ClipItem] = []

    def drop(item: ClipItem, reason: str, message: str) -> None:
        skip_log.skip(reason, message)
        if on_skip is not None:
            on_skip(item, reason, message)

    if not probe:
        for item in items:
            if item.path.is_file():
                kept.append(item)
            else:
                drop(item, "missing", f"{item.path}: file not found")
        return kept
    infos = probe_videos([item.path for item in items], workers, cache_file)
    for item in items:
        info = infos[item.path]
        if isinstance(info, VideoReadError):
            drop(item, "missing" if info.reason == "file not found" else "unreadable", str(info))
            continue
        try:
            overrun = item.overrun(info)
        except ValueError as error:
            drop(item, "segment outside video", f"{item.id} in {item.path}: {error}")
            continue
        if overrun is not None:
            skip_log.adjust(CLIPPED, overrun)
        kept.append(item)
    return kept


def unique_items(items: Iterable[ClipItem]) -> list[ClipItem]:
    """``items`` without repeated ids (the first of each id kept, in order)."""
    seen: set[str] = set()
    kept = []
    for item in items:
        if item.id not in seen:
            seen.add(item.id)
            kept.append(item)
    return kept


def limit_items(items: Sequence[T], limit: int | None, seed: int) -> list[T]:
    """A fixed random subset of ``limit`` items (all if None), in their original order.

    The subset depends only on ``len(items)``, ``limit`` and ``seed``, so the
    video data modules and the feature cache pick the same items.
    """
    if limit is None or limit >= len(items):
        return list(items)
    if limit < 0:
        raise ValueError(f"train_limit must be >= 0, got {limit}")
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed))
    return [items[i] for i in sorted(order[:limit].tolist())]


# -------------------------------------------------------------------------- dataset


class VideoClipDataset(Dataset):
    """Clips of video items, decoded on access.

    Args:
        items: The videos/segments (already filtered by :func:`filter_readable`).
        mode: ``"train"`` (random clip of ``frames`` at ``stride``, random crop and
            flip) or ``"eval"`` (every frame of the segment, short side resized).
        sampling: Clip sampling settings.
        name: Dataset name for warnings (e.g. ``"kinetics400 val"``).
        decode_threads: decord decoder threads per reader.
        open_readers: Readers kept open per process (long videos with many segments).
        max_retries: Training: other items tried when a video fails to decode.
        report_clipped: Count (and warn once about) segments that run past the
            end of their video when they are loaded, for items that setup did
            not probe (probed ones were reported by :func:`filter_readable`).

    Items: ``{"video": (T, C, H, W) uint8, "label": int, "id": str}``; T = ``frames``
    and H = W = ``crop_size`` in training, T = segment length in evaluation. An
    evaluation item that fails to decode is ``{"video": None, "label": -1, "id": ...}``
    (see :func:`collate_eval`).
    """

    def __init__(
        self,
        items: Sequence[ClipItem],
        mode: Mode,
        sampling: ClipSampling,
        name: str,
        decode_threads: int = 1,
        open_readers: int = 2,
        max_retries: int = 10,
        report_clipped: bool = False,
    ) -> None:
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        self.items = list(items)
        self.mode = mode
        self.sampling = sampling
        self.name = name
        self.decode_threads = decode_threads
        self.open_readers = open_readers
        self.max_retries = max_retries
        self.report_clipped = report_clipped
        self.transform = TrainClipTransform(sampling)
        #: Items that failed to decode in this process (after setup), and with
        #: ``report_clipped`` segments clipped to their video.
        self.skip_log = SkipLog(f"{name} (while loading)")
        self._clipped: set[str] = set()
        self._readers: ReaderCache | None = None
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.items)

    @property
    def readers(self) -> ReaderCache:
        if self._readers is None:  # made lazily: one per DataLoader worker process
            self._readers = ReaderCache(self.open_readers, self.decode_threads)
        return self._readers

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_readers"] = None  # decord readers do not pickle (spawned workers)
        return state

    def load(self, item: ClipItem, generator: torch.Generator | None = None) -> Tensor:
        """Decodes one item's clip (see class docstring); raises VideoReadError."""
        reader = self.readers.get(item.path)
        try:
            info = VideoInfo(len(reader), float(reader.get_avg_fps()))
            try:
                first, stop = item.frame_range(info)
                overrun = item.overrun(info) if self.report_clipped else None
            except ValueError as error:
                raise VideoReadError(item.path, f"{item.id}: {error}") from error
            if overrun is not None and item.id not in self._clipped:
                self._clipped.add(item.id)
                self.skip_log.adjust(CLIPPED, overrun)
            if self.mode == "train":
                s = self.sampling
                indices = train_clip_indices(first, stop, s.frames, s.stride, generator)
                return self.transform(read_frames(reader, indices, path=item.path), generator)
            short = self.sampling.eval_short_side
            return read_frames(reader, range(first, stop), short, path=item.path)
        except VideoReadError:
            self.readers.drop(item.path)
            raise

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.mode == "eval":
            item = self.items[index]
            try:
                video = self.load(item)
            except VideoReadError as error:
                self.skip_log.skip("unreadable", error)
                return {"video": None, "label": -1, "id": item.id}
            return {"video": video, "label": item.label, "id": item.id}
        for _ in range(self.max_retries + 1):
            item = self.items[index]
            try:
                return {"video": self.load(item), "label": item.label, "id": item.id}
            except VideoReadError as error:
                self.skip_log.skip("unreadable", error)
                self._bad.add(index)
                if len(self._bad) >= len(self.items):
                    break
                while index in self._bad:
                    index = int(torch.randint(len(self.items), ()))
        raise VideoReadError(
            self.items[index].path, f"{self.name}: too many unreadable videos in a row"
        )


def collate_train(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Training items -> ``{"video": (B, T, C, h, w) uint8, "label": (B,) int64, "id": [B]}``."""
    return {
        "video": torch.stack([item["video"] for item in batch]),
        "label": torch.tensor([item["label"] for item in batch], dtype=torch.long),
        "id": [item["id"] for item in batch],
    }


def collate_eval(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Evaluation items -> one batch of whole clips, for any mix of frame sizes.

    Returns ``{"video": ..., "length": (B,) int64, "label": (B,) int64,
    "id": [B], "skipped": [ids that failed to decode]}``, the B decoded clips in
    the order they came. ``video`` is

    - a ``(B, T_max, C, H, W) uint8`` tensor when the clips share one frame
      size H x W: clips shorter than ``T_max`` repeat their last frame (use
      ``length`` to cut them back; with batch size 1 there is no padding);
    - a list of B ``(T_i, C, H_i, W_i) uint8`` tensors, unpadded, when the
      frame sizes differ (e.g. Kinetics clips of other aspect ratios). Nothing
      is resized or padded, so a model that runs each group of equal-size
      clips (e.g. :meth:`ViViTFineTuning.video_features
      <eventful_pl.lightning.vivit_module.ViViTFineTuning.video_features>`)
      gets the same per-clip results as with batch size 1.

    If every item failed, ``video`` is a tensor with B = 0.
    """
    good = [item for item in batch if item["video"] is not None]
    skipped = [item["id"] for item in batch if item["video"] is None]
    if not good:
        return {
            "video": torch.empty(0, 0, 3, 0, 0, dtype=torch.uint8),
            "length": torch.empty(0, dtype=torch.long),
            "label": torch.empty(0, dtype=torch.long),
            "id": [],
            "skipped": skipped,
        }
    lengths = [item["video"].shape[0] for item in good]
    sizes = {tuple(item["video"].shape[1:]) for item in good}
    if len(sizes) > 1:
        videos: Tensor | list[Tensor] = [item["video"] for item in good]
    else:
        longest = max(lengths)
        videos = torch.stack(
            [
                torch.cat([v, v[-1:].expand(longest - len(v), *v.shape[1:])])
                if len(v) < longest
                else v
                for v in (item["video"] for item in good)
            ]
        )
    return {
        "video": videos,
        "length": torch.tensor(lengths, dtype=torch.long),
        "label": torch.tensor([item["label"] for item in good], dtype=torch.long),
        "id": [item["id"] for item in good],
        "skipped": skipped,
    }


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
