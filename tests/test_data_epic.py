"""EPIC-Kitchens-100 data module on generated videos with narrated segments (real mp4 + CSV)."""

from __future__ import annotations

import csv
import warnings

import numpy as np
import pytest
import torch

from datamodules.common import DataFormatError
from datamodules.epic_kitchens import EpicKitchensDataModule, parse_timestamp, read_segments
from datamodules.synthetic_video import EPIC_COLUMNS, make_epic_kitchens
from datamodules.video import probe_video, read_frames
from tests.helpers import SMALL_CLIPS


@pytest.fixture(scope="module", params=["participant", "flat"])
def data(request, tmp_path_factory):
    """3 participants x 2 videos x 4 segments, 40 x 48 at 30 fps; one corrupt, one missing video."""
    root = tmp_path_factory.mktemp(f"epic_{request.param}")
    return make_epic_kitchens(
        root, participants=3, size=(40, 48), layout=request.param, corrupt=1, missing=1
    )


def module(data, **kwargs) -> EpicKitchensDataModule:
    options = dict(SMALL_CLIPS, frames=6, stride=2, eval_short_side=0)
    return EpicKitchensDataModule(str(data.root), **{**options, **kwargs})


def _square_frames(video: torch.Tensor) -> torch.Tensor:
    """Which frames show the saturated square: (T, C, H, W) uint8 -> (T,) bool."""
    spread = video.max(dim=1).values.int() - video.min(dim=1).values.int()
    return (spread > 90).flatten(1).sum(1) > 4


