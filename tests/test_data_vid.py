"""ImageNet VID / DET data: both layouts, DET filtering, flips, segments, sharding, bad files.

Every test reads real files (JPEG, XML, JSON) written by
``datamodules.synthetic_detection`` into a temporary folder.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

import datamodules.imagenet_vid as vid
from datamodules.common import DataFormatError
from datamodules.detection_transforms import (
    Compose,
    RandomHorizontalFlip,
    ResizeShortEdge,
    hflip,
)
from datamodules.imagenet_vid import (
    DetectionDataset,
    ImageNetVIDDataModule,
    PreShardedSampler,
    SegmentDataset,
    collate_detection,
    load_frame,
    split_segments,
)
from datamodules.synthetic_detection import SHAPES, SyntheticVID, write_synthetic_vid
from datamodules.vid_annotations import (
    VID_CLASSES,
    VID_WNIDS,
    VideoAnnotation,
    index_ilsvrc_det,
    index_ilsvrc_vid,
    load_coco_det,
    load_coco_vid,
    parse_voc_xml,
    read_image_set,
    select_frames,
)

LAYOUTS = ("ilsvrc", "coco")


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> SyntheticVID:
    return write_synthetic_vid(tmp_path_factory.mktemp("vid_clean"), seed=0)


@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> SyntheticVID:
    return write_synthetic_vid(
        tmp_path_factory.mktemp("vid_damaged"),
        seed=1,
        corrupt={"train": 1, "val": 1},
        missing={"train": 1, "val": 1, "det": 1},
    )


def make_dm(data: SyntheticVID, layout: str = "ilsvrc", **kwargs) -> ImageNetVIDDataModule:
    kwargs = {"num_workers": 0, "batch_size": 4, **kwargs}
    return ImageNetVIDDataModule(str(data.root), layout=layout, **kwargs)


def setup_quietly(dm: ImageNetVIDDataModule, stage: str) -> list[str]:
    """Runs setup and returns the warning messages it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup(stage)
    return [str(w.message) for w in caught]


def records(dataset) -> list[tuple]:
    return [
        (
            f.image_id,
            f.video_id,
            f.frame_index,
            f.boxes.tolist(),
            f.labels.tolist(),
            f.track_ids.tolist(),
        )
        for f in dataset.images
    ]


def segment_records(dataset: SegmentDataset) -> list[tuple]:
    return [
        (
            s.video_id,
            s.segment_index,
            [(f.image_id, f.boxes.tolist(), f.labels.tolist()) for f in s.frames],
        )
        for s in dataset.segments
    ]


def drawn(data: SyntheticVID, image_id: str) -> list[tuple]:
    """Objects of the 30 classes drawn in an image: (label, x1, y1, x2, y2), sorted."""
    return sorted((b[0], *b[2:]) for b in data.boxes[image_id] if b[0] >= 0)


# --------------------------------------------------------------------------- generator


def test_generator_is_deterministic_and_seeded(tmp_path):
    a = write_synthetic_vid(tmp_path / "a", seed=3)
    b = write_synthetic_vid(tmp_path / "b", seed=3)
    c = write_synthetic_vid(tmp_path / "c", seed=4)
    assert a.boxes == b.boxes and a.videos == b.videos
    frame = next(iter(a.videos.values()))[3]
    bytes_a = (a.root / "Data/VID" / frame).read_bytes()
    assert bytes_a == (b.root / "Data/VID" / frame).read_bytes()
    assert a.vid_val_json.read_text() == b.vid_val_json.read_text()
    assert a.boxes != c.boxes


# --------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("stage", ["fit"])
def test_both_layouts_give_the_same_samples(synth, stage):
    ilsvrc, coco = make_dm(synth, "ilsvrc"), make_dm(synth, "coco")
    setup_quietly(ilsvrc, stage)
    setup_quietly(coco, stage)
    assert records(ilsvrc.train_dataset) == records(coco.train_dataset)
    assert segment_records(ilsvrc.eval_dataset) == segment_records(coco.eval_dataset)
    # And they hold what was drawn: every VID training frame and the DET images
    # with one of the 30 classes.
    expected = [i for v in synth.split_videos("train").values() for i in v]
    expected += sorted(i for i in synth.det_images if drawn(synth, i))
    assert [r[0] for r in records(ilsvrc.train_dataset)] == expected


