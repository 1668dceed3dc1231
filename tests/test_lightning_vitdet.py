"""ViTDetModule: LightningCLI fit/validate/test on real VID files, the r sweep's
mAP50 and GFlops, r = N against dense, per-segment state, LR schedule, resume,
pretrained weights, token-update maps, bad options and the paper configs.

Everything runs ``vitdet_tiny`` (8 x 8 tokens) on a dataset written by
``datamodules.synthetic_detection`` (labels 0, 2 and 6 of the 30 VID classes).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from torchmetrics.detection import MeanAveragePrecision

from cli import cli_main
from datamodules.imagenet_vid import ImageNetVIDDataModule
from datamodules.synthetic_detection import SyntheticVID, write_synthetic_vid
from eventful_pl.counting import OP_KINDS
from eventful_pl.gates import TokenGate
from eventful_pl.lightning.sweep import EvalSetting
from eventful_pl.lightning.vitdet_module import WARMUP_START_FACTOR, ViTDetModule
from eventful_pl.models.gflops import count_vitdet
from eventful_pl.models.vitdet import create_vitdet
from eventful_pl.policies import TopRPolicy
from tests.helpers import quiet_trainer_options, run_script

TOKENS = 64  # vitdet_tiny: an 8 x 8 grid
SEGMENT = 2  # every synthetic val video has 4 frames: two segments of 2 frames each
HAVE_CALLBACKS = importlib.util.find_spec("eventful_pl.lightning.callbacks") is not None
MODULE = "eventful_pl.lightning.vitdet_module.ViTDetModule"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> SyntheticVID:
    return write_synthetic_vid(
        tmp_path_factory.mktemp("vid"),
        seed=0,
        train_snippets=2,
        val_snippets=2,
        frames=(4, 4),
        det_images=3,
    )


def module(**kwargs) -> ViTDetModule:
    """A tiny ViTDetModule with 30 classes and seeded weights."""
    torch.manual_seed(0)
    kwargs = {"preset": "vitdet_tiny", "model_kwargs": {"num_classes": 30}, **kwargs}
    return ViTDetModule(**kwargs)


def datamodule(data: SyntheticVID, layout: str = "ilsvrc", **kwargs) -> ImageNetVIDDataModule:
    kwargs = {"num_workers": 0, "batch_size": 2, "segment_length": SEGMENT, **kwargs}
    return ImageNetVIDDataModule(str(data.root), layout=layout, **kwargs)


def trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    kwargs = {
        "max_epochs": 1,
        "limit_train_batches": 2,
        "logger": False,
        **quiet_trainer_options(tmp_path),
        **kwargs,
    }
    return L.Trainer(**kwargs)


def make_detecting(model: torch.nn.Module) -> None:
    """Random class scores favouring the drawn classes (0, 2, 6), so that an
    untrained model reports detections whose scores depend on its features."""
    predictor = model.head.roi_heads.box_predictor.cls_score
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        predictor.weight.copy_(torch.randn(predictor.weight.shape, generator=generator) * 0.3)
        predictor.bias.zero_()
        predictor.bias[[1, 3, 7]] = 3.0  # torchvision: class k is row k + 1


def eval_segments(data: SyntheticVID) -> list[dict]:
    dm = datamodule(data)
    dm.setup("validate")
    return [dm.eval_dataset[i] for i in range(len(dm.eval_dataset))]


def gates(model: torch.nn.Module) -> list[TokenGate]:
    return [m for m in model.modules() if isinstance(m, TokenGate)]


# --------------------------------------------------------------------------- LightningCLI


def cli_config(tmp_path: Path, data: SyntheticVID, layout: str, **trainer_args) -> Path:
    callbacks = [
        {"class_path": "eventful_pl.lightning.callbacks.GFlopsCallback"},
        {"class_path": "eventful_pl.lightning.callbacks.TokenUpdateMapCallback"},
    ]
    config = {
        "seed_everything": 0,
        "model": {
            "class_path": MODULE,
            "init_args": {
                "preset": "vitdet_tiny",
                "variant": "eventful",
                "model_kwargs": {"num_classes": 30},
                "r": 16,
                "eval_r": [TOKENS, 16],
                "warmup_steps": 2,
                "decay_epochs": [1],
            },
        },
        "data": {
            "class_path": "datamodules.imagenet_vid.ImageNetVIDDataModule",
            "init_args": {
                "root": str(data.root),
                "layout": layout,
                "batch_size": 2,
                "num_workers": 0,
                "segment_length": SEGMENT,
            },
        },
        "trainer": {
            "max_epochs": 1,
            "limit_train_batches": 2,
            **quiet_trainer_options(tmp_path),
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(tmp_path / "logs"), "name": "vitdet"},
            },
            "callbacks": callbacks if HAVE_CALLBACKS else [],
            **trainer_args,
        },
    }
    path = tmp_path / f"config_{layout}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def expected_gflops(model, r: int, length: int) -> dict[str, float]:
    (report,) = count_vitdet(model, r_values=[r], video_length=length, include_dense=False)[
        "settings"
    ]
    return {"total": report["total"], **report["by_kind"]}


@pytest.mark.parametrize("layout", ["ilsvrc", "coco"])
@pytest.mark.slow
def test_fit_validate_test_through_the_cli(tmp_path, data, layout, argv):
    config = str(cli_config(tmp_path, data, layout))
    cli = cli_main(["fit", "--config", config])
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 2
    for name in ("loss", "loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"):
        assert torch.isfinite(metrics[f"train/{name}"])
    losses = ["loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"]
    torch.testing.assert_close(metrics["train/loss"], sum(metrics[f"train/{n}"] for n in losses))
    # The sweep: one mAP50 per r; the run's own r (16, not the first setting)
    # also as val/map_50 and hp_metric (for monitoring).
    for r in (TOKENS, 16):
        assert 0.0 <= float(metrics[f"val/r{r}/map_50"]) <= 1.0
    assert float(metrics["val/map_50"]) == float(metrics["val/r16/map_50"])
    assert float(metrics["hp_metric"]) == float(metrics["val/r16/map_50"])
    assert not any("=" in key for key in metrics)
    # GFlops per frame: every segment has SEGMENT frames, so the average over all
    # evaluated frames is count_vitdet's average over a SEGMENT-frame video.
    model = cli.model
    assert list(model.eval_gflops) == [f"r{TOKENS}", "r16"]
    for r in (TOKENS, 16):
        got = model.eval_gflops[f"r{r}"]
        want = expected_gflops(model.model, r, SEGMENT)
        assert set(got) == {"total", *OP_KINDS}
        assert got == pytest.approx(want, rel=1e-12)
    assert model.eval_gflops["r16"]["total"] < model.eval_gflops[f"r{TOKENS}"]["total"]
    # The model's own policy is back after the sweep.
    assert all(g.policy is model.policy for g in gates(model.model))
    assert model.policy.r == 16

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        validated = cli_main(["validate", "--config", config])
        tested = cli_main(["test", "--config", config])
    assert set(validated.trainer.callback_metrics) >= {"val/r64/map_50", "val/r16/mar_100"}
    test_metrics = tested.trainer.callback_metrics
    assert set(test_metrics) >= {"test/r64/map_50", "test/r16/map_50", "test/map_50"}
    assert tested.model.eval_stage == "test"
    assert tested.model.eval_gflops["r16"] == pytest.approx(
        expected_gflops(tested.model.model, 16, SEGMENT), rel=1e-12
    )
    if HAVE_CALLBACKS:
        events = list((tmp_path / "logs" / "vitdet").glob("version_*/events.out.tfevents.*"))
        assert events, "the TensorBoard logger wrote nothing"


def test_logged_map50_equals_a_direct_evaluation(tmp_path, data):
    """The sweep's val/r16/map_50 is mAP50 of streaming each segment with r = 16."""
    lit = module(variant="eventful", eval_r=[16, TOKENS])
    make_detecting(lit.model)
    trainer(tmp_path).validate(lit, datamodule(data), verbose=False)
    logged = lit.eval_results
    model = create_vitdet("vitdet_tiny", num_classes=30, variant="eventful").eval()
    model.load_state_dict(lit.model.state_dict())
    for r in (16, TOKENS):
        model.set_policy(TopRPolicy(r))
        metric = MeanAveragePrecision(iou_thresholds=[0.5])
        with torch.no_grad():
            for segment in eval_segments(data):
                model.reset()
                preds = [model([frame])[0] for frame in segment["frames"]]
                targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in segment["targets"]]
                metric.update(preds, targets)
        want = metric.compute()
        assert logged[f"r{r}"]["map_50"] == pytest.approx(float(want["map_50"]), abs=1e-6)
        assert logged[f"r{r}"]["mar_100"] == pytest.approx(float(want["mar_100"]), abs=1e-6)
    assert logged[f"r{TOKENS}"]["map_50"] > 0  # the check is not vacuous


