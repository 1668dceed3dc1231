"""Predictions on your own videos: a folder, a glob or a list of video files, no annotations.

:class:`VideoFolderDataModule` finds the videos, opens each once at setup
(unreadable files are skipped with one warning per reason and counted in
``summary``) and serves ``predict_dataloader`` batches in one of two forms,
chosen by the model it is used with (the LightningModule hands its settings
over through :meth:`VideoFolderDataModule.use_vivit_clips` or
:meth:`VideoFolderDataModule.use_vitdet_frames` when ``predict`` starts):

- ``"vivit"``: one item per video, the frames of the model's temporal views
  only (see :func:`view_frame_indices`), short side resized as the labeled
  evaluation does; batches from :func:`collate_views` (``"id"`` and
  ``"path"`` are the video's file).
- ``"vitdet"``: the video's frames in order, in chunks of ``chunk_frames``
  (one item each; see :class:`FrameChunkDataset`); the model streams them.

Usage::

    dm = VideoFolderDataModule("my_videos/", class_names="classes.txt")
    trainer.predict(module, datamodule=dm)   # module: ViViTFineTuning or ViTDetModule
"""

from __future__ import annotations

import glob
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from datamodules.clips import collate_eval
from datamodules.common import (
    SkipLog,
    check_start_method,
    eval_loader,
    rank_and_world_size,
    shard,
)
from datamodules.detection_transforms import ResizeShortEdge
from datamodules.vid_records import VID_CLASSES
from datamodules.video_io import ReaderCache, VideoInfo, VideoReadError, probe_videos, read_frames

#: File name endings taken from folders (files named directly or by a glob are taken as they are).
VIDEO_EXTENSIONS = (
    ".mp4",
    ".m4v",
    ".mkv",
    ".webm",
    ".avi",
    ".mov",
    ".mpg",
    ".mpeg",
    ".wmv",
    ".flv",
    ".ts",
    ".3gp",
)
#: ``class_names`` value for the 30 ImageNet VID classes (the VID detectors' labels).
IMAGENET_VID = "imagenet_vid"
Kind = Literal["vivit", "vitdet"]
KINDS = ("vivit", "vitdet")


def find_videos(paths: str | Sequence[str], recursive: bool = True) -> list[Path]:
    """The video files named by ``paths``: folders (files ending in one of
    :data:`VIDEO_EXTENSIONS`, in sub-folders too with ``recursive``), globs
    (``*``, ``?``, ``[``; ``**`` crosses folders) and files. Sorted within each
    entry, repeats dropped.

    Raises:
        FileNotFoundError: an entry that is no glob names nothing, or nothing matches at all.
    """
    entries = [paths] if isinstance(paths, str | Path) else list(paths)
    if not entries:
        raise ValueError("VideoFolderDataModule: paths is empty; give a folder, a glob or files")
    found: list[Path] = []
    for entry in map(str, entries):
        path = Path(entry).expanduser()
        if any(c in entry for c in "*?["):
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
            found += [p for p in matches if p.is_file()]
        elif path.is_dir():
            pattern = "**/*" if recursive else "*"
            found += sorted(
                p
                for p in path.glob(pattern)
                if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS
            )
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(
                f"VideoFolderDataModule: paths entry {entry!r} is no file, folder or glob "
                "(check the path; quote globs so the shell leaves them alone)"
            )
    found = list(dict.fromkeys(found))
    if not found:
        raise FileNotFoundError(
            f"VideoFolderDataModule: paths {entries} match no video file (folders are "
            f"searched for {', '.join(VIDEO_EXTENSIONS)}); name the files or a glob such "
            "as 'videos/*.MTS' for other endings"
        )
    return found


def read_class_names(spec: str | Sequence[str] | None) -> list[str] | None:
    """Class names from ``spec``: a text file (one name per line, blank lines
    ignored), a JSON file holding a list of strings, the list itself, or
    ``"imagenet_vid"`` (the 30 ImageNet VID classes); None stays None.

    Raises:
        ValueError: the file is missing or holds no list of names (names the file).
    """
    if spec is None:
        return None
    if not isinstance(spec, str):
        names = [str(name) for name in spec]
    elif spec == IMAGENET_VID:
        names = list(VID_CLASSES)
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ValueError(
                f"class_names: {spec} is not a file; give a text file (one name per line), "
                f"a JSON list, or {IMAGENET_VID!r}"
            )
        text = path.read_text(encoding="utf-8-sig")
        if path.suffix.lower() == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(f"class_names: {path} is not valid JSON ({error})") from None
            if not isinstance(data, list) or not all(isinstance(n, str) for n in data):
                raise ValueError(f"class_names: {path} must hold a JSON list of strings")
            names = data
        else:
            names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise ValueError(f"class_names: {spec} holds no class names")
    return names


