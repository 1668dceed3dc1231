"""Safety of whole runs: checkpoints never run code embedded in them, the
user's files are never written over, ``--ckpt_path`` does what the command line
says, a non-finite loss stops the run naming its batch, and a resumed run
(dropout included) is bit-identical to an uninterrupted one.

The Lightning runs use ``vivit_tiny`` on 32 x 32 synthetic Kinetics clips, as
``tests/test_lightning_vivit.py`` does.
"""

from __future__ import annotations

import collections
import contextlib
import io
import os
import pickle
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import DataLoader, Dataset

from cli import cli_main
from datamodules.kinetics import KineticsDataModule
from datamodules.synthetic_detection import write_synthetic_vid
from datamodules.synthetic_video import make_epic_kitchens, make_kinetics
from eventful_pl.checkpoints import UntrustedCheckpointError, read_checkpoint
from eventful_pl.lightning.cli import CheckpointConflictError
from eventful_pl.lightning.evaluation import NonFiniteLossError
from eventful_pl.lightning.rng_state import capture_rng_states, restore_rng_states
from tests.helpers import SMALL_CLIPS, quiet_trainer_options
from tests.test_lightning_vivit import cli_config, datamodule, module

SYNTHETIC = {"videos_per_class": 2, "frames": 8, "size": 32, "frame_jitter": 2, "seed": 0}

pytestmark = pytest.mark.usefixtures("one_thread")


