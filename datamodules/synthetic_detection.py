"""Small synthetic ImageNet VID + DET datasets, written in both real on-disk layouts.

Snippets of moving coloured shapes (class = shape and colour, three of the 30
VID classes) over a noisy background, with boxes that follow the objects, plus
DET images (some holding only a class outside the 30, to be filtered out).
Everything is real: JPEG files (``torchvision.io.encode_jpeg``), ILSVRC-style
XML and ImageSets lists, and COCO-style JSON as the common conversions write it.
Deterministic for a seed and fast (about a second for the defaults)::

    data = write_synthetic_vid(tmp_path, seed=0, corrupt={"val": 1}, missing={"train": 1})
    dm = ImageNetVIDDataModule(str(data.root), layout="coco", segment_length=4)

Layout under ``root``::

    Data/VID/train/ILSVRC2015_VID_train_0000/ILSVRC2015_train_0000000{i}/00000{t}.JPEG
    Data/VID/val/ILSVRC2015_val_0000000{i}/00000{t}.JPEG
    Data/DET/train/ILSVRC2013_train/<wnid>/<wnid>_{i}.JPEG, .../ILSVRC2014_train_0000/...
    Annotations/{VID,DET}/...xml      ImageSets/VID/train_{k}.txt, val.txt
    annotations/imagenet_vid_train.json, imagenet_vid_val.json, imagenet_det_30plus1cls.json
"""

from __future__ import annotations

import json
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torchvision.io import encode_jpeg

from datamodules.synthetic_video import require_empty_folder
from datamodules.vid_annotations import VID_CLASSES, VID_WNIDS

#: label -> (shape, RGB colour) of the synthetic objects (airplane, bear, car).
SHAPES: dict[int, tuple[str, tuple[int, int, int]]] = {
    0: ("square", (220, 40, 40)),
    2: ("disc", (40, 200, 60)),
    6: ("diamond", (50, 80, 230)),
}
#: A DET class outside the 30 (tench), drawn as a yellow square.
OTHER_WNID = "n01440764"
OTHER_SHAPE = ("square", (230, 220, 40))

_CODEC_WARNING = "The image decoding and encoding capabilities of TorchVision"

#: Box of one object: (label or -1 for the other class, track id, x1, y1, x2, y2).
Box = tuple[int, int, int, int, int, int]


@dataclass
class SyntheticVID:
    """Where a synthetic dataset was written and what it holds.

    ``boxes`` maps each ``image_id`` (path relative to ``Data/VID`` or
    ``Data/DET``) to the objects drawn in it (other-class ones with label -1).
    """

    root: Path
    vid_train_json: Path
    vid_val_json: Path
    det_json: Path
    videos: dict[str, list[str]] = field(default_factory=dict)
    det_images: list[str] = field(default_factory=list)
    boxes: dict[str, list[Box]] = field(default_factory=dict)
    corrupt: list[Path] = field(default_factory=list)
    missing: list[Path] = field(default_factory=list)

    def split_videos(self, split: str) -> dict[str, list[str]]:
        """``video_id -> frame image_ids`` of one split (``"train"``/``"val"``)."""
        return {k: v for k, v in self.videos.items() if k.startswith(f"{split}/")}


def _draw(image: Tensor, shape: str, colour: tuple[int, int, int], box: tuple[int, ...]) -> None:
    x1, y1, x2, y2 = box
    ys = torch.arange(y1, y2, dtype=torch.float32)[:, None] - (y1 + y2 - 1) / 2
    xs = torch.arange(x1, x2, dtype=torch.float32)[None, :] - (x1 + x2 - 1) / 2
    radius = (x2 - x1) / 2
    if shape == "disc":
        mask = xs**2 + ys**2 <= radius**2
    elif shape == "diamond":
        mask = xs.abs() + ys.abs() <= radius
    else:
        mask = torch.ones(y2 - y1, x2 - x1, dtype=torch.bool)
    region = image[:, y1:y2, x1:x2]
    for c in range(3):
        region[c][mask] = colour[c]


def _background(height: int, width: int, generator: torch.Generator) -> Tensor:
    base = torch.tensor([110.0, 105.0, 100.0]).view(3, 1, 1)
    noise = torch.randn(3, height, width, generator=generator) * 14
    return (base + noise).clamp(0, 255).to(torch.uint8)


def _voc_xml(folder: str, filename: str, size: tuple[int, int], objects: list[Box]) -> bytes:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = folder
    ET.SubElement(root, "filename").text = filename
    ET.SubElement(ET.SubElement(root, "source"), "database").text = "ILSVRC_2015"
    size_el = ET.SubElement(root, "size")
    ET.SubElement(size_el, "width").text = str(size[1])
    ET.SubElement(size_el, "height").text = str(size[0])
    for label, track, x1, y1, x2, y2 in objects:
        obj = ET.SubElement(root, "object")
        if track >= 0:
            ET.SubElement(obj, "trackid").text = str(track)
        ET.SubElement(obj, "name").text = VID_WNIDS[label] if label >= 0 else OTHER_WNID
        bndbox = ET.SubElement(obj, "bndbox")
        for key, value in (("xmax", x2), ("xmin", x1), ("ymax", y2), ("ymin", y1)):
            ET.SubElement(bndbox, key).text = str(value)
        if track >= 0:
            ET.SubElement(obj, "occluded").text = "0"
            ET.SubElement(obj, "generated").text = "0"
    ET.indent(root, space="\t")
    return ET.tostring(root)


