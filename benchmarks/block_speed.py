"""Wall-clock speed of a ViT-B block stack, dense vs eventful, on incremental frames.

Times a 12-block ViT-B stack (D = 768, 12 heads, MLP ratio 4), dense and
eventful with the same weights, on the same steady-state incremental frames
of a synthetic video-like token stream, and compares the measured speedup
with the operation-count ratio (``eventful_pl.counting.count_ops``).

Cases (``--cases``):

- ``a50``, ``a100``: EPIC-Kitchens ViViT spatial model, 20x20 grid plus a
  class token (401 tokens), global attention everywhere, eventful variant
  ``"full"``, top-r with r = 50 / 100, no relative position.
- ``b256``: ViTDet at 672, 42x42 grid (1764 tokens), no class token, relative
  position, 14x14 windows in blocks 0,1,3,4,6,7,9,10 (eventful variant
  ``"tokenwise"``) and global attention in blocks 2,5,8,11 (variant
  ``"full"``), top-r with r = 256.

Method: the report starts with the machine (``benchmarks/sysinfo.py``). Each
row (case x dtype x streams) is measured in ``--rounds`` rounds; a round
starts new streams (flush), runs ``--warmup`` untimed incremental frames,
then times ``--frames`` incremental frames, dense and eventful alternating
frame by frame (which of the two goes first alternates too), and keeps the
median of each. The table gives the median over rounds and the spread
(min-max over rounds). With ``--streams B``, B independent streams run in one
forward (batch B, one frame of each): ms per step, frames/s per stream
(1000 / ms) and in total (B x that).

Usage::

    python benchmarks/block_speed.py
    python benchmarks/block_speed.py --cases a50 b256 --rounds 3 --frames 10 --markdown
    python benchmarks/block_speed.py --cases a50 --dtype float32 bfloat16 --streams 1 2 4 8 16
    python benchmarks/block_speed.py --cases a50 a100 b256 --dtype float32 bfloat16 \
        --streams 1 2 4 8 16 --streams-cases a50 --markdown
    python benchmarks/block_speed.py --device cuda --dtype float16
    python benchmarks/block_speed.py --cases a50 b256 --rounds 1 --frames 3 --profile 15

The targets are in column "target" (speedup / op ratio).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sysinfo import describe, format_info, memory_read_bandwidth

from eventful_pl import kernels, linear
from eventful_pl.backbone import ViTBackbone
from eventful_pl.counting import count_ops
from eventful_pl.policies import TopRPolicy

DIM = 768
DEPTH = 12
HEADS = 12
MLP_RATIO = 4.0
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    """One benchmark configuration (``target``: the goal for speedup / op ratio)."""

    name: str
    title: str
    grid: tuple[int, int]
    class_token: bool
    r: int
    windowed: bool
    target: float

    @property
    def num_tokens(self) -> int:
        return int(self.class_token) + self.grid[0] * self.grid[1]


CASES: dict[str, Case] = {
    "a50": Case("a50", "ViViT EPIC 20x20+cls, global, full", (20, 20), True, 50, False, 0.65),
    "a100": Case("a100", "ViViT EPIC 20x20+cls, global, full", (20, 20), True, 100, False, 0.65),
    "b256": Case(
        "b256",
        "ViTDet 672 42x42, win tokenwise + global full",
        (42, 42),
        False,
        256,
        True,
        0.75,
    ),
}


@dataclass
class Spread:
    """Per-round values of one quantity: median and min-max over rounds."""

    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def format(self, digits: int = 1, suffix: str = "") -> str:
        """``median (min-max)``, or just the median with one round."""
        text = f"{self.median:.{digits}f}{suffix}"
        if len(self.values) > 1:
            text += f" ({min(self.values):.{digits}f}-{max(self.values):.{digits}f})"
        return text


@dataclass
class Row:
    """Measurements of one case x dtype x streams (times in ms per step of B frames)."""

    case: Case
    dtype: str
    streams: int
    dense_ms: Spread = field(default_factory=Spread)
    eventful_ms: Spread = field(default_factory=Spread)
    speedup: Spread = field(default_factory=Spread)
    dense_ops: int = 0
    eventful_ops: int = 0
    weight_bytes: int = 0

    @property
    def op_ratio(self) -> float:
        return self.dense_ops / self.eventful_ops

    @property
    def efficiency(self) -> float:
        return self.speedup.median / self.op_ratio

    def add_round(self, dense_ms: float, eventful_ms: float) -> None:
        self.dense_ms.values.append(dense_ms)
        self.eventful_ms.values.append(eventful_ms)
        self.speedup.values.append(dense_ms / eventful_ms)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument(
        "--dtype",
        nargs="+",
        choices=sorted(DTYPES),
        default=["float32"],
        help="precision of weights and activations (one row per dtype)",
    )
    parser.add_argument(
        "--streams",
        nargs="+",
        type=int,
        default=[1],
        metavar="B",
        help="independent streams per forward (one row per B)",
    )
    parser.add_argument(
        "--streams-cases",
        nargs="+",
        choices=sorted(CASES),
        default=None,
        metavar="CASE",
        help="cases that get the --streams rows (default: all; the others run B = 1 only)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds per row (median, spread)")
    parser.add_argument("--frames", type=int, default=10, help="timed frames per round")
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed incremental frames after each flush"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--changed", type=float, default=0.1, help="fraction of strongly changed tokens"
    )
    parser.add_argument(
        "--tune-malloc",
        action="store_true",
        help="glibc only: keep freed memory (no mmap, no trim), so large temporaries "
        "do not page-fault on every frame",
    )
    parser.add_argument(
        "--no-fused-kernels", action="store_true", help="eventful_pl's fused CPU kernels off"
    )
    parser.add_argument(
        "--no-prepacked-linear", action="store_true", help="pre-packed oneDNN linears off"
    )
    parser.add_argument("--markdown", action="store_true", help="machine and table as markdown")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="also profile two more eventful incremental frames per row; print the top N ops",
    )
    args = parser.parse_args(argv)
    if args.frames < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error("--frames and --rounds must be >= 1 and --warmup >= 0")
    if any(b < 1 for b in args.streams):
        parser.error(f"--streams must be >= 1, got {args.streams}")
    return args


def tune_malloc() -> None:
    """Stops glibc from mmapping large blocks and trimming the heap.

    By default every temporary over 32 MiB (e.g. a 1764 x 1764 x 12 logits
    tensor) is a fresh mmap whose pages fault in again on every frame.
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    m_trim_threshold, m_mmap_max = -1, -4
    if not (libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2**31 - 1)):
        raise SystemExit("--tune-malloc: mallopt failed (not glibc?)")


