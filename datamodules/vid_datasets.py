"""ImageNet VID datasets: image loading, training images, evaluation segments, collates.

:func:`load_frame` decodes one annotated image into ``(uint8 (3, H, W), target)``
(boxes scaled to the JPEG when its size differs from the annotation's);
:class:`DetectionDataset` serves independent training images (VID frames and DET
images) batched by :func:`collate_detection`; :func:`split_segments` cuts videos
into :class:`Segment` s that :class:`SegmentDataset` serves one per item, batched
by :func:`collate_segments`. :func:`drop_missing_images` filters records whose
file is absent. The data module that builds these is
:class:`datamodules.imagenet_vid.ImageNetVIDDataModule`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image, read_file

from datamodules.common import LocalShardSampler, SkipLog
from datamodules.detection_transforms import DetectionTransform, scale_boxes
from datamodules.vid_records import FrameAnnotation, VideoAnnotation

Target = dict[str, Any]
TORCHVISION_CODEC_WARNING = "The image decoding and encoding capabilities of TorchVision"
#: The reason counted for a frame whose annotated size differs from its image's.
SIZE_MISMATCH = "annotated size differs from the image, boxes scaled"


# --------------------------------------------------------------------------- loading


def make_target(frame: FrameAnnotation) -> Target:
    """``{"boxes" (n, 4) float32, "labels" (n,) int64, "track_ids" (n,) int64, "image_id" str}``."""
    return {
        "boxes": torch.from_numpy(frame.boxes.copy()),
        "labels": torch.from_numpy(frame.labels.copy()),
        "track_ids": torch.from_numpy(frame.track_ids.copy()),
        "image_id": frame.image_id,
    }


def load_frame(
    frame: FrameAnnotation,
    transform: DetectionTransform | None = None,
    skips: SkipLog | None = None,
) -> tuple[Tensor, Target]:
    """Decodes the image (uint8 (3, H, W), RGB even for grey/CMYK JPEGs) and builds its target.

    If the annotation's image size (XML ``<size>``, COCO ``width``/``height``)
    differs from the decoded image's, the boxes are scaled to the image and
    the frame is counted in ``skips`` as adjusted (:data:`SIZE_MISMATCH`, one
    warning per ``skips``; without ``skips``, a warning per frame).

    Raises:
        RuntimeError: the file is missing or cannot be decoded.
    """
    with warnings.catch_warnings():
        # torchvision 0.29 flags its image codecs as deprecated on every call.
        warnings.filterwarnings("ignore", TORCHVISION_CODEC_WARNING, DeprecationWarning)
        image = decode_image(read_file(str(frame.path)), mode=ImageReadMode.RGB)
    target = make_target(frame)
    height, width = image.shape[-2:]
    if (width, height) != (frame.width, frame.height):
        note = (
            f"{frame.path}: annotated as {frame.width} x {frame.height}, the image is "
            f"{width} x {height}; its {frame.num_boxes} boxes are scaled to the image"
        )
        if skips is not None:
            skips.adjust(SIZE_MISMATCH, note)
        else:
            warnings.warn(note, stacklevel=2)
        target = scale_boxes(target, width / max(frame.width, 1), height / max(frame.height, 1))
    if transform is not None:
        image, target = transform(image, target)
    return image, target


def drop_missing_images(
    frames: Sequence[FrameAnnotation], skips: SkipLog, listings: dict[Path, set[str]] | None = None
) -> list[FrameAnnotation]:
    """The frames whose image file exists; the others are skipped (warned once, counted).

    Lists each folder once (``listings`` caches the listings across calls).
    """
    listings = {} if listings is None else listings
    kept = []
    for frame in frames:
        folder = frame.path.parent
        if folder not in listings:
            try:
                listings[folder] = set(os.listdir(folder))
            except OSError:
                listings[folder] = set()
        if frame.path.name in listings[folder]:
            kept.append(frame)
        else:
            skips.skip("missing image", frame.path)
    return kept


# --------------------------------------------------------------------------- training


class DetectionDataset(Dataset):
    """Independent images with boxes (VID frames and DET images), map-style.

    Item: ``(image uint8 (3, H, W), target)`` with target as :func:`make_target`
    (after ``transform``). An unreadable image is skipped (warned once, counted in
    ``skips``) and the next readable item is returned instead.

    Args:
        images: the records.
        transform: joint image/box transform (e.g. a random flip).
        name: dataset name used in warnings.
    """

    def __init__(
        self,
        images: Sequence[FrameAnnotation],
        transform: DetectionTransform | None = None,
        name: str = "imagenet_vid train",
    ) -> None:
        self.images = list(images)
        self.transform = transform
        self.skips = SkipLog(name)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        for offset in range(len(self.images)):
            frame = self.images[(index + offset) % len(self.images)]
            try:
                return load_frame(frame, self.transform, self.skips)
            except RuntimeError:
                self.skips.skip("unreadable image", frame.path)
        raise RuntimeError(f"{self.skips.dataset}: no readable image among {len(self)} items")


def collate_detection(batch: Sequence[tuple[Tensor, Target]]) -> tuple[list[Tensor], list[Target]]:
    """torchvision-detection style: ``(list of (3, H_i, W_i) images, list of target dicts)``."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)


# --------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class Segment:
    """Contiguous frames of one video, processed as one stream."""

    video_id: str
    segment_index: int
    frames: tuple[FrameAnnotation, ...]


def split_segments(video: VideoAnnotation, segment_length: int | None) -> list[Segment]:
    """Cuts a video into consecutive segments of ``segment_length`` frames, in order.

    The last segment holds the remainder (may be shorter); ``None`` keeps the
    whole video as one segment.
    """
    if segment_length is not None and segment_length < 1:
        raise ValueError(f"segment_length must be >= 1 or None, got {segment_length}")
    step = segment_length or max(1, len(video.frames))
    return [
        Segment(video.video_id, index, tuple(video.frames[start : start + step]))
        for index, start in enumerate(range(0, len(video.frames), step))
    ]


class SegmentDataset(Dataset):
    """One item per video segment: its frames in order, with targets.

    Item: ``{"video_id": str, "segment_index": int, "frame_indices": list[int],
    "frames": list of uint8 (3, H, W), "targets": list of target dicts}``. A frame
    that cannot be decoded is left out of its segment (warned once, counted in
    ``skips``); ``frame_indices`` lists the frames that remain.

    Args:
        segments: the segments (e.g. this rank's shard).
        transform: joint image/box transform applied to every frame.
        name: dataset name used in warnings.
    """

    def __init__(
        self,
        segments: Sequence[Segment],
        transform: DetectionTransform | None = None,
        name: str = "imagenet_vid val",
    ) -> None:
        self.segments = list(segments)
        self.transform = transform
        self.skips = SkipLog(name)

    def __len__(self) -> int:
        return len(self.segments)

    def __getitem__(self, index: int) -> dict[str, Any]:
        segment = self.segments[index]
        frames, targets, indices = [], [], []
        for frame in segment.frames:
            try:
                image, target = load_frame(frame, self.transform, self.skips)
            except RuntimeError:
                self.skips.skip("unreadable image", frame.path)
                continue
            frames.append(image)
            targets.append(target)
            indices.append(frame.frame_index)
        return {
            "video_id": segment.video_id,
            "segment_index": segment.segment_index,
            "frame_indices": indices,
            "frames": frames,
            "targets": targets,
        }


def collate_segments(batch: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """A batch of segments is the list of segment items (they differ in length)."""
    return list(batch)


#: The former name of :class:`datamodules.common.LocalShardSampler` (in imagenet_vid).
PreShardedSampler = LocalShardSampler