class _Writer:
    """Writes images, XML files and collects COCO records."""

    def __init__(self, root: Path, size: tuple[int, int], generator: torch.Generator) -> None:
        self.root, self.size, self.generator = root, size, generator
        self.data = SyntheticVID(
            root,
            root / "annotations" / "imagenet_vid_train.json",
            root / "annotations" / "imagenet_vid_val.json",
            root / "annotations" / "imagenet_det_30plus1cls.json",
        )
        self.coco: dict[str, dict[str, list]] = {
            key: {"images": [], "annotations": [], "videos": []} for key in ("train", "val", "det")
        }

    def image(self, kind: str, image_id: str, objects: list[Box], **video: int) -> None:
        """Draws and writes one image (``kind`` "VID" or "DET") with its XML and COCO entry."""
        height, width = self.size
        picture = _background(height, width, self.generator)
        for label, _, *box in objects:
            shape, colour = SHAPES[label] if label >= 0 else OTHER_SHAPE
            _draw(picture, shape, colour, tuple(box))
        jpeg = self.root / "Data" / kind / image_id
        jpeg.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():  # torchvision 0.29 flags its codecs as deprecated
            warnings.filterwarnings("ignore", _CODEC_WARNING, DeprecationWarning)
            encoded = encode_jpeg(picture, quality=90)
        jpeg.write_bytes(encoded.numpy().tobytes())
        xml = (self.root / "Annotations" / kind / image_id).with_suffix(".xml")
        xml.parent.mkdir(parents=True, exist_ok=True)
        rel = Path(image_id)
        folder = rel.parent.relative_to(rel.parts[0]).as_posix()  # without the split
        xml.write_bytes(_voc_xml(folder, rel.stem, self.size, objects))
        self.data.boxes[image_id] = objects
        key = image_id.split("/")[0] if kind == "VID" else "det"
        coco = self.coco[key]
        number = len(coco["images"]) + 1
        coco["images"].append(
            {"id": number, "file_name": image_id, "width": width, "height": height, **video}
        )
        for label, track, x1, y1, x2, y2 in objects:
            if label < 0:
                continue  # conversions keep the 30 classes only
            ann = {
                "id": len(coco["annotations"]) + 1,
                "image_id": number,
                "category_id": label + 1,
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": (x2 - x1) * (y2 - y1),
                "iscrowd": 0,
            }
            if track >= 0:
                ann |= {"instance_id": track, "occluded": False, "generated": False}
                ann["video_id"] = video["video_id"]
            coco["annotations"].append(ann)


