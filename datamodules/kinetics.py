"""Kinetics-400 read in its published layout (annotation CSVs + clip files), with decord.

Layout (the CVDF / ``kinetics-dataset`` copy; the others below are found too)::

    root/annotations/train.csv        # label,youtube_id,time_start,time_end,split
    root/annotations/val.csv
    root/train/<youtube_id>_<time_start:06d>_<time_end:06d>.mp4
    root/val/...

Also accepted: annotation files directly in ``root`` (or ``annotation_dir``) named
``{split}.csv``, ``kinetics400_{split}.csv`` or ``kinetics-400_{split}.csv``
(``val`` and ``validate`` are aliases); clips in ``root/{split}/`` or
``root/videos/{split}/``, directly or in per-class subfolders (the ActivityNet
downloader), with extension ``.mp4``, ``.mkv``, ``.webm``, ``.avi`` or ``.mov``.

Label index = position of the class name in the sorted list of the training
split's class names (``classes`` overrides). Missing and unreadable clips are
skipped with one warning per reason and counted (``summaries``). Annotation
files are read as UTF-8 (with or without a byte-order mark; another encoding is
a DataFormatError naming file and line); a clip listed twice with the same label
is kept once (the repeats are counted in one warning), with another label it is
a DataFormatError naming both lines.

Usage::

    from datamodules.kinetics import KineticsDataModule

    data = KineticsDataModule("/data/kinetics400", batch_size=16, frames=32, stride=2)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))  # video (16, 32, 3, 224, 224) uint8
    print(data.summaries["train"])  # "kinetics400 train: 234619 items, 1225 skipped (...)"

In LightningCLI YAML::

    data:
      class_path: datamodules.kinetics.KineticsDataModule
      init_args: {root: /data/kinetics400, batch_size: 16, frames: 32, stride: 2}
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info

from datamodules.common import DataFormatError, first_of_each_id, parse_int, read_csv_rows
from datamodules.video import ClipDataModule, ClipItem

COLUMNS = ("label", "youtube_id", "time_start", "time_end")
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov")
_ALIASES = {"val": ("val", "validate"), "validate": ("validate", "val")}


@dataclass(frozen=True)
class KineticsRow:
    """One annotation row; ``line`` is its line in ``file``."""

    label: str
    youtube_id: str
    time_start: int
    time_end: int
    file: Path
    line: int

    @property
    def clip(self) -> str:
        """The clip's file name without extension."""
        return f"{self.youtube_id}_{self.time_start:06d}_{self.time_end:06d}"


def read_annotations(path: str | Path) -> list[KineticsRow]:
    """Rows of a Kinetics annotation CSV; DataFormatError names file and line of a bad row.

    A clip listed again with the same label is left out (the duplicates are
    counted in one warning); listed again with another label, it is a
    DataFormatError naming both lines.
    """
    path = Path(path)
    rows = []
    for line, row in read_csv_rows(path, COLUMNS):
        start = parse_int(path, line, "time_start", row["time_start"])
        end = parse_int(path, line, "time_end", row["time_end"])
        if end < start:
            raise DataFormatError(path, f"time_end {end} < time_start {start}", line)
        rows.append(
            KineticsRow(row["label"].strip(), row["youtube_id"].strip(), start, end, path, line)
        )
    kept = first_of_each_id(path, [(row.clip, row.line, {"label": row.label}) for row in rows])
    return [rows[i] for i in kept]


def find_annotation_file(root: Path, split: str, annotation_dir: Path | None = None) -> Path:
    """The annotation CSV of ``split`` (see module docstring); FileNotFoundError lists the tries."""
    folders = [annotation_dir] if annotation_dir is not None else [root / "annotations", root]
    names = _ALIASES.get(split, (split,))
    tried = []
    for folder in folders:
        for name in names:
            for pattern in ("{}.csv", "kinetics400_{}.csv", "kinetics-400_{}.csv"):
                candidate = folder / pattern.format(name)
                if candidate.is_file():
                    return candidate
                tried.append(str(candidate))
    raise FileNotFoundError(f"Kinetics {split!r}: no annotation file; tried {tried}")


def find_video_dir(root: Path, split: str) -> Path:
    """The folder holding the clips of ``split``; FileNotFoundError lists the tries."""
    tried = []
    for name in _ALIASES.get(split, (split,)):
        for candidate in (root / name, root / "videos" / name):
            if candidate.is_dir():
                return candidate
            tried.append(str(candidate))
    raise FileNotFoundError(f"Kinetics {split!r}: no video folder; tried {tried}")


