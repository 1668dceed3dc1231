"""ImageNet VID + DET for video object detection (ViTDet; DESIGN sections 4, 6, 7).

Training samples VID frames and DET images as independent images with boxes;
evaluation yields VID videos cut into contiguous segments, one segment per item
(each segment is one stream for an eventful model). Both the ILSVRC2015 tree and
the COCO-style JSON conversion are read as they are (see
:mod:`datamodules.vid_annotations`)::

    dm = ImageNetVIDDataModule("/data/ILSVRC2015", layout="ilsvrc", segment_length=64)
    dm.setup("fit")
    images, targets = next(iter(dm.train_dataloader()))
    # images: list of uint8 (3, H_i, W_i); targets: list of {"boxes" (n_i, 4) float32
    # xyxy pixels, "labels" (n_i,) int64 in 0..29, "track_ids" (n_i,) int64, "image_id" str}
    for batch in dm.val_dataloader():  # a list of eval_batch_size segment items
        for segment in batch:
            model.reset()  # one segment = one stream
            for frame, target in zip(segment["frames"], segment["targets"]):
                detections = model([frame])

A segment item is ``{"video_id": str, "segment_index": int, "frame_indices":
list[int], "frames": list of uint8 (3, H, W), "targets": list of target dicts}``.

LightningCLI YAML::

    data:
      class_path: datamodules.imagenet_vid.ImageNetVIDDataModule
      init_args: {root: /data/ILSVRC2015, layout: coco, segment_length: 64, frames_per_snippet: 15}

Choices: VID training frames without objects are kept as negatives
(``keep_empty_frames``); DET images without any of the 30 classes are left out
(and their other-class boxes dropped). Images listed but missing on disk are
found at setup (one directory listing per folder), skipped with one warning and
counted; images that fail to decode are skipped when loaded (one warning per
dataset copy, counted in the dataset's ``skips``): a training item is replaced
by the next readable one, an evaluation segment loses that frame
(``frame_indices`` tells which remain). A frame whose annotated size (XML
``<size>``, COCO ``width``/``height``) differs from its JPEG's keeps its boxes
scaled to the JPEG (one warning per dataset copy, counted in ``skips``). An
evaluation split without any ground-truth object is warned about at setup.
Evaluation segments are sharded over ranks with :func:`datamodules.common.shard`
(whole segments, none repeated); the eval loaders carry a sampler that
Lightning leaves in place.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_image, read_file

from datamodules.common import LocalShardSampler, SkipLog, eval_loader, rank_and_world_size, shard
from datamodules.detection_transforms import (
    Compose,
    DetectionTransform,
    RandomHorizontalFlip,
    ResizeShortEdge,
    scale_boxes,
)
from datamodules.vid_annotations import (
    VID_CLASSES,
    VID_WNIDS,
    FrameAnnotation,
    FrameSelector,
    IndexStats,
    VideoAnnotation,
    index_ilsvrc_det,
    index_ilsvrc_vid,
    load_coco_det,
    load_coco_vid,
    select_frames,
)

__all__ = [
    "VID_CLASSES",
    "VID_WNIDS",
    "DetectionDataset",
    "ImageNetVIDDataModule",
    "PreShardedSampler",
    "Segment",
    "SegmentDataset",
    "collate_detection",
    "collate_segments",
    "drop_missing_images",
    "load_frame",
    "split_segments",
]

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


#: The former name of :class:`datamodules.common.LocalShardSampler` here.
PreShardedSampler = LocalShardSampler


# --------------------------------------------------------------------------- data module


class ImageNetVIDDataModule(L.LightningDataModule):
    """ImageNet VID (+ DET) for ViTDet: training images and evaluation video segments.

    ``train_dataloader`` gives ``(images, targets)`` batches (see
    :func:`collate_detection`); ``val_dataloader`` / ``test_dataloader`` (both on
    ``val_split``) give lists of segment items (see :class:`SegmentDataset`),
    this rank's share of the segments. ``summaries`` holds what setup found and
    skipped (also logged on rank 0).

    Args:
        root: dataset root (holding ``Data/``, ``Annotations/``, ``ImageSets/``).
        layout: ``"ilsvrc"`` (XML tree) or ``"coco"`` (JSON annotation files).
        train_split: VID split for training (ILSVRC folder name).
        val_split: VID split for evaluation.
        vid_train_annotations: COCO layout: VID training JSON (relative to
            ``root`` or absolute; default ``annotations/imagenet_vid_train.json``).
        vid_val_annotations: COCO layout: VID evaluation JSON (default
            ``annotations/imagenet_vid_val.json``).
        det_annotations: COCO layout: DET JSON (default
            ``annotations/imagenet_det_30plus1cls.json``).
        vid_image_root: folder that VID ``file_name`` values are relative to
            (default ``<root>/Data/VID``).
        det_image_root: folder that DET ``file_name`` values are relative to
            (default ``<root>/Data/DET``).
        use_image_sets: ILSVRC layout: read ``ImageSets/VID/<split>*.txt`` when
            present (else walk the annotation folders).
        vid_train_image_set: ILSVRC layout: explicit list file for the training
            split (e.g. ``ImageSets/VID/VID_train_15frames.txt``; relative to root).
        vid_val_image_set: ILSVRC layout: explicit list file for the eval split.
        det_image_set: ILSVRC layout: DET list file (e.g.
            ``ImageSets/DET/DET_train_30classes.txt``); default walks
            ``Annotations/DET/train``.
        include_det: train on DET images of the 30 classes as well.
        frame_stride: keep every k-th VID training frame per snippet (of the
            frames an image set lists, when one is used).
        frames_per_snippet: keep at most this many (evenly spaced) VID training
            frames per snippet, after ``frame_stride``.
        keep_empty_frames: keep VID training frames without objects (negatives).
        segment_length: evaluation segment length in frames (None: whole videos).
        batch_size: training images per batch.
        eval_batch_size: segments per evaluation batch.
        num_workers: DataLoader worker processes.
        flip_prob: horizontal flip probability for training.
        resize_short_edge: resize every image so its short edge has this length
            (None: raw images; the model resizes itself).
        resize_max_size: bound for the long edge when resizing.
        pin_memory: DataLoader ``pin_memory``.
    """

    def __init__(
        self,
        root: str,
        layout: Literal["ilsvrc", "coco"] = "ilsvrc",
        train_split: str = "train",
        val_split: str = "val",
        vid_train_annotations: str | None = None,
        vid_val_annotations: str | None = None,
        det_annotations: str | None = None,
        vid_image_root: str | None = None,
        det_image_root: str | None = None,
        use_image_sets: bool = True,
        vid_train_image_set: str | None = None,
        vid_val_image_set: str | None = None,
        det_image_set: str | None = None,
        include_det: bool = True,
        frame_stride: int = 1,
        frames_per_snippet: int | None = None,
        keep_empty_frames: bool = True,
        segment_length: int | None = None,
        batch_size: int = 8,
        eval_batch_size: int = 1,
        num_workers: int = 4,
        flip_prob: float = 0.5,
        resize_short_edge: int | None = None,
        resize_max_size: int | None = None,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        if layout not in ("ilsvrc", "coco"):
            raise ValueError(f"layout must be 'ilsvrc' or 'coco', got {layout!r}")
        checks = {
            "frame_stride": (frame_stride, frame_stride >= 1),
            "frames_per_snippet": (
                frames_per_snippet,
                frames_per_snippet is None or frames_per_snippet >= 1,
            ),
            "segment_length": (segment_length, segment_length is None or segment_length >= 1),
            "batch_size": (batch_size, batch_size >= 1),
            "eval_batch_size": (eval_batch_size, eval_batch_size >= 1),
            "num_workers": (num_workers, num_workers >= 0),
            "flip_prob": (flip_prob, 0.0 <= flip_prob <= 1.0),
            "resize_short_edge": (
                resize_short_edge,
                resize_short_edge is None or resize_short_edge >= 1,
            ),
            "resize_max_size (needs resize_short_edge)": (
                resize_max_size,
                resize_max_size is None or (resize_max_size >= 1 and resize_short_edge is not None),
            ),
        }
        for option, (value, ok) in checks.items():
            if not ok:
                raise ValueError(f"ImageNetVIDDataModule: invalid {option}: {value!r}")
        self.save_hyperparameters()
        self.root = Path(root)
        self.layout = layout
        self.train_split, self.val_split = train_split, val_split
        self.vid_image_root = Path(vid_image_root) if vid_image_root else self.root / "Data" / "VID"
        self.det_image_root = Path(det_image_root) if det_image_root else self.root / "Data" / "DET"
        self.annotation_files = {
            "vid_train": vid_train_annotations or "annotations/imagenet_vid_train.json",
            "vid_val": vid_val_annotations or "annotations/imagenet_vid_val.json",
            "det": det_annotations or "annotations/imagenet_det_30plus1cls.json",
        }
        self.use_image_sets = use_image_sets
        self.image_sets = {
            "vid_train": vid_train_image_set,
            "vid_val": vid_val_image_set,
            "det": det_image_set,
        }
        self.include_det = include_det
        self.frame_stride, self.frames_per_snippet = frame_stride, frames_per_snippet
        self.keep_empty_frames = keep_empty_frames
        self.segment_length = segment_length
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.flip_prob = flip_prob
        self.resize = (
            ResizeShortEdge(resize_short_edge, resize_max_size) if resize_short_edge else None
        )
        self.train_dataset: DetectionDataset | None = None
        self.eval_dataset: SegmentDataset | None = None
        self.summaries: dict[str, str] = {}

    @property
    def num_classes(self) -> int:
        """The 30 VID classes (labels 0..29, :data:`VID_CLASSES` order)."""
        return len(VID_CLASSES)

    # ----------------------------------------------------------------- indexing

    def _path(self, value: str | None) -> Path | None:
        return None if value is None else self.root / value

    def _vid_videos(
        self, key: str, split: str, select: FrameSelector
    ) -> tuple[list[VideoAnnotation], IndexStats]:
        if self.layout == "coco":
            return load_coco_vid(
                self._path(self.annotation_files[key]), self.vid_image_root, select=select
            )
        explicit = self._path(self.image_sets[key])
        return index_ilsvrc_vid(
            self.root,
            split,
            use_image_sets=self.use_image_sets,
            image_sets=[explicit] if explicit else None,
            select=select,
        )

    def _det_images(self) -> tuple[list[FrameAnnotation], IndexStats]:
        if self.layout == "coco":
            return load_coco_det(self._path(self.annotation_files["det"]), self.det_image_root)
        return index_ilsvrc_det(self.root, image_set=self._path(self.image_sets["det"]))

    def _build_train(self) -> DetectionDataset:
        name = f"imagenet_vid {self.train_split}"
        skips = SkipLog(name)
        select = partial(
            select_frames, stride=self.frame_stride, max_frames=self.frames_per_snippet
        )
        videos, stats = self._vid_videos("vid_train", self.train_split, select)
        frames = [f for v in videos for f in v.frames]
        empty = sum(1 for f in frames if not f.num_boxes)
        if not self.keep_empty_frames:
            frames = [f for f in frames if f.num_boxes]
        det: list[FrameAnnotation] = []
        if self.include_det:
            det, det_stats = self._det_images()
            stats.merge(det_stats)
        for reason, item in stats.missing:
            skips.skip(reason, item)
        listings: dict[Path, set[str]] = {}
        frames = drop_missing_images(frames, skips, listings)
        det = drop_missing_images(det, skips, listings)
        transforms: list[DetectionTransform] = [RandomHorizontalFlip(self.flip_prob)]
        if self.resize is not None:
            transforms.append(self.resize)
        dataset = DetectionDataset(frames + det, Compose(transforms), name)
        self.summaries["train"] = (
            skips.summary(len(dataset))
            + f"; VID {len(frames)} frames of {len(videos)} snippets"
            + f" ({empty} without objects, {'kept' if self.keep_empty_frames else 'left out'})"
            + (f", DET {len(det)} images with VID classes" if self.include_det else "")
            + f"; {stats.other_class_boxes} boxes of other classes and"
            + f" {stats.degenerate_boxes} empty boxes dropped"
        )
        return dataset

    def _build_eval(self) -> SegmentDataset:
        name = f"imagenet_vid {self.val_split}"
        skips = SkipLog(name)
        videos, stats = self._vid_videos("vid_val", self.val_split, select_frames)
        for reason, item in stats.missing:
            skips.skip(reason, item)
        listings: dict[Path, set[str]] = {}
        videos = [
            VideoAnnotation(v.video_id, drop_missing_images(v.frames, skips, listings))
            for v in videos
        ]
        videos = [v for v in videos if v.frames]
        segments = [s for v in videos for s in split_segments(v, self.segment_length)]
        rank, world = rank_and_world_size()
        mine = shard(segments, rank, world)
        dataset = SegmentDataset(mine, self.resize, name)
        frames = sum(len(v.frames) for v in videos)
        objects = sum(f.num_boxes for v in videos for f in v.frames)
        if frames and not objects:
            rank_zero_warn(
                f"{name}: no ground-truth objects in the {frames} evaluation frames, so "
                "mAP50 is undefined there (torchmetrics reports -1); check the split's "
                "annotations"
            )
        self.summaries["eval"] = (
            skips.summary(len(segments))
            + f"; {len(videos)} videos, {frames} frames ({objects} objects),"
            + f" segment_length {self.segment_length}"
            + f"; this rank ({rank} of {world}) has {len(mine)} segments"
            + f"; {stats.other_class_boxes} boxes of other classes and"
            + f" {stats.degenerate_boxes} empty boxes dropped"
        )
        return dataset

    # ----------------------------------------------------------------- Lightning hooks

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", None) and self.train_dataset is None:
            self.train_dataset = self._build_train()
            rank_zero_info(self.summaries["train"])
        if stage in ("fit", "validate", "test", "predict", None) and self.eval_dataset is None:
            self.eval_dataset = self._build_eval()
            rank_zero_info(self.summaries["eval"])

    def _loader(self, dataset: Dataset, **kwargs: Any) -> DataLoader:
        return DataLoader(
            dataset,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise RuntimeError("ImageNetVIDDataModule: call setup('fit') before train_dataloader")
        return self._loader(
            self.train_dataset,
            batch_size=self.batch_size,
            shuffle=True,
            collate_fn=collate_detection,
        )

    def val_dataloader(self) -> DataLoader:
        if self.eval_dataset is None:
            raise RuntimeError("ImageNetVIDDataModule: call setup() before val_dataloader")
        return eval_loader(
            self.eval_dataset,
            self.eval_batch_size,
            self.num_workers,
            collate_fn=collate_segments,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """The evaluation segments (``val_split``), as for test."""
        return self.val_dataloader()
