"""The ``count`` command: GFlops of a configuration, by kind, dense and per r / threshold.

    python cli.py count --config configs/vitdet/vid.yaml --config configs/vitdet/vid/672.yaml \
        --r 128 256 512
    python cli.py count --config configs/vivit/kinetics400.yaml --r 24 48 96 --json
    python cli.py count --config my_fit_config.yaml --thresholds 0.2 1.0 --video clip.mp4

It reads the ``fit`` configs themselves (several ``--config``: later files
override earlier ones, as for ``fit``). The ``model`` section names the
network (``FactorizedViViT``, ``ViTDet``) or a LightningModule holding it as
``.model``; the other sections (``trainer``, ``data``, ...) are ignored.
ViViT is counted per video (all views, spatial + temporal + classifier),
ViTDet per frame (backbone only; first frame, later frames and their average
over ``--video_length`` frames). Thresholds depend on content and need
``--video`` (any file decord reads).

Rows: ``dense (base model)`` is the base model (dense blocks, for ViTDet no
key/value pooling); a gate-free model that differs from it (ViTDet
``spatial``: pooled keys/values) also gets its own row, ``spatial (model)``.
Top-r of a ViTDet with pooled eventful attention (``spatiotemporal``) depends
on where the updates are: with ``--video`` it is measured on the clip,
otherwise counted on random tokens (flagged below the table).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

import torch
from jsonargparse import ActionConfigFile, ArgumentParser
from jsonargparse.typing import PositiveInt
from torch import nn

from eventful_pl.counting import OP_KINDS
from eventful_pl.models.gflops import count_vitdet, count_vivit
from eventful_pl.models.vitdet import ViTDet
from eventful_pl.models.vivit import FactorizedViViT

#: Sections of a LightningCLI config that counting ignores.
_IGNORED_SECTIONS = ("trainer", "data", "optimizer", "lr_scheduler", "ckpt_path", "seed_everything")


def build_parser(prog: str = "cli.py count") -> ArgumentParser:
    """The ``count`` options; ``--config`` may be given several times."""
    parser = ArgumentParser(
        prog=prog,
        description="Operation counts (GFlops) of a model configuration, by kind.",
    )
    parser.add_argument(
        "--config",
        action=ActionConfigFile,
        help="YAML config with a model (a fit config); repeat to add overlays",
    )
    parser.add_subclass_arguments(nn.Module, "model", required=True, instantiate=True)
    parser.add_argument(
        "--r", type=PositiveInt, nargs="+", default=[], help="top-r values to count (> 0)"
    )
    parser.add_argument("--thresholds", type=float, nargs="+", default=[], help="thresholds h")
    parser.add_argument(
        "--video", type=str | None, default=None, help="video file for threshold counts"
    )
    parser.add_argument(
        "--video_length",
        type=PositiveInt | None,
        default=None,
        help="ViTDet: frames per video for the average, > 0 (default: --video's length, else 100)",
    )
    parser.add_argument("--no_dense", action="store_true", help="skip the dense setting")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_ignored_sections(parser)
    return parser


def add_ignored_sections(
    parser: ArgumentParser, sections: Sequence[str] = _IGNORED_SECTIONS
) -> None:
    """Accepts (and ignores) the config ``sections`` a model-only command does
    not use, so the ``fit`` configs can be given to it unchanged."""
    for section in sections:
        parser.add_argument(
            f"--{section}",
            type=dict | list | str | float | bool | None,
            default=None,
            help="ignored",
        )


def network_of(model: nn.Module) -> nn.Module:
    """The network to count: the model itself, or a LightningModule's ``.model``."""
    if isinstance(model, FactorizedViViT | ViTDet):
        return model
    inner = getattr(model, "model", None)
    if isinstance(inner, FactorizedViViT | ViTDet):
        return inner
    raise ValueError(
        f"model: cannot count {type(model).__name__}; expected FactorizedViViT, ViTDet, or a "
        "LightningModule holding one as .model"
    )


