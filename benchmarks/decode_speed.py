"""Decode throughput (frames/s) of the Kinetics-400 loader: train clips, eval clips, raw decord.

Writes (unless ``--root`` already holds one) a synthetic Kinetics-400 layout
with real h264 mp4 clips (:func:`datamodules.synthetic_video.make_kinetics`:
``annotations/{train,val}.csv``, ``{train,val}/<ytid>_<start>_<end>.mp4``) and
measures in one run, for each ``--workers`` count:

- ``train``: :class:`datamodules.kinetics.KineticsDataModule` train loader,
  ``frames=32, stride=2, crop_size=224`` (random clip, random resized crop,
  flip), frames delivered per second (32 per clip);
- ``eval``: its val loader, whole clips, short side 224, batch size 1,
  frames delivered per second;
- ``raw decord``: :func:`datamodules.video.read_frames` of every frame of each
  val clip at its decoded size (open + decode, no resize, no collation, no
  transfer between processes), in the main process (0) or a spawn
  ``multiprocessing.Pool`` of that many processes: the ceiling.

Worker start-up is not timed: DataLoader workers start with the data module's
default start method (``"spawn"``), which costs seconds per loader. The train
loader (persistent workers) runs ``--warmup`` batches first, then one whole
epoch is timed on the already running workers; the val loader (workers not
persistent) is timed from its first batch on (``--warmup`` batches untimed);
the raw pool is started and warmed up before timing. Every case reads a clip
once before timing (warm-up).

Usage::

    python benchmarks/decode_speed.py
    python benchmarks/decode_speed.py --quick
    python benchmarks/decode_speed.py --workers 0 1 2 --batch-size 8
    python benchmarks/decode_speed.py --size 320x240 --frames 64 --videos-per-class 4
    python benchmarks/decode_speed.py --root /tmp/k400-bench  # generated once, then reused
    python benchmarks/decode_speed.py --root /data/kinetics400 --max-clips 64
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import decord
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.kinetics import KineticsDataModule, find_annotation_file
from datamodules.video import open_video, read_frames

FRAMES = 32
STRIDE = 2
CROP = 224


@dataclass
class Row:
    """One measured case."""

    case: str
    workers: int
    clips: int
    frames: int
    seconds: float

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else float("nan")


def parse_size(text: str) -> tuple[int, int]:
    """``"WxH"`` -> (H, W), both even."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WxH, e.g. 340x256, got {text!r}") from None
    if width < 2 or height < 2 or width % 2 or height % 2:
        raise argparse.ArgumentTypeError(f"width and height must be even and >= 2, got {text!r}")
    return height, width


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--root",
        type=Path,
        default=None,
        help="dataset root: used as is if it holds annotations/train.csv (or another "
        "Kinetics layout), else generated there (default: a temporary folder, removed)",
    )
    parser.add_argument(
        "--size", type=parse_size, default=None, help="generated frame size WxH (340x256)"
    )
    parser.add_argument(
        "--frames", type=int, default=None, help="generated frames per clip, plus 0..4 (96)"
    )
    parser.add_argument(
        "--videos-per-class",
        type=int,
        default=None,
        help="generated clips per class (4 classes) and split (8)",
    )
    parser.add_argument("--codec", choices=["h264", "mpeg4"], default="h264")
    parser.add_argument(
        "--workers", type=int, nargs="+", default=None, help="num_workers values (0 2)"
    )
    parser.add_argument("--batch-size", type=int, default=4, help="training clips per batch")
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed batches (clips for raw) per case"
    )
    parser.add_argument("--decode-threads", type=int, default=1, help="decord threads per reader")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads of the main process"
    )
    parser.add_argument(
        "--max-clips",
        type=int,
        default=None,
        help="at most this many clips per case (train: train_limit; eval/raw: the first "
        "clips of the val split)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small fast run: 160x120, 64 frames, 2 clips per class and split",
    )
    args = parser.parse_args(argv)
    quick = args.quick
    if args.size is None:
        args.size = (120, 160) if quick else (256, 340)
    if args.frames is None:
        args.frames = 64 if quick else 96
    if args.videos_per_class is None:
        args.videos_per_class = 2 if quick else 8
    if args.workers is None:
        args.workers = [0, 2]
    if args.frames < 1 or args.videos_per_class < 1 or args.batch_size < 1:
        parser.error("--frames, --videos-per-class and --batch-size must be >= 1")
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first batch includes worker start-up)")
    if min(args.workers) < 0:
        parser.error("--workers must be >= 0")
    if args.max_clips is not None and args.max_clips <= args.warmup:
        parser.error("--max-clips must exceed --warmup")
    return args


