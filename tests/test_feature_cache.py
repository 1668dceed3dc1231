"""Feature cache of the frozen spatial ViViT on generated Kinetics-layout videos (real mp4)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from datamodules.common import shard
from datamodules.features import (
    ENTRY_KEYS,
    MANIFEST,
    FeatureCacheIncomplete,
    FeatureCacheMismatch,
    FeatureDataModule,
    FeatureDataset,
    entry_key,
    feature_cache_dir,
)
from datamodules.kinetics import KineticsDataModule
from datamodules.synthetic_video import make_kinetics
from eventful_pl.lightning.feature_cache import (
    CacheReport,
    check_feature_datamodule,
    check_model,
    write_datamodule_features,
    write_feature_cache,
)
from eventful_pl.models.vivit import create_vivit
from eventful_pl.policies import TopRPolicy

REPO = Path(__file__).parents[1]
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


@pytest.mark.slow
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
        for (features, labels, batch_ids), batch in zip(from_cache, from_videos):
            assert list(batch_ids) == list(batch["id"])
            assert torch.equal(labels, batch["label"])
            expected = torch.stack(on_the_fly(model, batch))
            assert features.shape == expected.shape == (len(labels), 2, 4, 64)
            assert torch.equal(features, expected)


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.slow
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


# ------------------------------------------------------------------ shared reference cache


@dataclass
class Reference:
    """The validation cache written in one uninterrupted run by ``make_model(0)``."""

    root: Path
    dir: Path
    report: CacheReport
    listing: list[str]  # file names in the cache folder
    manifest: bytes
    ids: list[str]  # readable items, in dataset order


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Reference:
    root = tmp_path_factory.mktemp("reference_cache")
    report = write(module(data), "val", make_model(), root)
    cache = feature_cache_dir(root, "kinetics400", "val", R)
    ids = [item.id for item in data.ok("val")]
    return Reference(root, cache, report, listing(cache), (cache / MANIFEST).read_bytes(), ids)


def listing(cache_dir: Path) -> list[str]:
    return sorted(os.listdir(cache_dir))


def load_entry(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_entries(cache_dir: Path, reference: Reference) -> None:
    """Same files as the reference cache; every entry and skip record equal."""
    assert listing(cache_dir) == reference.listing
    for name in reference.listing:
        if name.endswith(".pt"):
            mine, theirs = load_entry(cache_dir / name), load_entry(reference.dir / name)
            assert mine.keys() == theirs.keys() == ENTRY_KEYS
            assert torch.equal(mine["features"], theirs["features"]), name
            assert (mine["label"], mine["id"]) == (theirs["label"], theirs["id"])
        elif name.endswith(".skip"):
            assert json.loads((cache_dir / name).read_text()) == json.loads(
                (reference.dir / name).read_text()
            )


@pytest.mark.slow
def test_reference_cache_holds_every_readable_clip(data, reference):
    assert reference.report.written == 10 and reference.report.existing == 0
    assert reference.report.shard_size == 12
    assert sorted(f"{entry_key(i)}.pt" for i in reference.ids) == [
        name for name in reference.listing if name.endswith(".pt")
    ]
    labels = {item.id: item.label for item in data.items["val"]}
    for item_id in reference.ids:
        entry = load_entry(reference.dir / f"{entry_key(item_id)}.pt")
        assert entry["id"] == item_id and entry["label"] == labels[item_id]
        assert entry["features"].shape == (2, 4, 64) and entry["features"].dtype == torch.float32
        assert entry["features"].std() > 0.1  # real features, not zeros


# ------------------------------------------------------------------------- atomicity

KILLED_WRITER = """
import io, sys, time

import torch

from datamodules.kinetics import KineticsDataModule
from eventful_pl.lightning.feature_cache import write_datamodule_features
from eventful_pl.models.vivit import create_vivit
from eventful_pl.policies import TopRPolicy

root, cache_root, whole = sys.argv[1], sys.argv[2], int(sys.argv[3])
save, saved = torch.save, []