def _read_video(path: str) -> torch.Tensor:
    """All frames of a video file, (T, 3, H, W) uint8."""
    import decord

    try:
        reader = decord.VideoReader(path)
        frames = reader.get_batch(list(range(len(reader)))).asnumpy()
    except (RuntimeError, decord.DECORDError) as error:
        raise ValueError(f"--video: cannot read {path}: {error}") from error
    return torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()


def count_report(
    network: nn.Module,
    r_values: Sequence[int] = (),
    thresholds: Sequence[float] = (),
    video: torch.Tensor | None = None,
    video_length: int | None = None,
    include_dense: bool = True,
) -> dict[str, Any]:
    """The report of :func:`count_vivit` or :func:`count_vitdet` for ``network``.

    ``video``: (T, 3, H, W) uint8 frames (needed for thresholds). ViTDet:
    ``video_length`` frames per video for the static averages (default: the
    video's length); thresholds average over ``video``'s frames.
    """
    network = network.eval()
    if isinstance(network, FactorizedViViT):
        return count_vivit(
            network,
            r_values,
            thresholds,
            video=None if video is None else video[None],
            include_dense=include_dense,
        )
    return count_vitdet(
        network,
        r_values,
        thresholds,
        video=video,
        video_length=video_length,
        include_dense=include_dense,
    )


#: Table labels of the settings' roles.
_ROLE_LABELS = {"base": "base model", "model": "model"}


def setting_label(setting: dict[str, Any]) -> str:
    """A setting's name, with its role: ``dense (base model)``, ``spatial (model)``."""
    role = _ROLE_LABELS.get(setting.get("role"))
    return f"{setting['name']} ({role})" if role else setting["name"]


def format_table(report: dict[str, Any]) -> str:
    """A plain-text table of a count report."""
    per_frame = report["per"] == "frame"
    kinds = [k for k in OP_KINDS if any(s["by_kind"][k] for s in report["settings"])]
    header = ["setting", "total"] + (["first", "later"] if per_frame else []) + kinds
    rows = [header]
    for s in report["settings"]:
        row = [setting_label(s), f"{s['total']:.3f}"]
        if per_frame:
            row += [f"{s['first_frame']:.3f}", f"{s['later_frame']:.3f}"]
        rows.append(row + [f"{s['by_kind'][k]:.3f}" for k in kinds])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in rows]
    title = f"{report['unit']} per {report['per']}"
    if per_frame:
        title += f" (total: average over a video of {report.get('video_length', '?')} frames)"
    notes = []
    measured = [s["name"] for s in report["settings"] if s.get("measured_on") == "video"]
    if measured and report.get("video_frames") is not None:
        notes.append(
            f"{', '.join(measured)}: measured on the video "
            f"(average over its {report['video_frames']} frames)"
        )
    guessed = [s["name"] for s in report["settings"] if s.get("measured_on") == "random tokens"]
    if guessed:
        notes.append(
            f"{', '.join(guessed)}: pooled eventful attention, whose cost depends on where "
            "the updates are; counted on random tokens (updates all over the frame). "
            "Pass --video for a real clip's count."
        )
    return "\n".join([title, *lines, *(f"note: {n}" for n in notes)])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the command; prints a table (or JSON with ``--json``) and returns the report."""
    parser = build_parser()
    config = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    init = parser.instantiate(config)
    network = network_of(init.model)
    video = _read_video(config.video) if config.video else None
    length = config.video_length or (len(video) if video is not None else 100)
    with torch.no_grad():
        report = count_report(
            network,
            config.r,
            config.thresholds,
            video=video,
            video_length=length,
            include_dense=not config.no_dense,
        )
    if report["per"] == "frame":
        report["video_length"] = length
        if video is not None:
            report["video_frames"] = len(video)
    print(json.dumps(report) if config.json else format_table(report))
    return report