class WritesMarker:
    """Unpickling this object creates a file: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("kinetics_tiny")
    make_kinetics(path, task="colour_order", **SYNTHETIC)
    return path


# ------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("suffix", [".pth", ".pyth", ".ckpt", ".pkl"])
def test_a_checkpoint_that_runs_code_is_refused(tmp_path, suffix):
    marker = tmp_path / "code_ran"
    path = tmp_path / f"weights{suffix}"
    payload = {"model": {"w": np.zeros(2, np.float32)}, "extra": WritesMarker(marker)}
    if suffix == ".pkl":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": WritesMarker(marker)}, path)
    with pytest.raises(UntrustedCheckpointError) as error:
        read_checkpoint(path)
    assert str(path) in str(error.value) and "trust_pretrained" in str(error.value)
    assert not marker.exists()
    # The explicit opt-in reads it (and so runs what it names).
    assert set(read_checkpoint(path, trusted=True)) == {"w"}
    assert marker.exists()


def test_module_pretrained_is_read_safely(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "vivit.pth"
    torch.save({"model": module().model.state_dict(), "extra": WritesMarker(marker)}, path)
    with pytest.raises(UntrustedCheckpointError, match="vivit.pth"):
        module(pretrained=str(path)).load_pretrained()
    assert not marker.exists()
    loaded = module(pretrained=str(path), trust_pretrained=True)
    loaded.load_pretrained()
    assert marker.exists()
    assert torch.equal(loaded.model.classifier.weight, module().model.classifier.weight)


def test_detectron2_style_pickle_of_numpy_arrays_loads(tmp_path):
    """detectron2 publishes pickles of numpy arrays (``{"model": {...}, "__author__": ...}``)."""
    weights = collections.OrderedDict(
        a=np.arange(6, dtype=np.float32).reshape(2, 3), b=np.array([1, 2], dtype=np.int64)
    )
    path = tmp_path / "model_final.pkl"
    for protocol in (2, 4, 5):
        data = {"model": weights, "__author__": "Detectron2", "matching_heuristics": True}
        path.write_bytes(pickle.dumps(data, protocol=protocol))
        loaded = read_checkpoint(path)
        assert torch.equal(loaded["a"], torch.arange(6.0).reshape(2, 3))
        assert loaded["b"].dtype == torch.int64


# ---------------------------------------------------------------- the CLI's files


def run_cli(*args: str):
    with contextlib.redirect_stdout(io.StringIO()):
        return cli_main(list(args))


@pytest.mark.slow
def test_config_yaml_of_the_user_is_never_replaced(tmp_path, root, argv, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    own = work / "config.yaml"
    own.write_text("my own notes\n")
    config = cli_config(
        tmp_path, root, logger=False, max_epochs=1, callbacks=[], default_root_dir=str(work)
    )
    run_cli("fit", "--config", str(config))
    run_cli("fit", "--config", str(config))
    assert own.read_text() == "my own notes\n"
    for copy in ("config.1.yaml", "config.2.yaml"):  # one per run, none replaced
        saved = yaml.safe_load((work / copy).read_text())
        assert saved["model"]["init_args"]["r"] == 4
    # With a logger, the copy goes to the run's own version folder.
    run_cli("fit", "--config", str(cli_config(tmp_path, root, max_epochs=1, callbacks=[])))
    (saved,) = (tmp_path / "logs" / "vivit").glob("version_*/config.yaml")
    assert yaml.safe_load(saved.read_text())["trainer"]["max_epochs"] == 1


def test_synthetic_option_never_writes_into_a_folder_with_files(tmp_path):
    own = tmp_path / "my_videos"
    own.mkdir()
    (own / "holiday.mp4").write_bytes(b"not a dataset")
    data = KineticsDataModule(str(own), **SMALL_CLIPS, synthetic=SYNTHETIC)
    with pytest.raises(FileExistsError, match="my_videos.*not empty.*synthetic"):
        data.prepare_data()
    assert [p.name for p in own.iterdir()] == ["holiday.mp4"]
    # The library writers refuse as well.
    for write in (
        lambda: make_kinetics(own, **SYNTHETIC),
        lambda: make_epic_kitchens(own, participants=1),
        lambda: write_synthetic_vid(own),
    ):
        with pytest.raises(FileExistsError, match="not empty"):
            write()
    assert [p.name for p in own.iterdir()] == ["holiday.mp4"]
    # An empty (or missing) folder receives the dataset, and only whole.
    empty = tmp_path / "empty"
    empty.mkdir()
    KineticsDataModule(str(empty), **SMALL_CLIPS, synthetic=SYNTHETIC).prepare_data()
    assert (empty / "annotations" / "train.csv").is_file()
    assert not list(tmp_path.glob(".*partial"))


# ------------------------------------------------------------------- --ckpt_path


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, root) -> tuple[Path, Path]:
    """(config, last.ckpt) of a one-epoch run with r = 4."""
    tmp_path = tmp_path_factory.mktemp("fitted")
    callback = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True},
    }
    config = cli_config(
        tmp_path, root, max_epochs=1, enable_checkpointing=True, callbacks=[callback]
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.argv", ["cli.py"])
        run_cli("fit", "--config", str(config))
    return config, tmp_path / "ckpt" / "last.ckpt"


@pytest.mark.slow
def test_command_line_wins_over_the_checkpoint(fitted, argv):
    config, ckpt = fitted
    cli = run_cli(
        "validate",
        "--config",
        str(config),
        "--ckpt_path",
        str(ckpt),
        "--model.init_args.r",
        "12",
        "--model.init_args.eval_r",
        "[12]",
    )
    assert cli.model.r == 12
    assert [s.name for s in cli.model.sweep] == ["r12"]
    assert "val/r12/top1" in cli.trainer.callback_metrics
    # The weights are the checkpoint's.
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    assert torch.equal(cli.model.model.classifier.weight, saved["model.classifier.weight"])


def test_checkpoint_of_another_model_class_is_refused(fitted, argv, tmp_path):
    config, ckpt = fitted
    other = torch.load(ckpt, weights_only=True)
    other["hyper_parameters"]["_class_path"] = "eventful_pl.lightning.vitdet_module.ViTDetModule"
    path = tmp_path / "other.ckpt"
    torch.save(other, path)
    with pytest.raises(CheckpointConflictError, match="ViTDetModule.*ViViTFineTuning"):
        run_cli("validate", "--config", str(config), "--ckpt_path", str(path))


@pytest.mark.slow
def test_ckpt_path_that_runs_code_is_refused(fitted, argv, tmp_path):
    config, ckpt = fitted
    marker = tmp_path / "code_ran"
    evil = torch.load(ckpt, weights_only=True)
    evil["extra"] = WritesMarker(marker)
    path = tmp_path / "evil.ckpt"
    torch.save(evil, path)
    with pytest.raises(CheckpointConflictError, match="evil.ckpt.*--weights_only false"):
        run_cli("validate", "--config", str(config), "--ckpt_path", str(path))
    assert not marker.exists()
    # The explicit opt-in for a trusted file.
    cli = run_cli(
        "validate", "--config", str(config), "--ckpt_path", str(path), "--weights_only", "false"
    )
    assert marker.exists() and "val/top1" in cli.trainer.callback_metrics


# --------------------------------------------------------------- non-finite loss


class FeatureItems(Dataset):
    """Cached-feature items ``(features (1, T', D), label, id)``; one holds a NaN."""

    def __init__(self, bad: int | None) -> None:
        gen = torch.Generator().manual_seed(0)
        self.features = torch.randn(8, 1, 4, 64, generator=gen)
        if bad is not None:
            self.features[bad, 0, 1, 3] = float("nan")

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int):
        return self.features[index], index % 4, f"video_{index}"


def test_non_finite_loss_stops_the_run_naming_the_batch(tmp_path):
    lit = module()
    before = {k: v.clone() for k, v in lit.state_dict().items()}
    trainer = L.Trainer(max_epochs=1, logger=False, **quiet_trainer_options(tmp_path))
    loader = DataLoader(FeatureItems(bad=5), batch_size=4)
    with pytest.raises(NonFiniteLossError, match=r"global step 1 .*video_5"):
        trainer.fit(lit, loader)
    after = lit.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    # The first batch trained; the bad one did not touch the weights.
    assert not torch.equal(after["model.classifier.weight"], before["model.classifier.weight"])


# ----------------------------------------------------------------- exact resume


def test_rng_states_round_trip():
    states = capture_rng_states()
    expected = (torch.rand(3), np.random.rand(3), __import__("random").random())
    restore_rng_states(states)
    again = (torch.rand(3), np.random.rand(3), __import__("random").random())
    assert torch.equal(expected[0], again[0])
    assert np.array_equal(expected[1], again[1]) and expected[2] == again[2]


def _fit(tmp_path: Path, root: Path, cache: Path, epochs: int, ckpt: Path | None = None):
    L.seed_everything(0)
    lit = module(dropout=0.5, eval_r=[16])
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    options = {**quiet_trainer_options(tmp_path), "enable_checkpointing": True}
    trainer = L.Trainer(max_epochs=epochs, logger=False, callbacks=[checkpoints], **options)
    trainer.fit(lit, datamodule(root, cache), ckpt_path=str(ckpt) if ckpt else None)
    return lit, trainer


@pytest.mark.slow
def test_resume_is_bit_identical_with_dropout(tmp_path, root):
    cache = tmp_path / "cache"
    _fit(tmp_path / "cache_writer", root, cache, epochs=1)  # writing it draws numbers too
    whole, whole_trainer = _fit(tmp_path / "whole", root, cache, epochs=3)
    _fit(tmp_path / "part", root, cache, epochs=1)
    # A new process would start from other generator states: scramble them.
    torch.manual_seed(1234)
    np.random.seed(1234)
    resumed, resumed_trainer = _fit(
        tmp_path / "part", root, cache, epochs=3, ckpt=tmp_path / "part" / "ckpt" / "last.ckpt"
    )
    assert resumed_trainer.global_step == whole_trainer.global_step == 6
    for key, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert resumed.eval_results == whole.eval_results
    os.environ.pop("PL_GLOBAL_SEED", None)