def slow_save(obj, f, *args, **kwargs):
    # The first `whole` entries are saved whole; the next is half written, then
    # the process waits (to be killed) before writing the rest.
    if len(saved) < whole:
        saved.append(obj["id"])
        return save(obj, f, *args, **kwargs)
    buffer = io.BytesIO()
    save(obj, buffer, *args, **kwargs)
    data = buffer.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()
    time.sleep(300)
    f.write(data[len(data) // 2 :])


torch.save = slow_save
torch.manual_seed(0)
model = create_vivit("vivit_tiny", spatial_variant="full", policy=TopRPolicy(6)).eval()
videos = KineticsDataModule(
    root, batch_size=3, num_workers=0, crop_size=64, flip_prob=0.0, probe_workers=2
)
write_datamodule_features(videos, "val", model, 6, cache_root, dtype="float32")
"""


@pytest.mark.slow
def test_killed_writer_leaves_whole_entries_and_a_restart_finishes_the_cache(
    data, reference, tmp_path
):
    whole = 3  # entries saved before the kill lands in the middle of the 4th
    script = tmp_path / "writer.py"
    script.write_text(KILLED_WRITER)
    root = tmp_path / "cache"
    cache = feature_cache_dir(root, "kinetics400", "val", R)
    log = (tmp_path / "writer.log").open("w")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    process = subprocess.Popen(
        [sys.executable, str(script), str(data.root), str(root), str(whole)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    partial = f".*.pt.{process.pid}.tmp"
    try:
        deadline = time.monotonic() + 120
        while True:  # until the 4th entry's temporary file holds its first half
            assert process.poll() is None, (tmp_path / "writer.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the writer never reached its 4th entry"
            count = len(list(cache.glob("*.pt"))) if cache.is_dir() else 0
            tmps = list(cache.glob(partial)) if count == whole else []
            if tmps and tmps[0].stat().st_size > 0:  # the slow entry's (the others are moved)
                break
            if count > whole:
                break  # (a writer without temporary files: checked below)
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()

    # Only whole entries under their names, and one half-written temporary file.
    names = listing(cache)
    entries = [name for name in names if name.endswith(".pt")]
    skips = [name for name in names if name.endswith(".skip")]
    (stale,) = [name for name in names if name.startswith(".")]
    assert len(entries) == whole
    assert set(names) == {MANIFEST, *entries, *skips, stale}
    assert (cache / MANIFEST).read_bytes() == reference.manifest
    for name in entries:  # each loads whole and equals the uninterrupted run's entry
        entry = load_entry(cache / name)
        assert entry["features"].shape == (2, 4, 64)
        assert torch.equal(entry["features"], load_entry(reference.dir / name)["features"])
    key = stale[1 : -len(f".pt.{process.pid}.tmp")]
    assert stale == f".{key}.pt.{process.pid}.tmp" and f"{key}.pt" not in names
    assert key in {entry_key(item_id) for item_id in reference.ids}
    half = (cache / stale).read_bytes()
    assert 0 < len(half) < (reference.dir / f"{key}.pt").stat().st_size
    with pytest.raises(RuntimeError, match="zip archive"):  # killed in the middle of the write
        load_entry(cache / stale)

    # Readers refuse the interrupted cache (the temporary file is not an entry).
    done = len(entries) + len(skips)
    with pytest.raises(FeatureCacheIncomplete) as error:
        FeatureDataset(cache)
    message = str(error.value)
    assert str(cache) in message and "run the writer again" in message
    assert f"{12 - done} of 12 entries not written" in message
    with pytest.raises(FeatureCacheIncomplete):
        FeatureDataModule(str(root), "kinetics400", R, num_workers=0).setup("validate")

    # A restart in this process resumes: only the rest is written.
    report = write(module(data), "val", make_model(), root)
    assert (report.existing, report.skipped_earlier) == (whole, len(skips))
    assert report.written + report.existing + sum(report.skipped.values()) == 12
    assert report.written == 10 - whole and report.rewritten == 0 and not report.bad
    assert f"{10 - whole} written, {whole} already there, 2 skipped" in report.summary()
    assert not (cache / stale).exists()  # its own stale temporary file is removed
    assert_same_entries(cache, reference)  # = one uninterrupted run
    assert (cache / MANIFEST).read_bytes() == reference.manifest

    # A stale temporary file next to a finished cache is ignored by readers ...
    (cache / stale).write_bytes(half)
    dataset = FeatureDataset(cache)
    assert dataset.ids == reference.ids
    assert all(features.shape == (2, 4, 64) for features, _, _ in dataset)
    # ... and removed by the next run of the writer, which writes nothing.
    report = write(module(data), "val", make_model(), root)
    assert (report.written, report.existing, report.skipped_earlier) == (0, 10, 2)
    assert listing(cache) == reference.listing


# -------------------------------------------------------------------------- mismatch


@pytest.mark.slow
def test_cache_made_otherwise_is_refused_naming_the_fields(data, reference):
    cache = reference.dir
    items = module(data).split_items("val")
    settings = dict(dataset="kinetics400", split="val", r=R, short_side=SIZE, dtype="float32")

    def write_items(model=None, items=items, **overrides):
        options = {**settings, **overrides}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return write_feature_cache(
                model or make_model(), items, cache, num_workers=0, probe_workers=2, **options
            )

    def refused(call, *fields: str, absent: tuple[str, ...] = ()) -> None:
        with pytest.raises(FeatureCacheMismatch) as error:
            call()
        message = str(error.value)
        assert f"feature cache {cache} was made with other settings" in message
        for text in fields:
            assert text in message
        for text in absent:
            assert text not in message
        assert listing(cache) == reference.listing  # nothing written or removed
        assert (cache / MANIFEST).read_bytes() == reference.manifest

    # Writing.
    refused(lambda: write_items(r=5), "r: cache 6 vs 5", absent=("dtype", "spatial"))
    refused(lambda: write_items(make_model(1)), "spatial_hash: cache", absent=("spatial_config",))
    refused(
        lambda: write_items(make_model(0, mean=0.5)),
        "spatial_config (mean: cache 0.45 vs 0.5)",
        absent=("spatial_hash", "std"),  # same initial weights: only the config differs
    )
    refused(
        lambda: write_items(dataset="kinetics600"), "dataset: cache 'kinetics400' vs 'kinetics600'"
    )
    refused(lambda: write_items(split="test"), "split: cache 'val' vs 'test'")
    refused(lambda: write_items(short_side=80), "short_side: cache 64 vs 80")
    refused(lambda: write_items(dtype="float16"), "dtype: cache 'float32' vs 'float16'")
    refused(lambda: write_items(items=items[:-1]), "items: 0 not in the cache, 1 only in the cache")
    refused(lambda: write_items(items=items[::-1]), "items: 0 not in", "labels or order differ")
    refused(  # every differing field is named
        lambda: write_items(make_model(1), r=5, dtype="bfloat16"),
        "r: cache 6 vs 5",
        "dtype: cache 'float32' vs 'bfloat16'",
        "spatial_hash",
        absent=("short_side", "dataset", "items"),
    )
    refused(  # through the data module: its short side
        lambda: write(module(data, eval_short_side=72), "val", make_model(), reference.root),
        "short_side: cache 64 vs 72",
    )

    # Reading.
    refused(lambda: FeatureDataset(cache, expect={"r": 24}), "r: cache 6 vs 24")
    refused(
        lambda: FeatureDataset(cache, expect={"dataset": "epic_kitchens100", "split": "train"}),
        "dataset: cache 'kinetics400' vs 'epic_kitchens100'",
        "split: cache 'val' vs 'train'",
    )
    refused(lambda: check_model(cache, make_model(1)), "spatial_hash")
    for name in ("embedding.conv.bias", "spatial.blocks.1.fc2.bias", "spatial.norm.weight"):
        changed = make_model()  # one spatial weight changed by 1e-3
        with torch.no_grad():
            changed.get_parameter(name).view(-1)[0] += 1e-3
        refused(lambda model=changed: check_model(cache, model), "spatial_hash")
    # The temporal model and classifier (trained on the features) do not make them.
    trained = make_model()
    with torch.no_grad():
        for name, parameter in trained.named_parameters():
            if name.startswith(("temporal.", "classifier.")):
                parameter.add_(1.0)
    check_model(cache, trained)
    refused(lambda: check_model(cache, make_model(0, mean=0.5)), "spatial_config (mean")

    # The same settings resume (here: nothing left to write), and read back.
    check_model(cache, make_model())
    report = write_items()
    assert (report.written, report.existing, report.shard_size) == (0, 10, 12)
    assert report.skipped == Counter(missing=1, unreadable=1) and report.skipped_earlier == 2
    report = write(module(data), "val", make_model(), reference.root)
    assert (report.written, report.existing) == (0, 10)
    assert listing(cache) == reference.listing
    expect = {"dataset": "kinetics400", "split": "val", "r": R, "dtype": "float32"}
    assert FeatureDataset(cache, expect=expect).ids == reference.ids


# ----------------------------------------------------------------------------- skips


@pytest.mark.slow
def test_unreadable_and_missing_videos_are_recorded_as_skips(data, reference):
    reasons = {"corrupt": "unreadable", "missing": "missing"}
    bad = [item for item in data.items["val"] if item.status != "ok"]
    assert sorted(item.status for item in bad) == ["corrupt", "missing"]
    for item in bad:
        key = entry_key(item.id)
        assert f"{key}.pt" not in reference.listing
        record = json.loads((reference.dir / f"{key}.skip").read_text())
        assert record["id"] == item.id and record["reason"] == reasons[item.status]
        assert item.path.name in record["message"]
    for item in data.ok("val"):
        assert f"{entry_key(item.id)}.skip" not in reference.listing
    assert reference.report.skipped == Counter(missing=1, unreadable=1)
    assert "10 written, 0 already there, 2 skipped (missing: 1, unreadable: 1)" in (
        reference.report.summary()
    )

    dataset = FeatureDataset(reference.dir)
    assert dataset.summary() == (
        "kinetics400 val features (r=6): 10 of 12 listed items used, "
        "2 skipped (missing: 1, unreadable: 1)"
    )
    assert len(dataset) == 10 and dataset.ids == reference.ids
    assert not {item.id for item in bad} & set(dataset.ids)
    cache = FeatureDataModule(str(reference.root), "kinetics400", R, num_workers=0)
    cache.setup("validate")
    assert cache.summaries["val"] == dataset.summary()
    # Per rank, each skip is counted once, by the rank holding it.
    counted = Counter()
    for rank in range(2):
        shard_of = FeatureDataset(reference.dir, rank=rank, world_size=2)
        counted.update(shard_of.skip_log.reasons)
        assert f"(rank {rank} of 2): {len(shard_of)} of 6 listed items used" in shard_of.summary()
    assert counted == Counter(missing=1, unreadable=1)


# --------------------------------------------------------------------- rank shards


@pytest.mark.slow
def test_ranks_write_and_read_disjoint_shards_covering_every_item(data, reference, tmp_path):
    model = make_model()
    cache = feature_cache_dir(tmp_path, "kinetics400", "val", R)
    manifest_ids = [item.id for item in module(data).split_items("val")]
    assert len(manifest_ids) == 12
    readable = set(reference.ids)

    first = write(module(data), "val", model, tmp_path, rank=0, world_size=2)
    written_by_0 = {name for name in listing(cache) if name != MANIFEST}
    assert written_by_0 == {
        f"{entry_key(i)}.{'pt' if i in readable else 'skip'}" for i in shard(manifest_ids, 0, 2)
    }
    with pytest.raises(FeatureCacheIncomplete, match="6 of 12 entries not written"):
        FeatureDataset(cache)
    second = write(module(data), "val", model, tmp_path, rank=1, world_size=2)
    written_by_1 = {name for name in listing(cache) if name != MANIFEST} - written_by_0
    assert written_by_1 == {
        f"{entry_key(i)}.{'pt' if i in readable else 'skip'}" for i in shard(manifest_ids, 1, 2)
    }
    for report in (first, second):
        assert report.shard_size == 6 and report.existing == 0
        assert report.written + sum(report.skipped.values()) == 6
    assert first.written + second.written == 10
    assert first.skipped + second.skipped == Counter(missing=1, unreadable=1)
    assert_same_entries(cache, reference)  # together: the single writer's cache

    shards = [FeatureDataset(cache, rank=rank, world_size=2).ids for rank in range(2)]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(reference.ids)
    for rank, ids in enumerate(shards):
        # A rank reads the entries it wrote, in dataset order.
        assert ids == [i for i in shard(manifest_ids, rank, 2) if i in readable]
        assert {f"{entry_key(i)}.pt" for i in ids} == {
            name for name in (written_by_0, written_by_1)[rank] if name.endswith(".pt")
        }


# ------------------------------------------------------------------- the data module


@pytest.mark.slow
def test_feature_data_module_batches_equal_the_spatial_model_on_whole_clips(data, reference):
    model = make_model()
    write(module(data), "train", model, reference.root)
    V, T, D = model.num_views, model.steps, model.dim
    assert (V, T, D) == (2, 4, 64)

    # The validation batches, in order, = the spatial model on each whole clip.
    videos = module(data)
    videos.setup("validate")
    expected = [on_the_fly(model, batch)[0] for batch in videos.val_dataloader()]
    expected_labels = [item.label for item in videos.datasets["val"].items]
    cache = FeatureDataModule(
        str(reference.root), "kinetics400", R, batch_size=4, eval_batch_size=4, num_workers=0
    )
    cache.setup("fit")
    batches = list(cache.val_dataloader())
    assert [len(labels) for _, labels, _ in batches] == [4, 4, 2]
    for features, labels, ids in batches:
        assert len(ids) == len(labels)
        assert features.dtype == torch.float32 and labels.dtype == torch.int64
        assert features.shape == (len(labels), V, T, D)
    features = torch.cat([f for f, _, _ in batches])
    assert torch.cat([y for _, y, _ in batches]).tolist() == expected_labels
    torch.testing.assert_close(features, torch.stack(expected), rtol=1e-4, atol=1e-5)
    assert features.std() > 0.1

    # Training batches: every training entry once per epoch, all views.
    entries = {}
    for name in listing(cache.cache_dir("train")):
        if name.endswith(".pt"):
            entry = load_entry(cache.cache_dir("train") / name)
            entries[entry["id"]] = entry
    assert sorted(entries) == sorted(item.id for item in data.ok("train"))
    torch.manual_seed(3)
    seen = []
    for features, labels, ids in cache.train_dataloader():
        assert features.dtype == torch.float32 and labels.dtype == torch.int64
        assert features.shape == (len(labels), V, T, D)
        for row, label, batch_id in zip(features, labels.tolist(), ids):
            (item_id,) = [i for i, e in entries.items() if torch.equal(e["features"], row)]
            assert entries[item_id]["label"] == label and batch_id == item_id
            seen.append(item_id)
    assert sorted(seen) == sorted(entries)

    # train_views="random": one view (V = 1) of each entry.
    one_view = FeatureDataModule(
        str(reference.root), "kinetics400", R, batch_size=4, num_workers=0, train_views="random"
    )
    one_view.setup("fit")
    torch.manual_seed(3)
    views = []  # (item id, the views of it that row equals)
    for features, labels, _ in one_view.train_dataloader():
        assert features.shape == (len(labels), 1, T, D)
        for row in features:
            (match,) = [
                (item_id, {v for v in range(V) if torch.equal(entry["features"][v], row[0])})
                for item_id, entry in entries.items()
                if any(torch.equal(view, row[0]) for view in entry["features"])
            ]
            views.append(match)
    assert sorted(item_id for item_id, _ in views) == sorted(entries)
    # (An 8-frame clip's two views are the same 8 frames; the longer clips' differ.)
    assert {min(found) for _, found in views if len(found) == 1} == set(range(V))
    assert one_view.datasets["val"][0][0].shape == (V, T, D)  # evaluation: all views

    # Another model (other weights, other config) is refused.
    check_model(cache.cache_dir("val"), model)
    with pytest.raises(FeatureCacheMismatch, match="spatial_hash") as error:
        check_model(cache.cache_dir("val"), make_model(1))
    assert str(cache.cache_dir("val")) in str(error.value)
    with pytest.raises(FeatureCacheMismatch, match=r"spatial_config \(mean: cache 0.45 vs 0.5\)"):
        check_model(cache.cache_dir("train"), make_model(0, mean=0.5))
    # The LightningModule checks the data module's caches against its ViViT
    # (stand-in trainer); the data module's setup runs no model.
    for other, refused in ((make_model(1), True), (make_model(0), False)):
        checked = FeatureDataModule(str(reference.root), "kinetics400", R, num_workers=0)
        checked.setup("validate")
        assert checked.datasets["val"].ids == reference.ids
        trainer = SimpleNamespace(datamodule=checked)
        if refused:
            with pytest.raises(FeatureCacheMismatch, match="spatial_hash"):
                check_feature_datamodule(trainer, other)
        else:
            done: set = set()
            check_feature_datamodule(trainer, other, done)
            assert done == {checked.cache_dir("val")}


# --------------------------------------------------------------------- command line


def cache_features_config(data, tmp_path: Path, pretrained: Path) -> Path:
    """A ``fit`` config of the tiny ViViT on the test videos, cache under tmp_path/cache."""
    videos = dict(root=str(data.root), batch_size=3, num_workers=0, crop_size=SIZE)
    videos.update(flip_prob=0.0, probe_workers=2, eval_short_side=SIZE)
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "logger": False},
        "model": {
            "class_path": "eventful_pl.lightning.vivit_module.ViViTFineTuning",
            "init_args": {"preset": "vivit_tiny", "r": R, "pretrained": str(pretrained)},
        },
        "data": {
            "class_path": "datamodules.finetune.ViViTFineTuneDataModule",
            "init_args": {
                "cache_root": str(tmp_path / "cache"),
                "cache_dtype": "float32",
                "videos": {
                    "class_path": "datamodules.kinetics.KineticsDataModule",
                    "init_args": videos,
                },
            },
        },
    }
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_cache_features_command_writes_the_cache_fit_reads(data, reference, tmp_path, capsys):
    from cli import cli_main

    weights = tmp_path / "spatial.pth"
    torch.save(make_model(0).state_dict(), weights)  # the reference cache's model
    config = cache_features_config(data, tmp_path, weights)
    args = ["cache-features", "--config", str(config), "--splits", "val", "--device", "cpu"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (report,) = cli_main(args)
    printed = capsys.readouterr().out
    cache = feature_cache_dir(tmp_path / "cache", "kinetics400", "val", R)
    assert report.path == cache
    assert f"feature cache {cache}: 12 items in this shard, 10 written" in printed
    assert "2 skipped (missing: 1, unreadable: 1)" in printed
    manifest = json.loads((cache / MANIFEST).read_text())
    assert (manifest["r"], manifest["dtype"], manifest["short_side"]) == (R, "float32", SIZE)
    assert manifest["feature_shape"] == [2, 4, 64]
    dataset = FeatureDataset(cache, expect={"dataset": "kinetics400", "split": "val", "r": R})
    assert dataset.ids == reference.ids
    labels = {item.id: item.label for item in data.items["val"]}
    for item_id, (features, label, entry_id) in zip(dataset.ids, dataset):
        assert features.shape == (2, 4, 64) and label == labels[item_id] and entry_id == item_id
    check_model(cache, make_model())  # made with the pretrained weights
    assert_same_entries(cache, reference)
    # Run again: with other weights (no pretrained, another seed: command-line
    # overrides, as for fit) it is refused; with the same, nothing is left to write.
    other = ["--model.init_args.pretrained", "null", "--seed_everything", "1"]
    with pytest.raises(FeatureCacheMismatch, match="spatial_hash"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cli_main(args + other)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli_main(args)
    assert (
        "0 written, 10 already there, 2 skipped (2 from earlier runs; missing: 1, unreadable: 1)"
        "; 10 of 12 items have features"
    ) in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli_main(args + ["--data.init_args.cache_dtype", "int8"])
    # The training split by default (the one fit reads), under the configured name.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (train,) = cli_main(args[:3])
    assert train.path == feature_cache_dir(tmp_path / "cache", "kinetics400", "train", R)


def test_old_writer_names_still_import_with_a_deprecation_warning():
    import datamodules.features as features_module
    from eventful_pl.lightning import feature_cache

    for name in ("write_datamodule_features", "spatial_weights_hash", "CacheReport"):
        with pytest.warns(DeprecationWarning, match=f"{name} moved to eventful_pl.lightning"):
            assert getattr(features_module, name) is getattr(feature_cache, name)
    with pytest.warns(DeprecationWarning, match="cli.py cache-features"):
        old_main = features_module.main
    with pytest.raises(SystemExit, match="cli.py cache-features"):
        old_main(["--help"])
