"""ViViTFineTuning with ViViTFineTuneDataModule: LightningCLI fit/validate/test on real
Kinetics-layout files (written by the data module's ``synthetic`` option), the r
sweep's accuracy and GFlops (equal to the ``count`` command's), TensorBoard
scalars and token-update images, cache vs on-the-fly training, DDP (2 processes,
gloo) against one process, resume, and bad options.

Everything runs ``vivit_tiny`` with 8 x 8-pixel tubelets on 32 x 32 frames: a
4 x 4 token grid (16 tokens + class token), one 8-frame view per clip.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cli import cli_main
from datamodules.features import FeatureCacheMismatch
from datamodules.finetune import ViViTFineTuneDataModule
from datamodules.kinetics import KineticsDataModule
from datamodules.synthetic_video import make_kinetics
from eventful_pl.counting import OP_KINDS
from eventful_pl.gates import TokenGate
from eventful_pl.lightning.callbacks import GFlopsCallback, TokenUpdateMapCallback
from eventful_pl.lightning.vivit_module import ViViTFineTuning
from eventful_pl.models.gflops import count_vivit
from eventful_pl.policies import TopRPolicy
from tests.helpers import SMALL_CLIPS, quiet_trainer_options, run_script

TOKENS = 16  # 4 x 4 grid
MODEL = "eventful_pl.lightning.vivit_module.ViViTFineTuning"
MODEL_KWARGS = {"image_size": 32, "tubelet": [2, 8, 8], "temporal_views": 1}
SYNTHETIC = {"videos_per_class": 2, "frames": 8, "size": 32, "frame_jitter": 2, "seed": 0}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """4 classes x 2 clips per split, 32 x 32, 8-10 frames (the colour-order task)."""
    path = tmp_path_factory.mktemp("kinetics_tiny")
    make_kinetics(path, task="colour_order", **SYNTHETIC)
    return path


def module(**kwargs) -> ViViTFineTuning:
    torch.manual_seed(0)
    options = dict(preset="vivit_tiny", model_kwargs=MODEL_KWARGS, r=8, lr=1e-3)
    return ViViTFineTuning(**{**options, **kwargs})


def videos(root: Path, **kwargs) -> KineticsDataModule:
    options = dict(SMALL_CLIPS, eval_batch_size=4, eval_short_side=32)
    return KineticsDataModule(str(root), **{**options, **kwargs})


def datamodule(root: Path, cache: Path | None, **kwargs) -> ViViTFineTuneDataModule:
    cache_root = str(cache) if cache is not None else None
    return ViViTFineTuneDataModule(videos(root), cache_root=cache_root, batch_size=4, **kwargs)


def trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    options = dict(
        max_epochs=1,
        logger=False,
        **quiet_trainer_options(tmp_path),
    )
    return L.Trainer(**{**options, **kwargs})


def expected_gflops(model, r: int) -> dict[str, float]:
    (report,) = count_vivit(model, r_values=[r], include_dense=False)["settings"]
    return {"total": report["total"], **report["by_kind"]}


# --------------------------------------------------------------------------- LightningCLI


def cli_config(tmp_path: Path, data_root: Path, **trainer_args) -> Path:
    config = {
        "seed_everything": 0,
        "model": {
            "class_path": MODEL,
            "init_args": {
                "preset": "vivit_tiny",
                "model_kwargs": MODEL_KWARGS,
                "r": 4,
                "eval_r": [TOKENS, 4],
                "lr": 0.001,
            },
        },
        "data": {
            "class_path": "datamodules.finetune.ViViTFineTuneDataModule",
            "init_args": {
                "cache_root": str(tmp_path / "features"),
                "batch_size": 4,
                "videos": {
                    "class_path": "datamodules.kinetics.KineticsDataModule",
                    "init_args": {
                        "root": str(data_root),
                        "eval_batch_size": 4,
                        "num_workers": 0,
                        "crop_size": 32,
                        "eval_short_side": 32,
                        "flip_prob": 0.0,
                        "probe_workers": 2,
                        "synthetic": {**SYNTHETIC, "task": "colour_order"},
                    },
                },
            },
        },
        "trainer": {
            "max_epochs": 2,
            "log_every_n_steps": 1,
            **quiet_trainer_options(tmp_path),
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(tmp_path / "logs"), "name": "vivit"},
            },
            "callbacks": [
                {"class_path": "eventful_pl.lightning.callbacks.GFlopsCallback"},
                {
                    "class_path": "eventful_pl.lightning.callbacks.TokenUpdateMapCallback",
                    "init_args": {"num_batches": 2},
                },
            ],
            **trainer_args,
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_fit_validate_test_through_the_cli(tmp_path, argv):
    data_root = tmp_path / "data"  # absent: the data module writes the synthetic dataset
    config = str(cli_config(tmp_path, data_root))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cli = cli_main(["fit", "--config", config])
    assert (data_root / "annotations" / "train.csv").is_file()
    lit = cli.model
    assert cli.trainer.global_step == 4  # 8 cached training items, batch 4, 2 epochs
    metrics = cli.trainer.callback_metrics
    for r in (TOKENS, 4):
        for name in ("top1", "top5"):
            assert 0.0 <= float(metrics[f"val/r{r}/{name}"]) <= 1.0
    # The run's own r (4, not the first setting) is val/top1 and hp_metric.
    assert float(metrics["val/top1"]) == float(metrics["val/r4/top1"])
    assert float(metrics["hp_metric"]) == float(metrics["val/r4/top1"])
    assert float(metrics["val/r4/top5"]) == 1.0  # 4 classes
    # GFlops per video equal the count API's for each r; fewer tokens cost less.
    for r in (TOKENS, 4):
        got = lit.eval_gflops[f"r{r}"]
        assert set(got) == {"total", *OP_KINDS}
        assert got == pytest.approx(expected_gflops(lit.model, r), rel=1e-12)
    assert lit.eval_gflops["r4"]["total"] < lit.eval_gflops[f"r{TOKENS}"]["total"]
    # The printed table after fit: one row per setting with accuracy and GFlops.
    table = out.getvalue()
    assert "| setting | top1 | top5 | GFlops/video |" in table
    row = next(line for line in table.splitlines() if line.startswith("| r4 |"))
    assert row.split("|")[4].strip() == f"{lit.eval_gflops['r4']['total']:.3f}"
    # The training spatial policy is back on the gates after the sweep.
    assert all(g.policy.r == 4 for g in lit.model.modules() if isinstance(g, TokenGate))

    # TensorBoard: the sweep's scalars, the GFlops callback's, the token maps.
    (run,) = (tmp_path / "logs" / "vivit").glob("version_*")
    events = EventAccumulator(str(run), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for r in (TOKENS, 4):
        assert {f"val/r{r}/top1", f"val/r{r}/top5", f"val/r{r}/gflops"} <= scalars
        assert {f"val/r{r}/gflops_{kind}" for kind in OP_KINDS} <= scalars
        logged = events.Scalars(f"val/r{r}/gflops")[-1].value
        assert logged == pytest.approx(lit.eval_gflops[f"r{r}"]["total"], rel=1e-6)
    assert {"train/loss", "train/top1"} <= scalars
    images = events.Tags()["images"]
    # The token maps and the accuracy-vs-GFlops figure (GFlopsCallback).
    assert sorted(images) == [
        "token_updates/batch_0", "token_updates/batch_1", "val/accuracy_vs_gflops"
    ]  # fmt: skip
    image = events.Images("token_updates/batch_0")[-1]
    # A row of frames under the heat map, then one row per spatial block's qkv
    # gate (2); one column per tubelet step (4); 8 pixels per token plus
    # 2-pixel separators; then labels and a legend around them.
    assert image.height > 3 * (4 * 8 + 2) and image.width > 4 * (4 * 8 + 2)

    # The count command on the same config reports the same GFlops.
    with contextlib.redirect_stdout(io.StringIO()):
        report = cli_main(["count", "--config", config, "--r", str(TOKENS), "4", "--json"])
    counted = {s["name"]: s["total"] for s in report["settings"]}
    for r in (TOKENS, 4):
        assert counted[f"r{r}"] == pytest.approx(lit.eval_gflops[f"r{r}"]["total"], rel=1e-9)

    with contextlib.redirect_stdout(out):
        validated = cli_main(["validate", "--config", config])
        tested = cli_main(["test", "--config", config])
    assert {f"val/r{TOKENS}/top1", "val/r4/top5"} <= set(validated.trainer.callback_metrics)
    assert {f"test/r{TOKENS}/top1", "test/r4/top1", "test/top1"} <= set(
        tested.trainer.callback_metrics
    )
    assert "Test: accuracy vs GFlops" in out.getvalue()


def test_validation_accuracy_equals_a_direct_evaluation(tmp_path, root):
    lit = module(r=4, eval_r=[TOKENS, 4])
    dm = datamodule(root, None)
    trainer(tmp_path).validate(lit, dm, verbose=False)
    dm.videos.setup("validate")
    model = lit.model.eval()
    for r in (TOKENS, 4):
        model.set_policy(TopRPolicy(r))
        correct, top5, total = 0, 0, 0
        with torch.no_grad():
            for index in range(len(dm.videos.datasets["val"])):
                item = dm.videos.datasets["val"][index]
                logits = model(item["video"][None])
                correct += int(logits.argmax(1).item() == item["label"])
                top5 += int(item["label"] in logits.topk(4).indices[0].tolist())
                total += 1
        assert lit.eval_results[f"r{r}"]["top1"] == pytest.approx(correct / total)
        assert lit.eval_results[f"r{r}"]["top5"] == pytest.approx(top5 / total)


def test_cache_and_video_training_give_the_same_model(tmp_path, root):
    """Training from the feature cache equals training with the spatial model on the fly."""
    results = []
    for cache in (tmp_path / "cache", None):
        L.seed_everything(3)
        lit = module(dropout=0.0)
        trainer(tmp_path, max_epochs=2, limit_val_batches=0).fit(lit, datamodule(root, cache))
        results.append({k: v.clone() for k, v in lit.model.state_dict().items()})
    assert any((tmp_path / "cache").rglob("*.pt"))  # the cache was written
    # Features of a video alone (cache) and in a batch agree to float rounding
    # (the CPU exp2 kernel rounds the last elements of a tensor differently).
    # Softmax ignores the key bias, so its gradient is that rounding alone, which
    # AdamW normalises up to lr-sized steps of either sign: it is left out (it
    # cannot change any output), the query and value biases are compared.
    for key, value in results[0].items():
        other = results[1][key]
        if key.endswith("qkv.bias"):
            q, _, v = value.chunk(3)
            q_other, _, v_other = other.chunk(3)
            value, other = torch.cat([q, v]), torch.cat([q_other, v_other])
        torch.testing.assert_close(other, value, rtol=1e-4, atol=1e-5, msg=key)
    # Training changed the temporal model and classifier only.
    fresh = module(dropout=0.0).model.state_dict()
    assert not torch.equal(fresh["classifier.weight"], results[0]["classifier.weight"])
    for key in fresh:
        if key.startswith(("spatial.", "embedding.")):
            assert torch.equal(fresh[key], results[0][key]), key


def test_cache_of_another_model_is_refused(tmp_path, root):
    trainer(tmp_path, limit_val_batches=0).fit(module(), datamodule(root, tmp_path / "cache"))
    other = module(r=4)  # another r: another cache folder, written anew
    trainer(tmp_path, limit_val_batches=0).fit(other, datamodule(root, tmp_path / "cache"))
    assert sorted(p.name for p in (tmp_path / "cache" / "kinetics400" / "train").iterdir()) == [
        "r4",
        "r8",
    ]
    torch.manual_seed(1)  # same r, other spatial weights: the cache does not fit
    changed = ViViTFineTuning(preset="vivit_tiny", model_kwargs=MODEL_KWARGS, r=8)
    with pytest.raises(FeatureCacheMismatch, match="spatial_hash"):
        trainer(tmp_path, limit_val_batches=0).fit(changed, datamodule(root, tmp_path / "cache"))


def test_resume_continues_the_optimizer(tmp_path, root):
    ckpt = tmp_path / "ckpt"
    first = trainer(
        tmp_path,
        max_epochs=1,
        limit_val_batches=0,
        enable_checkpointing=True,
        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=ckpt, save_last=True)],
    )
    first.fit(module(), datamodule(root, tmp_path / "cache"))
    saved = torch.load(ckpt / "last.ckpt", weights_only=False)
    assert saved["optimizer_states"][0]["state"][0]["step"] == 2
    # A Lightning checkpoint also works as `pretrained` (the network's weights).
    pretrained = module(pretrained=str(ckpt / "last.ckpt"))
    pretrained.load_pretrained()  # a Trainer does this at the start of fit/validate/test
    loaded = pretrained.model.state_dict()
    for key, value in loaded.items():
        assert torch.equal(value, saved["state_dict"][f"model.{key}"]), key
    assert not torch.equal(loaded["classifier.weight"], module().model.classifier.weight)
    lit = module()
    second = trainer(tmp_path, max_epochs=2, limit_val_batches=0)
    second.fit(lit, datamodule(root, tmp_path / "cache"), ckpt_path=str(ckpt / "last.ckpt"))
    assert second.global_step == 4
    state = second.optimizers[0].state_dict()["state"]
    assert all(float(s["step"]) == 4 for s in state.values())


def test_token_update_maps(tmp_path, root):
    lit = module(r=4, eval_r=[8]).eval()  # maps show the run's own r
    dm = datamodule(root, None)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    maps = lit.token_update_maps(batch)
    assert list(maps) == ["blocks.0.qkv_gate", "blocks.1.qkv_gate"]
    for frames in maps.values():
        assert frames.shape == (4, 4, 4)  # 4 tubelet steps of a 4 x 4 grid
        assert frames[0].sum() == TOKENS  # the flush frame updates every token
        assert frames[1:].sum(dim=(1, 2)).tolist() == [4, 4, 4]  # then r = 4 per step
    assert all(g.policy.r == 4 for g in lit.model.modules() if isinstance(g, TokenGate))
    frames = lit.token_map_frames(batch)  # the first frame of each tubelet step
    assert frames.shape == (4, 3, 32, 32) and 0 <= frames.min() and frames.max() <= 1
    video = batch["video"][0, : int(batch["length"][0])]
    start = lit.model.preprocessing.temporal_starts(len(video))[0]
    torch.testing.assert_close(frames[1], video[start + 2].float() / 255, atol=2e-6, rtol=0)
    callback = TokenUpdateMapCallback(num_batches=1)
    with pytest.raises(ValueError, match="num_batches"):
        TokenUpdateMapCallback(num_batches=0)
    assert callback.maps == {}


def test_gflops_callback_table(tmp_path, root):
    callback = GFlopsCallback(print_table=False)
    lit = module(r=4, eval_r=[TOKENS, 4])
    trainer(tmp_path, callbacks=[callback]).validate(lit, datamodule(root, None), verbose=False)
    results = callback.results["val"]
    assert list(results) == [f"r{TOKENS}", "r4"]
    for name, values in results.items():
        assert values["gflops"] == lit.eval_gflops[name]["total"]
        assert values["top1"] == lit.eval_results[name]["top1"]
    assert callback.tables["val"].splitlines()[0] == "| setting | top1 | top5 | GFlops/video |"


@pytest.mark.parametrize(
    "kwargs, option",
    [
        ({"preset": "vivit_huge"}, "preset"),
        ({"r": 0}, "r"),
        ({"r": TOKENS + 2}, "r=18 exceeds"),
        ({"eval_r": [4, TOKENS + 2]}, "eval_r=.4, 18. exceeds"),
        ({"eval_r": [0]}, "eval_r"),
        ({"eval_thresholds": [-1.0]}, "eval_thresholds"),
        ({"spatial_variant": "dense", "eval_r": [4]}, "eval_r"),
        ({"lr": 0.0}, "lr"),
    ],
)
def test_bad_options_name_the_option(kwargs, option):
    with pytest.raises(ValueError, match=option):
        module(**kwargs)


def test_bad_data_options_name_the_option(root):
    with pytest.raises(ValueError, match="cache_dtype"):
        ViViTFineTuneDataModule(videos(root), cache_root="x", cache_dtype="int8")
    with pytest.raises(ValueError, match="train_views"):
        ViViTFineTuneDataModule(videos(root), train_views="random")


# --------------------------------------------------------------------------- DDP

DDP_SCRIPT = """
import sys

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger

