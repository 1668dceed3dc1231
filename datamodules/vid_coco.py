"""Reader of the COCO-style JSON conversion of ImageNet VID / DET.

``images`` with ``file_name``, ``id``, ``width``, ``height`` and for video
frames ``video_id`` / ``frame_id``; ``annotations`` with ``bbox`` xywh and
1-based ``category_id``; ``categories`` (matched to the 30 VID classes by name
or WordNet id). Gives the records of :mod:`datamodules.vid_records`::

    videos, stats = load_coco_vid("annotations/imagenet_vid_val.json", "/data/ILSVRC2015/Data/VID")
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

from datamodules.common import DataFormatError
from datamodules.vid_records import (
    _TRAILING_NUMBER,
    VID_CLASSES,
    WNID_TO_LABEL,
    FrameAnnotation,
    FrameSelector,
    ImageBoxes,
    IndexStats,
    VideoAnnotation,
    _all_frames,
    _frame_number,
)


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