def test_threshold_sweep_and_counting_off(tmp_path, data):
    lit = module(variant="eventful", threshold=0.5, eval_thresholds=[0.0, 1e6])
    trainer(tmp_path, limit_val_batches=2).validate(lit, datamodule(data), verbose=False)
    names = ["h0.5", "h0.0", "h1000000.0"]  # the own threshold first: not in the sweep
    assert list(lit.eval_results) == names and list(lit.eval_gflops) == names
    # Threshold 0 updates every token that changed (at most r = N: the padding
    # never changes); a huge threshold none after the flush frame.
    low, high = (lit.eval_gflops[n]["total"] for n in names[1:])
    assert high < low <= expected_gflops(lit.model, TOKENS, SEGMENT)["total"]
    assert all(g.policy.threshold == 0.5 for g in gates(lit.model))
    quiet = module(variant="eventful", r=16, count_ops=False)
    trainer(tmp_path, limit_val_batches=1).validate(quiet, datamodule(data), verbose=False)
    assert quiet.eval_gflops == {} and list(quiet.eval_results) == ["r16"]
    assert 0.0 <= quiet.eval_results["r16"]["map_50"] <= 1.0


# --------------------------------------------------------------------------- streaming


def test_r_equals_n_gives_the_dense_detections_on_every_frame(data):
    eventful = module(variant="eventful", eval_r=[TOKENS]).eval()
    dense = module(variant="dense").eval()
    make_detecting(dense.model)
    eventful.model.load_state_dict(dense.model.state_dict())
    frames = 0
    for segment in eval_segments(data):
        got = eventful.stream(segment["frames"], eventful.sweep[0])
        want = dense.stream(segment["frames"], dense.sweep[0])
        for g, w in zip(got, want, strict=True):
            assert len(w["scores"]) > 0
            assert len(g["scores"]) == len(w["scores"])
            # Near-equal scores may swap places: compare sorted values.
            torch.testing.assert_close(g["scores"].sort().values, w["scores"].sort().values)
            assert g["labels"].sort().values.tolist() == w["labels"].sort().values.tolist()
            frames += 1
    assert frames == 8
    assert dense.sweep == [EvalSetting("default")]


