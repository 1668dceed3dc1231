"""decord reading, clip sampling/cropping, batching and the synthetic video generator.

Every video here is a real mp4 file written with PyAV and read with decord.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from datamodules.common import SkipLog
from datamodules.synthetic_video import (
    CLASSES,
    DIRECTIONS,
    corrupt_file,
    format_timestamp,
    make_kinetics,
    moving_square,
    write_video,
)
from datamodules.transforms import (
    ClipSampling,
    TrainClipTransform,
    random_resized_crop,
    resize_short_side,
    train_clip_indices,
)
from datamodules.video import (
    ClipItem,
    LocalShardSampler,
    VideoInfo,
    VideoReadError,
    collate_eval,
    filter_readable,
    probe_video,
    probe_videos,
    read_frames,
)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Two real videos (h264, mpeg4) of a moving square, 48 x 64, 20 frames, with their frames."""
    folder = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(0)
    out = {}
    for codec in ("h264", "mpeg4"):
        frames = moving_square(2, 20, (48, 64), rng)
        write_video(folder / f"{codec}.mp4", frames, fps=25, codec=codec)
        out[codec] = (folder / f"{codec}.mp4", frames)
    return out


@pytest.mark.parametrize("codec", ["h264", "mpeg4"])
def test_read_frames_gives_the_written_frames(clips, codec):
    path, frames = clips[codec]
    video = read_frames(path, range(20))
    assert video.shape == (20, 3, 48, 64) and video.dtype == torch.uint8
    expected = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    assert (video.float() - expected).abs().mean() < 12  # lossy codec, same picture
    # Random access decodes the same frames as the sequential read.
    picks = [17, 3, 3, 11, 0]
    assert torch.equal(read_frames(path, picks), video[picks])


@pytest.mark.parametrize("size", [(40, 48), (72, 72)])
def test_widths_decord_cannot_batch_are_read_frame_by_frame(tmp_path, size):
    """decord 0.6 pads rows of some widths to 4 bytes per pixel and fails get_batch."""
    frames = moving_square(0, 12, size, np.random.default_rng(1))
    write_video(tmp_path / "odd.mp4", frames)
    picks = [7, 2, 2, 11]
    video = read_frames(tmp_path / "odd.mp4", picks)
    assert video.shape == (4, 3, *size)
    expected = torch.from_numpy(frames[picks]).permute(0, 3, 1, 2).float()
    assert (video.float() - expected).abs().mean() < 8


def test_probe_and_resize(clips):
    path, _ = clips["h264"]
    assert probe_video(path) == VideoInfo(num_frames=20, fps=25.0)
    small = read_frames(path, [0, 5], short_side=24, chunk=1)
    assert small.shape == (2, 3, 24, 32)
    assert resize_short_side(read_frames(path, [0]), 96).shape == (1, 3, 96, 128)


def test_unreadable_and_missing_videos_raise_naming_the_file(clips, tmp_path):
    source, _ = clips["h264"]
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(source.read_bytes())
    corrupt_file(truncated, "truncated")
    garbage = tmp_path / "garbage.mp4"
    corrupt_file(garbage, "garbage")
    for path in (truncated, garbage, tmp_path / "absent.mp4"):
        with pytest.raises(VideoReadError, match=path.name):
            read_frames(path, [0])
    with pytest.raises(IndexError):
        read_frames(source, [20])


def test_probe_cache_and_filter_readable(clips, tmp_path):
    good, _ = clips["mpeg4"]
    bad = tmp_path / "bad.mp4"
    corrupt_file(bad, "garbage")
    cache = tmp_path / "probe.json"
    results = probe_videos([good, bad, tmp_path / "absent.mp4"], workers=2, cache_file=cache)
    assert results[good] == VideoInfo(20, 25.0)
    assert isinstance(results[bad], VideoReadError)
    assert "file not found" in str(results[tmp_path / "absent.mp4"])
    assert set(json.loads(cache.read_text())) == {str(good), str(bad)}
    bad.write_bytes(good.read_bytes())  # replaced by a good copy: probed again
    assert probe_videos([bad], cache_file=cache)[bad] == VideoInfo(20, 25.0)

    items = [
        ClipItem("good", good, 0),
        ClipItem("outside", good, 0, start=30, stop=40),
        ClipItem("absent", tmp_path / "absent.mp4", 1),
    ]
    log = SkipLog("demo")
    with pytest.warns(UserWarning) as caught:
        kept = filter_readable(items, log, probe=True)
    assert [item.id for item in kept] == ["good"]
    assert log.reasons == {"segment outside video": 1, "missing": 1}
    assert len(caught) == 2


