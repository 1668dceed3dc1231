"""The ``calibrate`` command: per-gate thresholds that meet a compute budget.

    python cli.py calibrate --config configs/vitdet/vid.yaml --config configs/vitdet/vid/672.yaml \\
        --budget_gflops 60 90 120 --videos clips/ --num_videos 8 --held_out 2
    python cli.py calibrate --config my_fit_config.yaml --ckpt_path last.ckpt \\
        --budget_fraction 0.5 --videos a.mp4 b.mp4 c.mp4

The config's ``model`` section names the network (``FactorizedViViT``,
``ViTDet``) or a LightningModule holding it as ``.model`` (its ``pretrained``
weights are loaded; ``--ckpt_path`` loads a Lightning checkpoint's instead).
The dense model and the eventful model run on the calibration clips; the
per-gate thresholds are fitted by :class:`eventful_pl.calibration.Calibrator`.
The command prints, per budget, the GFlops achieved and the relative error of
the final tokens against the dense model (with one global threshold fitted
to the same budget beside it), on the calibration clips and on the
``--held_out`` clips, and writes a calibration file (JSON) that
:class:`eventful_pl.policies.CalibratedThresholdPolicy` reads. The policy it
writes tracks each gate's average update rate, so the budget holds on
content that moves more or less than the calibration clips;
``--no_track_budget`` writes the plain per-gate thresholds instead.

Budgets are in the ``count`` command's units: GFlops per video for ViViT (all
views, spatial + temporal + classifier; the views of one video run as one
batch, as in evaluation), GFlops per frame of the backbone for ViTDet,
averaged over the clips' frames, first frames included. ``--budget_fraction``
gives them as fractions of the dense cost.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser
from jsonargparse.typing import PositiveInt
from torch import Tensor, nn

from eventful_pl.calibration import RATES, Calibrator, Stream, dense_outputs
from eventful_pl.counting import count_ops
from eventful_pl.lightning.count_command import add_ignored_sections, network_of
from eventful_pl.models.vitdet import ViTDet
from eventful_pl.models.vivit import FactorizedViViT
from eventful_pl.policies import write_calibration

#: Sections of a LightningCLI config that calibration ignores.
_IGNORED_SECTIONS = ("trainer", "data", "optimizer", "lr_scheduler", "seed_everything")
#: File name endings read as videos in a ``--videos`` folder.
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="cli.py calibrate",
        description="Per-gate thresholds that meet a compute budget, fitted on video clips.",
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config with a model")
    parser.add_subclass_arguments(nn.Module, "model", required=True, instantiate=True)
    parser.add_argument(
        "--budget_gflops", type=float, nargs="+", default=[], help="budgets in GFlops per unit"
    )
    parser.add_argument(
        "--budget_fraction",
        type=float,
        nargs="+",
        default=[],
        help="budgets as fractions of the dense model's cost, in (0, 1)",
    )
    parser.add_argument(
        "--videos", type=str, nargs="+", required=True, help="video files or folders of them"
    )
    parser.add_argument(
        "--num_videos", type=PositiveInt | None, default=None, help="use the first N videos"
    )
    parser.add_argument(
        "--held_out", type=int, default=0, help="the last N videos only check the result"
    )
    parser.add_argument(
        "--frames", type=PositiveInt, default=16, help="ViTDet: frames per clip (from the start)"
    )
    parser.add_argument("--stride", type=PositiveInt, default=1, help="ViTDet: frame stride")
    parser.add_argument(
        "--max_tokens", type=PositiveInt | None, default=None, help="per-gate token cap (off)"
    )
    parser.add_argument(
        "--refresh_every", type=PositiveInt | None, default=None, help="full refresh every K"
    )
    parser.add_argument(
        "--track_budget",
        action=ActionYesNo,
        default=True,
        help="gates keep an average update rate, their calibrated one or one for all gates, "
        "whichever is closer to dense, so the budget holds on other content (on; "
        "--no_track_budget: plain per-gate thresholds, whose cost follows the content)",
    )
    parser.add_argument(
        "--rates",
        type=str,
        default="best",
        help="with tracking: the rates held (best: the closer to dense of per-gate and "
        "uniform; per-gate; uniform)",
    )
    parser.add_argument(
        "--gammas",
        type=float,
        nargs="+",
        default=[0.0, 0.5, 1.0],
        help="threshold shapes tried (0: one global threshold, 1: cost/sensitivity optimum)",
    )
    parser.add_argument("--tolerance", type=float, default=0.01, help="relative budget tolerance")
    parser.add_argument(
        "--tracking_tolerance",
        type=float,
        default=0.03,
        help="with --rates best: relative distance to the budget of a tracked run on budget",
    )
    parser.add_argument("--output", type=str | None, default=None, help="calibration file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    parser.add_argument("--ckpt_path", type=str | None, default=None, help="Lightning checkpoint")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_ignored_sections(parser, _IGNORED_SECTIONS)
    return parser


# ------------------------------------------------------------------ clips and streams


def list_videos(paths: Sequence[str], limit: int | None = None) -> list[Path]:
    """Video files named in ``paths`` (files, or folders scanned in sorted order)."""
    found: list[Path] = []
    for item in paths:
        path = Path(item)
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            raise ValueError(f"--videos: {item} is neither a video file nor a folder")
    if not found:
        raise ValueError(f"--videos: no video files in {list(paths)} (looked for {VIDEO_SUFFIXES})")
    return found[:limit] if limit else found


def read_clip(
    path: str | Path, frames: int | None = None, stride: int = 1, start: int = 0
) -> Tensor:
    """Frames ``start, start + stride, ...`` of a video (all with ``frames``
    None) -> (T, 3, H, W) uint8."""
    from datamodules.video_io import VideoReadError, open_video, read_frames

    try:
        reader = open_video(path)
        last = len(reader) if frames is None else min(len(reader), start + frames * stride)
        indices = list(range(start, last, stride))
        if not indices:
            raise ValueError(f"--videos: {path} has no frame at {start} (it has {len(reader)})")
        return read_frames(reader, indices, path=path)
    except VideoReadError as error:
        raise ValueError(f"--videos: cannot read {path}: {error}") from error


@dataclass
class Target:
    """What is calibrated in a network: its gated backbone, the unit of its
    budgets, and the affine map from backbone GFlops per frame to that unit
    (``unit_gflops = offset + scale * backbone_gflops``)."""

    backbone: nn.Module
    unit: str
    scale: float
    offset: float

    def to_unit(self, backbone_gflops: float) -> float:
        return self.offset + self.scale * backbone_gflops

    def to_backbone(self, unit_gflops: float) -> float:
        return (unit_gflops - self.offset) / self.scale


@torch.no_grad()
def target_of(network: nn.Module) -> Target:
    """The calibration target of a ViViT (spatial model, per video) or ViTDet
    (backbone, per frame)."""
    if isinstance(network, FactorizedViViT):
        with count_ops(network) as counter:
            network.temporal_forward(
                torch.zeros(1, network.steps, network.dim, device=network.classifier.weight.device)
            )
        views = network.num_views
        return Target(
            network.spatial, "GFlops per video", views * network.steps, views * counter.total / 1e9
        )
    if isinstance(network, ViTDet):
        return Target(network.backbone, "GFlops per frame", 1.0, 0.0)
    raise ValueError(f"model: cannot calibrate {type(network).__name__}")


@torch.no_grad()
def clip_stream(network: nn.Module, clip: Tensor) -> Stream:
    """The backbone's input token frames of a clip (T, 3, H, W) uint8: for
    ViViT the tubelet steps of every view (B = views), for ViTDet one frame
    after another (B = 1)."""
    if isinstance(network, FactorizedViViT):
        views = network.preprocessing(clip[None])  # (1, V, T, C, h, w)
        tokens = network.embedding(views.flatten(0, 1))  # (V, T', P, D)
        return [tokens[:, t].contiguous() for t in range(tokens.shape[1])]
    if isinstance(network, ViTDet):
        pixels = [network.preprocessing(frame[None]).tensors for frame in clip]
        return [network.embedding(p) for p in pixels]
    raise ValueError(f"model: cannot calibrate {type(network).__name__}")


# ---------------------------------------------------------------------------- command


def load_weights(model: nn.Module, ckpt_path: str | None) -> None:
    """Loads a Lightning checkpoint's weights into ``model`` (a LightningModule),
    else the module's ``pretrained`` weights (if it has that option)."""
    if ckpt_path:
        from eventful_pl.lightning.cli import read_lightning_checkpoint

        if not hasattr(model, "load_pretrained"):
            raise ValueError(
                "--ckpt_path needs a LightningModule model (e.g. ViTDetModule) in the config; "
                "a plain network has no Lightning checkpoint layout"
            )
        checkpoint = read_lightning_checkpoint(ckpt_path)
        model.load_state_dict(checkpoint["state_dict"])
        model.pretrained_done = True
    elif hasattr(model, "load_pretrained"):
        model.load_pretrained()