def test_state_is_reset_per_segment(data):
    lit = module(variant="eventful", eval_r=[16]).eval()
    make_detecting(lit.model)
    first, second = eval_segments(data)[:2]
    setting = lit.sweep[0]
    fresh = lit.stream(second["frames"], setting)
    lit.stream(first["frames"], setting)  # another stream before it
    again = lit.stream(second["frames"], setting)
    for a, b in zip(fresh, again, strict=True):
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(a[key], b[key])
    # The state does matter within a stream: frame 1 after frame 0 (16 of 64
    # tokens updated) differs from frame 1 as a flush frame.
    alone = lit.stream(second["frames"][1:], setting)[0]
    assert not torch.equal(alone["scores"], fresh[1]["scores"])


def test_training_step_is_the_dense_flush_computation(data):
    """Training resets every image: the eventful module's loss is the dense one,
    even right after a stream left state behind."""
    eventful = module(variant="eventful", r=16)
    dense = module(variant="dense")
    eventful.model.load_state_dict(dense.model.state_dict())
    dm = datamodule(data, flip_prob=0.0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    eventful.model.eval()
    with torch.no_grad():
        eventful.model([batch[0][0]])  # leaves stream state (flush) behind
        eventful.model([batch[0][1]])  # and an incremental frame
    losses = []
    for lit in (eventful, dense):
        lit.train()
        torch.manual_seed(3)  # the RPN/RoI samplers draw at random
        with pytest.warns(UserWarning, match="self.log"):
            losses.append(lit.training_step(batch, 0))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    losses[0].backward()
    assert eventful.model.backbone.blocks[0].qkv.weight.grad.abs().sum() > 0


def test_token_update_maps_of_the_first_segment(data):
    lit = module(variant="eventful", r=32, eval_r=[16, 48])
    segments = eval_segments(data)
    maps = lit.token_update_maps(segments[:2])
    assert maps and all(name.endswith("qkv_gate") for name in maps)
    for frames in maps.values():
        assert frames.shape == (SEGMENT, 8, 8)
        assert frames[0].sum() == TOKENS  # the flush frame updates every token
        assert frames[1].sum() == 32  # the model's own policy: r = 32
        assert set(frames.unique().tolist()) <= {0.0, 1.0}
    assert all(g.policy is lit.policy for g in gates(lit.model))
    assert lit.model.training  # the mode is restored
    assert module(variant="dense").token_update_maps(segments[:1]) == {}
    frames = lit.token_map_frames(segments[:2])  # as the backbone sees them: 128 x 128
    assert frames.shape == (SEGMENT, 3, 128, 128)
    assert 0 <= frames.min() and frames.max() <= 1


# --------------------------------------------------------------------------- optimisation


class LearningRates(L.Callback):
    """The learning rate each optimizer step uses."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.values.append(trainer.optimizers[0].param_groups[0]["lr"])


def expected_lr(lr: float, step: int, epoch: int, warmup: int, decays: list[int]) -> float:
    ramp = WARMUP_START_FACTOR + (1 - WARMUP_START_FACTOR) * min(step, warmup) / warmup
    return lr * ramp * 0.1 ** sum(epoch >= e for e in decays)


def test_lr_warms_up_then_decays_by_ten_at_each_decay_epoch(tmp_path, data):
    lit = module(variant="eventful", r=16, lr=1e-3, warmup_steps=3, decay_epochs=[1, 2])
    rates = LearningRates()
    trainer(tmp_path, max_epochs=3, limit_val_batches=0, callbacks=[rates]).fit(
        lit, datamodule(data)
    )
    want = [expected_lr(1e-3, s, s // 2, 3, [1, 2]) for s in range(6)]
    assert rates.values == pytest.approx(want, rel=1e-6)
    # Step 0 is at 0.001 x lr; step 3 completes the ramp but is in epoch 1: x0.1.
    assert rates.values[0] == pytest.approx(1e-6) and rates.values[3] == pytest.approx(1e-4)
    decay, no_decay = lit.trainer.optimizers[0].param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    encoding = lit.model.backbone.position_encoding.encoding
    assert any(p is encoding for p in no_decay["params"])
    assert any(p is lit.model.backbone.blocks[0].qkv.weight for p in decay["params"])
    assert all(p.ndim > 1 for p in decay["params"])


def test_resume_continues_optimizer_schedulers_and_steps(tmp_path, data):
    def run(max_epochs: int, ckpt_path: str | None = None) -> tuple[ViTDetModule, L.Trainer]:
        lit = module(variant="eventful", r=16, lr=1e-3, warmup_steps=3, decay_epochs=[1])
        folder = tmp_path / "ckpt"
        checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=folder, save_last=True)
        rates = LearningRates()
        fit = trainer(
            tmp_path,
            max_epochs=max_epochs,
            limit_val_batches=0,
            enable_checkpointing=True,
            callbacks=[checkpoint, rates],
        )
        fit.fit(lit, datamodule(data), ckpt_path=ckpt_path)
        return lit, fit, rates.values

    _, first, _ = run(1)
    last = tmp_path / "ckpt" / "last.ckpt"
    saved = torch.load(last, weights_only=False)
    assert saved["global_step"] == 2 and saved["epoch"] == 0
    assert {int(s["step"]) for s in saved["optimizer_states"][0]["state"].values()} == {2}
    lit, second, rates = run(2, str(last))
    assert second.global_step == 4 and second.current_epoch == 2
    steps = {int(s["step"]) for s in second.optimizers[0].state.values()}
    assert steps == {4}  # AdamW's step count continued from 2, not restarted
    # The schedulers continued too: steps 2 and 3 are past the decay epoch, step 3
    # completes the warm-up (a restarted warm-up would start again at 0.001 x lr).
    assert rates == pytest.approx([expected_lr(1e-3, s, 1, 3, [1]) for s in (2, 3)], rel=1e-6)


def test_pretrained_coco_weights_load_all_but_the_box_predictor(tmp_path):
    torch.manual_seed(5)
    coco = create_vitdet("vitdet_tiny", num_classes=80)
    path = tmp_path / "coco.pth"
    torch.save(coco.state_dict(), path)
    lit = module(variant="eventful", r=16, pretrained=str(path))
    lit.load_pretrained()  # a Trainer does this at the start of fit/validate/test
    ours, theirs = lit.model.state_dict(), coco.state_dict()
    predictor = [k for k in ours if "box_predictor" in k]
    assert predictor and all(ours[k].shape != theirs[k].shape for k in predictor)
    for key in ours.keys() - set(predictor):
        assert torch.equal(ours[key], theirs[key]), key
    # Same classes: everything loads.
    torch.save({"state_dict": {f"model.{k}": v for k, v in ours.items()}}, tmp_path / "vid.ckpt")
    reloaded = ViTDetModule(
        preset="vitdet_tiny",
        variant="dense",
        model_kwargs={"num_classes": 30},
        pretrained=str(tmp_path / "vid.ckpt"),
    )
    reloaded.load_pretrained()
    for key, value in reloaded.model.state_dict().items():
        assert torch.equal(value, ours[key]), key


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"variant": "sparse"}, "variant"),
        ({"preset": "vitdet_huge"}, "preset"),
        ({"r": 0}, "r must be a positive integer"),
        ({"r": -4}, "r must be a positive integer"),
        ({"r": 16, "threshold": 0.5}, "r or threshold"),
        ({"threshold": -1.0}, "threshold"),
        ({"r": TOKENS + 1}, "r=65"),
        ({"r": 16, "eval_r": [16, 100]}, "r=100"),
        ({"r": 16, "eval_r": [0]}, "eval_r"),
        ({"variant": "dense", "r": 16}, "no token gates"),
        ({"variant": "spatial", "eval_r": [16]}, "no token gates"),
        ({"variant": "eventful"}, "set r or threshold"),
        ({"r": 16, "model_kwargs": {"variant": "dense"}}, "model_kwargs"),
        ({"r": 16, "lr": 0.0}, "lr"),
        ({"r": 16, "warmup_steps": -1}, "warmup_steps"),
    ],
)
def test_bad_options_raise_value_errors_naming_the_option(kwargs, match):
    kwargs = {"preset": "vitdet_tiny", "variant": "eventful", **kwargs}
    with pytest.raises(ValueError, match=match):
        ViTDetModule(**kwargs)


# The paper configs (every row, parsed, built and counted): tests/test_cli_configs.py.


# --------------------------------------------------------------------------- DDP

DDP_SCRIPT = """
import json
import sys

import lightning as L
import torch

sys.path.insert(0, {repo!r})
from datamodules.synthetic_detection import write_synthetic_vid  # noqa: E402
from tests.helpers import quiet_trainer_options  # noqa: E402
from tests.test_lightning_vitdet import datamodule, make_detecting, module  # noqa: E402


def main(devices: int, out: str) -> None:
    data = write_synthetic_vid(
        out + "/data", seed=0, train_snippets=2, val_snippets=3, frames=(4, 4), det_images=3
    )
    L.seed_everything(0)
    lit = module(variant="eventful", r=16, eval_r=[64, 16], warmup_steps=2)
    make_detecting(lit.model)
    trainer = L.Trainer(
        **{{**quiet_trainer_options(out), "devices": devices}},
        strategy="ddp_spawn" if devices > 1 else "auto",
        max_epochs=1,
        limit_train_batches=2,
        logger=False,
    )
    dm = datamodule(data)
    trainer.fit(lit, dm)  # runs under DDP (proposal sampling is random: not compared)
    validated = module(variant="eventful", r=16, eval_r=[64, 16])
    make_detecting(validated.model)
    results = trainer.validate(validated, dm, verbose=False)[0]
    with open(out + "/results.json", "w") as handle:
        json.dump({{k: float(v) for k, v in results.items()}}, handle)


if __name__ == "__main__":  # ddp_spawn re-imports this file in its processes
    main(int(sys.argv[1]), sys.argv[2])
"""


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.timeout(600)
def test_ddp_two_processes_validate_like_one(tmp_path):
    """Validation with 2 gloo processes (segments shared out whole) gives the
    single-process mAP50 of every r; fit runs under DDP too."""
    import json

    repo = str(Path(__file__).parents[1])
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(repo=repo))
    results = {}
    for devices in (1, 2):
        out = tmp_path / f"out{devices}"
        run_script(str(script), str(devices), str(out))
        results[devices] = json.loads((out / "results.json").read_text())
    one, two = results[1], results[2]
    assert {"val/r64/map_50", "val/r16/map_50", "val/map_50"} <= set(one)
    assert one["val/r64/map_50"] > 0  # the comparison is not vacuous
    assert set(one) == set(two)
    for key in one:
        assert two[key] == pytest.approx(one[key], abs=1e-6), key


@pytest.mark.slow
def test_predict_streams_each_segment_under_the_own_policy(tmp_path, data, argv):
    config = str(cli_config(tmp_path, data, "ilsvrc"))
    with contextlib.redirect_stdout(io.StringIO()):
        cli = cli_main(["predict", "--config", config, "--trainer.callbacks", "[]"])
    segments = [segment for batch in cli.trainer.predict_loop.predictions for segment in batch]
    expected = eval_segments(data)
    assert [(s["video_id"], s["segment_index"]) for s in segments] == [
        (s["video_id"], s["segment_index"]) for s in expected
    ]
    model = cli.model.model.eval()
    model.set_policy(TopRPolicy(16))  # the config's own r
    with torch.no_grad():
        model.reset()
        want = [model([frame])[0] for frame in expected[0]["frames"]]
    got = segments[0]["detections"]
    assert len(got) == len(want) == SEGMENT
    for a, b in zip(got, want):
        torch.testing.assert_close(a["boxes"], b["boxes"])
        torch.testing.assert_close(a["scores"], b["scores"])
    assert cli.model.eval_gflops == {}  # prediction counts nothing


def test_class_count_mismatch_is_a_clear_error(tmp_path, data):
    lit = module(variant="eventful", r=16, model_kwargs={"num_classes": 3})  # VID has 30
    with pytest.raises(
        ValueError, match="ImageNetVIDDataModule has 30 classes but the model has 3"
    ):
        trainer(tmp_path).validate(lit, datamodule(data), verbose=False)


@pytest.mark.slow
def test_dense_setting(tmp_path, data):
    """eval_dense: the dense model's mAP (= every token) and backbone GFlops, last."""
    lit = module(variant="eventful", r=TOKENS, eval_r=[TOKENS], eval_dense=True)
    make_detecting(lit.model)
    trainer(tmp_path, limit_val_batches=2).validate(lit, datamodule(data), verbose=False)
    assert list(lit.eval_results) == [f"r{TOKENS}", "dense"]
    assert lit.eval_results["dense"] == lit.eval_results[f"r{TOKENS}"]
    (dense,) = count_vitdet(lit.model, video_length=SEGMENT)["settings"]
    assert lit.eval_gflops["dense"]["total"] == pytest.approx(dense["total"], rel=1e-12)
    assert lit.eval_gflops["dense"]["total"] < lit.eval_gflops[f"r{TOKENS}"]["total"]
    with pytest.raises(ValueError, match="eval_dense"):
        module(variant="dense", eval_dense=True)


def test_dense_setting_of_a_pooled_variant_counts_the_pooled_network():
    from eventful_pl.counting import count_ops

    lit = module(variant="spatiotemporal", r=32, eval_dense=True)
    spatial = create_vitdet("vitdet_tiny", num_classes=30, variant="spatial")  # pooled, no gates
    with torch.no_grad(), count_ops(spatial.backbone) as counter:
        spatial.backbone(torch.randn(1, TOKENS, 64))
    assert lit.dense_frame_counts() == dict(counter.counts)
    unpooled = count_vitdet(spatial)["settings"][0]  # count_vitdet's dense: no pooling
    assert counter.counts["matmul"] < unpooled["by_kind"]["matmul"] * 1e9