def test_segment_frame_range():
    info = VideoInfo(num_frames=100, fps=50.0)
    assert ClipItem("a", None, 0).frame_range(info) == (0, 100)
    assert ClipItem("a", None, 0, start=10, stop=20).frame_range(info) == (10, 20)
    assert ClipItem("a", None, 0, start=0.5, stop=1.0, unit="second").frame_range(info) == (25, 50)
    assert ClipItem("a", None, 0, start=90, stop=150).frame_range(info) == (90, 100)
    with pytest.raises(ValueError, match="outside the video"):
        ClipItem("a", None, 0, start=3.0, stop=4.0, unit="second").frame_range(info)


def test_train_clip_indices():
    generator = torch.Generator().manual_seed(0)
    starts = set()
    for _ in range(1000):
        indices = train_clip_indices(10, 50, frames=8, stride=2, generator=generator)
        assert len(indices) == 8 and indices[0] >= 10 and indices[-1] < 50
        assert np.all(np.diff(indices) == 2)
        starts.add(indices[0])
    assert starts == set(range(10, 50 - 14))  # every start that fits is drawn
    # A segment shorter than the clip span repeats its last frame.
    assert train_clip_indices(5, 9, frames=4, stride=2) == [5, 7, 8, 8]


def test_random_resized_crop_and_flip():
    clip = torch.randint(0, 256, (4, 3, 40, 60), dtype=torch.uint8)
    crop = random_resized_crop(clip, 32, (1.0, 1.0), torch.Generator().manual_seed(1))
    assert crop.shape == (4, 3, 32, 32) and crop.dtype == torch.uint8
    # Scale 1 on a 32-high clip: a plain 32 x 32 window of the source.
    small = clip[..., :32, :]
    window = random_resized_crop(small, 32, (1.0, 1.0), torch.Generator().manual_seed(2))
    assert any(torch.equal(window, small[..., j : j + 32]) for j in range(29))
    base = ClipSampling(frames=4, stride=1, crop_size=24, scale_range=(1.0, 1.5))
    plain = TrainClipTransform(ClipSampling(**{**base.__dict__, "flip_prob": 0.0}))
    flipped = TrainClipTransform(ClipSampling(**{**base.__dict__, "flip_prob": 1.0}))
    a = plain(clip, torch.Generator().manual_seed(3))
    b = flipped(clip, torch.Generator().manual_seed(3))
    assert torch.equal(b, a.flip(-1)) and not torch.equal(a, b)


def test_clip_sampling_validates():
    with pytest.raises(ValueError, match="frames"):
        ClipSampling(frames=0)
    with pytest.raises(ValueError, match="scale_range"):
        ClipSampling(scale_range=(0.5, 1.0))