def test_walking_folders_equals_image_set_lists(synth):
    listed, _ = index_ilsvrc_vid(synth.root, "train", use_image_sets=True)
    walked, _ = index_ilsvrc_vid(synth.root, "train", use_image_sets=False)
    assert [f.image_id for v in listed for f in v.frames] == [
        f.image_id for v in walked for f in v.frames
    ]
    val, _ = index_ilsvrc_vid(synth.root, "val")
    assert {v.video_id: [f.image_id for f in v.frames] for v in val} == synth.split_videos("val")


def test_coco_video_grouping_from_file_name_folders(synth, tmp_path):
    """Without video_id/frame_id, frames group by their snippet folder and order by number."""
    data = json.loads(synth.vid_val_json.read_text())
    for image in data["images"]:
        del image["video_id"], image["frame_id"]
    data["images"].reverse()
    del data["videos"]
    path = tmp_path / "no_video_ids.json"
    path.write_text(json.dumps(data))
    videos, _ = load_coco_vid(path, synth.root / "Data" / "VID")
    assert {v.video_id: [f.image_id for f in v.frames] for v in videos} == synth.split_videos("val")
    assert all([f.frame_index for f in v.frames] == list(range(len(v.frames))) for v in videos)


def test_boxes_labels_and_pixels_match_the_drawn_objects(synth):
    dm = make_dm(synth, flip_prob=0.0)
    setup_quietly(dm, "fit")
    dataset = dm.train_dataset
    for frame in dataset.images:
        got = sorted(zip(frame.labels.tolist(), *frame.boxes.T.tolist()))
        assert got == drawn(synth, frame.image_id), frame.image_id
    image, target = dataset[5]
    assert image.dtype == torch.uint8 and image.shape == (3, 64, 96)
    assert target["boxes"].dtype == torch.float32 and target["boxes"].shape[1] == 4
    assert target["labels"].dtype == torch.int64
    assert target["labels"].min() >= 0 and target["labels"].max() < len(VID_CLASSES)
    # The object's colour sits at its box centre (boxes are in image pixels).
    for (x1, y1, x2, y2), label in zip(target["boxes"].tolist(), target["labels"].tolist()):
        centre = image[:, int((y1 + y2) / 2), int((x1 + x2) / 2)].float()
        colours = torch.tensor([c for _, c in SHAPES.values()], dtype=torch.float32)
        assert (colours - centre).abs().sum(1).argmin() == list(SHAPES).index(label)


def test_classes_and_wordnet_ids_follow_the_design_order():
    assert len(VID_CLASSES) == len(set(VID_WNIDS)) == 30
    assert VID_CLASSES[9] == "domestic_cat" and VID_WNIDS[9] == "n02121808"
    assert VID_CLASSES[-1] == "zebra" and VID_WNIDS[-1] == "n02391049"


# --------------------------------------------------------------------------- DET filtering


@pytest.mark.parametrize("layout", LAYOUTS)
def test_det_keeps_only_images_and_boxes_of_the_30_classes(synth, layout):
    if layout == "ilsvrc":
        det, stats = index_ilsvrc_det(synth.root)
        other = sum(1 for boxes in synth.boxes.values() for b in boxes if b[0] < 0)
        assert stats.other_class_boxes == other > 0
    else:
        det, _ = load_coco_det(synth.det_json, synth.root / "Data" / "DET")
    with_vid = sorted(i for i in synth.det_images if drawn(synth, i))
    assert 0 < len(with_vid) < len(synth.det_images)
    assert [f.image_id for f in det] == with_vid
    mixed = [i for i in with_vid if len(synth.boxes[i]) > len(drawn(synth, i))]
    assert mixed, "the generator should write DET images with both kinds of objects"
    for frame in det:
        assert sorted(zip(frame.labels.tolist(), *frame.boxes.T.tolist())) == drawn(
            synth, frame.image_id
        )
        assert (frame.track_ids == -1).all()


def test_include_det_option(synth):
    dm = make_dm(synth, include_det=False)
    setup_quietly(dm, "fit")
    assert all(f.video_id is not None for f in dm.train_dataset.images)
    assert "DET" not in dm.summaries["train"]