# ---------------------------------------------------------------------------- dataset


def has_dataset(root: Path) -> bool:
    try:
        find_annotation_file(root, "train")
        find_annotation_file(root, "val")
    except FileNotFoundError:
        return False
    return True


def generate(root: Path, args: argparse.Namespace) -> None:
    from datamodules.synthetic_video import make_kinetics

    height, width = args.size
    print(
        f"generating {4 * args.videos_per_class} clips per split ({width}x{height}, "
        f"{args.frames}+ frames, {args.codec}) in {root} ...",
        flush=True,
    )
    start = time.perf_counter()
    make_kinetics(root, args.videos_per_class, args.frames, args.size, args.seed, codec=args.codec)
    print(f"generated in {time.perf_counter() - start:.1f} s", flush=True)


def describe(data: KineticsDataModule) -> str:
    """Clips, frame size, frames per clip and file size of the val split."""
    items = data.datasets["val"].items
    lengths, sizes, shapes = [], [], set()
    for item in items:
        reader = open_video(item.path)
        lengths.append(len(reader))
        shapes.add(reader[0].shape)
        sizes.append(item.path.stat().st_size)
    dims = ", ".join(f"{w}x{h}" for h, w, _ in sorted(shapes))
    return (
        f"train {len(data.datasets['train'])} clips, val {len(items)} clips "
        f"({dims}, {min(lengths)}-{max(lengths)} frames, "
        f"{sum(sizes) / len(sizes) / 2**20:.1f} MiB per clip)"
    )


# ------------------------------------------------------------------------------ cases


def data_module(root: Path, workers: int, args: argparse.Namespace) -> KineticsDataModule:
    data = KineticsDataModule(
        str(root),
        batch_size=args.batch_size,
        eval_batch_size=1,
        num_workers=workers,
        frames=FRAMES,
        stride=STRIDE,
        crop_size=CROP,
        train_limit=args.max_clips,
        seed=args.seed,
        decode_threads=args.decode_threads,
    )
    data.setup("fit")
    return data


def bench_train(data: KineticsDataModule, workers: int, args: argparse.Namespace) -> Row:
    """Warm-up batches (start the persistent workers), then one timed epoch."""
    loader = data.train_dataloader()
    start = time.perf_counter()
    iterator = iter(loader)
    for _ in range(min(args.warmup, len(loader))):
        next(iterator)
    startup = time.perf_counter() - start
    clips = frames = 0
    start = time.perf_counter()
    for batch in loader:  # a new epoch on the same (persistent) workers
        video = batch["video"]
        clips += video.shape[0]
        frames += video.shape[0] * video.shape[1]
    seconds = time.perf_counter() - start
    del iterator, loader  # stops the persistent workers
    row = Row("train 32x2, crop 224", workers, clips, frames, seconds)
    report(row, startup)
    return row


def bench_eval(data: KineticsDataModule, workers: int, args: argparse.Namespace) -> Row:
    """Whole val clips, timed from the batch after the ``--warmup`` first ones."""
    loader = data.val_dataloader()
    total = len(data.datasets["val"])
    limit = total if args.max_clips is None else min(total, args.max_clips)
    warmup = min(args.warmup, limit - 1)
    start = time.perf_counter()
    iterator = iter(loader)
    for _ in range(warmup):
        next(iterator)
    startup = time.perf_counter() - start
    clips = frames = 0
    start = time.perf_counter()
    for batch in iterator:
        clips += len(batch["id"])
        frames += int(batch["length"].sum())
        if clips + warmup >= limit:
            break
    seconds = time.perf_counter() - start
    del iterator, loader
    row = Row("eval whole clips, short side 224", workers, clips, frames, seconds)
    report(row, startup)
    return row


