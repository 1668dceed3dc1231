"""Feature cache of the frozen spatial ViViT on generated Kinetics-layout videos (real mp4)."""

from __future__ import annotations

import warnings

import pytest
import torch

from datamodules.features import FeatureDataModule, feature_cache_dir, write_datamodule_features
from datamodules.kinetics import KineticsDataModule
from datamodules.synthetic_video import make_kinetics
from eventful_pl.models.vivit import create_vivit
from eventful_pl.policies import TopRPolicy

R = 6
SIZE = 64  # = the vivit_tiny preset's image_size: the model crops nothing away


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """4 classes x 3 clips per split, 64 x 64, 8-10 frames; per split one corrupt, one missing."""
    root = tmp_path_factory.mktemp("kinetics_features")
    return make_kinetics(
        root, videos_per_class=3, frames=8, size=SIZE, frame_jitter=2, corrupt=1, missing=1
    )


def make_model(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = create_vivit("vivit_tiny", spatial_variant="full", policy=TopRPolicy(R), **overrides)
    assert model.preprocessing.size == (SIZE, SIZE)
    return model.eval()


def module(data, **kwargs) -> KineticsDataModule:
    options = dict(batch_size=3, num_workers=0, crop_size=SIZE, flip_prob=0.0, probe_workers=2)
    return KineticsDataModule(str(data.root), **{**options, **kwargs})


def write(dm, split, model, root, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skipped videos warn once; counted in the report
        return write_datamodule_features(dm, split, model, R, root, dtype="float32", **kwargs)


def on_the_fly(model, batch) -> list[torch.Tensor]:
    """The spatial features of each whole clip of a video batch, (V, T', D) each."""
    with torch.inference_mode():
        return [
            model.spatial_features(video[None, :length])[0]
            for video, length in zip(batch["video"], batch["length"])
        ]


def test_cache_and_whole_video_training_give_the_same_batches(data, tmp_path):
    model = make_model()
    videos = module(data, train_clips="whole", train_limit=8, seed=5)
    videos.setup("fit")
    write(videos, "train", model, tmp_path / "subset")  # the train_limit subset only
    write(module(data), "train", model, tmp_path / "all")  # every training clip
    for root in ("subset", "all"):  # setup("fit") reads the validation cache too
        write(videos, "val", model, tmp_path / root)
    caches = [
        FeatureDataModule(str(tmp_path / "subset"), "kinetics400", R, batch_size=3, num_workers=0),
        FeatureDataModule(
            str(tmp_path / "all"),
            "kinetics400",
            R,
            batch_size=3,
            num_workers=0,
            train_limit=8,
            seed=5,
        ),
    ]
    ids = [item.id for item in videos.datasets["train"].items]
    assert 6 <= len(ids) <= 8  # the subset of 8 may hold the corrupt / missing clip
    for cache in caches:
        cache.setup("fit")
        assert cache.datasets["train"].ids == ids  # same items, same order
        torch.manual_seed(11)
        from_cache = list(cache.train_dataloader())
        torch.manual_seed(11)
        from_videos = list(videos.train_dataloader())
        assert len(from_cache) == len(from_videos)
        for (features, labels), batch in zip(from_cache, from_videos):
            assert torch.equal(labels, batch["label"])
            expected = torch.stack(on_the_fly(model, batch))
            assert features.shape == expected.shape == (len(labels), 2, 4, 64)
            assert torch.equal(features, expected)


@pytest.mark.parametrize("world_size", [1, 2])
def test_eval_items_are_listed_in_the_video_module_order(data, tmp_path, world_size):
    model = make_model()
    write(module(data), "val", model, tmp_path)  # single writer
    for rank in range(world_size):
        videos = module(data, rank=rank, world_size=world_size)
        videos.setup("validate")
        cache = FeatureDataModule(
            str(tmp_path), "kinetics400", R, val_split="val", rank=rank, world_size=world_size
        )
        cache.setup("validate")
        assert cache.datasets["val"].ids == [item.id for item in videos.datasets["val"].items]
    assert feature_cache_dir(tmp_path, "kinetics400", "val", R).is_dir()
