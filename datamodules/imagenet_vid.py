"""ImageNet VID + DET for video object detection with ViTDet (see docs/data-formats.md
and docs/training-protocol.md).

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

The datasets, collates and loading helpers live in :mod:`datamodules.vid_datasets`
and are importable from here as well.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset

# The names marked noqa F401 stay importable from here (they were defined or
# imported here before the datasets moved to datamodules.vid_datasets).
from datamodules.common import (
    LocalShardSampler,  # noqa: F401
    SkipLog,
    eval_loader,
    rank_and_world_size,
    shard,
)
from datamodules.detection_transforms import (
    Compose,
    DetectionTransform,
    RandomHorizontalFlip,
    ResizeShortEdge,
    scale_boxes,  # noqa: F401
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
from datamodules.vid_datasets import (
    SIZE_MISMATCH,  # noqa: F401
    TORCHVISION_CODEC_WARNING,  # noqa: F401
    DetectionDataset,
    PreShardedSampler,
    Segment,
    SegmentDataset,
    Target,  # noqa: F401
    collate_detection,
    collate_segments,
    drop_missing_images,
    load_frame,
    make_target,  # noqa: F401
    split_segments,
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