def test_empty_vid_frames_are_kept_as_negatives_unless_disabled(synth):
    kept, dropped = make_dm(synth), make_dm(synth, keep_empty_frames=False)
    setup_quietly(kept, "fit")
    setup_quietly(dropped, "fit")
    empty = [f for f in kept.train_dataset.images if f.num_boxes == 0]
    assert len(empty) == 2  # the first training snippet's frames 0 and 1
    index = kept.train_dataset.images.index(empty[0])
    image, target = kept.train_dataset[index]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert len(dropped.train_dataset) == len(kept.train_dataset) - 2
    assert all(f.num_boxes for f in dropped.train_dataset.images)


# --------------------------------------------------------------------------- frame subsampling


def test_select_frames():
    assert select_frames(10) == list(range(10))
    assert select_frames(10, stride=3) == [0, 3, 6, 9]
    assert select_frames(300, max_frames=15) == [10 + 20 * i for i in range(15)]
    assert select_frames(10, stride=2, max_frames=2) == [2, 6]
    assert select_frames(3, max_frames=15) == [0, 1, 2]
    with pytest.raises(ValueError, match="stride"):
        select_frames(5, stride=0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_frame_subsampling_in_the_data_module(synth, layout):
    dm = make_dm(synth, layout, frame_stride=3, frames_per_snippet=2, include_det=False)
    setup_quietly(dm, "fit")
    by_video: dict[str, list[int]] = {}
    for frame in dm.train_dataset.images:
        by_video.setdefault(frame.video_id, []).append(frame.frame_index)
    expected = {
        video: [int(Path(frames[i]).stem) for i in select_frames(len(frames), 3, 2)]
        for video, frames in synth.split_videos("train").items()
    }
    assert by_video == expected
    # Evaluation always keeps every frame.
    assert sum(len(s.frames) for s in dm.eval_dataset.segments) == sum(
        len(v) for v in synth.split_videos("val").values()
    )


# --------------------------------------------------------------------------- transforms


def test_hflip_moves_boxes_with_the_object(synth):
    dm = make_dm(synth, flip_prob=0.0)
    setup_quietly(dm, "fit")
    frame = next(f for f in dm.train_dataset.images if f.num_boxes == 1)
    image, target = load_frame(frame)
    flipped, flipped_target = hflip(image, target)
    width = image.shape[-1]
    (x1, y1, x2, y2), (f1, g1, f2, g2) = (
        target["boxes"][0].tolist(),
        flipped_target["boxes"][0].tolist(),
    )
    assert (f1, g1, f2, g2) == (width - x2, y1, width - x1, y2)
    assert f1 < f2
    # The object's pixels are inside the flipped box: its crop is the mirrored crop.
    crop = image[:, int(y1) : int(y2), int(x1) : int(x2)]
    flipped_crop = flipped[:, int(g1) : int(g2), int(f1) : int(f2)]
    assert torch.equal(flipped_crop, crop.flip(-1))
    assert torch.equal(flipped_target["labels"], target["labels"])
    twice_image, twice_target = hflip(flipped, flipped_target)
    assert torch.equal(twice_image, image) and torch.equal(twice_target["boxes"], target["boxes"])


def test_random_flip_probability_and_empty_boxes():
    image = torch.zeros(3, 4, 10, dtype=torch.uint8)
    image[:, :, 0] = 255
    target = {"boxes": torch.tensor([[0.0, 0.0, 1.0, 4.0]]), "labels": torch.tensor([3])}
    _, kept = RandomHorizontalFlip(0.0)(image, target)
    out, moved = RandomHorizontalFlip(1.0)(image, target)
    assert kept["boxes"].tolist() == [[0.0, 0.0, 1.0, 4.0]]
    assert moved["boxes"].tolist() == [[9.0, 0.0, 10.0, 4.0]] and out[0, 0, 9] == 255
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    assert hflip(image, empty)[1]["boxes"].shape == (0, 4)
    torch.manual_seed(0)
    flips = sum(
        RandomHorizontalFlip(0.5)(image, target)[1]["boxes"][0, 0].item() == 9.0 for _ in range(200)
    )
    assert 60 < flips < 140
    with pytest.raises(ValueError, match="probability"):
        RandomHorizontalFlip(1.5)


def test_resize_short_edge_scales_boxes():
    image = torch.zeros(3, 60, 100, dtype=torch.uint8)
    target = {"boxes": torch.tensor([[10.0, 6.0, 50.0, 30.0]])}
    out, scaled = Compose([ResizeShortEdge(30, max_size=40)])(image, target)
    assert out.shape == (3, 24, 40)
    assert torch.allclose(scaled["boxes"], torch.tensor([[4.0, 2.4, 20.0, 12.0]]))


def test_data_module_resize_option(synth):
    dm = make_dm(synth, resize_short_edge=32, resize_max_size=40)
    setup_quietly(dm, "fit")
    image, target = dm.train_dataset[0]
    assert image.shape == (3, 27, 40)
    assert dm.eval_dataset[0]["frames"][0].shape == (3, 27, 40)


# --------------------------------------------------------------------------- segments and ranks


def test_split_segments_lengths_and_order(synth):
    videos, _ = index_ilsvrc_vid(synth.root, "val")
    for video in videos:
        n = len(video.frames)
        for length in (1, 3, 4, n, n + 5, None):
            segments = split_segments(video, length)
            step = length or n
            assert [s.segment_index for s in segments] == list(range(-(-n // step)))
            assert [len(s.frames) for s in segments[:-1]] == [step] * (len(segments) - 1)
            assert len(segments[-1].frames) == n - step * (len(segments) - 1)
            assert [f for s in segments for f in s.frames] == video.frames
    with pytest.raises(ValueError, match="segment_length"):
        split_segments(videos[0], 0)
    assert split_segments(VideoAnnotation("empty", []), 4) == []


@pytest.mark.parametrize("layout", LAYOUTS)
def test_eval_items_are_ordered_contiguous_segments(synth, layout):
    dm = make_dm(synth, layout, segment_length=4)
    setup_quietly(dm, "validate")
    assert dm.train_dataset is None
    items = [item for batch in dm.val_dataloader() for item in batch]
    assert len(items) == len(dm.eval_dataset)
    by_video: dict[str, list[dict]] = {}
    for item in items:
        by_video.setdefault(item["video_id"], []).append(item)
    assert set(by_video) == set(synth.split_videos("val"))
    for video_id, segments in by_video.items():
        frames = synth.split_videos("val")[video_id]
        assert [s["segment_index"] for s in segments] == list(range(len(segments)))
        indices = [i for s in segments for i in s["frame_indices"]]
        assert indices == list(range(len(frames)))
        assert all(len(s["frames"]) == 4 for s in segments[:-1])
        assert 1 <= len(segments[-1]["frames"]) <= 4
        for segment in segments:
            assert (
                len(segment["frames"]) == len(segment["targets"]) == len(segment["frame_indices"])
            )
            for index, frame, target in zip(
                segment["frame_indices"], segment["frames"], segment["targets"]
            ):
                assert frame.dtype == torch.uint8 and frame.shape == (3, 64, 96)
                assert target["image_id"] == frames[index]
                got = sorted(zip(target["labels"].tolist(), *target["boxes"].T.tolist()))
                assert got == drawn(synth, frames[index])


def test_rank_sharding_splits_by_whole_segments(synth, monkeypatch):
    def segments(rank: int, world: int) -> list[tuple]:
        monkeypatch.setattr(vid, "rank_and_world_size", lambda: (rank, world))
        dm = make_dm(synth, segment_length=3)
        setup_quietly(dm, "validate")
        return [
            (s.video_id, s.segment_index, [f.image_id for f in s.frames])
            for s in dm.eval_dataset.segments
        ]

    everything = segments(0, 1)
    rank0, rank1 = segments(0, 2), segments(1, 2)
    assert len(everything) >= 5
    assert not set(map(str, rank0)) & set(map(str, rank1))
    assert sorted(rank0 + rank1) == sorted(everything)  # none lost, none repeated, none cut
    assert abs(len(rank0) - len(rank1)) <= 1


def test_lightning_keeps_the_pre_sharded_eval_sampler(synth):
    from lightning import Trainer
    from lightning.pytorch.trainer.states import RunningStage
    from torch.utils.data import DistributedSampler

    dm = make_dm(synth, segment_length=3)
    setup_quietly(dm, "fit")
    trainer = Trainer(
        accelerator="cpu", strategy="ddp", devices=2, logger=False, enable_checkpointing=False
    )
    connector = trainer._data_connector
    val = dm.val_dataloader()
    assert isinstance(val.sampler, PreShardedSampler)
    assert list(val.sampler) == list(range(len(dm.eval_dataset)))
    assert connector._prepare_dataloader(val, shuffle=False, mode=RunningStage.VALIDATING) is val
    # The training loader, by contrast, gets Lightning's (shuffling) distributed sampler.
    train = connector._prepare_dataloader(
        dm.train_dataloader(), shuffle=True, mode=RunningStage.TRAINING
    )
    assert type(train.sampler) is DistributedSampler and train.sampler.num_replicas == 2


# --------------------------------------------------------------------------- corrupt and missing


def test_missing_images_are_skipped_at_setup_with_one_warning(damaged):
    dm = make_dm(damaged, segment_length=4)
    messages = setup_quietly(dm, "fit")
    missing_warnings = [m for m in messages if "missing image" in m]
    assert len(missing_warnings) == 2  # one for training (VID + DET), one for evaluation
    assert "missing image: 2" in dm.summaries["train"]
    assert "missing image: 1" in dm.summaries["eval"]
    paths = {f.path for f in dm.train_dataset.images}
    paths |= {f.path for s in dm.eval_dataset.segments for f in s.frames}
    assert len(damaged.missing) == 3
    assert not paths & set(damaged.missing)


def test_corrupt_images_are_skipped_when_loaded(damaged):
    dm = make_dm(damaged, segment_length=4, flip_prob=0.0)
    setup_quietly(dm, "fit")
    train = dm.train_dataset
    bad = next(i for i, f in enumerate(train.images) if f.path in damaged.corrupt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image, target = train[bad]
        train[bad]  # a second failure is counted, not warned again
    assert len(caught) == 1 and "unreadable image" in str(caught[0].message)
    assert train.skips.reasons["unreadable image"] == 2
    assert target["image_id"] == train.images[bad + 1].image_id  # the next item instead
    assert image.shape == (3, 64, 96)

    corrupt_val = next(p for p in damaged.corrupt if "/val/" in p.as_posix())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = [dm.eval_dataset[i] for i in range(len(dm.eval_dataset))]
    assert len(caught) == 1 and dm.eval_dataset.skips.reasons["unreadable image"] == 1
    loaded = {t["image_id"] for item in items for t in item["targets"]}
    all_val = {f.image_id for s in dm.eval_dataset.segments for f in s.frames}
    assert all_val - loaded == {corrupt_val.relative_to(damaged.root / "Data" / "VID").as_posix()}


def test_unreadable_everything_raises(damaged):
    frame = next(f for f in make_frames(damaged) if f.path in damaged.corrupt)
    with pytest.raises(RuntimeError, match="no readable image"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        DetectionDataset([frame])[0]


def make_frames(data: SyntheticVID):
    videos, _ = index_ilsvrc_vid(data.root, "train")
    return [f for v in videos for f in v.frames]


# --------------------------------------------------------------------------- malformed files


VOC = """<annotation><size><width>96</width><height>64</height></size>{objects}</annotation>"""
OBJ = "<object><trackid>0</trackid><name>{name}</name><bndbox>{box}</bndbox></object>"
BOX = "<xmin>1</xmin><ymin>2</ymin><xmax>30</xmax><ymax>40</ymax>"


def write_xml(tmp_path: Path, objects: str) -> Path:
    path = tmp_path / "000007.xml"
    path.write_text(VOC.format(objects=objects))
    return path


def test_xml_is_parsed_and_clipped(tmp_path):
    box = "<xmin>-3</xmin><ymin>2</ymin><xmax>120</xmax><ymax>40</ymax>"
    empty = "<xmin>96</xmin><ymin>2</ymin><xmax>99</xmax><ymax>40</ymax>"
    objects = OBJ.format(name=VID_WNIDS[4], box=box) + OBJ.format(name=VID_WNIDS[4], box=empty)
    parsed = parse_voc_xml(write_xml(tmp_path, objects), other_classes=False)
    assert parsed.boxes == [(0.0, 2.0, 96.0, 40.0)] and parsed.labels == [4]
    assert parsed.stats.degenerate_boxes == 1


@pytest.mark.parametrize(
    ("objects", "message"),
    [
        (OBJ.format(name=VID_WNIDS[0], box=BOX) + "<object><name>", "line"),
        (OBJ.format(name=VID_WNIDS[0], box=BOX.replace("<xmax>30</xmax>", "")), "object 0.*xmax"),
        (
            OBJ.format(name=VID_WNIDS[0], box=BOX) + OBJ.format(name=VID_WNIDS[1], box=""),
            "object 1.*xmin",
        ),
        (
            OBJ.format(name=VID_WNIDS[0], box=BOX)
            .replace("<bndbox>", "<bbox>")
            .replace("</bndbox>", "</bbox>"),
            "object 0.*bndbox",
        ),
        (OBJ.format(name=VID_WNIDS[0], box=BOX.replace(">30<", ">0<")), "object 0.*xmax < xmin"),
        (OBJ.format(name="n01440764", box=BOX), "object 0.*n01440764"),
        (OBJ.format(name=VID_WNIDS[0], box=BOX.replace(">30<", ">abc<")), "not a number"),
    ],
)
def test_malformed_xml_names_file_and_object(tmp_path, objects, message):
    path = write_xml(tmp_path, objects)
    with pytest.raises(DataFormatError, match=message) as error:
        parse_voc_xml(path, other_classes=False)
    assert str(path) in str(error.value) and error.value.path == path


def test_other_classes_are_dropped_in_det_xml(tmp_path):
    path = write_xml(
        tmp_path, OBJ.format(name="n01440764", box=BOX) + OBJ.format(name=VID_WNIDS[2], box=BOX)
    )
    parsed = parse_voc_xml(path, other_classes=True)
    assert parsed.labels == [2] and parsed.stats.other_class_boxes == 1


def test_malformed_xml_in_the_tree_fails_setup_naming_the_file(tmp_path):
    data = write_synthetic_vid(tmp_path, seed=2, train_snippets=1, val_snippets=1, det_images=0)
    bad = next((data.root / "Annotations" / "VID" / "val").rglob("000003.xml"))
    bad.write_text(bad.read_text().replace("<xmin>", "<xmin>oops"))
    dm = make_dm(data)
    with pytest.raises(DataFormatError, match="000003.xml: object 0"):
        setup_quietly(dm, "validate")


def edit_json(source: Path, target: Path, edit) -> Path:
    data = json.loads(source.read_text())
    edit(data)
    target.write_text(json.dumps(data, indent=1))
    return target


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda d: d["annotations"][2].update(category_id=31),
            r"annotations\[2\].*unknown category id 31",
        ),
        (lambda d: d["annotations"][1].pop("bbox"), r"annotations\[1\].*missing 'bbox'"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, -3, 4]), r"annotations\[0\].*negative"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), r"annotations\[0\].*bbox"),
        (lambda d: d["annotations"][0].update(image_id=99999), "unknown image id 99999"),
        (lambda d: d["images"][3].pop("width"), r"images\[3\]: missing 'width'"),
        (lambda d: d.pop("annotations"), "missing list 'annotations'"),
    ],
)
def test_malformed_json_names_file_and_entry(synth, tmp_path, edit, message):
    path = edit_json(synth.vid_val_json, tmp_path / "bad.json", edit)
    with pytest.raises(DataFormatError, match=message) as error:
        load_coco_vid(path, synth.root / "Data" / "VID")
    assert str(path) in str(error.value)


