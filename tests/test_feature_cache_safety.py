"""The feature cache is verified, not trusted: bad entries are found, named and rewritten;
skipped videos are tried again once their files change (real mp4 videos, tiny ViViT)."""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch

import eventful_pl.lightning.feature_cache as features_module
from datamodules.features import (
    ENTRY_KEYS,
    MANIFEST,
    NONFINITE,
    FeatureCacheCorrupt,
    FeatureDataModule,
    FeatureDataset,
    entry_key,
    feature_cache_dir,
)
from datamodules.synthetic_video import make_kinetics
from eventful_pl.lightning.feature_cache import write_datamodule_features
from tests.test_feature_cache import SIZE, R, listing, load_entry, make_model, module

DATA = dict(videos_per_class=2, frames=8, size=SIZE, frame_jitter=2)


def make_data(root: Path, broken: bool = True):
    """8 clips (2 per class) per split; with ``broken`` one is corrupt and one missing.

    The clips (names, labels, frames) do not depend on ``broken``: only which
    files are written whole.
    """
    return make_kinetics(root, **DATA, corrupt=int(broken), missing=int(broken))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("safety_videos"))


def write(data, root: Path, model=None, **kwargs):
    """Writes the val cache; returns (report, warning messages)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = write_datamodule_features(
            module(data), "val", model or make_model(), R, root, dtype="float32", **kwargs
        )
    return report, [str(w.message) for w in caught]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """The root of a cache written in one clean run."""
    root = tmp_path_factory.mktemp("safety_reference")
    report, _ = write(data, root)
    assert (report.written, report.existing) == (6, 0)
    assert report.skipped == Counter(missing=1, unreadable=1)
    return root


def cache_of(root: Path) -> Path:
    return feature_cache_dir(root, "kinetics400", "val", R)


def copy_cache(reference: Path, tmp_path: Path) -> Path:
    root = tmp_path / "cache"
    shutil.copytree(reference, root)
    return root


def sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


@pytest.mark.slow
def test_entries_record_checksum_shape_and_dtype(data, reference):
    cache = cache_of(reference)
    for item in data.ok("val"):
        entry = load_entry(cache / f"{entry_key(item.id)}.pt")
        assert entry.keys() == ENTRY_KEYS
        assert entry["sha256"] == sha256(entry["features"])
        assert (entry["shape"], entry["dtype"]) == ([2, 4, 64], "float32")
        assert (entry["id"], entry["label"]) == (item.id, item.label)


# ------------------------------------------------------------------------ bad entries


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_bit(path: Path) -> None:
    """Flips one bit inside the stored features: the file still loads."""
    entry = load_entry(path)
    data = bytearray(path.read_bytes())
    start = bytes(data).find(entry["features"].numpy().tobytes())
    assert start > 0
    data[start + 1001] ^= 0x04
    path.write_bytes(bytes(data))
    changed = load_entry(path)  # loads without complaint ...
    assert not torch.equal(changed["features"], entry["features"])  # ... other values
    assert changed["sha256"] == entry["sha256"]


def rewrite(path: Path, change) -> None:
    """Saves the entry changed by ``change(entry)``, with a matching checksum."""
    entry = change(load_entry(path))
    features = entry["features"]
    entry.update(sha256=sha256(features), shape=list(features.shape))
    torch.save(entry, path)


def wrong_shape(path: Path) -> None:
    rewrite(path, lambda e: {**e, "features": e["features"][:, :3].clone()})


def with_nan(path: Path) -> None:
    def change(entry):
        features = entry["features"].clone()
        features[1, 2, 5] = float("nan")
        return {**entry, "features": features}

    rewrite(path, change)


def without_checksum(path: Path) -> None:
    """An entry as the writer wrote them before checksums."""
    entry = load_entry(path)
    torch.save({k: entry[k] for k in ("features", "label", "id")}, path)


def with_object(path: Path) -> None:
    """An entry holding an arbitrary Python object (a pickle that runs code could)."""
    torch.save({**load_entry(path), "extra": argparse.Namespace(x=1)}, path)


def other_item(path: Path) -> None:
    """Another item's entry copied under this one's name."""
    others = sorted(p for p in path.parent.glob("*.pt") if p != path)
    shutil.copyfile(others[0], path)


BAD = {
    "truncated": (truncate, "cannot be read"),
    "bit-flipped": (flip_bit, "fails its checksum"),
    "wrong-shape": (wrong_shape, "holds features of shape (2, 3, 64), not (2, 4, 64)"),
    "nan": (with_nan, "holds non-finite features (1 NaN, 0 inf)"),
    "no-checksum": (without_checksum, "has no checksum"),
    "arbitrary-object": (with_object, "cannot be read (UnpicklingError"),
    "other-item": (other_item, "holds item"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_entry_is_named_by_the_reader_and_rewritten_by_the_writer(
    data, reference, tmp_path, kind
):
    damage, problem = BAD[kind]
    root = copy_cache(reference, tmp_path)
    cache = cache_of(root)
    ids = [item.id for item in data.ok("val")]
    bad_id = ids[2]
    path = cache / f"{entry_key(bad_id)}.pt"
    damage(path)

    # The reader: the other entries read; this one raises, naming the file and the fix.
    dataset = FeatureDataset(cache)
    assert dataset.ids == ids
    for index in (0, 1, 3):
        assert torch.isfinite(dataset[index][0]).all()
    with pytest.raises(FeatureCacheCorrupt) as error:
        dataset[2]
    message = str(error.value)
    assert f"feature cache entry {path} {problem}" in message
    assert "rerun the feature cache writer" in message
    assert error.value.path == path
    # Through the data module's loader too.
    loader = FeatureDataModule(str(root), "kinetics400", R, eval_batch_size=8, num_workers=0)
    loader.setup("validate")
    with pytest.raises(FeatureCacheCorrupt, match=re.escape(str(path))):
        list(loader.val_dataloader())

    # The writer: warns naming the file, removes it, computes it again from the video.
    report, warned = write(data, root)
    assert (report.written, report.rewritten, report.existing) == (1, 1, 5)
    assert report.skipped_earlier == 2 and report.skipped == Counter(missing=1, unreadable=1)
    assert len(report.bad) == 1 and report.bad[0].startswith(f"{path}: {problem}")
    assert any(str(path) in text and problem in text for text in warned)
    assert "1 written (1 rewritten: bad entries), 5 already there, 2 skipped" in (report.summary())
    # The rewritten entry = the one of the clean run; the cache reads whole again.
    assert listing(cache) == listing(cache_of(reference))
    fresh, rewritten = load_entry(cache_of(reference) / path.name), load_entry(path)
    assert rewritten.keys() == ENTRY_KEYS
    assert torch.equal(rewritten["features"], fresh["features"])
    assert {k: rewritten[k] for k in ENTRY_KEYS - {"features"}} == {
        k: fresh[k] for k in ENTRY_KEYS - {"features"}
    }
    assert torch.equal(FeatureDataset(cache)[2][0], fresh["features"])
    report, _ = write(data, root)  # nothing left to repair
    assert (report.written, report.existing, report.bad) == (0, 6, [])


def test_unreadable_manifest_and_skip_records_are_named(data, reference, tmp_path):
    root = copy_cache(reference, tmp_path)
    cache = cache_of(root)
    bad_item = next(item for item in data.items["val"] if item.status == "corrupt")
    skip = cache / f"{entry_key(bad_item.id)}.skip"
    skip.write_text('{"id": ')  # cut short
    with pytest.raises(FeatureCacheCorrupt, match=re.escape(f"skip record {skip} cannot be")):
        FeatureDataset(cache)
    report, warned = write(data, root)  # removed and the video tried again
    (bad,) = report.bad
    assert bad.startswith(f"{skip}: skip record cannot be read (JSONDecodeError: Expecting value")
    assert any(str(skip) in text for text in warned)
    assert report.skipped == Counter(missing=1, unreadable=1) and report.skipped_earlier == 1
    assert json.loads(skip.read_text())["reason"] == "unreadable"
    assert len(FeatureDataset(cache)) == 6

    manifest = cache / MANIFEST
    manifest.write_text(manifest.read_text()[:100])
    for call in (lambda: FeatureDataset(cache), lambda: write(data, root)):
        with pytest.raises(FeatureCacheCorrupt, match=re.escape(f"manifest {manifest} cannot be")):
            call()
    manifest.write_text("[]")
    with pytest.raises(FeatureCacheCorrupt, match=re.escape(f"manifest {manifest} is not a")):
        FeatureDataset(cache)


# ----------------------------------------------------------------- non-finite features


def nan_model():
    model = make_model()
    with torch.no_grad():
        model.spatial.norm.weight[3] = float("nan")
    return model


@pytest.mark.slow
def test_non_finite_model_outputs_are_never_cached(data, tmp_path):
    cache = cache_of(tmp_path)
    report, warned = write(data, tmp_path, nan_model())
    assert report.written == 0 and not list(cache.glob("*.pt"))
    assert report.skipped == Counter({NONFINITE: 6, "missing": 1, "unreadable": 1})
    assert "0 written, 0 already there, 8 skipped" in report.summary()
    assert any(NONFINITE in text for text in warned)
    for item in data.ok("val"):
        record = json.loads((cache / f"{entry_key(item.id)}.skip").read_text())
        assert record["reason"] == NONFINITE and str(item.path) in record["message"]
        assert "non-finite values (NaN or inf) of 512" in record["message"]
    dataset = FeatureDataset(cache)
    assert len(dataset) == 0
    assert dataset.summary() == (
        "kinetics400 val features (r=6): 0 of 8 listed items used, 8 skipped "
        "(missing: 1, non-finite features: 6, unreadable: 1)"
    )
    # Non-finite skips are tried again by every run (the model's precision may differ).
    report, _ = write(data, tmp_path, nan_model())
    assert (report.retried, report.skipped_earlier, report.written) == (6, 2, 0)
    assert report.skipped[NONFINITE] == 6 and not list(cache.glob("*.pt"))


@pytest.mark.slow
def test_features_overflowing_the_storage_dtype_are_not_cached(data, tmp_path):
    model = make_model()
    with torch.no_grad():
        model.spatial.norm.weight.mul_(1e6)  # features far above float16's 65504
    readable = {item.id for item in data.ok("val")}
    items = [item for item in module(data).split_items("val") if item.id in readable][:3]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = features_module.write_feature_cache(
            model, items, tmp_path, "kinetics400", "val", R, probe_workers=2, dtype="float16"
        )
    assert report.written == 0 and not list(tmp_path.glob("*.pt"))
    assert report.skipped == Counter({NONFINITE: 3})
    records = [json.loads(p.read_text()) for p in tmp_path.glob("*.skip")]
    assert len(records) == 3
    for record in records:
        assert record["reason"] == NONFINITE
        assert "features overflow float16" in record["message"]
        assert "write the cache with dtype float32 or bfloat16" in record["message"]


def test_writer_stops_when_the_model_gives_only_non_finite_features(data, tmp_path, monkeypatch):
    monkeypatch.setattr(features_module, "NONFINITE_STOP", 3)
    with pytest.raises(RuntimeError, match="non-finite features for each of the 3 videos"):
        write(data, tmp_path, nan_model())
    cache = cache_of(tmp_path)
    assert not list(cache.glob("*.pt"))
    reasons = Counter(json.loads(p.read_text())["reason"] for p in cache.glob("*.skip"))
    assert reasons[NONFINITE] == 3


# ---------------------------------------------------------------- skipped, then fixed


@pytest.mark.slow
def test_fixed_video_is_tried_again_and_trained_on(tmp_path):
    videos = make_data(tmp_path / "videos")
    good = make_data(tmp_path / "good", broken=False)
    root = tmp_path / "cache"
    cache = cache_of(root)
    report, _ = write(videos, root)
    assert (report.written, report.skipped) == (6, Counter(missing=1, unreadable=1))
    broken = [item for item in videos.items["val"] if item.status != "ok"]
    for item in broken:  # the video's state is recorded with the skip
        record = json.loads((cache / f"{entry_key(item.id)}.skip").read_text())
        assert record["video"]["path"] == str(item.path)
        if item.status == "missing":
            assert record["video"]["exists"] is False
        else:
            assert record["video"]["size"] == item.path.stat().st_size
            assert record["video"]["mtime_ns"] == item.path.stat().st_mtime_ns

    # Unchanged videos: the skips stand, and the summary counts them.
    report, _ = write(videos, root)
    assert (report.written, report.existing, report.retried) == (0, 6, 0)
    assert report.skipped == Counter(missing=1, unreadable=1) and report.skipped_earlier == 2
    assert (
        "0 written, 6 already there, 2 skipped (2 from earlier runs; missing: 1, unreadable: 1)"
        "; 6 of 8 items have features"
    ) in report.summary()

    # The user replaces the corrupt video and adds the missing one.
    for item in broken:
        shutil.copyfile(good.root / item.path.relative_to(videos.root), item.path)
    with pytest.warns(UserWarning, match="2 videos skipped by the feature cache writer changed"):
        stale = FeatureDataset(cache)
    assert "6 of 8 listed items used" in stale.summary()
    assert "2 skipped videos changed since: rerun the writer" in stale.summary()

    report, _ = write(videos, root)
    assert (report.written, report.existing, report.retried) == (2, 6, 2)
    assert sum(report.skipped.values()) == 0
    assert "2 earlier skips retried; 8 of 8 items have features" in report.summary()
    assert not list(cache.glob("*.skip"))

    # The fixed videos' entries = those of a cache of the good videos; all 8 are trained on.
    good_report, _ = write(good, tmp_path / "good_cache")
    assert good_report.written == 8
    expected = {
        item.id: load_entry(cache_of(tmp_path / "good_cache") / f"{entry_key(item.id)}.pt")
        for item in good.items["val"]
    }
    for item in broken:
        entry = load_entry(cache / f"{entry_key(item.id)}.pt")
        assert torch.equal(entry["features"], expected[item.id]["features"])
    features = FeatureDataModule(
        str(root), "kinetics400", R, train_split="val", batch_size=3, num_workers=0
    )
    features.setup("fit")
    assert features.summaries["val"] == (
        "kinetics400 val features (r=6): 8 of 8 listed items used, 0 skipped"
    )
    assert set(features.datasets["train"].ids) == set(expected)
    seen = []
    for batch, labels, _ in features.train_dataloader():
        for row, label in zip(batch, labels.tolist()):
            (item_id,) = [i for i, e in expected.items() if torch.equal(e["features"], row)]
            assert expected[item_id]["label"] == label
            seen.append(item_id)
    assert sorted(seen) == sorted(expected)
    assert {item.id for item in broken} <= set(seen)
