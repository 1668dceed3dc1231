"""Wall-clock speed of whole models, dense vs eventful, as the paper measures them.

- ``vivit_epic``: ViViT-B EPIC-Kitchens (``vivit_b_epic_kitchens``), per video:
  preprocessing, tubelet embedding, the spatial ViT over every view (each
  view one stream: a flush step, then incremental steps), the temporal ViT
  and the classifier. Default shape: 3 x 4 views of 32 frames at 320 x 320
  (16 steps of 401 tokens per view); ``--views`` and ``--frames`` shrink it.
- ``vitdet_672``, ``vitdet_1024``: ViTDet-B ImageNet VID (``vitdet_b_vid_672``,
  ``vitdet_b_vid``), per frame of a stream: preprocessing, patch embedding,
  backbone, feature pyramid and Faster R-CNN head (one stream, steady state).

Dense and eventful models share weights (random: speed does not depend on
them, but the detector's proposal count does not either: its RPN keeps its
top-n proposals) and run on the same synthetic video (a textured background
with a little noise and a moving square). Each row (model x dtype x r) is
measured in ``--rounds`` rounds, dense and eventful interleaved call by call
with alternating order; the table gives the median over rounds and the
spread (min-max). The op ratio is what :func:`eventful_pl.counting.count_ops`
counts over the same call (ViViT: the whole model; ViTDet: the backbone).
The report starts with the machine (``benchmarks/sysinfo.py``).

Usage::

    python benchmarks/model_speed.py                              # paper shapes, float32
    python benchmarks/model_speed.py --dtype float32 bfloat16 --markdown
    python benchmarks/model_speed.py --models vivit_epic --views 1 --frames 8 --rounds 1
    python benchmarks/model_speed.py --models vitdet_672 --r vitdet_672=128,256
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from block_speed import DTYPES, Spread, setup, time_interleaved, timed
from sysinfo import describe, format_info

from eventful_pl.counting import count_ops
from eventful_pl.models.vitdet import create_vitdet
from eventful_pl.models.vivit import create_vivit
from eventful_pl.policies import TopRPolicy


@dataclass(frozen=True)
class ModelSpec:
    """One whole model: preset, kind (``"vivit"``/``"vitdet"``), default r values."""

    name: str
    preset: str
    kind: str
    r_values: tuple[int, ...]
    paper: dict[int, str] = field(default_factory=dict)


MODELS: dict[str, ModelSpec] = {
    "vivit_epic": ModelSpec(
        "vivit_epic",
        "vivit_b_epic_kitchens",
        "vivit",
        (50,),
        {50: "54.5 s -> 21.5 s, 2.53x"},
    ),
    "vitdet_672": ModelSpec(
        "vitdet_672", "vitdet_b_vid_672", "vitdet", (256,), {256: "1492 -> 838 ms, 1.78x"}
    ),
    "vitdet_1024": ModelSpec("vitdet_1024", "vitdet_b_vid", "vitdet", (512,)),
}
PAPER_NOTE = "paper (8-thread Xeon, bfloat16, full shapes)"


@dataclass
class Row:
    """Measurements of one model x dtype x r (ms per video or per frame)."""

    spec: ModelSpec
    dtype: str
    r: int
    shape: str
    dense_ms: Spread = field(default_factory=Spread)
    eventful_ms: Spread = field(default_factory=Spread)
    speedup: Spread = field(default_factory=Spread)
    dense_ops: int = 0
    eventful_ops: int = 0

    @property
    def op_ratio(self) -> float:
        return self.dense_ops / self.eventful_ops

    def add_round(self, dense_ms: float, eventful_ms: float) -> None:
        self.dense_ms.values.append(dense_ms)
        self.eventful_ms.values.append(eventful_ms)
        self.speedup.values.append(dense_ms / eventful_ms)


def parse_r(values: list[str]) -> dict[str, tuple[int, ...]]:
    """``MODEL=R[,R...]`` overrides of the r values."""
    out = {}
    for value in values:
        name, _, rs = value.partition("=")
        if name not in MODELS or not rs:
            raise argparse.ArgumentTypeError(
                f"--r {value!r}: expected MODEL=R[,R...] with MODEL one of {sorted(MODELS)}"
            )
        try:
            out[name] = tuple(int(r) for r in rs.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"--r {value!r}: r values must be integers") from None
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["float32"])
    parser.add_argument(
        "--r",
        nargs="+",
        default=[],
        metavar="MODEL=R[,R]",
        help="r values of a model (default: "
        + ", ".join(f"{m.name}={','.join(map(str, m.r_values))}" for m in MODELS.values())
        + ")",
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds per row (median, spread)")
    parser.add_argument("--views", type=int, default=12, help="ViViT views (12 = 3 x 4)")
    parser.add_argument("--frames", type=int, default=32, help="ViViT frames per view (even)")
    parser.add_argument(
        "--detector-frames", type=int, default=5, help="ViTDet timed frames per round"
    )
    parser.add_argument("--warmup", type=int, default=1, help="ViTDet untimed frames per round")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--tune-malloc", action="store_true", help="see block_speed.py")
    parser.add_argument("--markdown", action="store_true", help="machine and table as markdown")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        args.r_values = parse_r(args.r)
    except argparse.ArgumentTypeError as err:
        parser.error(str(err))
    if args.rounds < 1 or args.views < 1 or args.detector_frames < 1 or args.warmup < 0:
        parser.error("--rounds, --views and --detector-frames must be >= 1, --warmup >= 0")
    if args.frames < 2 or args.frames % 2:
        parser.error(f"--frames must be an even number >= 2 (tubelets of 2), got {args.frames}")
    return args


def synthetic_video(frames: int, height: int, width: int, seed: int) -> Tensor:
    """A video-like uint8 clip (T, 3, H, W): a smooth textured background with
    a little per-frame noise and a square (1/5 of the height) moving across it."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, max(2, height // 16), max(2, width // 16), generator=gen)
    background = F.interpolate(coarse, size=(height, width), mode="bilinear")[0] * 200 + 20
    side = max(4, height // 5)
    square = torch.rand(3, side, side, generator=gen) * 255
    video = background.expand(frames, -1, -1, -1).clone()
    video += 4 * torch.randn(video.shape, generator=gen)
    for t in range(frames):  # setup only, outside the timed calls
        y = (height - side) // 2 + int((height - side) // 3 * torch.sin(torch.tensor(t / 7.0)))
        x = (4 * t) % (width - side)
        video[t, :, y : y + side, x : x + side] = square
    return video.clamp_(0, 255).to(torch.uint8)


def vivit_views(args: argparse.Namespace) -> tuple[int, int]:
    """(spatial, temporal) views of ``--views``: 12 -> 3 x 4, else 1 x V."""
    return (3, 4) if args.views == 12 else (1, args.views)


def build_pair(
    spec: ModelSpec, dtype: torch.dtype, args: argparse.Namespace, device: torch.device
) -> tuple[nn.Module, nn.Module]:
    """Dense and eventful models of ``spec`` with the same weights, in eval mode."""
    torch.manual_seed(args.seed)
    if spec.kind == "vivit":
        spatial, temporal = vivit_views(args)
        options = dict(
            frames=args.frames,
            spatial_views=spatial,
            temporal_views=temporal,
            dtype=dtype,
        )
        dense = create_vivit(spec.preset, spatial_variant="dense", **options)
        eventful = create_vivit(
            spec.preset, spatial_variant="full", policy=TopRPolicy(spec.r_values[0]), **options
        )
    else:
        dense = create_vitdet(spec.preset, variant="dense", dtype=dtype)
        eventful = create_vitdet(
            spec.preset, variant="eventful", policy=TopRPolicy(spec.r_values[0]), dtype=dtype
        )
    eventful.load_state_dict(dense.state_dict())
    return dense.to(device).eval(), eventful.to(device).eval()


def counted(model: nn.Module, call: Callable[[], object]) -> int:
    """Operations counted over one ``call()`` of ``model``."""
    with count_ops(model) as counter:
        call()
    return counter.total


def run_vivit(
    rows: list[Row], dense: nn.Module, eventful: nn.Module, video: Tensor, args, device
) -> None:
    """One video per model per r and round, interleaved (which model goes first
    alternates from round to round)."""
    for k in range(args.rounds):
        for row in rows:
            eventful.set_policy(TopRPolicy(row.r))
            if k % 2 == 0:
                dense_s = timed(dense, (video,), device)
                eventful_s = timed(eventful, (video,), device)
            else:
                eventful_s = timed(eventful, (video,), device)
                dense_s = timed(dense, (video,), device)
            row.add_round(1e3 * dense_s, 1e3 * eventful_s)
    for row in rows:
        eventful.set_policy(TopRPolicy(row.r))
        row.dense_ops = counted(dense, lambda: dense(video))
        row.eventful_ops = counted(eventful, lambda: eventful(video))


def run_vitdet(
    rows: list[Row], dense: nn.Module, eventful: nn.Module, frames: Tensor, args, device
) -> None:
    """Per round and r: a new stream (flush), warm-up, then timed frames with
    dense and eventful interleaved."""
    timed_start = 1 + args.warmup
    for _ in range(args.rounds):
        for row in rows:
            eventful.set_policy(TopRPolicy(row.r))
            eventful.reset()
            for frame in frames[:timed_start]:
                dense([frame])
                eventful([frame])
            inputs = (([frame],) for frame in frames[timed_start:-1])
            dense_s, eventful_s = time_interleaved((dense, eventful), inputs, device)
            row.add_round(1e3 * dense_s, 1e3 * eventful_s)
            # Counted on one more frame of the same stream (steady state).
            row.dense_ops = counted(dense, lambda: dense([frames[-1]]))
            row.eventful_ops = counted(eventful, lambda: eventful([frames[-1]]))


def benchmark(args: argparse.Namespace, device: torch.device) -> list[Row]:
    rows: list[Row] = []
    for dtype_name in args.dtype:
        for name in args.models:
            spec = MODELS[name]
            r_values = args.r_values.get(name, spec.r_values)
            spec = ModelSpec(spec.name, spec.preset, spec.kind, r_values, spec.paper)
            start = time.perf_counter()
            dense, eventful = build_pair(spec, DTYPES[dtype_name], args, device)
            if spec.kind == "vivit":
                spatial, temporal = vivit_views(args)
                size = dense.preprocessing.size
                length = args.frames * temporal
                video = synthetic_video(length, size[0], size[1] * 4 // 3, args.seed)[None]
                shape = (
                    f"video: {spatial}x{temporal} views x {args.frames} frames, "
                    f"{size[0]}x{size[1]} crops"
                )
                video = video.to(device)
            else:
                side = dense.preprocessing.image_size
                count = 1 + args.warmup + args.detector_frames + 1
                video = synthetic_video(count, round(side * 0.625), side, args.seed).to(device)
                shape = f"frame: {video.shape[-2]}x{video.shape[-1]} -> {side} padded"
            rows_here = [Row(spec, dtype_name, r, shape) for r in r_values]
            with torch.inference_mode():
                run = run_vivit if spec.kind == "vivit" else run_vitdet
                run(rows_here, dense, eventful, video, args, device)
            for row in rows_here:
                print(
                    f"{name} {dtype_name} r={row.r}: dense {row.dense_ms.format(0)} ms, "
                    f"eventful {row.eventful_ms.format(0)} ms, speedup "
                    f"{row.speedup.format(2, 'x')}, op ratio {row.op_ratio:.2f}x",
                    flush=True,
                )
            print(f"({time.perf_counter() - start:.0f} s)", flush=True)
            rows.extend(rows_here)
            del dense, eventful
    return rows


def format_table(rows: list[Row], args: argparse.Namespace) -> str:
    lines = [
        f"device={args.device} threads={torch.get_num_threads()} rounds={args.rounds} "
        f"ViTDet timed frames/round={args.detector_frames} warmup={args.warmup}; "
        "median over rounds (min-max); ms per video (ViViT) or per frame (ViTDet)",
        "",
        "| model | measured per | dtype | r | dense ms | eventful ms | speedup | op ratio "
        f"| speedup / ops | {PAPER_NOTE} |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.spec.name} | {row.shape} | {row.dtype} | {row.r} "
            f"| {row.dense_ms.format(0)} | {row.eventful_ms.format(0)} "
            f"| {row.speedup.format(2, 'x')} | {row.op_ratio:.2f}x "
            f"| {row.speedup.median / row.op_ratio:.2f} | {row.spec.paper.get(row.r, '')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = setup(args)
    print(format_info(describe(device), args.markdown), flush=True)
    print(flush=True)
    rows = benchmark(args, device)
    print()
    print(format_table(rows, args))


if __name__ == "__main__":
    main()