def _randint(low: int, high: int, generator: torch.Generator) -> int:
    """Uniform integer in [low, high]."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def _snippet_objects(
    frames: int, size: tuple[int, int], generator: torch.Generator, enter_at: int
) -> list[list[Box]]:
    """Per-frame boxes of 1-2 objects moving in straight lines, bouncing off the edges."""
    height, width = size
    labels = list(SHAPES)
    objects = []
    for track in range(_randint(1, 2, generator)):
        side = _randint(14, 24, generator)
        objects.append(
            {
                "label": labels[_randint(0, len(labels) - 1, generator)],
                "track": track,
                "side": side,
                "pos": [
                    _randint(0, width - side, generator),
                    _randint(0, height - side, generator),
                ],
                "vel": [_randint(-4, 4, generator) or 2, _randint(-3, 3, generator) or 1],
                "enter": enter_at,
            }
        )
    per_frame = []
    for t in range(frames):
        boxes = []
        for obj in objects:
            for axis, limit in ((0, width), (1, height)):
                value = obj["pos"][axis] + obj["vel"][axis]
                if not 0 <= value <= limit - obj["side"]:
                    obj["vel"][axis] = -obj["vel"][axis]
                    value = obj["pos"][axis] + obj["vel"][axis]
                obj["pos"][axis] = value
            if t >= obj["enter"]:
                x, y, s = obj["pos"][0], obj["pos"][1], obj["side"]
                boxes.append((obj["label"], obj["track"], x, y, x + s, y + s))
        per_frame.append(boxes)
    return per_frame


def _write_json(path: Path, coco: dict[str, list], videos: bool) -> None:
    categories = [
        {"id": k + 1, "name": name, "encode_name": wnid}
        for k, (name, wnid) in enumerate(zip(VID_CLASSES, VID_WNIDS))
    ]
    data = {"categories": categories, "images": coco["images"], "annotations": coco["annotations"]}
    if videos:
        data["videos"] = coco["videos"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def _damage(
    data: SyntheticVID, corrupt: Mapping[str, int], missing: Mapping[str, int], det: list[str]
) -> None:
    """Overwrites some JPEGs with garbage and deletes others (first frames of each split)."""
    pools = {
        "train": [i for k, v in data.split_videos("train").items() for i in v],
        "val": [i for k, v in data.split_videos("val").items() for i in v],
        "det": det,
    }
    for split in set(corrupt) | set(missing):
        if split not in pools:
            raise ValueError(f"damage split must be one of {sorted(pools)}, got {split!r}")
        # Every third image of the pool, so damaged frames fall in different videos.
        pool = pools[split][1::3]
        want_c, want_m = corrupt.get(split, 0), missing.get(split, 0)
        if want_c + want_m > len(pool):
            raise ValueError(f"cannot damage {want_c + want_m} images of {split!r}: too few")
        kind = "DET" if split == "det" else "VID"
        for image_id in pool[:want_c]:
            path = data.root / "Data" / kind / image_id
            path.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
            data.corrupt.append(path)
        for image_id in pool[want_c : want_c + want_m]:
            path = data.root / "Data" / kind / image_id
            path.unlink()
            data.missing.append(path)


def write_synthetic_vid(
    root: str | Path,
    *,
    seed: int = 0,
    train_snippets: int = 3,
    val_snippets: int = 3,
    frames: tuple[int, int] = (6, 12),
    det_images: int = 6,
    size: tuple[int, int] = (64, 96),
    corrupt: Mapping[str, int] | None = None,
    missing: Mapping[str, int] | None = None,
) -> SyntheticVID:
    """Writes a small VID + DET dataset under ``root`` in the ILSVRC and COCO layouts.

    Args:
        root: output folder (created).
        seed: everything (shapes, motion, noise) follows from it.
        train_snippets: number of VID training snippets (in the first one the
            objects enter at frame 2: frames 0 and 1 have no objects).
        val_snippets: number of VID validation snippets.
        frames: (min, max) frames per snippet.
        det_images: DET images, cycling through: VID classes only, another class
            only (to be filtered out), both.
        size: image (height, width).
        corrupt: images to overwrite with garbage, per split (``"train"``,
            ``"val"``, ``"det"``); annotations stay.
        missing: images to delete, per split; annotations stay.

    Returns:
        paths, ``video_id -> image_ids``, the drawn boxes and the damaged files.

    ``root`` must not exist or be empty (FileExistsError otherwise).
    """
    root = require_empty_folder(root)
    generator = torch.Generator().manual_seed(seed)
    writer = _Writer(root, size, generator)
    data = writer.data
    image_sets: dict[str, list[str]] = {}
    val_lines = []
    for split, count in (("train", train_snippets), ("val", val_snippets)):
        for i in range(count):
            snippet = (
                f"ILSVRC2015_VID_train_0000/ILSVRC2015_train_{i:08d}"
                if split == "train"
                else f"ILSVRC2015_val_{i:08d}"
            )
            video_id = f"{split}/{snippet}"
            length = _randint(frames[0], frames[1], generator)
            enter = 2 if split == "train" and i == 0 else 0
            number = len(writer.coco[split]["videos"]) + 1
            writer.coco[split]["videos"].append({"id": number, "name": video_id})
            data.videos[video_id] = []
            for t, objects in enumerate(_snippet_objects(length, size, generator, enter)):
                image_id = f"{video_id}/{t:06d}.JPEG"
                writer.image("VID", image_id, objects, video_id=number, frame_id=t)
                data.videos[video_id].append(image_id)
                if split == "val":
                    val_lines.append(f"{snippet}/{t:06d} {len(val_lines) + 1}")
                for label in {box[0] for box in objects} if split == "train" else ():
                    lines = image_sets.setdefault(f"train_{label + 1}", [])
                    if f"{snippet} 1" not in lines:
                        lines.append(f"{snippet} 1")
    kinds = ("vid", "other", "both")
    height, width = size
    kept = []
    for i in range(det_images):
        kind = kinds[i % 3]
        objects: list[Box] = []
        if kind in ("vid", "both"):
            objects.append((list(SHAPES)[i % len(SHAPES)], -1, 4, 6, 4 + 20, 6 + 18))
        if kind in ("other", "both"):
            objects.append((-1, -1, width - 30, height - 26, width - 6, height - 4))
        wnid = VID_WNIDS[objects[0][0]] if objects[0][0] >= 0 else OTHER_WNID
        image_id = (
            f"train/ILSVRC2013_train/{wnid}/{wnid}_{i}.JPEG"
            if i % 2 == 0
            else f"train/ILSVRC2014_train_0000/ILSVRC2014_train_{i:08d}.JPEG"
        )
        writer.image("DET", image_id, objects)
        data.det_images.append(image_id)
        if kind != "other":
            kept.append(image_id)
    sets = root / "ImageSets" / "VID"
    sets.mkdir(parents=True, exist_ok=True)
    for name, lines in image_sets.items():
        (sets / f"{name}.txt").write_text("\n".join(lines) + "\n")
    (sets / "val.txt").write_text("\n".join(val_lines) + "\n")
    _write_json(data.vid_train_json, writer.coco["train"], videos=True)
    _write_json(data.vid_val_json, writer.coco["val"], videos=True)
    _write_json(data.det_json, writer.coco["det"], videos=False)
    _damage(data, corrupt or {}, missing or {}, kept)
    return data
