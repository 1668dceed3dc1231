"""Wall-clock speed of a ViT-B block stack, dense vs eventful, on incremental frames.

Times a 12-block ViT-B stack (D = 768, 12 heads, MLP ratio 4) in one run,
dense and eventful, on the same steady-state incremental frames of a
synthetic video-like token stream, and compares the measured speedup with
the operation-count ratio (``eventful_pl.counting.count_ops``).

Cases (``--cases``):

- ``a50``, ``a100``: EPIC-Kitchens ViViT spatial model, 20x20 grid plus a
  class token (401 tokens), global attention everywhere, eventful variant
  ``"full"``, top-r with r = 50 / 100, no relative position.
- ``b256``: ViTDet at 672, 42x42 grid (1764 tokens), no class token, relative
  position, 14x14 windows in blocks 0,1,3,4,6,7,9,10 (eventful variant
  ``"tokenwise"``) and global attention in blocks 2,5,8,11 (variant
  ``"full"``), top-r with r = 256.

Usage::

    python benchmarks/block_speed.py
    python benchmarks/block_speed.py --cases a50 b256 --frames 8 --threads 2
    python benchmarks/block_speed.py --device cuda --dtype float16
    python benchmarks/block_speed.py --tune-malloc
    python benchmarks/block_speed.py --cases a50 b256 --frames 3 --profile 15

The target is ``speedup >= 0.6 * op-count ratio`` (column "speedup / ops").
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eventful_pl.backbone import ViTBackbone
from eventful_pl.counting import count_ops
from eventful_pl.policies import TopRPolicy

DIM = 768
DEPTH = 12
HEADS = 12
MLP_RATIO = 4.0
TARGET = 0.6
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    """One benchmark configuration."""

    name: str
    title: str
    grid: tuple[int, int]
    class_token: bool
    r: int
    windowed: bool

    @property
    def num_tokens(self) -> int:
        return int(self.class_token) + self.grid[0] * self.grid[1]


CASES: dict[str, Case] = {
    "a50": Case("a50", "ViViT EPIC 20x20+cls, global, full", (20, 20), True, 50, False),
    "a100": Case("a100", "ViViT EPIC 20x20+cls, global, full", (20, 20), True, 100, False),
    "b256": Case(
        "b256", "ViTDet 672 42x42, win tokenwise + global full", (42, 42), False, 256, True
    ),
}


@dataclass
class Result:
    """Measurements of one case."""

    case: Case
    dense_ms: float
    eventful_ms: float
    dense_ops: int
    eventful_ops: int

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.eventful_ms

    @property
    def op_ratio(self) -> float:
        return self.dense_ops / self.eventful_ops

    @property
    def efficiency(self) -> float:
        return self.speedup / self.op_ratio


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--frames", type=int, default=15, help="timed incremental frames")
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed incremental frames after the flush"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument(
        "--changed", type=float, default=0.1, help="fraction of strongly changed tokens"
    )
    parser.add_argument(
        "--tune-malloc",
        action="store_true",
        help="glibc only: keep freed memory (no mmap, no trim), so large temporaries "
        "do not page-fault on every frame",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="also profile two more eventful incremental frames per case; print the top N ops",
    )
    args = parser.parse_args(argv)
    if args.frames < 1 or args.warmup < 0:
        parser.error("--frames must be >= 1 and --warmup >= 0")
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
    cast = None if dtype == torch.float32 else str(dtype).removeprefix("torch.")
    dense = ViTBackbone(block_variant="dense", **common)
    eventful = ViTBackbone(
        block_variant="full",
        window_block_variant="tokenwise" if case.windowed else None,
        matmul_2_cast=cast,
        policy=TopRPolicy(case.r),
        **common,
    )
    eventful.load_state_dict(dense.state_dict())
    return dense.to(device, dtype).eval(), eventful.to(device, dtype).eval()


def make_frames(
    case: Case, count: int, changed: float, seed: int, dtype: torch.dtype, device: torch.device
) -> list[Tensor]:
    """A video-like stream of patch tokens, each (1, h * w, D).

    Frame t = background + slow global drift + small per-frame noise, with a
    square "object" (about ``changed`` of the tokens) that moves across the
    grid and whose tokens change strongly every frame.
    """
    gen = torch.Generator().manual_seed(seed)
    gh, gw = case.grid
    background = torch.randn(gh, gw, DIM, generator=gen)
    drift = torch.randn(gh, gw, DIM, generator=gen)
    side = max(1, round(math.sqrt(changed * gh * gw)))
    frames = []
    for t in range(count):
        frame = background + 0.01 * t * drift + 0.02 * torch.randn(gh, gw, DIM, generator=gen)
        y, x = (2 * t) % (gh - side + 1), (3 * t) % (gw - side + 1)
        frame[y : y + side, x : x + side] += 1.5 * torch.randn(side, side, DIM, generator=gen)
        frames.append(frame.reshape(1, gh * gw, DIM).to(device, dtype))
    return frames


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(model: Callable[[Tensor], Tensor], x: Tensor, device: torch.device) -> float:
    """Seconds for one ``model(x)`` call."""
    synchronize(device)
    start = time.perf_counter()
    model(x)
    synchronize(device)
    return time.perf_counter() - start


def count_frame(model: ViTBackbone, x: Tensor) -> int:
    """Operations counted for one call (advances an eventful stream by a frame)."""
    with count_ops(model) as counter:
        model(x)
    return counter.total


def benchmark_case(case: Case, args: argparse.Namespace, device: torch.device) -> Result:
    """Flush, warm up, then time dense and eventful on the same incremental frames."""
    dtype = DTYPES[args.dtype]
    # Built outside inference mode: eventful_pl caches position tables only for
    # ordinary (non-inference) parameters.
    dense, eventful = build_models(case, dtype, device)
    count = 1 + args.warmup + args.frames + 1 + (2 if args.profile else 0)
    frames = make_frames(case, count, args.changed, args.seed, dtype, device)
    with torch.inference_mode():
        return run_case(case, dense, eventful, frames, args, device)


def run_case(
    case: Case,
    dense: ViTBackbone,
    eventful: ViTBackbone,
    frames: list[Tensor],
    args: argparse.Namespace,
    device: torch.device,
) -> Result:
    """Runs one case on ``frames`` (flush, warm-up, timed, counted, profiled)."""
    eventful.reset()
    dense(frames[0])
    eventful(frames[0])  # flush
    for x in frames[1 : 1 + args.warmup]:
        dense(x)
        eventful(x)
    dense_times, eventful_times = [], []
    timed_end = 1 + args.warmup + args.frames
    for x in frames[1 + args.warmup : timed_end]:
        dense_times.append(timed(dense, x, device))
        eventful_times.append(timed(eventful, x, device))
    result = Result(
        case,
        1e3 * statistics.median(dense_times),
        1e3 * statistics.median(eventful_times),
        count_frame(dense, frames[timed_end]),
        count_frame(eventful, frames[timed_end]),
    )
    if args.profile:
        print(f"== {case.name}: profile", flush=True)
        profile_incremental(eventful, frames[timed_end + 1 :], args.profile, device)
    return result


def profile_incremental(
    model: ViTBackbone, frames: list[Tensor], top: int, device: torch.device
) -> None:
    """Prints the top ops (self time) of two more incremental frames of ``model``.

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