sys.path.insert(0, {repo!r})
from eventful_pl.lightning.callbacks import GFlopsCallback  # noqa: E402
from tests.helpers import quiet_trainer_options  # noqa: E402
from tests.test_lightning_vivit import datamodule, module  # noqa: E402


def main(devices: int, out: str) -> None:
    L.seed_everything(0)
    lit = module(eval_r=[16, 4], dropout=0.0)
    dm = datamodule({root!r}, out + "/cache")  # each run writes its own cache (by rank)
    dm.batch_size = 4 // devices
    trainer = L.Trainer(
        **{{**quiet_trainer_options(out), "devices": devices}},
        strategy="ddp_spawn" if devices > 1 else "auto",
        max_epochs=2,
        logger=CSVLogger(out, name="run"),
        callbacks=[GFlopsCallback(print_table=False)],
    )
    trainer.fit(lit, dm)
    trainer.validate(lit, dm, verbose=False)
    torch.save(lit.model.state_dict(), out + "/weights.pt")


if __name__ == "__main__":  # ddp_spawn re-imports this file in its processes
    main(int(sys.argv[1]), sys.argv[2])
"""


def _read_csv_metrics(path: Path) -> dict[str, float]:
    """The last value of every ``val/`` metric in the CSV logs (each ``ddp_spawn``
    launch, fit then validate, starts a new version)."""
    files = sorted(path.glob("run/version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:]))
    assert files, f"no metrics under {path}"
    last: dict[str, float] = {}
    for metrics in files:
        with metrics.open() as handle:
            for row in csv.DictReader(handle):
                for key, value in row.items():
                    if value not in ("", None) and key.startswith("val/"):
                        last[key] = float(value)
    return last


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.timeout(600)
def test_ddp_two_processes_equal_one(tmp_path, root):
    """fit + validate with 2 gloo processes (batch 2 each) equals 1 process (batch 4):
    the same trained weights, the same synced accuracy and GFlops per video."""
    repo = str(Path(__file__).parents[1])
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(repo=repo, root=str(root)))
    runs, weights = {}, {}
    for devices in (1, 2):
        out = tmp_path / f"out{devices}"
        run_script(str(script), str(devices), str(out))
        runs[devices] = _read_csv_metrics(out)
        weights[devices] = torch.load(out / "weights.pt", weights_only=True)
    # Both ranks wrote their shard of the cache: every training item is there once.
    cached = sorted(p.name for p in (tmp_path / "out2" / "cache").rglob("*.pt"))
    assert cached == sorted(p.name for p in (tmp_path / "out1" / "cache").rglob("*.pt"))
    assert len(cached) == 8
    for key, value in weights[1].items():
        other = weights[2][key]
        if key.endswith("qkv.bias"):
            # The key bias gets a zero gradient in exact arithmetic (softmax ignores
            # a shift of every logit of a row); AdamW scales its rounding noise up
            # to full steps, so only the query and value biases are comparable.
            third = len(value) // 3
            value = torch.cat([value[:third], value[2 * third :]])
            other = torch.cat([other[:third], other[2 * third :]])
        torch.testing.assert_close(other, value, rtol=1e-4, atol=1e-6, msg=key)
    one, two = runs[1], runs[2]
    keys = {f"val/r{r}/{m}" for r in (16, 4) for m in ("top1", "top5", "gflops")}
    assert keys <= set(one) and set(one) == set(two)
    for key in sorted(one):
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key


# The paper configs (every row, parsed, built and counted): tests/test_cli_configs.py.


def test_predict_through_the_cli(tmp_path, argv):
    data_root = tmp_path / "data"
    config = cli_config(tmp_path, data_root)
    raw = yaml.safe_load(config.read_text())
    output = tmp_path / "predictions" / "videos.jsonl"
    raw["trainer"]["callbacks"] = [
        {
            "class_path": "eventful_pl.lightning.callbacks.PredictionWriter",
            "init_args": {"output": str(output)},
        }
    ]
    config.write_text(yaml.safe_dump(raw))
    with contextlib.redirect_stdout(io.StringIO()):
        cli = cli_main(["predict", "--config", str(config)])
    batches = cli.trainer.predict_loop.predictions
    ids = [clip_id for batch in batches for clip_id in batch["id"]]
    dm = cli.datamodule.videos
    assert sorted(ids) == sorted(item.id for item in dm.datasets["test"].items)
    lit = cli.model.eval()
    item = dm.datasets["test"][0]
    with torch.no_grad():
        want = lit.model(item["video"][None])  # the run's own top-r (r = 8)
    got = next(b["logits"][b["id"].index(item["id"])] for b in batches if item["id"] in b["id"])
    torch.testing.assert_close(got, want[0])
    assert all(b["label"].tolist() == b["logits"].argmax(-1).tolist() for b in batches)
    # The writer: one JSON line per video with its id, logits and label.
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [line["id"] for line in lines] == ids
    first = next(line for line in lines if line["id"] == item["id"])
    assert first["logits"] == pytest.approx(want[0].tolist(), rel=1e-5, abs=1e-6)
    assert first["label"] == int(want[0].argmax())


def test_class_count_mismatch_is_a_clear_error(tmp_path, root):
    lit = module(model_kwargs={**MODEL_KWARGS, "num_classes": 7})  # the data has 4
    with pytest.raises(ValueError, match="has 4 classes but the model has 7.*num_classes"):
        trainer(tmp_path).validate(lit, datamodule(root, None), verbose=False)


def test_threshold_sweep(tmp_path, root):
    lit = module(eval_thresholds=[0.0, 1e6])
    trainer(tmp_path).validate(lit, datamodule(root, None), verbose=False)
    names = ["r8", "h0.0", "h1000000.0"]  # the own r first: not in the sweep
    assert list(lit.eval_results) == names and list(lit.eval_gflops) == names
    # h = 0 updates every token that changed (at most r = N: the class token
    # entering the first block never changes); a huge h none after each view's
    # first step.
    low, high = (lit.eval_gflops[name]["total"] for name in names[1:])
    all_tokens = expected_gflops(lit.model, TOKENS + 1)["total"]
    assert high < expected_gflops(lit.model, 1)["total"] < low <= all_tokens
    assert all(g.policy.r == 8 for g in lit.model.modules() if isinstance(g, TokenGate))


@pytest.mark.slow
def test_demo_config_runs(tmp_path, argv):
    """README command 1 (configs/demo.yaml) on a smaller dataset and one epoch."""
    demo = Path(__file__).parents[1] / "configs" / "demo.yaml"
    synthetic = {"videos_per_class": 3, "frames": 16, "size": 64, "speed": 3}
    args = [
        "fit",
        "--config",
        str(demo),
        "--trainer.max_epochs=1",
        "--trainer.check_val_every_n_epoch=1",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        f"--data.init_args.cache_root={tmp_path / 'features'}",
        f"--data.init_args.videos.init_args.root={tmp_path / 'data'}",
        "--data.init_args.videos.init_args.synthetic="
        + json.dumps({**synthetic, "task": "colour_order", "seed": 0}),
    ]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = cli_main(args)
    assert (tmp_path / "data" / "annotations" / "val.csv").is_file()
    # The happy path warns about nothing the project causes, and shows Lightning's bar.
    repo = Path(__file__).parents[1]
    ours = [
        f"{w.filename}:{w.lineno}: {w.message}"
        for w in caught
        if Path(w.filename).resolve().is_relative_to(repo) and ".venv" not in Path(w.filename).parts
    ]
    assert ours == []
    assert not [w for w in caught if "eval mode" in str(w.message)]
    assert "Epoch 0: 100%" in out.getvalue()
    (run,) = (tmp_path / "lightning_logs").glob("version_*")
    assert (run / "val_accuracy_vs_gflops.png").is_file()
    assert list(cli.model.eval_results) == ["r65", "r32", "r16", "r8", "r4", "dense"]
    gflops = [cli.model.eval_gflops[f"r{r}"]["total"] for r in (65, 32, 16, 8, 4)]
    assert gflops == sorted(gflops, reverse=True)  # fewer tokens, fewer operations
    results = cli.model.eval_results
    assert results["dense"] == results["r65"]  # every token: the dense computation
    assert gflops[-1] < cli.model.eval_gflops["dense"]["total"] < gflops[0]
    assert "Validation after epoch 1: accuracy vs GFlops" in out.getvalue()
    assert any((tmp_path / "lightning_logs").glob("version_0/events.out.tfevents.*"))


def test_render_maps_with_a_heat_map_over_the_frames():
    from eventful_pl.lightning.token_maps import render_maps

    maps = {"a": torch.zeros(2, 2, 3), "b": torch.zeros(2, 2, 3)}
    maps["a"][1, 0, 0] = maps["b"][1, 0, 0] = 1.0  # both gates: token (0, 0) of frame 1
    maps["a"][1, 1, 2] = 1.0  # one gate of two: token (1, 2)
    frames = torch.full((2, 3, 8, 12), 0.5)
    frames[:, 1] = 0.25
    image = render_maps(maps, cell=4, gap=1, frames=frames)
    assert image.shape == (3, 3 * (2 * 4 + 1), 2 * (3 * 4 + 1))
    frame1 = image[:, :8, 13:25]  # first row, second column: frame 1 at 4 px per token
    torch.testing.assert_close(frame1[:, 0, 0], torch.tensor([0.85, 0.18, 0.15]))  # 0.7 red
    torch.testing.assert_close(frame1[:, 4, 8], torch.tensor([0.675, 0.215, 0.325]))
    torch.testing.assert_close(frame1[:, 0, 4], torch.tensor([0.5, 0.25, 0.5]))  # kept
    torch.testing.assert_close(image[:, :8, :12], frames[0])  # frame 0: nothing updated
    with pytest.raises(ValueError, match="3 frames for maps of 2 frames"):
        render_maps(maps, frames=torch.zeros(3, 3, 8, 12))


def test_dense_setting(tmp_path, root):
    """eval_dense: the dense model's accuracy (= every token) and GFlops, last in the sweep."""
    lit = module(r=4, eval_r=[TOKENS + 1, 4], eval_dense=True)
    trainer(tmp_path).validate(lit, datamodule(root, None), verbose=False)
    assert list(lit.eval_results) == [f"r{TOKENS + 1}", "r4", "dense"]
    assert lit.eval_results["dense"] == lit.eval_results[f"r{TOKENS + 1}"]
    (dense,) = count_vivit(lit.model)["settings"]
    assert lit.eval_gflops["dense"]["total"] == pytest.approx(dense["total"], rel=1e-12)
    assert lit.eval_gflops["dense"]["gate"] == 0.0
    assert lit.eval_gflops["dense"]["total"] < lit.eval_gflops[f"r{TOKENS + 1}"]["total"]
    with pytest.raises(ValueError, match="eval_dense"):
        module(spatial_variant="dense", eval_dense=True)