def test_unparseable_json_names_the_line(synth, tmp_path):
    path = tmp_path / "broken.json"
    path.write_text(synth.vid_val_json.read_text()[:500])
    with pytest.raises(DataFormatError, match=r"broken.json, line \d+: unparseable JSON"):
        load_coco_vid(path, synth.root)


def test_json_categories_map_by_name_and_drop_other_classes(synth, tmp_path):
    def edit(data):
        # Reverse the ids (names decide the label) and add a non-VID category.
        for category in data["categories"]:
            category["id"] = 100 - category["id"]
        for ann in data["annotations"]:
            ann["category_id"] = 100 - ann["category_id"]
        data["categories"].append({"id": 500, "name": "other_categories"})
        data["annotations"][0]["category_id"] = 500

    path = edit_json(synth.vid_val_json, tmp_path / "renumbered.json", edit)
    videos, stats = load_coco_vid(path, synth.root / "Data" / "VID")
    reference, _ = load_coco_vid(synth.vid_val_json, synth.root / "Data" / "VID")
    assert stats.other_class_boxes == 1
    got = [f.labels.tolist() for v in videos for f in v.frames]
    want = [f.labels.tolist() for v in reference for f in v.frames]
    first = next(i for i, labels in enumerate(want) if labels)
    want[first] = want[first][1:]
    assert got == want


