"""ImageNet VID / DET annotations: parse both on-disk layouts into one record type.

Two layouts are read without conversion (DESIGN section 7):

* the ILSVRC2015 tree (``Data/VID/<split>/<snippet>/000000.JPEG`` next to
  ``Annotations/VID/<split>/<snippet>/000000.xml``, PASCAL-VOC style XML with
  ``trackid``; ``ImageSets/VID/<split>*.txt`` lists when present; DET images under
  ``Data/DET/train`` with XML under ``Annotations/DET/train``);
* the COCO-style JSON conversion (``images`` with ``file_name``, ``id``,
  ``width``, ``height`` and for video frames ``video_id`` / ``frame_id``;
  ``annotations`` with ``bbox`` xywh and 1-based ``category_id``; ``categories``).

Both give :class:`FrameAnnotation` records (boxes xyxy in pixels, labels 0..29 in
the order of :data:`VID_CLASSES`), VID frames grouped into :class:`VideoAnnotation`::

    videos, stats = index_ilsvrc_vid("/data/ILSVRC2015", "val")
    det, det_stats = index_ilsvrc_det("/data/ILSVRC2015")
    videos, stats = load_coco_vid("annotations/imagenet_vid_val.json", "/data/ILSVRC2015/Data/VID")

Box conventions: XML corner values are used as they are and COCO ``[x, y, w, h]``
becomes ``[x, y, x + w, y + h]`` (so a COCO conversion of the XML gives the same
boxes). Boxes are clipped to the image; boxes that are then empty (zero width or
height) are dropped and counted. A box with ``xmax < xmin`` (or ``ymax < ymin``,
or a negative COCO width/height) is a format error. Objects of classes outside
the 30 are dropped (and counted) in DET files and in COCO files whose categories
name other classes; in VID XML files an unknown WordNet id is a format error.
"""

from __future__ import annotations

import json
import os
import re
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from datamodules.common import DataFormatError

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
_BOX_KEYS = ("xmin", "ymin", "xmax", "ymax")
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


def _frame_number(stem: str) -> int:
    match = _TRAILING_NUMBER.match(stem)
    return int(match.group(2)) if match else -1


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


# --------------------------------------------------------------------------- COCO JSON


def _normalise(name: Any) -> str:
    return str(name).strip().lower().replace(" ", "_").replace("-", "_")


_NAME_TO_LABEL = {_normalise(n): k for k, n in enumerate(VID_CLASSES)} | WNID_TO_LABEL


def _category_labels(path: Path, categories: Any) -> dict[int, int | None]:
    """COCO category id -> VID label (None: another class, dropped)."""
    if not categories:
        return {k + 1: k for k in range(len(VID_CLASSES))}
    if not isinstance(categories, list):
        raise DataFormatError(path, "'categories' is not a list")
    labels: dict[int, int | None] = {}
    for index, category in enumerate(categories):
        if not isinstance(category, dict) or "id" not in category:
            raise DataFormatError(path, f"categories[{index}]: missing 'id'")
        names = [category.get(key) for key in ("name", "encode_name", "wnid")]
        matches = [_NAME_TO_LABEL.get(_normalise(n)) for n in names if n is not None]
        matches = [m for m in matches if m is not None]
        labels[int(category["id"])] = matches[0] if matches else None
    if all(label is None for label in labels.values()):
        raise DataFormatError(
            path, "no category names one of the 30 VID classes (by name or WordNet id)"
        )
    return labels


