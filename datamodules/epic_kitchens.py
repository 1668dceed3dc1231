"""EPIC-Kitchens-100 action segments (verb classes) read from the published videos with decord.

Layout::

    root/EPIC_100_train.csv           # narration_id, participant_id, video_id, ...,
    root/EPIC_100_validation.csv      #   start/stop_timestamp, start/stop_frame, verb_class
    root/P01/videos/P01_01.MP4        # {participant_id}/videos/{video_id}.MP4
    root/videos/P01_01.MP4            # or all videos in one folder (both are searched)

The annotation CSVs may also lie in ``root/annotations``,
``root/epic-kitchens-100-annotations`` or ``annotation_dir``. Split names are
the file suffixes (``train``, ``validation``; ``val`` is an alias).

Segment bounds come from ``start_frame``/``stop_frame`` (1-based, inclusive, as
in the annotation files) or, with ``clip_bounds="timestamps"``, from
``start_timestamp``/``stop_timestamp`` (``HH:MM:SS.ff``) converted with the
video's real frame rate read from the file. Labels are ``verb_class``
(97 classes). Segments of missing or unreadable videos are skipped with one
warning per reason and counted (``summaries``); so are segments that start
after the end of their video, while one that runs past the end is clipped to
the video (counted, one warning). Annotation files are read as UTF-8 (with or
without a byte-order mark); a ``narration_id`` listed twice with the same
values is kept once (the repeats counted in one warning), with other values it
is a DataFormatError naming both lines.

Usage::

    from datamodules.epic_kitchens import EpicKitchensDataModule

    data = EpicKitchensDataModule("/data/EPIC-KITCHENS", frames=32, stride=1, crop_size=320)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))  # video (8, 32, 3, 320, 320) uint8

In LightningCLI YAML::

    data:
      class_path: datamodules.epic_kitchens.EpicKitchensDataModule
      init_args: {root: /data/EPIC-KITCHENS, batch_size: 8, clip_bounds: timestamps}
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from datamodules.common import DataFormatError, first_of_each_id, parse_int, read_csv_rows
from datamodules.video import ClipDataModule, ClipItem

NUM_VERB_CLASSES = 97
ID_COLUMNS = ("narration_id", "participant_id", "video_id", "verb_class")
BOUND_COLUMNS = {
    "frames": ("start_frame", "stop_frame"),
    "timestamps": ("start_timestamp", "stop_timestamp"),
}
_SPLIT_ALIASES = {"val": "validation"}
_TIMESTAMP = re.compile(r"^(\d+):([0-5]?\d):([0-5]?\d(?:\.\d+)?)$")


def parse_timestamp(path: Path, line: int, column: str, text: str) -> float:
    """``HH:MM:SS.ff`` -> seconds, or DataFormatError naming file, line and column."""
    match = _TIMESTAMP.match(text.strip())
    if match is None:
        raise DataFormatError(path, f"{column} must be HH:MM:SS.ff, got {text!r}", line)
    hours, minutes, seconds = match.groups()
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def find_annotation_file(root: Path, split: str, annotation_dir: Path | None = None) -> Path:
    """``EPIC_100_{split}.csv`` in ``annotation_dir`` or the usual places; lists the tries."""
    name = f"EPIC_100_{_SPLIT_ALIASES.get(split, split)}.csv"
    folders = (
        [annotation_dir]
        if annotation_dir is not None
        else [root, root / "annotations", root / "epic-kitchens-100-annotations"]
    )
    for folder in folders:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(
        f"EPIC-Kitchens {split!r}: no annotation file; tried {[str(f / name) for f in folders]}"
    )


def find_video(root: Path, participant_id: str, video_id: str) -> Path:
    """The video file of ``video_id`` (``{participant_id}/videos/`` or ``videos/``).

    Returns the first candidate path if none exists (the skip message names it).
    """
    candidates = [
        root / participant_id / "videos" / f"{video_id}{ext}" for ext in (".MP4", ".mp4")
    ] + [root / "videos" / f"{video_id}{ext}" for ext in (".MP4", ".mp4")]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return candidates[0]


def read_segments(
    path: Path,
    root: Path,
    clip_bounds: Literal["frames", "timestamps"] = "frames",
    num_classes: int = NUM_VERB_CLASSES,
) -> list[ClipItem]:
    """The narrated segments of an EPIC-Kitchens-100 CSV as clip items (label = verb_class).

    Raises DataFormatError naming the file and line of a malformed row (missing
    value, non-integer frame, bad timestamp, stop before start, verb_class out
    of range). A ``narration_id`` listed again with the same video, bounds and
    verb_class is left out (the duplicates are counted in one warning); listed
    again with other values, it is a DataFormatError naming both lines.
    """
    if clip_bounds not in BOUND_COLUMNS:
        raise ValueError(f"clip_bounds must be 'frames' or 'timestamps', got {clip_bounds!r}")
    start_col, stop_col = BOUND_COLUMNS[clip_bounds]
    videos: dict[str, Path] = {}
    items = []
    entries = []  # (narration_id, line, values) for the duplicate check
    for line, row in read_csv_rows(path, ID_COLUMNS + BOUND_COLUMNS[clip_bounds]):
        label = parse_int(path, line, "verb_class", row["verb_class"])
        if not 0 <= label < num_classes:
            raise DataFormatError(path, f"verb_class {label} outside [0, {num_classes})", line)
        if clip_bounds == "frames":
            start = parse_int(path, line, start_col, row[start_col])
            stop = parse_int(path, line, stop_col, row[stop_col])
            if start < 1:
                raise DataFormatError(path, f"start_frame {start} < 1 (frames are 1-based)", line)
        else:
            start = parse_timestamp(path, line, start_col, row[start_col])
            stop = parse_timestamp(path, line, stop_col, row[stop_col])
        if stop < start:
            raise DataFormatError(
                path, f"{stop_col} {row[stop_col]} < {start_col} {row[start_col]}", line
            )
        video_id = row["video_id"].strip()
        if video_id not in videos:
            videos[video_id] = find_video(root, row["participant_id"].strip(), video_id)
        narration_id = row["narration_id"]
        if clip_bounds == "frames":  # 1-based inclusive -> 0-based, stop exclusive
            item = ClipItem(narration_id, videos[video_id], label, start - 1, stop)
        else:
            item = ClipItem(narration_id, videos[video_id], label, start, stop, "second")
        items.append(item)
        values = {"verb_class": label, "video_id": video_id, start_col: start, stop_col: stop}
        entries.append((narration_id, line, values))
    return [items[i] for i in first_of_each_id(path, entries)]


class EpicKitchensDataModule(ClipDataModule):
    """EPIC-Kitchens-100 verb recognition: random training clips, whole evaluation segments.

    Train batches: ``{"video": (B, frames, 3, crop_size, crop_size) uint8,
    "label": (B,) int64 verb_class, "id": [B] narration_id}`` (with
    ``train_clips="whole"``: whole segments like the evaluation batches, shuffled).
    Evaluation batches:
    every frame of each segment, ``{"video": (B, T, 3, H, W) uint8, "length": (B,),
    "label": (B,), "id": [B], "skipped": [...]}`` with short side
    ``eval_short_side`` (``video`` is a list of B clips when their frame sizes
    differ, see :func:`datamodules.video.collate_eval`); each rank gets its own
    shard, nothing repeated. A segment that runs past the end of its video is
    clipped to the video (counted in ``summaries``, one warning); one that
    starts after the end is skipped.

    Args:
        root: Dataset root (see module docstring for the layouts).
        annotation_dir: Folder of the annotation CSVs (default: searched).
        clip_bounds: ``"frames"`` (start/stop_frame) or ``"timestamps"``
            (start/stop_timestamp with the video's real fps).
        num_classes: Verb classes (97).
        val_split: Validation split (``EPIC_100_{val_split}.csv``; the training
            split is ``train_split``, default ``train``).
        batch_size: Training clips per batch.
        stride: Frame step within a training clip.
        crop_size: Training crop side.
        **kwargs: The other options shared by the video data modules, with
            their defaults (``frames`` 32, ``eval_short_side``, ``train_limit``,
            ``probe``, ``open_readers``, ``num_workers``, ``train_clips``, ...):
            see :class:`~datamodules.video.ClipDataModule`.
    """

    name = "epic_kitchens100"

    def __init__(
        self,
        root: str,
        annotation_dir: str | None = None,
        clip_bounds: Literal["frames", "timestamps"] = "frames",
        num_classes: int = NUM_VERB_CLASSES,
        val_split: str = "validation",
        batch_size: int = 8,
        stride: int = 1,
        crop_size: int = 320,
        **kwargs: Any,
    ) -> None:
        if clip_bounds not in BOUND_COLUMNS:
            raise ValueError(f"clip_bounds must be 'frames' or 'timestamps', got {clip_bounds!r}")
        super().__init__(
            root,
            val_split=val_split,
            batch_size=batch_size,
            stride=stride,
            crop_size=crop_size,
            **kwargs,
        )
        self.annotation_dir = Path(annotation_dir) if annotation_dir else None
        self.clip_bounds = clip_bounds
        self.num_classes = num_classes

    def load_items(self, split: str) -> list[ClipItem]:
        path = find_annotation_file(self.root, split, self.annotation_dir)
        return read_segments(path, self.root, self.clip_bounds, self.num_classes)


__all__: Sequence[str] = (
    "EpicKitchensDataModule",
    "find_annotation_file",
    "find_video",
    "parse_timestamp",
    "read_segments",
)