def test_image_set_lines(tmp_path):
    path = tmp_path / "val.txt"
    path.write_text(
        "ILSVRC2015_val_00000000/000000 1\n\n"
        "train/ILSVRC2015_VID_train_0000/ILSVRC2015_train_00000000 1 10 300\n"
        "ILSVRC2015_VID_train_0000/ILSVRC2015_train_00000001 -1\n"
    )
    entries = read_image_set(path, "train")
    assert [(e.snippet, e.frame) for e in entries] == [
        ("ILSVRC2015_val_00000000", 0),
        ("ILSVRC2015_VID_train_0000/ILSVRC2015_train_00000000", 10),
        ("ILSVRC2015_VID_train_0000/ILSVRC2015_train_00000001", None),
    ]
    path.write_text("a/000000 1\na/000001 x\n")
    with pytest.raises(DataFormatError, match=r"val.txt, line 2: non-integer"):
        read_image_set(path, "val")


def test_image_set_selects_listed_frames(synth, tmp_path):
    root = tmp_path / "subset"
    shutil.copytree(synth.root, root, ignore=shutil.ignore_patterns("*.JPEG"))
    (root / "ImageSets" / "VID" / "val.txt").write_text(
        "ILSVRC2015_val_00000001/000002 1\nILSVRC2015_val_00000001/000000 2\n"
        "ILSVRC2015_val_00000002/000099 3\n"
    )
    videos, stats = index_ilsvrc_vid(root, "val")
    assert [(v.video_id, [f.frame_index for f in v.frames]) for v in videos] == [
        ("val/ILSVRC2015_val_00000001", [0, 2])
    ]
    assert [reason for reason, _ in stats.missing] == ["missing annotation"]