def _require(path: Path, record: Any, keys: Iterable[str], where: str) -> None:
    if not isinstance(record, dict):
        raise DataFormatError(path, f"{where}: not an object")
    for key in keys:
        if key not in record:
            raise DataFormatError(path, f"{where}: missing {key!r}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with path.open() as handle:
            data = json.load(handle)
    except json.JSONDecodeError as error:
        raise DataFormatError(path, f"unparseable JSON ({error.msg})", line=error.lineno) from None
    except (OSError, UnicodeDecodeError) as error:
        raise DataFormatError(path, f"cannot read JSON file ({error})") from None
    if not isinstance(data, dict):
        raise DataFormatError(path, "top level is not an object")
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise DataFormatError(path, f"missing list {key!r}")
    return data


def _parse_coco(
    path: Path, image_root: Path
) -> tuple[list[FrameAnnotation], dict[str, Any], IndexStats]:
    """Reads a COCO-style detection JSON file.

    Returns one record per image (in file order, boxes of other classes
    dropped), the raw JSON (for the video fields) and counters.

    Raises:
        DataFormatError: unparseable JSON (with its line), missing fields,
            unknown image or category ids, malformed ``bbox`` (naming the entry).
    """
    data = _read_json(path)
    labels_of = _category_labels(path, data.get("categories"))
    stats = IndexStats()
    images: dict[Any, ImageBoxes] = {}
    for index, image in enumerate(data["images"]):
        _require(path, image, ("id", "file_name", "width", "height"), f"images[{index}]")
        if image["id"] in images:
            raise DataFormatError(path, f"images[{index}]: duplicate image id {image['id']!r}")
        try:
            size = int(image["width"]), int(image["height"])
        except (TypeError, ValueError):
            raise DataFormatError(path, f"images[{index}]: width/height are not integers") from None
        images[image["id"]] = ImageBoxes(*size, stats)
    for index, ann in enumerate(data["annotations"]):
        where = f"annotations[{index}]"
        _require(path, ann, ("image_id", "bbox", "category_id"), where)
        if "id" in ann:
            where += f" (id {ann['id']})"
        target = images.get(ann["image_id"])
        if target is None:
            raise DataFormatError(path, f"{where}: unknown image id {ann['image_id']!r}")
        try:
            category = int(ann["category_id"])
        except (TypeError, ValueError):
            raise DataFormatError(path, f"{where}: category_id is not an integer") from None
        if category not in labels_of:
            raise DataFormatError(path, f"{where}: unknown category id {category}")
        bbox = ann["bbox"]
        if (
            not isinstance(bbox, list)
            or len(bbox) != 4
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in bbox)
        ):
            raise DataFormatError(path, f"{where}: bbox is not [x, y, w, h] numbers: {bbox!r}")
        x, y, w, h = (float(v) for v in bbox)
        if w < 0 or h < 0:
            raise DataFormatError(path, f"{where}: negative bbox width or height: {bbox!r}")
        label = labels_of[category]
        if label is None:
            stats.other_class_boxes += 1
            continue
        track = ann.get("instance_id", ann.get("track_id", -1))
        target.add((x, y, x + w, y + h), label, int(track) if track is not None else -1)
    frames = []
    for image in data["images"]:
        name = PurePosixPath(str(image["file_name"]))
        frames.append(images[image["id"]].frame(image_root / name, name.as_posix()))
    return frames, data, stats


def _video_name(file_name: PurePosixPath, video_id: Any, names: dict[Any, str]) -> str:
    parent = file_name.parent.as_posix()
    if parent not in ("", "."):
        return parent
    if video_id is not None and video_id in names:
        return names[video_id]
    match = _TRAILING_NUMBER.match(file_name.stem)
    return match.group(1) if match else file_name.stem


def load_coco_vid(
    path: str | Path, image_root: str | Path, *, select: FrameSelector = _all_frames
) -> tuple[list[VideoAnnotation], IndexStats]:
    """Reads a COCO-style VID JSON file into videos of ordered frames.

    Frames are grouped by ``video_id`` (else by the folder of ``file_name``)
    and ordered by ``frame_id`` (else the number ending the file name). The video
    name is the folder of ``file_name`` (e.g. ``val/ILSVRC2015_val_00000000``,
    matching :func:`index_ilsvrc_vid` when ``file_name`` is relative to
    ``Data/VID``), else the ``videos`` entry's name, else the file name without
    its frame number (flat ``<snippet>_<frame>.JPEG`` files). ``select`` picks
    frame positions per video.
    """
    frames, data, stats = _parse_coco(Path(path), Path(image_root))
    videos_field = data.get("videos")
    names = {
        v.get("id"): str(v.get("name"))
        for v in (videos_field if isinstance(videos_field, list) else [])
        if isinstance(v, dict)
    }
    groups: dict[Any, list[FrameAnnotation]] = defaultdict(list)
    video_names: dict[Any, str] = {}
    for frame, raw in zip(frames, data["images"]):
        file_name = PurePosixPath(str(raw["file_name"]))
        name = _video_name(file_name, raw.get("video_id"), names)
        key = raw["video_id"] if raw.get("video_id") is not None else name
        video_names.setdefault(key, name)
        frame.video_id = video_names[key]
        frame_id = raw.get("frame_id")
        frame.frame_index = int(frame_id) if frame_id is not None else _frame_number(file_name.stem)
        groups[key].append(frame)
    videos = []
    for key, group in groups.items():
        group.sort(key=lambda f: (f.frame_index, f.image_id))
        kept = [group[i] for i in select(len(group))]
        if kept:
            videos.append(VideoAnnotation(video_names[key], kept))
    videos.sort(key=lambda v: v.video_id)
    return videos, stats


def load_coco_det(
    path: str | Path, image_root: str | Path
) -> tuple[list[FrameAnnotation], IndexStats]:
    """Reads a COCO-style DET JSON file: images with at least one box of the 30 classes.

    Images without such boxes are left out; records are sorted by ``image_id``.
    """
    frames, _, stats = _parse_coco(Path(path), Path(image_root))
    kept = sorted((f for f in frames if f.num_boxes), key=lambda f: f.image_id)
    return kept, stats
