"""The command line and the configs: every config combination docs/configs.md
shows parses and builds (and counts), short class names, Literal choices in
``--help``, the console script, and a quiet happy path (no "args" warning, no
advertising tips)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import sys
import tomllib
import warnings
from pathlib import Path
from typing import get_args

import pytest
import torch

from cli import cli_main
from eventful_pl.blocks import BLOCK_VARIANTS, BlockVariant
from eventful_pl.lightning.cli import EventfulCLI, main
from eventful_pl.lightning.cli import cli_main as package_cli_main
from eventful_pl.lightning.count_command import main as count_main
from eventful_pl.lightning.vitdet_module import ViTDetModule, ViTDetPreset, ViTDetVariant
from eventful_pl.lightning.vivit_module import ViViTFineTuning, ViViTPreset
from eventful_pl.models.vitdet import VITDET_PRESETS, VITDET_VARIANTS
from eventful_pl.models.vivit import VIVIT_PRESETS
from tests.helpers import quiet_trainer_options

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "configs.md"

VITDET_SIZES = {None: ((64, 64), 1024, 467.4), "672": ((42, 42), 512, 174.5)}
VITDET_VARIANT_OVERLAYS = [
    None,
    "tokenwise",
    "stgt",
    "spatial",
    "spatiotemporal",
    "threshold",
    "gate_before_ln",
]
VIVIT_ROWS = {"kinetics400": (48, 24, 96), "epic_kitchens": (100, 50, 200)}


def vitdet_combo(size: str | None, variant: str | None) -> tuple[str, ...]:
    files = ["configs/vitdet/vid.yaml"]
    files += [f"configs/vitdet/vid/{x}.yaml" for x in (size, variant) if x]
    return tuple(files)


def vivit_combo(dataset: str, r: int) -> tuple[str, ...]:
    base = f"configs/vivit/{dataset}.yaml"
    if r == VIVIT_ROWS[dataset][0]:
        return (base,)
    return (base, f"configs/vivit/{dataset}/r{r}.yaml")


#: Every paper row: its config files, in order.
VITDET_COMBOS = {
    vitdet_combo(size, variant): (size, variant)
    for size in VITDET_SIZES
    for variant in VITDET_VARIANT_OVERLAYS
}
VIVIT_COMBOS = {
    vivit_combo(dataset, r): (dataset, r) for dataset, rs in VIVIT_ROWS.items() for r in rs
}


def documented_combos() -> set[tuple[str, ...]]:
    """The ``--config`` lists of every command line in docs/configs.md."""
    text = re.sub(r"\\\n\s*", " ", DOCS.read_text())  # join continued lines
    combos = set()
    for line in text.splitlines():
        files = re.findall(r"--config\s+(configs/\S+\.yaml)", line)
        if files:
            combos.add(tuple(files))
    return combos


def print_config(files, *extra: str) -> dict:
    import yaml

    args = ["fit", *(a for f in files for a in ("--config", str(ROOT / f))), *extra]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        cli_main([*args, "--print_config"])
    assert done.value.code == 0, files
    return yaml.safe_load(out.getvalue())


def test_docs_show_every_paper_row_and_every_config_file():
    documented = documented_combos()
    paper = set(VITDET_COMBOS) | set(VIVIT_COMBOS)
    assert paper <= documented, sorted(paper - documented)
    for combo in documented:
        for file in combo:
            assert (ROOT / file).is_file(), f"docs/configs.md names {file}, which does not exist"
    used = {f for combo in documented for f in combo}
    on_disk = {str(p.relative_to(ROOT)) for p in ROOT.glob("configs/vi*/**/*.yaml")}
    assert on_disk <= used, f"configs not shown in docs/configs.md: {sorted(on_disk - used)}"
    assert not (ROOT / "configs" / "count").exists()  # count reads the fit configs


def test_no_config_points_outside_the_repository():
    for path in ROOT.glob("configs/**/*.yaml"):
        text = path.read_text()
        assert "DESIGN" not in text and "../shared" not in text, path


@pytest.mark.slow
@pytest.mark.parametrize(
    "files", list(VITDET_COMBOS), ids=lambda f: "+".join(Path(x).stem for x in f)
)
def test_vitdet_rows_parse_build_and_count(files, argv, monkeypatch):
    size, variant = VITDET_COMBOS[files]
    grid, r, dense_gflops = VITDET_SIZES[size]
    parsed = print_config(files)
    args = parsed["model"]["init_args"]
    assert parsed["model"]["class_path"] == "eventful_pl.lightning.vitdet_module.ViTDetModule"
    assert parsed["trainer"]["max_epochs"] == 5 and parsed["data"]["init_args"]["batch_size"] == 8
    assert (args["lr"], args["weight_decay"], args["decay_epochs"]) == (1e-4, 0.1, [3])
    assert args["model_kwargs"]["matmul_2_cast"] == "float16"
    assert args["model_kwargs"].get("gate_before_ln", False) == (variant == "gate_before_ln")
    own_variant = variant if variant in VITDET_VARIANTS else "eventful"
    assert args["variant"] == own_variant
    logger = parsed["trainer"]["logger"]["init_args"]
    assert (logger["save_dir"], logger["name"]) == (
        f"outputs/vitdet/{size or 1024}",
        variant or "eventful",
    )
    # The sweep as (r, threshold, dense) per setting.
    dense = [(None, None, True)]
    if variant == "spatial":
        sweep, own = [(None, None, False)], (None, None)
    elif variant == "threshold":
        sweep, own = [(None, h, False) for h in (0.2, 1.0, 5.0)] + dense, (None, 1.0)
    else:
        rs = (2 * r, 3 * r // 2, r, 3 * r // 4, r // 2)
        sweep, own = [(x, None, False) for x in rs] + dense, (r, None)
    assert (args["r"], args["threshold"]) == own
    # Shapes only (meta device); the metrics need real tensors.
    monkeypatch.setattr(ViTDetModule, "make_metrics", lambda self: torch.nn.Identity())
    with torch.device("meta"):
        lit = ViTDetModule(**args)
    assert lit.model.variant == own_variant
    assert lit.model.grid == grid
    assert [(s.r, s.threshold, s.dense) for s in lit.sweep] == sweep
    # count reads the same files (the dense base model's GFlops per frame).
    with contextlib.redirect_stdout(io.StringIO()):
        report = count_main([a for f in files for a in ("--config", str(ROOT / f))])
    assert round(report["settings"][0]["total"], 1) == dense_gflops
    assert report["settings"][0]["role"] == "base"


@pytest.mark.slow
@pytest.mark.parametrize(
    "files", list(VIVIT_COMBOS), ids=lambda f: "+".join(Path(x).stem for x in f)
)
def test_vivit_rows_parse_build_and_count(files, argv):
    dataset, r = VIVIT_COMBOS[files]
    kinetics = dataset == "kinetics400"
    parsed = print_config(files)
    args = parsed["model"]["init_args"]
    assert parsed["model"]["class_path"] == "eventful_pl.lightning.vivit_module.ViViTFineTuning"
    assert args["r"] == r and r in args["eval_r"]
    assert (args["lr"], args["weight_decay"], args["dropout"]) == (
        2e-6 if kinetics else 1e-5,
        0.05,
        0.5,
    )
    assert parsed["trainer"]["max_epochs"] == (10 if kinetics else 5)
    assert parsed["trainer"]["logger"]["init_args"]["name"] == f"{dataset}_r{r}"
    data = parsed["data"]["init_args"]
    assert data["batch_size"] == (16 if kinetics else 8)
    assert data["videos"]["init_args"]["root"].startswith("data/")
    with torch.device("meta"):
        lit = ViViTFineTuning(**args)
    sweep = [(s.r, s.threshold, s.dense) for s in lit.sweep]
    assert sweep == [(x, None, False) for x in args["eval_r"]] + [(None, None, True)]
    assert lit.model.num_classes == (400 if kinetics else 97)
    with contextlib.redirect_stdout(io.StringIO()):
        report = count_main(
            [*(a for f in files for a in ("--config", str(ROOT / f))), "--r", str(r)]
        )
    dense, top_r = report["settings"]
    if kinetics:  # the paper's dense ViViT-B: 3.36 TFlops per Kinetics-400 video
        assert dense["total"] == pytest.approx(3359.6, abs=0.5)
    assert top_r["total"] < dense["total"]


def test_overlay_changes_only_its_lines(argv):
    """A row overlay on the demo: later files override earlier ones, the rest is kept."""
    base = print_config(["configs/demo.yaml"])
    over = print_config(["configs/demo.yaml", "configs/vivit/kinetics400/r24.yaml"])
    assert over["model"]["init_args"]["r"] == 24 and base["model"]["init_args"]["r"] == 16
    assert over["trainer"]["logger"]["init_args"]["name"] == "kinetics400_r24"
    over["model"]["init_args"]["r"] = 16
    over["trainer"]["logger"]["init_args"]["name"] = base["trainer"]["logger"]["init_args"]["name"]
    assert over == base


def test_short_class_names(argv):
    parsed = print_config(
        [],
        "--model=ViViTFineTuning",
        "--model.preset=vivit_tiny",
        "--data=ViViTFineTuneDataModule",
        "--data.videos=KineticsDataModule",
        "--data.videos.root=somewhere",
    )
    assert parsed["model"]["class_path"] == "eventful_pl.lightning.vivit_module.ViViTFineTuning"
    assert parsed["data"]["class_path"] == "datamodules.finetune.ViViTFineTuneDataModule"
    videos = parsed["data"]["init_args"]["videos"]
    assert videos["class_path"] == "datamodules.kinetics.KineticsDataModule"
    parsed = print_config([], "--model=ViTDetModule", "--data=ImageNetVIDDataModule")
    assert parsed["model"]["class_path"] == "eventful_pl.lightning.vitdet_module.ViTDetModule"


def test_literal_options_list_their_choices(argv):
    assert set(get_args(ViViTPreset)) == set(VIVIT_PRESETS)
    assert set(get_args(ViTDetPreset)) == set(VITDET_PRESETS)
    assert set(get_args(ViTDetVariant)) == set(VITDET_VARIANTS)
    assert set(get_args(BlockVariant)) == set(BLOCK_VARIANTS)
    # The networks' own options (count configs name them directly).
    from eventful_pl.models import vitdet, vivit

    assert get_args(vivit.ViViTPreset) == get_args(ViViTPreset)
    assert get_args(vitdet.ViTDetPreset) == get_args(ViTDetPreset)
    assert get_args(vitdet.ViTDetVariant) == get_args(ViTDetVariant)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        cli_main(["fit", "--model.help", "ViTDetModule"])
    assert "--model.variant {" + ",".join(VITDET_VARIANTS) + "}" in out.getvalue()
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        cli_main(["fit", "--model.help", "ViViTFineTuning"])
    assert "--model.preset {" + ",".join(get_args(ViViTPreset)) + "}" in out.getvalue()
    assert "--model.spatial_variant {dense,tokenwise,query_key,full}" in out.getvalue()
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit):
        cli_main(["fit", "--model=ViViTFineTuning", "--model.preset=vivit_huge"])
    assert "vivit_huge" in err.getvalue() and "vivit_tiny" in err.getvalue()


def test_help_lists_count_and_cache_features(argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        cli_main(["--help"])
    assert done.value.code == 0
    listed = re.findall(r"^\s{4}(\S+)\s", out.getvalue(), re.M)
    assert {"fit", "validate", "test", "predict", "count", "cache-features"} <= set(listed)
    assert "calibrate" in listed


def test_console_script_is_the_cli_main(tmp_path, monkeypatch, capsys):
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, name = scripts["eventful-pl"].partition(":")
    imported = __import__(module, fromlist=[name])
    assert getattr(imported, name) is main
    assert sys.modules["cli"].main is main and cli_main is package_cli_main  # cli.py: the same
    # The script's function reads sys.argv and returns None (a console script
    # exits with its return value: anything else would be a failure status).
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "model:\n  class_path: ViTDet\n  init_args:\n    {preset_args}\n".format(
            preset_args="num_classes: 3\n    image_size: 64\n    dim: 32\n    depth: 2\n"
            "    heads: 2\n    window_block_indices: []\n    position_encoding_size: 4\n"
            "    pyramid_channels: 16\n    box_conv_dims: [16]\n    box_fc_dims: [32]"
        )
    )
    monkeypatch.setattr(sys, "argv", ["eventful-pl", "count", "--config", str(config), "--json"])
    assert main() is None
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["per"] == "frame" and report["settings"][0]["name"] == "dense"


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_quiet_happy_path(tmp_path, monkeypatch):
    """The command line as a user types it: no "args parameter" warning, no
    advertising tips; Lightning's other messages still show."""
    options = {**quiet_trainer_options(tmp_path), "logger": False}
    # run=False (below): no subcommand.
    argv = ["cli.py", "--model=ViViTFineTuning", "--model.preset=vivit_tiny", "--model.r=8"]
    argv += [
        f"--trainer.{key}={json.dumps(value) if isinstance(value, bool) else value}"
        for key, value in options.items()
    ]
    monkeypatch.setattr(sys, "argv", argv)
    records = Records()
    lightning_logger = logging.getLogger("lightning.pytorch")
    lightning_logger.addHandler(records)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cli = EventfulCLI(run=False)  # what main() builds, without the run
    finally:
        lightning_logger.removeHandler(records)
    assert not [w for w in caught if "args" in str(w.message)], [str(w.message) for w in caught]
    assert any("GPU available" in m for m in records.messages), records.messages
    assert not [m for m in records.messages if "Tip" in m]
    assert isinstance(cli.model, ViViTFineTuning)