def setup(args: argparse.Namespace) -> torch.device:
    """Applies the process-wide options (threads, malloc, fast paths); returns the device."""
    if getattr(args, "tune_malloc", False):
        tune_malloc()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if getattr(args, "no_fused_kernels", False):
        kernels.set_fused_kernels(False)
    if getattr(args, "no_prepacked_linear", False):
        linear.set_prepacked_linear(False)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available; run with --device cpu")
    torch.manual_seed(args.seed)
    return torch.device(args.device)


def build_models(
    case: Case, dtype: torch.dtype, device: torch.device
) -> tuple[ViTBackbone, ViTBackbone]:
    """Dense and eventful backbones of ``case`` with the same weights, in eval mode."""
    common = dict(
        dim=DIM,
        depth=DEPTH,
        heads=HEADS,
        mlp_ratio=MLP_RATIO,
        input_size=case.grid,
        class_token=case.class_token,
    )
    if case.windowed:
        common.update(
            window_size=14,
            window_block_indices=(0, 1, 3, 4, 6, 7, 9, 10),
            relative_embedding_size=case.grid[0],
        )
    dense = ViTBackbone(block_variant="dense", dtype=dtype, **common)
    eventful = ViTBackbone(
        block_variant="full",
        window_block_variant="tokenwise" if case.windowed else None,
        policy=TopRPolicy(case.r),
        dtype=dtype,
        **common,
    )
    eventful.load_state_dict(dense.state_dict())
    return dense.to(device).eval(), eventful.to(device).eval()


