"""Logging that fits Lightning, and progress output.

- Every setting's metrics and GFlops go through ``self.log``: they are in what
  ``trainer.validate()`` returns, equal to direct computations (the count API),
  under names without ``=``; ``val/top1`` and ``hp_metric`` are the run's own
  setting, not the first one.
- The accuracy-vs-GFlops figure is logged to TensorBoard and saved as a PNG of
  the documented size; the token-update images carry labels and a legend
  around the unchanged maps.
- The frozen spatial model is in eval mode in the model summary and during
  training, and fit raises no warning caused by the project.
- Probing videos, writing the feature cache and each evaluation print progress.

Everything runs ``vivit_tiny`` on 32 x 32 frames: a 4 x 4 token grid (16 tokens
+ class token), one 8-frame view per clip, 8 videos per split.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.model_summary import ModelSummary
from matplotlib.image import imread
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from datamodules.finetune import ViViTFineTuneDataModule
from datamodules.kinetics import KineticsDataModule
from datamodules.synthetic_video import make_kinetics
from datamodules.video_io import PROGRESS_MIN, probe_videos
from eventful_pl.lightning.callbacks import GFlopsCallback, TokenUpdateMapCallback
from eventful_pl.lightning.feature_cache import write_datamodule_features
from eventful_pl.lightning.sweep import EvalSetting, build_sweep, setting_name, sweep_figure
from eventful_pl.lightning.token_maps import (
    UPDATED_COLOUR,
    gate_label,
    labelled_maps,
    render_maps,
)
from eventful_pl.lightning.vivit_module import ViViTFineTuning
from eventful_pl.models.gflops import count_vivit
from tests.helpers import SMALL_CLIPS, quiet_trainer_options

TOKENS = 16  # 4 x 4 grid (+ class token)
MODEL_KWARGS = {"image_size": 32, "tubelet": [2, 8, 8], "temporal_views": 1}
SYNTHETIC = {"videos_per_class": 2, "frames": 8, "size": 32, "frame_jitter": 2, "seed": 0}
REPO = Path(__file__).parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("kinetics_tiny")
    make_kinetics(path, task="colour_order", **SYNTHETIC)
    return path


def module(**kwargs) -> ViViTFineTuning:
    torch.manual_seed(0)
    options = dict(preset="vivit_tiny", model_kwargs=MODEL_KWARGS, r=4, lr=1e-3)
    return ViViTFineTuning(**{**options, **kwargs})


def videos(root: Path) -> KineticsDataModule:
    return KineticsDataModule(str(root), **dict(SMALL_CLIPS, eval_batch_size=4, eval_short_side=32))


def datamodule(root: Path) -> ViViTFineTuneDataModule:
    return ViViTFineTuneDataModule(videos(root), cache_root=None, batch_size=4)


def counted(model, setting: str) -> float:
    """GFlops per video of ``setting`` from the count API."""
    if setting == "dense":
        return count_vivit(model)["settings"][0]["total"]
    (report,) = count_vivit(model, r_values=[int(setting[1:])], include_dense=False)["settings"]
    return report["total"]


# ------------------------------------------------------------------- names, figure


def test_setting_names_have_no_equals_sign_and_the_own_setting_is_evaluated():
    assert setting_name(r=16) == "r16" and setting_name(threshold=0.1) == "h0.1"
    assert setting_name(threshold=1e-5) == "h1e-05"
    own = EvalSetting("r8", r=8)
    sweep = build_sweep([16, 4], [0.1], dense=True, own=own)
    assert [s.name for s in sweep] == ["r8", "r16", "r4", "h0.1", "dense"]
    assert [s.name for s in build_sweep([16, 8], own=own)] == ["r16", "r8"]  # not twice
    assert [s.name for s in build_sweep()] == ["default"]
    with pytest.raises(ValueError, match="list each r and threshold once"):
        build_sweep([16, 16])
    with pytest.raises(ValueError, match="give r or threshold"):
        setting_name()


def test_sweep_figure_one_line_per_family(tmp_path):
    sweep = build_sweep([32, 8, 16], [0.5, 0.1], dense=True)
    gflops = {s.name: {"total": g} for s, g in zip(sweep, [3.0, 1.0, 2.0, 1.5, 2.5, 3.5])}
    results = {s.name: {"top1": a} for s, a in zip(sweep, [0.9, 0.5, 0.8, 0.6, 0.7, 0.9])}
    figure = sweep_figure(sweep, results, gflops, "top1", "video", own="r16", title="val")
    (axes,) = figure.axes
    lines = {line.get_label(): line for line in axes.get_lines()}
    assert list(lines) == ["top-r", "threshold", "dense", "own setting (r16)"]
    # Each family's points in order of GFlops.
    assert list(lines["top-r"].get_xdata()) == [1.0, 2.0, 3.0]
    assert list(lines["top-r"].get_ydata()) == [0.5, 0.8, 0.9]
    assert list(lines["threshold"].get_xdata()) == [1.5, 2.5]
    assert list(lines["dense"].get_xdata()) == [3.5]
    assert list(lines["own setting (r16)"].get_xdata()) == [2.0]
    assert axes.get_xlabel() == "GFlops per video" and axes.get_ylabel() == "top1"
    figure.savefig(tmp_path / "sweep.png")
    assert imread(tmp_path / "sweep.png").shape[:2] == (500, 800)
    assert sweep_figure(sweep, results, {}, "top1") is None  # no GFlops: nothing to plot


def test_labelled_maps_keep_the_maps_and_add_labels():
    generator = torch.Generator().manual_seed(0)
    maps = {
        f"blocks.{i}.qkv_gate": (torch.rand(3, 4, 5, generator=generator) < 0.4).float()
        for i in range(2)
    }
    frames = torch.rand(3, 3, 32, 40, generator=generator)
    bare = render_maps(maps, cell=8, frames=frames)
    image = labelled_maps(maps, cell=8, frames=frames, frame_numbers=[0, 2, 4], title="t")
    assert image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    assert image.shape[0] == 3 and image.shape[1] > bare.shape[1] and image.shape[2] > bare.shape[2]
    # The maps are pasted unchanged: every updated-token pixel of the bare image
    # (exact float colour; the legend's patch is quantised to 8 bits) is there.
    i, j = (maps["blocks.0.qkv_gate"][0] == 1).nonzero()[0].tolist()
    yellow = bare[:, 34 + 8 * i, 8 * j][:, None, None]  # below the 34-pixel frame row
    torch.testing.assert_close(yellow.flatten(), torch.tensor(UPDATED_COLOUR))
    count = lambda im: int((im == yellow).all(dim=0).sum())  # noqa: E731
    assert count(image) == count(bare) > 0
    # Labels and legend: dark text pixels outside the maps, above and beside them.
    dark = (image < 0.3).all(dim=0)
    assert dark[:12].any() and dark[:, :20].any() and dark[-20:].any()
    assert gate_label("blocks.3.qkv_gate") == "block 3 qkv"
    assert gate_label("backbone.blocks.11.qkv_gate") == "backbone.block 11 qkv"
    with pytest.raises(ValueError, match="2 frame numbers for 3 frames"):
        labelled_maps(maps, frame_numbers=[0, 1])


# ------------------------------------------------------------------------ a validation


def test_validate_logs_every_setting_with_self_log(tmp_path, root, caplog):
    """trainer.validate() returns each setting's metrics and GFlops (= the count
    API's), the own setting as val/top1 and hp_metric; the figure and the
    labelled token maps reach TensorBoard; the figure and table are saved."""
    lit = module(eval_r=[TOKENS, 4], eval_dense=True)  # own r = 4: the second setting
    logger = TensorBoardLogger(tmp_path, name="run")
    gflops_callback = GFlopsCallback(print_table=False)
    maps_callback = TokenUpdateMapCallback(num_batches=1)
    options = {**quiet_trainer_options(tmp_path), "logger": logger}
    trainer = L.Trainer(**options, callbacks=[gflops_callback, maps_callback])
    with caplog.at_level(logging.INFO):
        (returned,) = trainer.validate(lit, datamodule(root), verbose=False)
    assert not [key for key in returned if "=" in key]
    for setting in (f"r{TOKENS}", "r4", "dense"):
        assert {f"val/{setting}/{m}" for m in ("top1", "top5", "gflops")} <= set(returned)
        want = counted(lit.model, setting)
        assert returned[f"val/{setting}/gflops"] == pytest.approx(want, rel=1e-6)
        assert lit.eval_gflops[setting]["total"] == pytest.approx(want, rel=1e-12)
    assert lit.own_setting == "r4"
    assert returned["val/top1"] == returned["val/r4/top1"] == returned["hp_metric"]
    assert returned["val/top1"] == pytest.approx(lit.eval_results["r4"]["top1"])
    # One line before and one after the evaluation, with the counts.
    messages = [record.getMessage() for record in caplog.records]
    assert f"val: 2 batches on this rank, each under 3 settings (r{TOKENS}, r4, dense)" in messages
    assert any(m.startswith("val: 3 settings evaluated, 8 videos each (") for m in messages)

    log_dir = Path(logger.log_dir)
    png = imread(log_dir / "val_accuracy_vs_gflops.png")
    assert png.shape[:2] == (500, 800)
    table = (log_dir / "val_accuracy_vs_gflops.md").read_text()
    assert table == gflops_callback.tables["val"] + "\n" and "| r4 |" in table

    events = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert sorted(events.Tags()["images"]) == ["token_updates/batch_0", "val/accuracy_vs_gflops"]
    figure = events.Images("val/accuracy_vs_gflops")[-1]
    assert (figure.height, figure.width) == (500, 800)
    scalars = set(events.Tags()["scalars"])
    assert {"val/r4/gflops", "val/top1", "hp_metric", "val/r4/gflops_linear"} <= scalars
    assert events.Scalars("hp_metric")[-1].value == pytest.approx(returned["hp_metric"])
    # Token maps: labelled image around the bare maps of the first validation batch.
    maps = maps_callback.maps[0]
    image = events.Images("token_updates/batch_0")[-1]
    bare = render_maps(maps, cell=8, frames=torch.zeros(4, 3, 32, 32))
    assert image.height > bare.shape[1] and image.width > bare.shape[2]
    assert tuple(maps_callback.images[0].shape) == (3, image.height, image.width)


def test_fit_keeps_the_frozen_model_in_eval_without_warnings(tmp_path, root):
    """The model summary sees the frozen spatial model in eval mode, training
    runs it in eval mode, and fit warns about nothing the project causes."""

    class Modes(L.Callback):
        def __init__(self) -> None:
            self.summary: dict[str, bool] = {}
            self.training: list[tuple[bool, bool]] = []

        def on_fit_start(self, trainer, pl_module) -> None:  # where ModelSummary runs
            summary = ModelSummary(pl_module, max_depth=2)
            self.summary = dict(zip(summary.layer_names, summary.training_modes))

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            model = pl_module.model
            self.training.append((model.spatial.training, model.temporal.training))

    modes = Modes()
    options = {
        **quiet_trainer_options(tmp_path),
        "num_sanity_val_steps": 1,
        "enable_model_summary": True,
    }
    trainer = L.Trainer(
        **options,
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        logger=False,
        callbacks=[modes],
    )
    lit = module(eval_r=[4])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(lit, datamodule(root))
    assert modes.summary["model.spatial"] is False and modes.summary["model.embedding"] is False
    assert modes.summary["model.temporal"] is True
    assert modes.training == [(False, True), (False, True)]
    ours = [
        f"{w.filename}:{w.lineno}: {w.message}"
        for w in caught
        if Path(w.filename).resolve().is_relative_to(REPO) and ".venv" not in Path(w.filename).parts
    ]
    assert ours == []
    assert not [w for w in caught if "eval mode" in str(w.message)]
    assert not lit.model.spatial.training  # module.train() keeps it in eval
    lit.train()
    assert not lit.model.spatial.training and lit.model.temporal.training


# ------------------------------------------------------------------------- progress


def test_probing_shows_progress(root, capsys):
    paths = sorted(root.rglob("*.mp4"))[:PROGRESS_MIN]
    assert len(paths) == PROGRESS_MIN
    results = probe_videos(paths, workers=2)
    assert len(results) == PROGRESS_MIN
    err = capsys.readouterr().err
    assert f"probing {PROGRESS_MIN} videos" in err and f"{PROGRESS_MIN}/{PROGRESS_MIN}" in err
    probe_videos(paths[:2], workers=2)  # a few videos: no bar
    assert "probing" not in capsys.readouterr().err


def test_feature_cache_writer_shows_progress(tmp_path, root, capsys):
    lit = module()
    report = write_datamodule_features(videos(root), "val", lit.model, 4, tmp_path / "cache")
    assert report.written == 8
    err = capsys.readouterr().err
    assert "caching kinetics400 val features" in err and "8/8" in err