# --------------------------------------------------------------------------- data module


def test_data_module_fit_batches(synth):
    dm = make_dm(synth, "coco", batch_size=3, num_workers=1)
    messages = setup_quietly(dm, "fit")
    assert not messages
    assert "0 skipped" in dm.summaries["train"] and "0 skipped" in dm.summaries["eval"]
    images, targets = next(iter(dm.train_dataloader()))
    assert isinstance(images, list) and len(images) == len(targets) == 3
    for image, target in zip(images, targets):
        assert image.dtype == torch.uint8 and image.shape == (3, 64, 96)
        assert set(target) == {"boxes", "labels", "track_ids", "image_id"}
        assert target["boxes"].shape == (len(target["labels"]), 4)
    batch = next(iter(dm.val_dataloader()))
    assert isinstance(batch, list) and len(batch) == 1
    assert set(batch[0]) == {"video_id", "segment_index", "frame_indices", "frames", "targets"}


def test_collate_detection_keeps_lists():
    a = (torch.zeros(3, 2, 2, dtype=torch.uint8), {"boxes": torch.zeros(0, 4)})
    b = (torch.zeros(3, 5, 4, dtype=torch.uint8), {"boxes": torch.ones(1, 4)})
    images, targets = collate_detection([a, b])
    assert [i.shape[1] for i in images] == [2, 5] and targets[1]["boxes"].shape == (1, 4)