def default_output(model: nn.Module, ckpt_path: str | None) -> Path:
    """``<checkpoint>.calibration.json`` beside ``--ckpt_path`` or the
    ``pretrained`` file, else ``calibration.json`` here."""
    source = ckpt_path or getattr(model, "pretrained", None)
    if source:
        return Path(source).with_suffix(".calibration.json")
    return Path("calibration.json")


def budgets_in_unit(config: Any, dense_unit: float) -> list[tuple[float, float | None]]:
    """(budget in the unit, fraction or None) of each ``--budget_*``."""
    for f in config.budget_fraction:
        if not 0.0 < f < 1.0:
            raise ValueError(f"--budget_fraction: every fraction must lie in (0, 1), got {f}")
    for b in config.budget_gflops:
        if b <= 0:
            raise ValueError(f"--budget_gflops: budgets must be positive, got {b}")
    budgets = [(float(b), None) for b in config.budget_gflops]
    budgets += [(round(f * dense_unit, 6), float(f)) for f in config.budget_fraction]
    if not budgets:
        raise ValueError("give --budget_gflops or --budget_fraction (one or more budgets)")
    return budgets


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def format_table(report: dict[str, Any]) -> str:
    """A plain-text table of a calibration report."""
    held = report["held_out_videos"] > 0
    header = ["budget", "GFlops", "error", "global-h error", "gamma"]
    tracking = any(r.get("rates") for r in report["results"])
    if tracking:
        header.append("rates")
    if held:
        header += ["held-out GFlops", "held-out error", "held-out global-h error"]
    rows = [header]
    for r in report["results"]:
        row = [
            f"{r['budget']:.4g}",
            f"{r['gflops']:.4g}",
            f"{r['error']:.4f}",
            _number(r["global_error"]),
            f"{r['gamma']:g}",
        ]
        if tracking:
            row.append(r["rates"] or "-")
        if held:
            row += [
                f"{r['held_out_gflops']:.4g}",
                f"{r['held_out_error']:.4f}",
                _number(r["held_out_global_error"]),
            ]
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    title = (
        f"{report['unit']} (dense {report['dense_gflops']:.4g}); error: relative L2 error of "
        f"the final tokens vs the dense model; {report['calibration_videos']} calibration "
        f"and {report['held_out_videos']} held-out videos"
    )
    return "\n".join([title, *lines, f"wrote {report['output']}"])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the command; prints a table (or JSON) and returns the report."""
    parser = build_parser()
    config = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if config.held_out < 0:
        raise ValueError(f"--held_out must be >= 0, got {config.held_out}")
    if config.rates not in RATES:
        raise ValueError(f"--rates: choose one of {', '.join(RATES)}; got {config.rates!r}")
    videos = list_videos(config.videos, config.num_videos)  # before building the model
    init = parser.instantiate(config)
    load_weights(init.model, config.ckpt_path)
    network = network_of(init.model).eval()
    target = target_of(network)
    output = Path(config.output) if config.output else default_output(init.model, config.ckpt_path)
    if output.exists() and not config.overwrite:
        raise ValueError(f"--output: {output} exists; choose another path or add --overwrite")
    if len(videos) <= config.held_out:
        raise ValueError(
            f"--held_out {config.held_out} leaves no calibration video of {len(videos)}; "
            "give more --videos or hold out fewer"
        )
    frames = None if isinstance(network, FactorizedViViT) else config.frames
    streams = [clip_stream(network, read_clip(v, frames, config.stride)) for v in videos]
    split = len(streams) - config.held_out
    calibrator = Calibrator(
        target.backbone,
        streams[:split],
        gammas=config.gammas,
        max_tokens=config.max_tokens,
        refresh_every=config.refresh_every,
        tolerance=config.tolerance,
        tracking_tolerance=config.tracking_tolerance,
    )
    dense_unit = target.to_unit(calibrator.dense_gflops)
    held_streams = streams[split:]
    held_reference = None
    if held_streams:
        held_reference, _ = dense_outputs(target.backbone, held_streams)
    results, policies = [], []
    for budget, fraction in budgets_in_unit(config, dense_unit):
        result = calibrator.calibrate(
            target.to_backbone(budget), track_budget=config.track_budget, rates=config.rates
        )
        glob = 0.0 in result.candidates  # one global threshold, fitted to the same budget
        policy = result.policy(budget, track_budget=config.track_budget)
        policy.info["fraction"] = fraction
        row = {
            "budget": budget,
            "fraction": fraction,
            "gflops": target.to_unit(result.gflops),
            "error": result.error,
            "gamma": result.gamma,
            "rates": result.rates if config.track_budget else None,
            "global_gflops": target.to_unit(result.tried[0.0][0]) if glob else None,
            "global_error": result.tried[0.0][1] if glob else None,
        }
        if held_streams:
            held = calibrator.run(policy, held_streams, held_reference)
            row |= {
                "held_out_gflops": target.to_unit(held.gflops),
                "held_out_error": held.error,
                "held_out_global_error": (
                    calibrator.run(result.candidates[0.0], held_streams, held_reference).error
                    if glob
                    else None
                ),
            }
            policy.info |= {"held_out_gflops": row["held_out_gflops"], "held_out_error": held.error}
        policy.info["gflops"] = row["gflops"]
        results.append(row)
        policies.append(policy)
    write_calibration(
        output,
        policies,
        unit=target.unit,
        model=type(network).__name__,
        dense_gflops=dense_unit,
        videos=[str(v) for v in videos[:split]],
        held_out=[str(v) for v in videos[split:]],
    )
    report = {
        "unit": target.unit,
        "dense_gflops": dense_unit,
        "calibration_videos": split,
        "held_out_videos": len(held_streams),
        "output": str(output),
        "results": results,
    }
    print(json.dumps(report) if config.json else format_table(report))
    return report