class FrameStream:
    """A video-like stream of patch tokens for B independent streams.

    Frame t of stream s = background_s + slow global drift_s + small per-frame
    noise, with a square "object" (about ``changed`` of the tokens) that moves
    across the grid and whose tokens change strongly every frame. Frames are
    made on demand (the same for the same seed, stream and t): (B, h * w, D).
    """

    def __init__(
        self,
        grid: tuple[int, int],
        streams: int,
        changed: float,
        seed: int,
        dtype: torch.dtype,
        device: torch.device,
        dim: int = DIM,
    ) -> None:
        self.grid, self.streams, self.dim = grid, streams, dim
        self.seed, self.dtype, self.device = seed, dtype, device
        gen = torch.Generator().manual_seed(seed)
        gh, gw = grid
        self.background = torch.randn(streams, gh, gw, dim, generator=gen)
        self.drift = torch.randn(streams, gh, gw, dim, generator=gen)
        self.side = max(1, round(math.sqrt(changed * gh * gw)))

    def frame(self, t: int) -> Tensor:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + t + 1)
        gh, gw = self.grid
        frame = self.background + 0.01 * t * self.drift
        frame += 0.02 * torch.randn(frame.shape, generator=gen)
        side = self.side
        for s in range(self.streams):  # setup only, outside the timed calls
            y = (2 * t + 5 * s) % (gh - side + 1)
            x = (3 * t + 7 * s) % (gw - side + 1)
            frame[s, y : y + side, x : x + side] += 1.5 * torch.randn(
                side, side, self.dim, generator=gen
            )
        return frame.reshape(self.streams, gh * gw, self.dim).to(self.device, self.dtype)

    def frames(self, start: int, count: int) -> Iterator[Tensor]:
        return (self.frame(t) for t in range(start, start + count))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(model: Callable[..., object], args: Sequence[object], device: torch.device) -> float:
    """Seconds for one ``model(*args)`` call."""
    synchronize(device)
    start = time.perf_counter()
    model(*args)
    synchronize(device)
    return time.perf_counter() - start


def time_interleaved(
    models: tuple[Callable[..., object], Callable[..., object]],
    inputs: Iterator[Sequence[object]],
    device: torch.device,
) -> tuple[float, float]:
    """Median seconds of each of two models over the same inputs, alternating
    call by call (and which goes first, input by input)."""
    times: tuple[list[float], list[float]] = ([], [])
    for i, args in enumerate(inputs):
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for k in order:
            times[k].append(timed(models[k], args, device))
    return statistics.median(times[0]), statistics.median(times[1])


def count_frame(model: ViTBackbone, x: Tensor) -> int:
    """Operations counted for one call (advances an eventful stream by a frame)."""
    with count_ops(model) as counter:
        model(x)
    return counter.total


def run_round(
    row: Row,
    dense: ViTBackbone,
    eventful: ViTBackbone,
    stream: FrameStream,
    args: argparse.Namespace,
    device: torch.device,
    last: bool,
) -> None:
    """One round of ``row``: flush, warm-up, interleaved timed frames (and, in
    the last round, the operation counts and the optional profile)."""
    eventful.reset()
    x = stream.frame(0)
    dense(x)
    eventful(x)  # flush
    for x in stream.frames(1, args.warmup):
        dense(x)
        eventful(x)
    start = 1 + args.warmup
    inputs = ((x,) for x in stream.frames(start, args.frames))
    dense_s, eventful_s = time_interleaved((dense, eventful), inputs, device)
    row.add_round(1e3 * dense_s, 1e3 * eventful_s)
    if last:
        x = stream.frame(start + args.frames)
        row.dense_ops = count_frame(dense, x)
        row.eventful_ops = count_frame(eventful, x)
        if args.profile:
            print(f"== {row.case.name} {row.dtype} B={row.streams}: profile", flush=True)
            frames = list(stream.frames(start + args.frames + 1, 2))
            profile_calls(eventful, frames, args.profile, device)