def test_data_module_from_cli_yaml(synth):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(ImageNetVIDDataModule, "data")
    config = parser.parse_string(
        f"data:\n  root: {synth.root}\n  layout: coco\n  segment_length: 5\n"
        "  frames_per_snippet: 4\n  num_workers: 0\n"
    )
    dm = parser.instantiate(config).data
    assert dm.layout == "coco" and dm.segment_length == 5 and dm.frames_per_snippet == 4
    with pytest.raises(Exception, match="layout"):
        parser.parse_string(f"data:\n  root: {synth.root}\n  layout: voc\n")


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"layout": "voc"}, "layout"),
        ({"segment_length": 0}, "segment_length"),
        ({"frame_stride": 0}, "frame_stride"),
        ({"flip_prob": 2.0}, "flip_prob"),
        ({"resize_max_size": 100}, "resize_max_size"),
    ],
)
def test_invalid_options_name_the_option(synth, kwargs, option):
    with pytest.raises(ValueError, match=option):
        ImageNetVIDDataModule(str(synth.root), **kwargs)


def test_missing_annotation_folder_is_a_clear_error(tmp_path):
    dm = ImageNetVIDDataModule(str(tmp_path), num_workers=0)
    with pytest.raises(FileNotFoundError, match="Annotations/VID/val"):
        dm.setup("validate")
    coco = ImageNetVIDDataModule(str(tmp_path), layout="coco", num_workers=0)
    with pytest.raises(DataFormatError, match="imagenet_vid_val.json"):
        coco.setup("validate")