def decode_all(path: Path) -> int:
    """Opens ``path`` and decodes every frame at its size; the number of frames."""
    reader = open_video(path)
    return len(read_frames(reader, range(len(reader)), path=path))


def pid_after(seconds: float) -> int:
    """This process's id, after ``seconds`` (so each pool process takes one call)."""
    time.sleep(seconds)
    return os.getpid()


def bench_raw(paths: list[Path], workers: int, args: argparse.Namespace) -> Row:
    """Every frame of each clip, in this process (0) or a spawn pool of ``workers``."""
    warmup = paths[: min(args.warmup, len(paths) - 1) or 1]
    timed_paths = paths[len(warmup) :] or paths
    start = time.perf_counter()
    if workers == 0:
        for path in warmup:
            decode_all(path)
        startup = time.perf_counter() - start
        start = time.perf_counter()
        counts = [decode_all(path) for path in timed_paths]
        seconds = time.perf_counter() - start
    else:
        context = multiprocessing.get_context("spawn")
        with context.Pool(workers) as pool:
            pids: set[int] = set()
            while len(pids) < workers:  # every process started (imports done)
                pids.update(pool.map(pid_after, [0.2] * workers, chunksize=1))
            pool.map(decode_all, warmup * workers, chunksize=1)
            startup = time.perf_counter() - start
            start = time.perf_counter()
            counts = pool.map(decode_all, timed_paths, chunksize=1)
            seconds = time.perf_counter() - start
    row = Row("raw decord read_frames, all frames", workers, len(counts), sum(counts), seconds)
    report(row, startup)
    return row


def report(row: Row, startup: float) -> None:
    print(
        f"{row.case}, workers={row.workers}: {row.frames} frames of {row.clips} clips in "
        f"{row.seconds:.2f} s = {row.fps:.0f} frames/s "
        f"(untimed start-up + warm-up {startup:.1f} s)",
        flush=True,
    )


# ------------------------------------------------------------------------------ output


def format_table(rows: list[Row], header: list[str]) -> str:
    lines = [
        *header,
        "",
        "| case | workers | clips | frames | seconds | frames/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.case} | {row.workers} | {row.clips} | {row.frames} "
            f"| {row.seconds:.2f} | {row.fps:.0f} |"
        )
    return "\n".join(lines)


def run(root: Path, args: argparse.Namespace) -> None:
    if not has_dataset(root):
        generate(root, args)
    else:
        print(f"using the dataset in {root}", flush=True)
    rows: list[Row] = []
    description = ""
    load_before = os.getloadavg()[0]
    for workers in args.workers:
        data = data_module(root, workers, args)
        if not description:
            description = describe(data)
            print(description, flush=True)
        rows.append(bench_train(data, workers, args))
        rows.append(bench_eval(data, workers, args))
        paths = [item.path for item in data.datasets["val"].items][: args.max_clips]
        rows.append(bench_raw(paths, workers, args))
    order = {"train": 0, "eval": 1, "raw": 2}
    rows.sort(key=lambda row: (order[row.case.split()[0]], row.workers))
    header = [
        f"dataset: {description}",
        f"cpus={os.cpu_count()} torch threads={torch.get_num_threads()} (main process; "
        f"1 per DataLoader worker) decord={decord.__version__} decode_threads="
        f"{args.decode_threads} batch_size={args.batch_size} (train), 1 (eval) "
        f"start method=spawn torch={torch.__version__} "
        f"load average (1 min) {load_before:.1f} before, {os.getloadavg()[0]:.1f} after",
        "Worker start-up is not timed: train = one epoch on already started persistent "
        f"workers after {args.warmup} warm-up batch(es); eval = from the batch after the "
        f"first {args.warmup} on; raw = pool started and warmed up first. "
        "frames = frames delivered (train: 32 per clip; eval/raw: every frame of the clip).",
    ]
    print()
    print(format_table(rows, header))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.root is not None:
        args.root.mkdir(parents=True, exist_ok=True)
        run(args.root, args)
    else:
        with tempfile.TemporaryDirectory(prefix="decode_speed_") as folder:
            run(Path(folder), args)


if __name__ == "__main__":
    main()
