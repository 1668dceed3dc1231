"""Reader of the ILSVRC2015 tree: PASCAL-VOC style XML and ImageSets lists.

``Data/VID/<split>/<snippet>/000000.JPEG`` next to
``Annotations/VID/<split>/<snippet>/000000.xml`` (with ``trackid``),
``ImageSets/VID/<split>*.txt`` lists when present, DET images under
``Data/DET/train`` with XML under ``Annotations/DET/train``. Gives the records of
:mod:`datamodules.vid_records`::

    videos, stats = index_ilsvrc_vid("/data/ILSVRC2015", "val")
    det, det_stats = index_ilsvrc_det("/data/ILSVRC2015")
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from datamodules.common import DataFormatError
from datamodules.vid_records import (
    IMAGE_SUFFIX,
    WNID_TO_LABEL,
    FrameAnnotation,
    FrameSelector,
    ImageBoxes,
    IndexStats,
    VideoAnnotation,
    _all_frames,
    _frame_number,
)

_BOX_KEYS = ("xmin", "ymin", "xmax", "ymax")


# --------------------------------------------------------------------------- XML


def _xml_number(element: ET.Element, tag: str, path: Path, where: str) -> float:
    text = element.findtext(tag)
    if text is None or not text.strip():
        raise DataFormatError(path, f"{where}: missing <{tag}>")
    try:
        return float(text)
    except ValueError:
        raise DataFormatError(path, f"{where}: <{tag}> is not a number: {text.strip()!r}") from None


def parse_voc_xml(
    path: str | Path, *, other_classes: bool, stats: IndexStats | None = None
) -> ImageBoxes:
    """Reads one PASCAL-VOC style XML file (ILSVRC VID or DET).

    Args:
        path: the XML file.
        other_classes: whether objects outside the 30 VID WordNet ids are
            expected (DET: dropped and counted) or a format error (VID).
        stats: counters to add dropped boxes to.

    Returns:
        the image size and its boxes of the 30 classes, clipped to the image.

    Raises:
        DataFormatError: unparseable XML (with its line), a missing ``<size>``,
            ``<name>`` or ``<bndbox>`` field, an unknown class in a VID file, or
            ``xmax < xmin`` / ``ymax < ymin`` (naming the object index).
    """
    path = Path(path)
    stats = stats if stats is not None else IndexStats()
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as error:
        raise DataFormatError(path, f"unparseable XML ({error})", line=error.position[0]) from None
    except OSError as error:
        raise DataFormatError(path, f"cannot read XML file ({error.strerror})") from None
    size = root.find("size")
    if size is None:
        raise DataFormatError(path, "missing <size>")
    width = int(_xml_number(size, "width", path, "<size>"))
    height = int(_xml_number(size, "height", path, "<size>"))
    out = ImageBoxes(width, height, stats)
    for index, obj in enumerate(root.findall("object")):
        where = f"object {index}"
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise DataFormatError(path, f"{where}: missing <name>")
        label = WNID_TO_LABEL.get(name)
        if label is None:
            if not other_classes:
                raise DataFormatError(
                    path, f"{where}: class {name!r} is not one of the 30 VID WordNet ids"
                )
            stats.other_class_boxes += 1
            continue
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise DataFormatError(path, f"{where}: missing <bndbox>")
        x1, y1, x2, y2 = (_xml_number(bndbox, key, path, f"{where} <bndbox>") for key in _BOX_KEYS)
        if x2 < x1 or y2 < y1:
            raise DataFormatError(
                path, f"{where}: box has xmax < xmin or ymax < ymin ({x1}, {y1}, {x2}, {y2})"
            )
        track = obj.findtext("trackid")
        try:
            track_id = int(track) if track is not None and track.strip() else -1
        except ValueError:
            raise DataFormatError(
                path, f"{where}: <trackid> is not an integer: {track!r}"
            ) from None
        out.add((x1, y1, x2, y2), label, track_id)
    return out


# --------------------------------------------------------------------------- ImageSets


@dataclass(frozen=True)
class ImageSetEntry:
    """One line of an ImageSets list: a whole snippet (``frame`` None) or one frame."""

    snippet: str
    frame: int | None


def read_image_set(path: str | Path, split: str) -> list[ImageSetEntry]:
    """Parses an ``ImageSets/VID/*.txt`` list.

    Accepted lines (a leading ``<split>/`` on the path is removed):
    ``<snippet> [1|-1]`` (``train_*.txt``), ``<snippet>/<frame> <index>``
    (``val.txt``) and ``<snippet> 1 <frame> <num_frames>`` (the
    ``VID_train_15frames.txt`` recipe lists). Blank lines are skipped.

    Raises:
        DataFormatError: a line with more than 4 fields or non-integer
            columns, naming the file and the line.
    """
    path = Path(path)
    entries = []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataFormatError(path, f"cannot read image set ({error})") from None
    prefix = f"{split}/"
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) > 4 or len(fields) == 3:
            raise DataFormatError(
                path, f"expected '<path> [flag]' or '<snippet> 1 <frame> <n>', got {line!r}", number
            )
        try:
            numbers = [int(value) for value in fields[1:]]
        except ValueError:
            raise DataFormatError(path, f"non-integer column in {line!r}", number) from None
        item = fields[0].strip("/")
        if item.startswith(prefix):
            item = item[len(prefix) :]
        if len(fields) == 4:
            entries.append(ImageSetEntry(item, numbers[1]))
            continue
        parent, _, last = item.rpartition("/")
        if parent and last.isdigit():
            entries.append(ImageSetEntry(parent, int(last)))
        else:
            entries.append(ImageSetEntry(item, None))
    return entries


def image_set_files(root: str | Path, split: str) -> list[Path]:
    """The ``ImageSets/VID/<split>*.txt`` lists under ``root`` (sorted; may be empty)."""
    folder = Path(root) / "ImageSets" / "VID"
    return sorted(folder.glob(f"{split}*.txt")) if folder.is_dir() else []


# --------------------------------------------------------------------------- ILSVRC tree


def _snippets_by_walk(ann_split: Path) -> list[str]:
    """Snippet folders (relative, POSIX) under ``ann_split`` that hold XML files."""
    found = []
    for folder, _, files in os.walk(ann_split):
        if any(name.endswith(".xml") for name in files):
            found.append(Path(folder).relative_to(ann_split).as_posix())
    return sorted(found)


def index_ilsvrc_vid(
    root: str | Path,
    split: str,
    *,
    use_image_sets: bool = True,
    image_sets: Sequence[str | Path] | None = None,
    select: FrameSelector = _all_frames,
) -> tuple[list[VideoAnnotation], IndexStats]:
    """Indexes the VID frames of one split of the ILSVRC2015 tree.

    Snippets come from ``image_sets`` (explicit list files), else from
    ``ImageSets/VID/<split>*.txt`` when ``use_image_sets`` and present, else from
    walking ``Annotations/VID/<split>``. ``select`` picks frame positions per
    snippet (see :func:`select_frames`); only the selected XML files are parsed.
    ``video_id`` is ``<split>/<snippet>``; ``image_id`` is the frame's path
    relative to ``Data/VID``.

    Raises:
        DataFormatError: malformed image set lists or XML files.
        FileNotFoundError: no annotation folder for the split.
    """
    root = Path(root)
    ann_split = root / "Annotations" / "VID" / split
    data_split = root / "Data" / "VID" / split
    if not ann_split.is_dir():
        raise FileNotFoundError(f"ImageNet VID: no annotation folder {ann_split}")
    stats = IndexStats()
    lists = [Path(p) for p in image_sets] if image_sets else []
    if not lists and use_image_sets:
        lists = image_set_files(root, split)
    # snippet -> listed frame numbers (None: the whole snippet is listed)
    wanted: dict[str, set[int] | None] = {}
    for list_file in lists:
        for entry in read_image_set(list_file, split):
            if entry.frame is None:
                wanted[entry.snippet] = None
            elif entry.snippet not in wanted:
                wanted[entry.snippet] = {entry.frame}
            elif (listed := wanted[entry.snippet]) is not None:
                listed.add(entry.frame)
    snippets = sorted(wanted) if lists else _snippets_by_walk(ann_split)
    videos = []
    for snippet in snippets:
        folder = ann_split / snippet
        try:
            names = sorted(n for n in os.listdir(folder) if n.endswith(".xml"))
        except OSError:
            stats.missing.append(("missing annotation folder", str(folder)))
            continue
        by_number = {}
        for name in names:
            number = _frame_number(name[:-4])
            if number < 0 or number in by_number:
                raise DataFormatError(
                    folder / name, "VID annotation file name is not a unique frame number"
                )
            by_number[number] = name
        listed = wanted.get(snippet) if lists else None
        if listed is not None:
            numbers = sorted(listed)
            for number in numbers:
                if number not in by_number:
                    stats.missing.append(("missing annotation", f"{folder}/{number:06d}.xml"))
            numbers = [n for n in numbers if n in by_number]
        else:
            numbers = sorted(by_number)
        frames = []
        for position in select(len(numbers)):
            number = numbers[position]
            name = by_number[number]
            parsed = parse_voc_xml(folder / name, other_classes=False, stats=stats)
            image_id = f"{split}/{snippet}/{name[:-4]}{IMAGE_SUFFIX}"
            frames.append(
                parsed.frame(
                    data_split / snippet / f"{name[:-4]}{IMAGE_SUFFIX}",
                    image_id,
                    video_id=f"{split}/{snippet}",
                    frame_index=number,
                )
            )
        if frames:
            videos.append(VideoAnnotation(f"{split}/{snippet}", frames))
    return videos, stats


def read_det_image_set(path: str | Path) -> list[str]:
    """Image paths (relative to ``Data/DET/train``, no suffix) listed in a DET list file.

    Lines are ``<path> [more columns]``; a leading ``train/`` is removed.
    """
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataFormatError(path, f"cannot read image set ({error})") from None
    items = []
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        if any(not value.lstrip("-").isdigit() for value in fields[1:]):
            raise DataFormatError(path, f"non-integer column in {line!r}", number)
        item = fields[0].strip("/")
        items.append(item[len("train/") :] if item.startswith("train/") else item)
    return items


def index_ilsvrc_det(
    root: str | Path, *, image_set: str | Path | None = None
) -> tuple[list[FrameAnnotation], IndexStats]:
    """Indexes the DET training images that contain at least one of the 30 classes.

    Images come from ``image_set`` (a list such as ``DET_train_30classes.txt``)
    or from walking ``Annotations/DET/train`` (every XML file is parsed: slow on
    the full 450k-image set, pass a list there). Boxes of other classes are
    dropped; images left without boxes are not returned (counted in
    ``stats.other_class_boxes`` only). ``image_id`` is the path relative to
    ``Data/DET``.

    Raises:
        DataFormatError: malformed XML or list files.
        FileNotFoundError: no ``Annotations/DET/train`` folder.
    """
    root = Path(root)
    ann_train = root / "Annotations" / "DET" / "train"
    data_train = root / "Data" / "DET" / "train"
    if not ann_train.is_dir():
        raise FileNotFoundError(f"ImageNet DET: no annotation folder {ann_train}")
    stats = IndexStats()
    if image_set is not None:
        items = read_det_image_set(image_set)
    else:
        items = sorted(
            (Path(folder) / name).relative_to(ann_train).as_posix()[:-4]
            for folder, _, files in os.walk(ann_train)
            for name in files
            if name.endswith(".xml")
        )
    images = []
    for item in items:
        xml = ann_train / f"{item}.xml"
        if image_set is not None and not xml.is_file():
            stats.missing.append(("missing annotation", str(xml)))
            continue
        parsed = parse_voc_xml(xml, other_classes=True, stats=stats)
        if parsed.labels:
            images.append(
                parsed.frame(data_train / f"{item}{IMAGE_SUFFIX}", f"train/{item}{IMAGE_SUFFIX}")
            )
    return images, stats