def format_table(results: list[Result], args: argparse.Namespace) -> str:
    """A markdown table of the results."""
    lines = [
        f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} "
        f"batch=1 timed frames={args.frames} (median) warmup={args.warmup} "
        f"malloc={'tuned' if args.tune_malloc else 'default'} torch={torch.__version__}",
        "",
        "| case | model | tokens | r | dense ms/frame | eventful ms/frame | speedup "
        "| op ratio | speedup / ops | >= 0.6 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for res in results:
        case = res.case
        lines.append(
            f"| {case.name} | {case.title} | {case.num_tokens} | {case.r} "
            f"| {res.dense_ms:.1f} | {res.eventful_ms:.1f} | {res.speedup:.2f}x "
            f"| {res.op_ratio:.2f}x | {res.efficiency:.2f} "
            f"| {'yes' if res.efficiency >= TARGET else 'no'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.tune_malloc:
        tune_malloc()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    results = []
    for name in args.cases:
        start = time.perf_counter()
        res = benchmark_case(CASES[name], args, device)
        results.append(res)
        print(
            f"{name}: dense {res.dense_ms:.1f} ms, eventful {res.eventful_ms:.1f} ms, "
            f"speedup {res.speedup:.2f}x, ops {res.dense_ops / 1e9:.2f} / "
            f"{res.eventful_ops / 1e9:.2f} GMAC = {res.op_ratio:.2f}x "
            f"({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    print()
    print(format_table(results, args))


if __name__ == "__main__":
    main()