@pytest.mark.slow
def test_quiet_validate_run(tmp_path, monkeypatch):
    """``main()`` runs validate on the demo (tiny synthetic data) without the
    "args" warning and without any "Tip" in Lightning's log."""
    synthetic = {"videos_per_class": 2, "frames": 16, "size": 64, "speed": 3}
    synthetic.update(task="colour_order", seed=0)
    argv = ["cli.py", "validate", "--config", str(ROOT / "configs" / "demo.yaml")]
    argv += [
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=false",
        "--trainer.callbacks=[]",
        "--trainer.limit_val_batches=1",
        "--model.eval_r=[16]",
        "--model.eval_dense=false",
        f"--data.init_args.cache_root={tmp_path / 'features'}",
        f"--data.init_args.videos.init_args.root={tmp_path / 'data'}",
        f"--data.init_args.videos.init_args.synthetic={json.dumps(synthetic)}",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    records = Records()
    lightning_logger = logging.getLogger("lightning.pytorch")
    lightning_logger.addHandler(records)
    try:
        with (
            warnings.catch_warnings(record=True) as caught,
            contextlib.redirect_stdout(io.StringIO()),
        ):
            warnings.simplefilter("always")
            cli = cli_main()  # args=None: sys.argv, as typed
    finally:
        lightning_logger.removeHandler(records)
    assert [s.r for s in cli.model.sweep] == [16] and len(cli.model.eval_results) == 1
    assert not [w for w in caught if "args" in str(w.message)], [str(w.message) for w in caught]
    assert not [m for m in records.messages if "Tip" in m], records.messages
