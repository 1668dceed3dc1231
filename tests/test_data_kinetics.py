"""Kinetics-400 data module on a generated dataset in the published layout (real mp4 + CSV)."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
import yaml
from torch.utils.data import DistributedSampler

from datamodules.common import DataFormatError
from datamodules.kinetics import KineticsDataModule, read_annotations
from datamodules.synthetic_video import make_kinetics
from datamodules.video import read_frames
from eventful_pl.models.vivit import ViViTPreprocessing, create_vivit
from tests.helpers import SMALL_CLIPS

# Unsorted on purpose: label index = position in the sorted names.
NAMES = ("zoom down", "apple left", "moving right", "Kite up")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """3 clips per class and split, 48 x 64 frames, 12-16 frames; per split 2 corrupt, 1 missing."""
    root = tmp_path_factory.mktemp("kinetics")
    return make_kinetics(
        root, videos_per_class=3, frames=12, size=(48, 64), corrupt=2, missing=1, label_names=NAMES
    )


def module(data, **kwargs) -> KineticsDataModule:
    options = dict(SMALL_CLIPS, frames=6, stride=2)
    return KineticsDataModule(str(data.root), **{**options, **kwargs})


def test_setup_skips_missing_and_unreadable_with_one_warning_each(data):
    dm = module(data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup("fit")
    messages = [str(w.message) for w in caught if "kinetics400" in str(w.message)]
    assert len(messages) == 4  # (missing, unreadable) x (train, val)
    assert sum("train: skipping" in m and "(missing)" in m for m in messages) == 1
    for split in ("train", "val"):
        assert dm.summaries[split if split == "train" else "val (eval)"] == (
            f"kinetics400 {split}: 9 items, 3 skipped (missing: 1, unreadable: 2)"
        )
    readable = {item.id for item in data.ok("train")}
    assert {item.id for item in dm.datasets["train"].items} == readable


def test_label_index_is_sorted_class_names(data):
    dm = module(data)
    assert dm.classes == sorted(NAMES) == ["Kite up", "apple left", "moving right", "zoom down"]
    assert dm.num_classes == 4
    dm.setup("fit")
    truth = {item.id: item.label for item in data.items["train"]}
    rows = {row.clip: row.label for row in read_annotations(data.root / "annotations/train.csv")}
    for item in dm.datasets["train"].items:
        assert item.label == truth[item.id] == dm.classes.index(rows[item.id])


def test_train_batch_is_a_strided_random_crop_of_the_clip(data):
    dm = module(data, scale_range=(1.0, 1.0), crop_size=48)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["video"].shape == (4, 6, 3, 48, 48) and batch["video"].dtype == torch.uint8
    assert batch["label"].dtype == torch.long and len(batch["id"]) == 4
    truth = {item.id: item for item in data.items["train"]}
    for clip, label, clip_id in zip(batch["video"], batch["label"], batch["id"]):
        item = truth[clip_id]
        assert label == item.label
        whole = read_frames(item.path, range(item.num_frames))  # (T, 3, 48, 64)
        # Scale 1: the clip is frames start, start + 2, ... of a 48 x 48 window.
        matches = [
            (start, left)
            for start in range(item.num_frames - 10)
            for left in range(17)
            if torch.equal(clip, whole[start : start + 11 : 2, :, :, left : left + 48])
        ]
        assert len(matches) >= 1


def test_eval_gives_the_whole_clip_for_multi_view_preprocessing(data):
    dm = module(data, eval_batch_size=1)
    dm.setup("validate")
    truth = {item.id: item for item in data.items["val"]}
    loader = dm.val_dataloader()
    assert isinstance(loader.sampler, DistributedSampler)  # Lightning keeps it
    seen = []
    for batch in loader:
        (clip_id,) = batch["id"]
        length = truth[clip_id].num_frames
        assert batch["video"].shape == (1, length, 3, 32, 43)  # 48 x 64 -> 32 x 42.7
        assert batch["length"].tolist() == [length] and batch["label"].tolist() == [
            truth[clip_id].label
        ]
        seen.append(clip_id)
    assert sorted(seen) == sorted(item.id for item in data.ok("val"))
    # The paper's 3 x 4 views of 4 frames at stride 2 from one whole clip.
    views = ViViTPreprocessing(4, 32, temporal_stride=2, temporal_views=4, spatial_views=3)
    assert views(batch["video"]).shape == (1, 12, 4, 3, 32, 32)
    model = create_vivit("vivit_tiny", image_size=32, frames=4, temporal_views=4, spatial_views=3)
    with torch.no_grad():
        assert model(batch["video"]).shape == (1, 4)


def test_eval_batches_pad_to_the_longest_clip(data):
    dm = module(data, eval_batch_size=3)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert batch["video"].shape[:2] == (3, int(batch["length"].max()))


def test_ddp_ranks_get_disjoint_shards_covering_the_split(data):
    shards = []
    for rank in (0, 1):
        dm = module(data, rank=rank, world_size=2, eval_batch_size=2)
        dm.setup("validate")
        shards.append([clip_id for batch in dm.val_dataloader() for clip_id in batch["id"]])
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(item.id for item in data.ok("val"))
    assert all(len(s) == len(set(s)) for s in shards)  # nothing repeated


def test_unreadable_clip_found_while_loading_is_replaced_or_reported(data):
    dm = module(data, probe=False, eval_batch_size=2)
    with pytest.warns(UserWarning, match="missing"):
        dm.setup("fit")
    assert dm.summaries["train"] == "kinetics400 train: 11 items, 1 skipped (missing: 1)"
    train = dm.datasets["train"]
    bad = [
        i for i, item in enumerate(train.items) if item.id not in {x.id for x in data.ok("train")}
    ]
    assert len(bad) == 2
    with pytest.warns(UserWarning, match="unreadable"):
        sample = train[bad[0]]
    assert sample["id"] != train.items[bad[0]].id and sample["video"].shape == (6, 3, 32, 32)
    assert train.skip_log.reasons["unreadable"] in (1, 2)  # the stand-in may be bad too
    reported = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for batch in dm.val_dataloader():
            reported += batch["skipped"]
            assert len(batch["id"]) + len(batch["skipped"]) in (1, 2)
    corrupt = {item.id for item in data.items["val"] if item.status == "corrupt"}
    assert set(reported) == corrupt


@pytest.mark.slow
def test_loader_workers_and_train_limit(data):
    dm = module(data, num_workers=2, train_limit=5, batch_size=5)
    dm.setup("fit")
    assert dm.summaries["train"].startswith("kinetics400 train: ")
    assert len(dm.datasets["train"]) <= 5
    batch = next(iter(dm.train_dataloader()))
    assert batch["video"].shape[1:] == (6, 3, 32, 32)


def test_other_layouts_class_folders_and_annotation_names(tmp_path):
    data = make_kinetics(tmp_path, videos_per_class=1, frames=6, size=32, class_folders=True)
    (tmp_path / "annotations" / "val.csv").rename(tmp_path / "kinetics-400_validate.csv")
    (tmp_path / "val").rename(tmp_path / "validate")
    dm = KineticsDataModule(str(tmp_path), num_workers=0, crop_size=32, frames=4)
    dm.setup("validate")
    assert dm.summaries["val (eval)"] == "kinetics400 val: 4 items, 0 skipped"
    found = {item.path.relative_to(tmp_path / "validate") for item in dm.datasets["val"].items}
    assert found == {x.path.relative_to(tmp_path / "val") for x in data.items["val"]}
    assert all(item.path.parent.parent.name == "validate" for item in dm.datasets["val"].items)


@pytest.mark.parametrize(
    "header, row, line, message",
    [
        ("label,youtube_id,time_start,split", "a,b,1,val", 1, "missing column"),
        ("label,youtube_id,time_start,time_end,split", "a,b,1", 3, "no value for column"),
        ("label,youtube_id,time_start,time_end,split", "a,b,1.5,10,val", 3, "time_start"),
        ("label,youtube_id,time_start,time_end,split", "a,b,20,10,val", 3, "time_end 10 < "),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path, header, row, line, message):
    path = tmp_path / "val.csv"
    path.write_text(f"{header}\nfine,abcdefghijk,1,11,val\n{row}\n")
    if "time_end" not in header:
        path.write_text(f"{header}\n{row}\n")
    with pytest.raises(DataFormatError, match=message) as error:
        read_annotations(path)
    assert error.value.path == path and error.value.line == line
    assert f"{path}, line {line}" in str(error.value)


def test_unknown_label_in_a_split_names_file_and_line(data, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(data.root, root)
    val = root / "annotations" / "val.csv"
    val.write_text(val.read_text() + "no such class,abcdefghijk,1,11,val\n")
    dm = KineticsDataModule(str(root), num_workers=0)
    with pytest.raises(DataFormatError, match="not a known class") as error:
        dm.setup("validate")
    assert error.value.line == 14 and error.value.path == val


def test_missing_annotation_file_lists_the_places_tried(tmp_path):
    with pytest.raises(FileNotFoundError, match="annotations/train.csv"):
        KineticsDataModule(str(tmp_path)).setup("fit")


def test_configurable_from_lightning_cli_yaml(data, tmp_path):
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.demos.boring_classes import BoringModel

    config = {
        "data": {
            "root": str(data.root),
            "batch_size": 2,
            "frames": 8,
            "stride": 1,
            "crop_size": 32,
            "scale_range": [1.0, 1.2],
            "flip_prob": 0.0,
            "num_workers": 0,
            "train_clips": "whole",
        }
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = LightningCLI(BoringModel, KineticsDataModule, run=False, args=["--config", str(path)])
    dm = cli.datamodule
    assert isinstance(dm, KineticsDataModule) and dm.batch_size == 2
    assert dm.sampling.frames == 8 and dm.sampling.scale_range == (1.0, 1.2)
    assert dm.sampling.eval_short_side == 32 and dm.train_clips == "whole"


def test_worker_start_method_is_checked(data):
    with pytest.raises(ValueError, match="worker_start_method"):
        module(data, worker_start_method="threads")
    dm = module(data, num_workers=1, worker_start_method="forkserver")
    dm.setup("validate")
    assert dm.val_dataloader().multiprocessing_context.get_start_method() == "forkserver"


def test_whole_train_clips_are_eval_items_shuffled_from_the_whole_split(data):
    # flip_prob 1 and a small crop: neither may touch whole clips.
    options = dict(train_clips="whole", batch_size=3, flip_prob=1.0, crop_size=24)
    dm = module(data, rank=1, world_size=2, **options)
    dm.setup("fit")
    assert dm.datasets["train"].mode == "eval"
    readable = [item.id for item in data.items["train"] if item.status == "ok"]
    # The whole split in annotation order (not rank 1's shard: under DDP
    # Lightning's DistributedSampler shards the training set).
    assert [item.id for item in dm.datasets["train"].items] == readable
    reference = module(data, val_split="train", crop_size=24)  # eval items of the train split
    reference.setup("validate")
    eval_items = {
        reference.datasets["val"][i]["id"]: reference.datasets["val"][i] for i in range(9)
    }
    orders = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        batches = list(dm.train_dataloader())
        orders.append([clip_id for batch in batches for clip_id in batch["id"]])
    assert sorted(orders[0]) == sorted(readable)  # every item once per epoch
    assert orders[0] == orders[1] != orders[2]  # shuffled by the seed
    assert orders[0] != readable or orders[2] != readable
    for batch in batches:
        assert set(batch) == {"video", "length", "label", "id", "skipped"}
        assert batch["video"].dtype == torch.uint8 and batch["video"].shape[2:] == (3, 24, 32)
        assert batch["video"].shape[1] == int(batch["length"].max()) and batch["skipped"] == []
        for video, length, label, clip_id in zip(
            *(batch[k] for k in ("video", "length", "label", "id"))
        ):
            item = eval_items[clip_id]
            assert torch.equal(video[:length], item["video"]) and label == item["label"]
            assert torch.equal(video[length:], video[length - 1 : length].expand_as(video[length:]))


def test_whole_train_clips_honour_train_limit(data):
    dms = {}
    for clips in ("random", "whole"):
        dms[clips] = module(data, train_clips=clips, train_limit=7, seed=3)
        dms[clips].setup("fit")
    ids = [[item.id for item in dm.datasets["train"].items] for dm in dms.values()]
    assert ids[0] == ids[1] and len(ids[0]) <= 7  # the same subset (minus unreadable)
    listed = dms["whole"].split_items("train", train=True)
    assert len(listed) == 7 and [i.id for i in listed if i.id in ids[1]] == ids[1]
    other = module(data, train_clips="whole", train_limit=7, seed=4)
    assert [i.id for i in other.split_items("train", train=True)] != [i.id for i in listed]
    assert len(module(data).split_items("train", train=True)) == 12  # no limit: all listed


def test_train_clips_is_checked(data):
    with pytest.raises(ValueError, match="train_clips must be 'random' or 'whole'"):
        module(data, train_clips="wholes")