def benchmark(args: argparse.Namespace, device: torch.device) -> list[Row]:
    """Every row of the table (see the module docstring for the method)."""
    rows = []
    for dtype_name in args.dtype:
        dtype = DTYPES[dtype_name]
        for name in args.cases:
            case = CASES[name]
            # Built outside inference mode: eventful_pl caches position tables
            # only for ordinary (non-inference) parameters.
            dense, eventful = build_models(case, dtype, device)
            counts = args.streams
            if args.streams_cases is not None and name not in args.streams_cases:
                counts = [1]
            weights = sum(
                m.weight.numel() * m.weight.element_size()
                for m in eventful.modules()
                if isinstance(m, torch.nn.Linear)
            )
            case_rows = [Row(case, dtype_name, b, weight_bytes=weights) for b in counts]
            streams = [
                FrameStream(case.grid, b, args.changed, args.seed, dtype, device) for b in counts
            ]
            start = time.perf_counter()
            with torch.inference_mode():
                for k in range(args.rounds):
                    for row, stream in zip(case_rows, streams, strict=True):
                        run_round(row, dense, eventful, stream, args, device, k == args.rounds - 1)
            for row in case_rows:
                print(
                    f"{name} {dtype_name} B={row.streams}: dense {row.dense_ms.format()} ms, "
                    f"eventful {row.eventful_ms.format()} ms, speedup "
                    f"{row.speedup.format(2, 'x')}, ops {row.dense_ops / 1e9:.2f} / "
                    f"{row.eventful_ops / 1e9:.2f} GMAC = {row.op_ratio:.2f}x",
                    flush=True,
                )
            print(f"({time.perf_counter() - start:.0f} s)", flush=True)
            rows.extend(case_rows)
            del dense, eventful
    return rows


def profile_calls(
    model: Callable[[Tensor], object], frames: list[Tensor], top: int, device: torch.device
) -> None:
    """Prints the top ops (self time) of two more calls of ``model``.

    The first profile is by op only; the second adds input shapes
    (``record_shapes=True``), which tells which line of eventful_pl an op
    comes from but, on CPU, inflates the self time of some large ops.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for x, shapes in zip(frames, (False, True), strict=True):
        with profile(activities=activities, record_shapes=shapes) as prof:
            model(x)
            synchronize(device)
        table = prof.key_averages(group_by_input_shape=shapes).table(
            sort_by=sort_by, row_limit=top, max_name_column_width=40, max_shapes_column_width=70
        )
        print(f"eventful incremental frame, record_shapes={shapes}:\n{table}", flush=True)


def method_line(args: argparse.Namespace) -> str:
    """One line stating how the numbers were taken."""
    return (
        f"device={args.device} threads={torch.get_num_threads()} rounds={args.rounds} "
        f"timed frames/round={args.frames} warmup={args.warmup} changed={args.changed} "
        f"malloc={'tuned' if args.tune_malloc else 'default'}; per round the median "
        "of interleaved dense/eventful frames; table: median over rounds (min-max)"
    )


def format_table(rows: list[Row], args: argparse.Namespace, read_gbs: float) -> str:
    """A markdown table of the rows; ``read_gbs``: the memory read rate (GB/s)
    that gives the weight-streaming bound (every linear weight read once per step)."""
    lines = [
        method_line(args),
        f"weight bound: linear weights / memory read rate ({read_gbs:.1f} GB/s, measured "
        "before the run): the least time a step that reads every weight from memory takes",
        "",
        "| case | dtype | streams | tokens | r | dense ms/step | eventful ms/step | speedup "
        "| op ratio | speedup / ops | target | eventful frames/s per stream | total "
        "| weights MB | weight bound ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        case = row.case
        per_stream = 1e3 / row.eventful_ms.median
        met = "yes" if row.efficiency >= case.target else "no"
        lines.append(
            f"| {case.name} | {row.dtype} | {row.streams} | {case.num_tokens} | {case.r} "
            f"| {row.dense_ms.format()} | {row.eventful_ms.format()} "
            f"| {row.speedup.format(2, 'x')} | {row.op_ratio:.2f}x | {row.efficiency:.2f} "
            f"| {case.target:.2f} {met} | {per_stream:.2f} | {row.streams * per_stream:.2f} "
            f"| {row.weight_bytes / 1e6:.0f} | {row.weight_bytes / 1e6 / read_gbs:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = setup(args)
    print(format_info(describe(device), args.markdown), flush=True)
    print(flush=True)
    read_gbs = memory_read_bandwidth()
    rows = benchmark(args, device)
    print()
    print(format_table(rows, args, read_gbs))


if __name__ == "__main__":
    main()
