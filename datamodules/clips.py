"""Clip items and the clip dataset shared by Kinetics and EPIC-Kitchens.

This module holds :class:`ClipItem` (a video or a segment of one), the item
list helpers :func:`filter_readable`, :func:`unique_items` and
:func:`limit_items`, :class:`VideoClipDataset` and its batch collators
:func:`collate_train` and :func:`collate_eval`. Decoding is in
:mod:`datamodules.video_io`; the data module using these is
:class:`datamodules.video.ClipDataModule` (:mod:`datamodules.video` re-exports
these names).

Usage::

    from datamodules.clips import ClipItem, VideoClipDataset

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

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor
from torch.utils.data import Dataset

from datamodules.common import SkipLog
from datamodules.transforms import ClipSampling, TrainClipTransform, train_clip_indices
from datamodules.video_io import (
    ReaderCache,
    VideoInfo,
    VideoReadError,
    probe_videos,
    read_frames,
)

Mode = Literal["train", "eval"]
#: The reason counted for a segment that runs past the end of its video (kept, clipped).
CLIPPED = "segment clipped to video end"
T = TypeVar("T")


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