def test_both_layouts_find_the_videos_and_skip_bad_ones(data):
    dm = module(data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup("fit")
    bad = {s: [i for i in data.items[s] if i.status != "ok"] for s in ("train", "validation")}
    for split, role in (("train", "train"), ("validation", "validation (eval)")):
        ok = data.ok(split)
        detail = ", ".join(
            f"{reason}: {n}"
            for reason, n in sorted(
                {
                    r: sum(i.status == s for i in bad[split])
                    for r, s in (("missing", "missing"), ("unreadable", "corrupt"))
                }.items()
            )
            if n
        )
        expected = f"epic_kitchens100 {split}: {len(ok)} items, {len(bad[split])} skipped"
        assert dm.summaries[role] == expected + (f" ({detail})" if detail else "")
    reasons = [str(w.message).split("(")[-2] for w in caught if "skipping" in str(w.message)]
    assert len(reasons) == len(set(reasons))  # one warning per reason and split
    assert sum(len(v) for v in bad.values()) == 8  # two videos of 4 segments
    found = {item.id: item.path for item in dm.datasets["train"].items}
    assert found == {item.id: item.path for item in data.ok("train")}


@pytest.mark.parametrize("clip_bounds", ["frames", "timestamps"])
@pytest.mark.slow
def test_eval_gives_every_frame_of_each_segment(data, clip_bounds):
    dm = module(data, clip_bounds=clip_bounds)
    dm.setup("validate")
    truth = {item.id: item for item in data.items["validation"]}
    seen = []
    for batch in dm.val_dataloader():
        (segment_id,) = batch["id"]
        item = truth[segment_id]
        video = batch["video"][0]
        assert video.shape == (item.stop - item.first, 3, 40, 48)
        assert batch["label"].tolist() == [item.label]
        assert _square_frames(video).all()  # no gap frame inside
        seen.append(segment_id)
    assert sorted(seen) == sorted(item.id for item in data.ok("validation"))


def test_frame_and_timestamp_bounds_decode_the_same_frames(data):
    clips = []
    for clip_bounds in ("frames", "timestamps"):
        dm = module(data, clip_bounds=clip_bounds)
        dm.setup("validate")
        clips.append([dm.datasets["val"][i]["video"] for i in range(3)])
    for a, b in zip(*clips):
        assert torch.equal(a, b)


def test_timestamps_use_the_real_frame_rate(tmp_path):
    data = make_epic_kitchens(tmp_path, participants=1, segments_per_video=2, size=32, fps=50)
    path = data.items["train"][0].path
    assert probe_video(path).fps == 50.0
    items = read_segments(tmp_path / "EPIC_100_train.csv", tmp_path, "timestamps")
    first = items[1]
    assert first.unit == "second"
    assert first.frame_range(probe_video(path)) == (
        data.items["train"][1].first,
        data.items["train"][1].stop,
    )


def test_train_clips_come_from_inside_the_segment(data):
    dm = module(data, crop_size=40, scale_range=(1.0, 1.0))
    dm.setup("fit")
    truth = {item.id: item for item in data.items["train"]}
    batches = list(dm.train_dataloader())
    assert sum(len(b["id"]) for b in batches) == len(data.ok("train"))
    for batch in batches:
        assert batch["video"].shape[1:] == (6, 3, 40, 40) and batch["video"].dtype == torch.uint8
        for clip, label, segment_id in zip(batch["video"], batch["label"], batch["id"]):
            item = truth[segment_id]
            assert label == item.label
            whole = read_frames(item.path, range(item.num_frames))  # (T, 3, 40, 48)
            # Frames start, start + 2, ... (stride 2) of a 40 x 40 window, inside the segment.
            starts = [
                start
                for start in range(item.first, item.stop - 10)
                for left in range(9)
                if torch.equal(clip, whole[start : start + 11 : 2, ..., left : left + 40])
            ]
            # The segment's frames all show the square (the crop may cut it off at an edge).
            assert starts and _square_frames(whole[starts[0] : starts[0] + 11 : 2]).all()


def test_ddp_ranks_get_disjoint_shards(data):
    shards = []
    for rank in (0, 1):
        dm = module(data, rank=rank, world_size=2)
        dm.setup("validate")
        shards.append([i for batch in dm.val_dataloader() for i in batch["id"]])
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(item.id for item in data.ok("validation"))


def _rewrite(path, line, column, value):
    """Sets ``column`` of the row on ``line`` (1 = header) of a CSV file."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    rows[line - 2][column] = value
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(EPIC_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture
def small(tmp_path):
    make_epic_kitchens(tmp_path, participants=1, segments_per_video=3, size=32)
    return tmp_path / "EPIC_100_train.csv"


@pytest.mark.parametrize(
    "column, value, bounds, message",
    [
        ("stop_frame", "3", "frames", "stop_frame 3 < start_frame"),
        ("start_frame", "12a", "frames", "start_frame must be an integer"),
        ("start_frame", "", "frames", "no value for column"),
        ("verb_class", "97", "frames", "verb_class 97 outside"),
        ("start_timestamp", "1:2", "timestamps", "HH:MM:SS.ff"),
        ("stop_timestamp", "00:00:00.01", "timestamps", "stop_timestamp 00:00:00.01 <"),
    ],
)
def test_malformed_rows_name_file_and_line(small, column, value, bounds, message):
    _rewrite(small, 3, column, value)
    with pytest.raises(DataFormatError, match=message) as error:
        read_segments(small, small.parent, bounds)
    assert error.value.path == small and error.value.line == 3
    assert f"{small}, line 3" in str(error.value)


def test_missing_column_is_reported_on_the_header_line(small):
    text = small.read_text().replace("verb_class", "verb_klass", 1)
    small.write_text(text)
    with pytest.raises(DataFormatError, match="missing column") as error:
        EpicKitchensDataModule(str(small.parent), num_workers=0).setup("fit")
    assert error.value.line == 1


def test_segment_past_the_end_of_its_video_is_skipped(small):
    _rewrite(small, 2, "start_frame", "5000")
    _rewrite(small, 2, "stop_frame", "5100")
    dm = EpicKitchensDataModule(str(small.parent), num_workers=0, frames=4, crop_size=32)
    with pytest.warns(UserWarning, match="segment outside video"):
        dm.setup("fit")
    assert (
        dm.summaries["train"]
        == "epic_kitchens100 train: 2 items, 1 skipped (segment outside video: 1)"
    )


def test_parse_timestamp():
    assert parse_timestamp("f", 2, "start_timestamp", "00:01:02.50") == 62.5
    assert np.isclose(parse_timestamp("f", 2, "t", "01:00:00.123"), 3600.123)
    with pytest.raises(DataFormatError, match="f, line 2"):
        parse_timestamp("f", 2, "t", "00:61:00.00")
