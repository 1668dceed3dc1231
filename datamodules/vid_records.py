"""ImageNet VID records shared by both annotation readers.

The 30 class names and WordNet ids (:data:`VID_CLASSES`, :data:`VID_WNIDS`), the
record types the readers return (:class:`FrameAnnotation`,
:class:`VideoAnnotation`, :class:`IndexStats`), the box accumulator that clips
and validates boxes (:class:`ImageBoxes`) and the per-snippet frame selection
(:func:`select_frames`). The readers are :mod:`datamodules.vid_ilsvrc` (XML tree)
and :mod:`datamodules.vid_coco` (COCO-style JSON); :mod:`datamodules.vid_annotations`
gathers them all.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: The 30 ImageNet VID classes; label ``k`` is ``VID_CLASSES[k]``.
VID_CLASSES: tuple[str, ...] = (
    "airplane", "antelope", "bear", "bicycle", "bird", "bus", "car", "cattle", "dog",
    "domestic_cat", "elephant", "fox", "giant_panda", "hamster", "horse", "lion", "lizard",
    "monkey", "motorcycle", "rabbit", "red_panda", "sheep", "snake", "squirrel", "tiger",
    "train", "turtle", "watercraft", "whale", "zebra",
)  # fmt: skip

#: WordNet ids of :data:`VID_CLASSES`, in the same order (as they appear in the XML).
VID_WNIDS: tuple[str, ...] = (
    "n02691156", "n02419796", "n02131653", "n02834778", "n01503061", "n02924116",
    "n02958343", "n02402425", "n02084071", "n02121808", "n02503517", "n02118333",
    "n02510455", "n02342885", "n02374451", "n02129165", "n01674464", "n02484322",
    "n03790512", "n02324045", "n02509815", "n02411705", "n01726692", "n02355227",
    "n02129604", "n04468005", "n01662784", "n04530566", "n02062744", "n02391049",
)  # fmt: skip

WNID_TO_LABEL: dict[str, int] = {wnid: k for k, wnid in enumerate(VID_WNIDS)}

IMAGE_SUFFIX = ".JPEG"
_TRAILING_NUMBER = re.compile(r"^(.*?)[_-]?(\d+)$")


@dataclass
class FrameAnnotation:
    """One image and its boxes.

    ``boxes`` (n, 4) float32 xyxy pixels, ``labels`` (n,) int64 in 0..29,
    ``track_ids`` (n,) int64 (-1 where the file has none, e.g. DET). ``image_id``
    names the image (its path relative to the image root, POSIX form).
    ``video_id`` / ``frame_index`` are set for VID frames.
    """

    path: Path
    image_id: str
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    track_ids: np.ndarray
    video_id: str | None = None
    frame_index: int | None = None

    @property
    def num_boxes(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class VideoAnnotation:
    """One VID snippet: its frames in temporal order."""

    video_id: str
    frames: list[FrameAnnotation]


@dataclass
class IndexStats:
    """What indexing left out: objects of other classes, empty boxes, missing files."""

    other_class_boxes: int = 0
    degenerate_boxes: int = 0
    #: Items listed (ImageSets) but without an annotation file: (reason, item) pairs.
    missing: list[tuple[str, str]] = field(default_factory=list)

    def merge(self, other: IndexStats) -> None:
        self.other_class_boxes += other.other_class_boxes
        self.degenerate_boxes += other.degenerate_boxes
        self.missing.extend(other.missing)


@dataclass
class ImageBoxes:
    """The validated boxes of one image, as parsed (lists; :meth:`frame` makes arrays)."""

    width: int
    height: int
    stats: IndexStats
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    track_ids: list[int] = field(default_factory=list)

    def add(self, box: Sequence[float], label: int, track_id: int) -> None:
        x1, y1, x2, y2 = box
        x1, x2 = min(max(x1, 0.0), self.width), min(max(x2, 0.0), self.width)
        y1, y2 = min(max(y1, 0.0), self.height), min(max(y2, 0.0), self.height)
        if x2 <= x1 or y2 <= y1:
            self.stats.degenerate_boxes += 1
            return
        self.boxes.append((x1, y1, x2, y2))
        self.labels.append(label)
        self.track_ids.append(track_id)

    def frame(self, path: Path, image_id: str, **video: Any) -> FrameAnnotation:
        """The record for the image at ``path`` (``video``: ``video_id``, ``frame_index``)."""
        return FrameAnnotation(
            path=path,
            image_id=image_id,
            width=self.width,
            height=self.height,
            boxes=np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4),
            labels=np.asarray(self.labels, dtype=np.int64),
            track_ids=np.asarray(self.track_ids, dtype=np.int64),
            **video,
        )


# --------------------------------------------------------------------------- frame selection


def select_frames(num_frames: int, stride: int = 1, max_frames: int | None = None) -> list[int]:
    """Positions of the frames kept from a snippet of ``num_frames`` frames.

    Every ``stride``-th frame (0, stride, 2 stride, ...); with ``max_frames``, at
    most that many of those, evenly spaced (the centres of ``max_frames`` equal
    parts, as the "15 frames per snippet" recipes pick them).
    """
    if stride < 1:
        raise ValueError(f"frame stride must be >= 1, got {stride}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"frames per snippet must be >= 1, got {max_frames}")
    kept = list(range(0, num_frames, stride))
    if max_frames is not None and len(kept) > max_frames:
        n = len(kept)
        kept = [kept[(2 * i + 1) * n // (2 * max_frames)] for i in range(max_frames)]
    return kept


FrameSelector = Callable[[int], list[int]]


def _all_frames(num_frames: int) -> list[int]:
    return list(range(num_frames))


def _frame_number(stem: str) -> int:
    """The number ending a frame file's stem (``-1`` when there is none)."""
    match = _TRAILING_NUMBER.match(stem)
    return int(match.group(2)) if match else -1