def index_videos(folder: Path) -> dict[str, Path]:
    """Clip name (file stem) -> path of every video under ``folder`` (one directory walk)."""
    found: dict[str, Path] = {}
    for directory, subdirs, files in os.walk(folder):
        subdirs.sort()
        for name in sorted(files):
            stem, ext = os.path.splitext(name)
            if ext.lower() in VIDEO_EXTENSIONS and stem not in found:
                found[stem] = Path(directory) / name
    return found


def kinetics_items(
    rows: Sequence[KineticsRow], classes: Sequence[str], videos: dict[str, Path], folder: Path
) -> list[ClipItem]:
    """Clip items (label = index in ``classes``); clips not on disk point to their expected path."""
    index = {name: i for i, name in enumerate(classes)}
    items = []
    for row in rows:
        if row.label not in index:
            raise DataFormatError(row.file, f"label {row.label!r} is not a known class", row.line)
        path = videos.get(row.clip, folder / f"{row.clip}.mp4")
        items.append(ClipItem(row.clip, path, index[row.label]))
    return items


class KineticsDataModule(ClipDataModule):
    """Kinetics-400 clips for ViViT: random training clips, whole evaluation clips.

    Train batches: ``{"video": (B, frames, 3, crop_size, crop_size) uint8,
    "label": (B,) int64, "id": [B]}`` (Lightning's default sampler shards them
    under DDP); with ``train_clips="whole"``, whole clips like the evaluation
    batches below, shuffled. Evaluation batches (val/test): whole clips for the model's
    multi-view preprocessing, ``{"video": (B, T, 3, H, W) uint8, "length": (B,),
    "label": (B,), "id": [B], "skipped": [...]}``, short side ``eval_short_side``
    (``video`` is a list of B clips when their frame sizes differ, see
    :func:`datamodules.video.collate_eval`);
    each rank gets its own shard (:func:`datamodules.common.shard`), nothing repeated.

    Args:
        root: Dataset root (see module docstring for the layouts).
        annotation_dir: Folder of the annotation CSVs (default: ``root/annotations``
            or ``root``).
        classes: Class names in label order (default: sorted names of the
            training split's annotation file).
        synthetic: If set and ``root`` holds no training annotations yet,
            :meth:`prepare_data` first writes a synthetic dataset there in this
            layout with :func:`datamodules.synthetic_video.make_kinetics`
            (these are its keyword arguments, e.g. ``{videos_per_class: 16,
            frames: 16, size: 64}``; needs the ``av`` package). For demos and tests.
        **kwargs: The options shared by the video data modules, with their
            defaults (splits ``train``/``val``, ``batch_size`` 16, ``frames`` 32,
            ``stride`` 2, ``crop_size`` 224, ``eval_short_side``, ``train_limit``,
            ``probe``, ``num_workers``, ``train_clips``, ...): see
            :class:`~datamodules.video.ClipDataModule`. One video is kept open
            per worker (``open_readers`` is 1: each clip is its own file).
    """

    name = "kinetics400"

    def __init__(
        self,
        root: str,
        annotation_dir: str | None = None,
        classes: list[str] | None = None,
        synthetic: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(root, open_readers=1, **kwargs)
        self.annotation_dir = Path(annotation_dir) if annotation_dir else None
        self._classes = list(classes) if classes else None
        self.synthetic = dict(synthetic) if synthetic is not None else None

    def prepare_data(self) -> None:
        """Writes the ``synthetic`` dataset if asked for and ``root`` has none yet."""
        if self.synthetic is None:
            return
        try:
            find_annotation_file(self.root, self.train_split, self.annotation_dir)
        except FileNotFoundError:
            from datamodules.synthetic_video import make_kinetics, write_new_folder

            splits = list(dict.fromkeys([self.train_split, self.val_split, self.test_split]))
            rank_zero_info(f"kinetics400: writing a synthetic dataset to {self.root}")
            what = (
                f"kinetics400's synthetic dataset (option synthetic; {self.root} has no "
                f"{self.train_split} annotations, so it is not a Kinetics dataset)"
            )
            write_new_folder(
                self.root,
                lambda folder: make_kinetics(folder, splits=splits, **self.synthetic),
                what,
            )

    # ----------------------------------------------------------------- indexing

    @property
    def classes(self) -> list[str]:
        """Class names in label order (sorted names of the training split by default)."""
        if self._classes is None:
            path = find_annotation_file(self.root, self.train_split, self.annotation_dir)
            self._classes = sorted({row.label for row in read_annotations(path)})
        return self._classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def load_items(self, split: str) -> list[ClipItem]:
        rows = read_annotations(find_annotation_file(self.root, split, self.annotation_dir))
        folder = find_video_dir(self.root, split)
        return kinetics_items(rows, self.classes, index_videos(folder), folder)