def test_collate_eval_pads_and_reports_skips():
    a = torch.zeros(5, 3, 8, 8, dtype=torch.uint8)
    b = torch.ones(3, 3, 8, 8, dtype=torch.uint8)
    batch = collate_eval(
        [
            {"video": a, "label": 1, "id": "a"},
            {"video": None, "label": -1, "id": "bad"},
            {"video": b, "label": 2, "id": "b"},
        ]
    )
    assert batch["video"].shape == (2, 5, 3, 8, 8)
    assert batch["length"].tolist() == [5, 3] and batch["label"].tolist() == [1, 2]
    assert batch["skipped"] == ["bad"] and batch["id"] == ["a", "b"]
    assert torch.equal(batch["video"][1, 3:], b[-1:].expand(2, 3, 8, 8))
    empty = collate_eval([{"video": None, "label": -1, "id": "bad"}])
    assert empty["video"].shape[0] == 0 and empty["skipped"] == ["bad"]
    # Clips of other frame sizes: a list of the clips as they are (no padding, no resize).
    c = torch.full((2, 3, 8, 4), 7, dtype=torch.uint8)
    mixed = collate_eval(
        [
            {"video": a, "label": 0, "id": "a"},
            {"video": c, "label": 3, "id": "c"},
            {"video": None, "label": -1, "id": "bad"},
            {"video": b, "label": 2, "id": "b"},
        ]
    )
    assert isinstance(mixed["video"], list) and len(mixed["video"]) == 3
    assert all(torch.equal(x, y) for x, y in zip(mixed["video"], (a, c, b)))
    assert mixed["length"].tolist() == [5, 2, 3] and mixed["label"].tolist() == [0, 3, 2]
    assert mixed["id"] == ["a", "c", "b"] and mixed["skipped"] == ["bad"]


def test_local_shard_sampler_iterates_its_shard_once():
    data = list(range(7))
    sampler = LocalShardSampler(data)
    assert isinstance(sampler, DistributedSampler)  # so Lightning does not replace it
    assert list(sampler) == data and len(sampler) == 7


def _square_mask(frames: np.ndarray) -> np.ndarray:
    """Pixels of the saturated square, (T, H, W) bool."""
    spread = frames.max(axis=-1).astype(int) - frames.min(axis=-1).astype(int)
    return spread > 90


@pytest.mark.parametrize("direction", range(len(CLASSES)))
def test_synthetic_square_moves_in_its_class_direction(direction):
    frames = moving_square(direction, 6, (40, 48), np.random.default_rng(direction), speed=3)
    mask = _square_mask(frames)
    dy, dx = DIRECTIONS[direction]
    assert mask[0].sum() == 64  # an 8 x 8 square
    for t in range(5):
        assert np.array_equal(np.roll(mask[t], (3 * dy, 3 * dx), axis=(0, 1)), mask[t + 1])


def test_synthetic_single_frame_carries_no_class():
    """Where the square is in one frame is uniform over the frame for every class."""
    rng = np.random.default_rng(0)
    for direction in range(len(CLASSES)):
        corners = np.zeros((16, 16))
        for _ in range(1000):
            mask = _square_mask(moving_square(direction, 3, 16, rng))[-1]
            corners += mask & ~np.roll(mask, 1, axis=0) & ~np.roll(mask, 1, axis=1)
        assert corners.sum() == 1000  # one top-left corner per frame, wrapped or not
        cells = corners.reshape(2, 8, 2, 8).sum(axis=(1, 3))  # 2 x 2 cells, ~250 each
        assert np.abs(cells / 250 - 1).max() < 0.25


def test_synthetic_kinetics_is_deterministic(tmp_path):
    a = make_kinetics(tmp_path / "a", videos_per_class=1, frames=6, size=32, seed=3, corrupt=1)
    b = make_kinetics(tmp_path / "b", videos_per_class=1, frames=6, size=32, seed=3, corrupt=1)
    make_kinetics(tmp_path / "c", videos_per_class=1, frames=6, size=32, seed=4)
    for split in ("train", "val"):
        csv_a = (tmp_path / "a" / "annotations" / f"{split}.csv").read_text()
        assert csv_a == (tmp_path / "b" / "annotations" / f"{split}.csv").read_text()
        assert csv_a != (tmp_path / "c" / "annotations" / f"{split}.csv").read_text()
        for item_a, item_b in zip(a.items[split], b.items[split]):
            assert item_a.status == item_b.status
            assert item_a.path.read_bytes() == item_b.path.read_bytes()
    assert sum(item.status == "corrupt" for item in a.items["train"]) == 1


def test_format_timestamp():
    assert format_timestamp(0) == "00:00:00.00"
    assert format_timestamp(3723.456) == "01:02:03.46"