def processed_frames(num_frames: int, frame_stride: int, max_frames: int | None) -> list[int]:
    """The frame numbers of a video that are used: every ``frame_stride``-th, at
    most ``max_frames`` of them."""
    frames = list(range(0, num_frames, frame_stride))
    return frames if max_frames is None else frames[:max_frames]


def view_frame_indices(
    length: int, frames: int, temporal_stride: int, temporal_views: int
) -> list[int]:
    """A compact clip of a ``length``-frame video that a ViViT model with these
    view settings reads exactly as the whole video (and decodes far fewer frames).

    The model pads a short video with its last frame, starts its
    ``temporal_views`` views at evenly spaced frames and takes ``frames``
    frames at ``temporal_stride`` from each. The returned positions (into the
    video, ``temporal_views * frames * temporal_stride`` of them) lay the views
    end to end, each view's frames where the model looks for them (the
    positions it skips repeat a used frame): on this clip the model's views
    start at ``k * frames * temporal_stride`` and take the same frames as on
    the whole video.
    """
    if min(length, frames, temporal_stride, temporal_views) < 1:
        raise ValueError(
            "view_frame_indices: length, frames, temporal_stride and temporal_views must be "
            f">= 1, got {length}, {frames}, {temporal_stride}, {temporal_views}"
        )
    span = frames * temporal_stride
    padded = max(length, span)
    if temporal_views == 1:
        starts = [(padded - span) // 2]
    else:
        spacing = (padded - span) / (temporal_views - 1)
        starts = [int(k * spacing) for k in range(temporal_views)]
    offsets = [(j // temporal_stride) * temporal_stride for j in range(span)]
    return [min(start + offset, length - 1) for start in starts for offset in offsets]


@dataclass(frozen=True)
class FolderVideo:
    """A readable video: its file, frame count and average frame rate."""

    path: Path
    num_frames: int
    fps: float


@dataclass(frozen=True)
class ViewClips:
    """The ViViT model's view settings (see :func:`view_frame_indices`) and the
    short side frames are resized to (None: as decoded)."""

    frames: int
    temporal_stride: int
    temporal_views: int
    short_side: int | None


class _ReadingDataset(Dataset):
    """A dataset that keeps a few decord readers open per process."""

    def __init__(self, name: str, decode_threads: int) -> None:
        self.name = name
        self.decode_threads = decode_threads
        #: Videos that failed to decode in this process (after setup).
        self.skip_log = SkipLog(f"{name} (while loading)")
        self._readers: ReaderCache | None = None

    @property
    def readers(self) -> ReaderCache:
        if self._readers is None:  # one per DataLoader worker process
            self._readers = ReaderCache(2, self.decode_threads)
        return self._readers

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_readers"] = None  # decord readers do not pickle (spawned workers)
        return state


class ViewClipDataset(_ReadingDataset):
    """One item per video: the compact clip of the model's views.

    Item: ``{"video": (V * T * s, C, H, W) uint8 or None (decoding failed),
    "label": -1, "id": path str, "num_frames": int, "fps": float}``, batched by
    :func:`datamodules.clips.collate_eval`.
    """

    def __init__(
        self,
        videos: Sequence[FolderVideo],
        clips: ViewClips,
        frame_stride: int = 1,
        max_frames: int | None = None,
        name: str = "video folder",
        decode_threads: int = 1,
    ) -> None:
        super().__init__(name, decode_threads)
        self.videos = list(videos)
        self.clips = clips
        self.frame_stride, self.max_frames = frame_stride, max_frames

    def __len__(self) -> int:
        return len(self.videos)

    def indices(self, video: FolderVideo) -> list[int]:
        """The frame numbers of ``video`` that make its clip."""
        used = processed_frames(video.num_frames, self.frame_stride, self.max_frames)
        c = self.clips
        plan = view_frame_indices(len(used), c.frames, c.temporal_stride, c.temporal_views)
        return [used[i] for i in plan]

    def __getitem__(self, index: int) -> dict[str, Any]:
        video = self.videos[index]
        item = {"label": -1, "id": str(video.path), "num_frames": video.num_frames}
        try:
            reader = self.readers.get(video.path)
            clip = read_frames(reader, self.indices(video), self.clips.short_side, path=video.path)
        except (VideoReadError, IndexError) as error:
            self.readers.drop(video.path)
            self.skip_log.skip("unreadable", f"{video.path}: {error}")
            return {**item, "video": None, "fps": video.fps}
        return {**item, "video": clip, "fps": video.fps}


@dataclass(frozen=True)
class FrameChunk:
    """Frames ``[first, stop)`` of the used frames of video ``video`` (an index);
    ``reset``: the model starts a new stream at its first frame."""

    video: int
    index: int
    first: int
    stop: int
    reset: bool
    last: bool


def chunk_video(
    video: int, count: int, chunk_frames: int, stream_length: int | None
) -> list[FrameChunk]:
    """Chunks of ``count`` used frames: a new chunk every ``chunk_frames``
    frames and at every stream start (every ``stream_length`` frames)."""
    cuts = set(range(0, count, chunk_frames))
    if stream_length is not None:
        cuts |= set(range(0, count, stream_length))
    starts = sorted(cuts)
    stops = [*starts[1:], count]
    return [
        FrameChunk(
            video,
            k,
            first,
            stop,
            first == 0 or (stream_length is not None and first % stream_length == 0),
            k == len(starts) - 1,
        )
        for k, (first, stop) in enumerate(zip(starts, stops))
    ]


class FrameChunkDataset(_ReadingDataset):
    """The frames of every video in order, in chunks: one item per chunk.

    Item: ``{"video": path str, "chunk": int (0, 1, ... per video),
    "frame_indices": [n] frame numbers in the file, "frames": (n, 3, h, w)
    uint8 or None (decoding failed), "size": (H, W) of the file's frames,
    "reset": bool (a new stream starts here), "last": bool (the video's last
    chunk), "fps": frames per second of the used frames, "error": str or
    None}``; with ``resize`` the frames are resized (h, w), else h, w = H, W.
    Batches are lists of items (:func:`collate_chunks`).
    """

    def __init__(
        self,
        videos: Sequence[FolderVideo],
        chunk_frames: int = 16,
        stream_length: int | None = None,
        frame_stride: int = 1,
        max_frames: int | None = None,
        resize: ResizeShortEdge | None = None,
        name: str = "video folder",
        decode_threads: int = 1,
    ) -> None:
        super().__init__(name, decode_threads)
        self.videos = list(videos)
        self.frame_stride, self.max_frames = frame_stride, max_frames
        self.resize = resize
        self.used = [processed_frames(v.num_frames, frame_stride, max_frames) for v in self.videos]
        self.chunks = [
            chunk
            for k, used in enumerate(self.used)
            for chunk in chunk_video(k, len(used), chunk_frames, stream_length)
        ]

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, index: int) -> dict[str, Any]:
        chunk = self.chunks[index]
        video = self.videos[chunk.video]
        indices = self.used[chunk.video][chunk.first : chunk.stop]
        item = {
            "video": str(video.path),
            "chunk": chunk.index,
            "frame_indices": indices,
            "reset": chunk.reset,
            "last": chunk.last,
            "fps": video.fps / self.frame_stride,
            "frames": None,
            "size": None,
            "error": None,
        }
        try:
            frames = read_frames(self.readers.get(video.path), indices, path=video.path)
        except (VideoReadError, IndexError) as error:
            self.readers.drop(video.path)
            self.skip_log.skip("unreadable", f"{video.path}: {error}")
            return {**item, "error": str(error)}
        item["size"] = tuple(frames.shape[-2:])
        if self.resize is not None:
            empty = {"boxes": torch.zeros(0, 4)}
            frames = torch.stack([self.resize(frame, empty)[0] for frame in frames])
        return {**item, "frames": frames}


def collate_views(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """:func:`datamodules.clips.collate_eval` of view clips, plus ``"path"``: the
    decoded videos' files (as ``"id"``), which marks a batch of this data module."""
    out = collate_eval(batch)
    return {**out, "path": list(out["id"])}


def collate_chunks(batch: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """A batch of chunks is the list of chunk items, in order."""
    return list(batch)


class VideoFolderDataModule(L.LightningDataModule):
    """Videos without annotations, for ``predict`` (ViViT or ViTDet).

    Args:
        paths: A folder, a glob or a file, or a list of them (see :func:`find_videos`).
        class_names: Class names for the outputs: a text file (one per line), a
            JSON list file, a list, or ``"imagenet_vid"`` (the 30 VID classes);
            None: class ids only. Their number must equal the model's classes.
        kind: ``"vivit"`` or ``"vitdet"``; None: set by the model when
            ``predict`` starts (:meth:`use_vivit_clips` / :meth:`use_vitdet_frames`).
        frames: ViViT: frames per view (None: the model's).
        temporal_stride: ViViT: frame step within a view (None: the model's).
        temporal_views: ViViT: views along time (None: the model's).
        short_side: ViViT: frames are resized so their short side is this
            before the model's own resize and crops (None: the model's input
            size, as the labeled evaluation does; 0: as decoded).
        chunk_frames: ViTDet: frames per item (decoded and held at once).
        stream_length: ViTDet: the model's state restarts every this many
            (used) frames; None: each video is one stream.
        frame_stride: Use every this-th frame (both models).
        max_frames: Use at most this many frames of each video (after
            ``frame_stride``); None: all.
        resize_short_edge: ViTDet: resize frames to this short edge in the
            loader (boxes are still given in the video's pixels); None: the
            model resizes them.
        resize_max_size: ViTDet: bound of the long edge with ``resize_short_edge``.
        batch_size: Videos (ViViT) or chunks (ViTDet) per batch.
        num_workers: DataLoader workers.
        recursive: Search folders' sub-folders too.
        probe_workers: Threads opening the videos at setup.
        decode_threads: decord threads per reader.
        pin_memory: DataLoader ``pin_memory``.
        worker_start_method: ``"spawn"``, ``"forkserver"`` or ``"fork"``
            (can deadlock with decord's threads) for DataLoader workers.
    """

    def __init__(
        self,
        paths: str | list[str],
        class_names: str | list[str] | None = None,
        kind: Kind | None = None,
        frames: int | None = None,
        temporal_stride: int | None = None,
        temporal_views: int | None = None,
        short_side: int | None = None,
        chunk_frames: int = 16,
        stream_length: int | None = None,
        frame_stride: int = 1,
        max_frames: int | None = None,
        resize_short_edge: int | None = None,
        resize_max_size: int | None = None,
        batch_size: int = 1,
        num_workers: int = 0,
        recursive: bool = True,
        probe_workers: int = 4,
        decode_threads: int = 1,
        pin_memory: bool = False,
        worker_start_method: str = "spawn",
    ) -> None:
        super().__init__()
        if kind is not None and kind not in KINDS:
            raise ValueError(f"VideoFolderDataModule: kind must be one of {KINDS}, got {kind!r}")
        positive = {
            "frames": frames,
            "temporal_stride": temporal_stride,
            "temporal_views": temporal_views,
            "chunk_frames": chunk_frames,
            "stream_length": stream_length,
            "frame_stride": frame_stride,
            "max_frames": max_frames,
            "resize_short_edge": resize_short_edge,
            "resize_max_size": resize_max_size,
            "batch_size": batch_size,
            "probe_workers": probe_workers,
            "decode_threads": decode_threads,
        }
        for option, value in positive.items():
            if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
                raise ValueError(
                    f"VideoFolderDataModule: {option} must be a positive integer, got {value!r}"
                )
        if short_side is not None and short_side < 0:
            raise ValueError(f"VideoFolderDataModule: short_side must be >= 0, got {short_side}")
        if num_workers < 0:
            raise ValueError(f"VideoFolderDataModule: num_workers must be >= 0, got {num_workers}")
        if resize_max_size is not None and resize_short_edge is None:
            raise ValueError("VideoFolderDataModule: resize_max_size needs resize_short_edge")
        self.save_hyperparameters()
        self.paths = paths
        #: The class names (None: ids only).
        self.class_names = read_class_names(class_names)
        self.kind = kind
        self.view_options = (frames, temporal_stride, temporal_views, short_side)
        self.chunk_frames, self.stream_length = chunk_frames, stream_length
        self.frame_stride, self.max_frames = frame_stride, max_frames
        self.resize = (
            ResizeShortEdge(resize_short_edge, resize_max_size) if resize_short_edge else None
        )
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        self.recursive, self.probe_workers = recursive, probe_workers
        self.decode_threads = decode_threads
        self.worker_start_method = check_start_method(worker_start_method, "worker_start_method")
        #: The readable videos of this rank (after setup), in order.
        self.videos: list[FolderVideo] = []
        #: What setup found and skipped.
        self.summary = ""
        self._clips: ViewClips | None = None

    # ------------------------------------------------------------------ set-up

    def setup(self, stage: str | None = None) -> None:
        """Finds the videos, shards them by rank (whole videos) and opens each
        once; unreadable ones are skipped (one warning per reason, counted)."""
        if stage not in (None, "predict"):
            raise ValueError(
                f"VideoFolderDataModule has no labels, so it serves predict only, not {stage!r} "
                "(use the dataset's data module to fit, validate or test)"
            )
        if self.videos:
            return
        found = find_videos(self.paths, self.recursive)
        rank, world = rank_and_world_size()
        mine = shard(found, rank, world)
        name = "video folder" + (f" (rank {rank} of {world})" if world > 1 else "")
        log = SkipLog(name)
        infos = probe_videos(mine, self.probe_workers)
        for path in mine:
            info = infos[path]
            if isinstance(info, VideoInfo):
                self.videos.append(FolderVideo(path, info.num_frames, info.fps))
            else:
                reason = "missing" if info.reason == "file not found" else "unreadable"
                log.skip(reason, str(info))
        self.summary = log.summary(len(self.videos)) + f" of {len(found)} found"
        rank_zero_info(self.summary)
        if not self.videos and world == 1:
            raise RuntimeError(f"{self.summary}: no readable video in {self.paths}")

    def check_classes(self, num_classes: int) -> None:
        """Refuses a class list whose length is not the model's class count."""
        if self.class_names is not None and len(self.class_names) != num_classes:
            raise ValueError(
                f"VideoFolderDataModule: class_names ({self.hparams['class_names']}) has "
                f"{len(self.class_names)} names but the model has {num_classes} classes; give "
                "the model's class list, in its label order"
            )

    def use_vivit_clips(
        self,
        frames: int,
        temporal_stride: int,
        temporal_views: int,
        short_side: int | None,
        num_classes: int | None = None,
    ) -> None:
        """The ViViT model's view settings (its module calls this when predict
        starts): options left at None take these; ones set must agree."""
        self._set_kind("vivit")
        model = {"frames": frames, "temporal_stride": temporal_stride}
        model["temporal_views"] = temporal_views
        for (option, value), given in zip(model.items(), self.view_options):
            if given is not None and given != value:
                raise ValueError(
                    f"VideoFolderDataModule: {option}={given} but the model uses {value}; "
                    f"leave {option} unset (null) to take the model's"
                )
        side = self.view_options[3]
        short = short_side if side is None else (side or None)
        self._clips = ViewClips(frames, temporal_stride, temporal_views, short)
        if num_classes is not None:
            self.check_classes(num_classes)

    def use_vitdet_frames(self, num_classes: int | None = None) -> None:
        """Frames in order for a ViTDet model (its module calls this when predict starts)."""
        self._set_kind("vitdet")
        if num_classes is not None:
            self.check_classes(num_classes)

    def _set_kind(self, kind: str) -> None:
        if self.kind is not None and self.kind != kind:
            raise ValueError(
                f"VideoFolderDataModule: kind={self.kind!r} but the model is a {kind} model; "
                "leave kind unset (null) or match the model"
            )
        self.kind = kind  # type: ignore[assignment]

    # ------------------------------------------------------------------ loading

    def predict_dataset(self) -> Dataset:
        """This rank's dataset: :class:`ViewClipDataset` or :class:`FrameChunkDataset`."""
        if self.kind is None:
            raise ValueError(
                "VideoFolderDataModule: kind is not set; predict with a ViViTFineTuning or "
                "ViTDetModule (they set it), or set kind: vivit / vitdet"
            )
        if not self.videos:
            self.setup("predict")
        common = {"name": "video folder", "decode_threads": self.decode_threads}
        strides = {"frame_stride": self.frame_stride, "max_frames": self.max_frames}
        if self.kind == "vitdet":
            return FrameChunkDataset(
                self.videos,
                self.chunk_frames,
                self.stream_length,
                resize=self.resize,
                **strides,
                **common,
            )
        clips = self._clips
        if clips is None:
            frames, stride, views, side = self.view_options
            if None in (frames, stride, views):
                raise ValueError(
                    "VideoFolderDataModule: kind 'vivit' without a model needs frames, "
                    "temporal_stride and temporal_views (or predict with a ViViTFineTuning)"
                )
            clips = ViewClips(frames, stride, views, side or None)
        return ViewClipDataset(self.videos, clips, **strides, **common)

    def predict_dataloader(self) -> DataLoader:
        """Batches of this rank's videos (ViViT: :func:`collate_views`)
        or chunks (ViTDet: :func:`collate_chunks`), in order."""
        dataset = self.predict_dataset()
        collate = collate_chunks if isinstance(dataset, FrameChunkDataset) else collate_views
        return eval_loader(
            dataset,
            self.batch_size,
            self.num_workers,
            collate_fn=collate,
            pin_memory=self.pin_memory,
            multiprocessing_context=self.worker_start_method if self.num_workers > 0 else None,
        )