def test_segment_dataset_item_types(synth):
    videos, _ = index_ilsvrc_vid(synth.root, "val")
    dataset = SegmentDataset(split_segments(videos[0], 3))
    item = dataset[len(dataset) - 1]
    assert isinstance(item["frame_indices"], list) and isinstance(item["segment_index"], int)
    assert all(isinstance(t["boxes"], torch.Tensor) for t in item["targets"])
    assert np.array_equal(item["targets"][0]["boxes"].numpy(), dataset.segments[-1].frames[0].boxes)


class SegmentRecorder(L.LightningModule):
    """Writes the segments each rank's validation loop received to ``<folder>/rank<k>.json``."""

    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder = folder
        self.seen: list[list] = []
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def validation_step(self, batch, batch_index):
        for item in batch:
            self.seen.append([item["video_id"], item["segment_index"], item["frame_indices"]])

    def on_validation_epoch_end(self):
        Path(self.folder, f"rank{self.global_rank}.json").write_text(json.dumps(self.seen))


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_validation_sees_every_segment_once(synth, tmp_path):
    """Two real processes (gloo): each segment is validated once, whole, by one rank."""
    dm = make_dm(synth, segment_length=3, eval_batch_size=2)
    trainer = L.Trainer(
        accelerator="cpu",
        strategy="ddp_spawn",
        devices=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.validate(SegmentRecorder(str(tmp_path)), datamodule=dm)
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0 and rank1
    seen = sorted(map(tuple, (s[:2] for s in rank0 + rank1)))
    videos = synth.split_videos("val")
    expected = sorted((v, i) for v, frames in videos.items() for i in range(-(-len(frames) // 3)))
    assert seen == expected  # each once
    for video_id, index, frame_indices in rank0 + rank1:
        n = len(videos[video_id])
        assert frame_indices == list(range(3 * index, min(3 * index + 3, n)))


def test_det_image_set_list(synth, tmp_path):
    listed = [i for i in synth.det_images if drawn(synth, i)][:2]
    other = next(i for i in synth.det_images if not drawn(synth, i))
    path = tmp_path / "DET_train_30classes.txt"
    lines = [f"{Path(i).with_suffix('').as_posix()} 1" for i in [*listed, other]]
    path.write_text("\n".join([*lines, "train/ILSVRC2014_train_0000/absent 1"]) + "\n")
    det, stats = index_ilsvrc_det(synth.root, image_set=path)
    assert [f.image_id for f in det] == listed  # the other-class image is filtered out
    assert [reason for reason, _ in stats.missing] == ["missing annotation"]
    path.write_text("train/x 1 oops\n")
    with pytest.raises(DataFormatError, match="line 1"):
        index_ilsvrc_det(synth.root, image_set=path)


def test_explicit_image_set_option(synth, tmp_path):
    path = tmp_path / "VID_val_subset.txt"
    path.write_text("val/ILSVRC2015_val_00000002 1 3 9\nILSVRC2015_val_00000000/000001 7\n")
    dm = make_dm(synth, vid_val_image_set=str(path), segment_length=None)
    setup_quietly(dm, "validate")
    assert [(s.video_id, [f.frame_index for f in s.frames]) for s in dm.eval_dataset.segments] == [
        ("val/ILSVRC2015_val_00000000", [1]),
        ("val/ILSVRC2015_val_00000002", [3]),
    ]
