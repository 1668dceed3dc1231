"""Small synthetic video datasets written in the real Kinetics-400 / EPIC-Kitchens-100 layouts.

Each clip shows a coloured square moving over a noisy background in one of
four directions; the class is the direction of motion (``CLASSES``: down,
left, right, up, in sorted order). The square wraps around the frame edges and
starts at a uniformly random place, so every single frame has the same
distribution whatever the class: only a temporal model can tell the classes
apart. (A horizontal flip swaps left and right: train with ``flip_prob=0``.)

Usage::

    from datamodules.synthetic_video import make_kinetics, make_epic_kitchens

    data = make_kinetics("/tmp/k400", videos_per_class=8, frames=16, size=64, seed=0)
    # /tmp/k400/annotations/{train,val}.csv, /tmp/k400/{train,val}/<ytid>_<start>_<end>.mp4
    epic = make_epic_kitchens("/tmp/epic", participants=2, seed=0)
    # /tmp/epic/EPIC_100_{train,validation}.csv, /tmp/epic/P01/videos/P01_01.MP4 ...

Videos are real mp4 files (PyAV, h264 or mpeg4) and CSVs real CSVs; the
output is deterministic given the seed. ``corrupt`` / ``missing`` make some
listed videos unreadable (truncated or garbage bytes) or absent, as in every
real copy. Needs the ``av`` package (installed with the project).
"""

from __future__ import annotations

import csv
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

#: Class names; index = position (sorted), direction of motion (dy, dx) below.
CLASSES: tuple[str, ...] = ("down", "left", "right", "up")
DIRECTIONS: tuple[tuple[int, int], ...] = ((1, 0), (0, -1), (0, 1), (-1, 0))

#: Square colours of the ``"colour_order"`` task (RGB).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 70, 230),
}
#: ``"colour_order"`` classes (sorted): the square turns from one colour into another.
#: Each colour pair occurs in both orders, so only the order of the frames tells
#: the class: a model that pools frames without order gets at most 50%.
COLOUR_ORDERS: tuple[tuple[str, str], ...] = (
    ("blue", "red"),
    ("green", "red"),
    ("red", "blue"),
    ("red", "green"),
)

KINETICS_COLUMNS = ("label", "youtube_id", "time_start", "time_end", "split")
EPIC_COLUMNS = (
    "narration_id",
    "participant_id",
    "video_id",
    "narration_timestamp",
    "start_timestamp",
    "stop_timestamp",
    "start_frame",
    "stop_frame",
    "narration",
    "verb",
    "verb_class",
    "noun",
    "noun_class",
    "all_nouns",
    "all_noun_classes",
)

Codec = Literal["h264", "mpeg4"]
Status = Literal["ok", "corrupt", "missing"]


@dataclass
class SyntheticItem:
    """One listed clip (Kinetics) or narrated segment (EPIC) of a synthetic dataset.

    ``first``/``stop`` are 0-based frame numbers of the segment (stop exclusive).
    """

    id: str
    path: Path
    label: int
    num_frames: int
    status: Status = "ok"
    first: int = 0
    stop: int = 0


@dataclass
class SyntheticDataset:
    """What a generator wrote: items per split in CSV order."""

    root: Path
    classes: tuple[str, ...] = CLASSES
    items: dict[str, list[SyntheticItem]] = field(default_factory=dict)

    def ok(self, split: str) -> list[SyntheticItem]:
        """The readable items of ``split``."""
        return [item for item in self.items[split] if item.status == "ok"]


# --------------------------------------------------------------------------- frames


def moving_square(
    direction: int,
    frames: int,
    size: int | tuple[int, int],
    rng: np.random.Generator,
    speed: int = 2,
    colours: tuple[np.ndarray, np.ndarray] | None = None,
    switch: int = 0,
) -> np.ndarray:
    """A square moving in ``DIRECTIONS[direction]`` -> ``(T, H, W, 3) uint8`` frames.

    Blocky static noise background, small per-frame noise, a square of side
    ``min(H, W) // 5`` in a random bright colour at ``speed`` pixels per frame,
    wrapping around the edges from a uniformly random start. With ``colours``
    ``(before, after)`` the square has colour ``before`` on frames ``< switch``
    and ``after`` from frame ``switch`` on.
    """
    height, width = (size, size) if isinstance(size, int) else size
    dy, dx = DIRECTIONS[direction]
    background = _background(height, width, rng)
    side = max(2, min(height, width) // 5)
    t = np.arange(frames)
    top = (rng.integers(height) + dy * speed * t) % height  # (T,)
    left = (rng.integers(width) + dx * speed * t) % width
    rows = (np.arange(height)[None, :] - top[:, None]) % height < side  # (T, H)
    cols = (np.arange(width)[None, :] - left[:, None]) % width < side  # (T, W)
    mask = rows[:, :, None] & cols[:, None, :]  # (T, H, W)
    colour = rng.integers(160, 256, 3)
    colour[rng.integers(3)] = rng.integers(0, 60)  # saturated: stands out from the grey
    video = background[None] + rng.integers(-8, 9, (frames, height, width, 1))
    if colours is not None:
        colour = np.where((t < switch)[:, None], colours[0], colours[1])[:, None, None, :]
    video = np.where(mask[..., None], colour, video)
    return np.clip(video, 0, 255).astype(np.uint8)


def static_noise(frames: int, size: int | tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Background only (no square): ``(T, H, W, 3) uint8`` (EPIC gaps between segments)."""
    height, width = (size, size) if isinstance(size, int) else size
    video = _background(height, width, rng)[None] + rng.integers(-8, 9, (frames, height, width, 1))
    return np.clip(video, 0, 255).astype(np.uint8)


def _background(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Blocky (4 x 4) grey noise, (H, W, 3) int."""
    blocks = rng.integers(40, 140, (-(-height // 4), -(-width // 4), 1))
    return np.repeat(np.repeat(blocks, 4, 0), 4, 1)[:height, :width].repeat(3, 2)


# --------------------------------------------------------------------------- files


def write_video(path: str | Path, frames: np.ndarray, fps: int = 25, codec: Codec = "h264") -> None:
    """Writes ``(T, H, W, 3) uint8`` frames (H, W even) to an mp4 file with PyAV."""
    import av  # only the generator needs it

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"frame size must be even for yuv420p, got {height} x {width}")
    options = {"crf": "18", "preset": "ultrafast"} if codec == "h264" else {}
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream(codec, rate=fps, options=options)
        stream.height, stream.width, stream.pix_fmt = height, width, "yuv420p"
        if codec == "mpeg4":
            stream.bit_rate = 8_000_000
        stream.codec_context.thread_count = 1  # deterministic bytes
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def corrupt_file(path: str | Path, kind: Literal["truncated", "garbage"], seed: int = 0) -> None:
    """Makes ``path`` unreadable: keep its first third (truncated) or write random bytes."""
    path = Path(path)
    if kind == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    elif kind == "garbage":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(np.random.default_rng(seed).bytes(4096))
    else:
        raise ValueError(f"kind must be 'truncated' or 'garbage', got {kind!r}")


def _mark_bad(
    items: Sequence[SyntheticItem], corrupt: int, missing: int, rng: np.random.Generator
) -> tuple[set[int], set[int]]:
    """Indices of items to corrupt and to leave missing (disjoint, deterministic)."""
    if corrupt + missing > len(items):
        raise ValueError(f"corrupt + missing = {corrupt + missing} exceeds {len(items)} videos")
    chosen = rng.permutation(len(items))[: corrupt + missing].tolist()
    return set(chosen[:corrupt]), set(chosen[corrupt:])


def _write_csv(path: Path, columns: Sequence[str], rows: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)


def _colour_change(
    order: int, frames: int, size: int | tuple[int, int], rng: np.random.Generator, speed: int
) -> np.ndarray:
    """A square turning from ``COLOUR_ORDERS[order][0]`` into ``[1]`` (random direction)."""
    before, after = (np.array(COLOURS[c]) + rng.integers(-20, 21, 3) for c in COLOUR_ORDERS[order])
    switch = int(rng.integers(frames // 3, 2 * frames // 3 + 1))
    direction = int(rng.integers(len(DIRECTIONS)))
    return moving_square(direction, frames, size, rng, speed, (before, after), switch)


# ------------------------------------------------------------------------ Kinetics

_ID_CHARS = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"))


def require_empty_folder(root: str | Path, what: str = "a synthetic dataset") -> Path:
    """``root`` as a Path if it does not exist or is an empty folder; else a
    FileExistsError: a synthetic dataset never writes into a folder that holds files."""
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(
            f"{root} is not empty: {what} is written only into a folder that does not "
            "exist or is empty, never among existing files. Choose a new folder."
        )
    return root


def write_new_folder(root: str | Path, write: Callable[[Path], object], what: str) -> None:
    """Calls ``write(folder)`` on a hidden sibling of ``root`` and renames it to
    ``root`` when done, so ``root`` never holds half a dataset (a killed run
    leaves only the hidden folder, removed by the next try). ``root`` must not
    exist or be empty (:func:`require_empty_folder`)."""
    root = require_empty_folder(root, what)
    partial = root.with_name(f".{root.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    write(partial)
    os.rename(partial, root)  # replaces an empty folder, never a full one


def make_kinetics(
    root: str | Path,
    videos_per_class: int = 4,
    frames: int = 16,
    size: int | tuple[int, int] = 64,
    seed: int = 0,
    splits: Sequence[str] = ("train", "val"),
    fps: int = 25,
    codec: Codec = "h264",
    speed: int = 2,
    frame_jitter: int = 4,
    corrupt: int = 0,
    missing: int = 0,
    class_folders: bool = False,
    label_names: Sequence[str] | None = None,
    task: Literal["direction", "colour_order"] = "direction",
) -> SyntheticDataset:
    """Writes a Kinetics-400 layout: ``annotations/{split}.csv`` + ``{split}/<clip>.mp4``.

    Args:
        root: Output folder.
        videos_per_class: Clips per class and split.
        frames: Frames per clip (plus ``0..frame_jitter`` more, so lengths vary).
        size: Frame size (square side or (H, W), even).
        seed: Seed; the output is a function of the arguments.
        splits: Split folders / annotation files to write.
        fps: Frame rate.
        codec: ``"h264"`` or ``"mpeg4"``.
        speed: Pixels per frame of the moving square.
        frame_jitter: Largest extra length of a clip.
        corrupt: Clips per split made unreadable (listed in the CSV).
        missing: Clips per split listed in the CSV but not written.
        class_folders: Put clips in ``{split}/{label}/`` (the ActivityNet
            downloader's layout) instead of directly in ``{split}/``.
        label_names: Class names written in the CSV, one per class (default:
            ``"moving down"``, ... or ``"blue to red"``, ... with spaces as
            real labels have).
        task: What the class is. ``"direction"``: the direction of motion.
            ``"colour_order"``: the order of the square's two colours (it turns
            from one of :data:`COLOUR_ORDERS` into the other at a random frame
            of the middle third, moving in a random direction); easy to see in
            any single frame's features, yet only the order tells the class.

    Clip names are ``{youtube_id}_{time_start:06d}_{time_end:06d}.mp4``; label
    indices follow the sorted names (= direction index for the defaults).
    ``root`` must not exist or be empty (FileExistsError otherwise).
    """
    root = require_empty_folder(root)
    if task not in ("direction", "colour_order"):
        raise ValueError(f"task must be 'direction' or 'colour_order', got {task!r}")
    default = (
        [f"moving {c}" for c in CLASSES]
        if task == "direction"
        else [f"{a} to {b}" for a, b in COLOUR_ORDERS]
    )
    names = list(label_names or default)
    if len(names) != len(default):
        raise ValueError(f"label_names needs {len(default)} names, got {len(names)}")
    rng = np.random.default_rng(seed)
    data = SyntheticDataset(root, tuple(sorted(names)))
    for split in splits:
        rows, items, videos = [], [], []
        for kind, name in enumerate(names):
            for _ in range(videos_per_class):
                youtube_id = "".join(rng.choice(_ID_CHARS, 11))
                start = int(rng.integers(0, 600))
                clip = f"{youtube_id}_{start:06d}_{start + 10:06d}"
                folder = root / split / name if class_folders else root / split
                length = frames + int(rng.integers(0, frame_jitter + 1))
                if task == "direction":
                    videos.append(moving_square(kind, length, size, rng, speed))
                else:
                    videos.append(_colour_change(kind, length, size, rng, speed))
                label = data.classes.index(name)
                items.append(
                    SyntheticItem(clip, folder / f"{clip}.mp4", label, length, stop=length)
                )
                rows.append(
                    dict(zip(KINETICS_COLUMNS, (name, youtube_id, start, start + 10, split)))
                )
        bad, absent = _mark_bad(items, corrupt, missing, rng)
        for index, (item, video) in enumerate(zip(items, videos)):
            if index in absent:
                item.status = "missing"
                continue
            write_video(item.path, video, fps, codec)
            if index in bad:
                item.status = "corrupt"
                corrupt_file(item.path, "truncated" if index % 2 else "garbage", seed + index)
        _write_csv(root / "annotations" / f"{split}.csv", KINETICS_COLUMNS, rows)
        data.items[split] = items
    return data


# ---------------------------------------------------------------------- EPIC-Kitchens


def format_timestamp(seconds: float) -> str:
    """Seconds -> ``HH:MM:SS.ff`` (the EPIC-Kitchens-100 start/stop timestamp format)."""
    hundredths = int(round(seconds * 100))
    hours, rest = divmod(hundredths, 360_000)
    minutes, rest = divmod(rest, 6_000)
    return f"{hours:02d}:{minutes:02d}:{rest // 100:02d}.{rest % 100:02d}"


def make_epic_kitchens(
    root: str | Path,
    participants: int = 2,
    videos_per_participant: int = 2,
    segments_per_video: int = 4,
    segment_frames: int = 16,
    gap_frames: int = 6,
    size: int | tuple[int, int] = 64,
    seed: int = 0,
    fps: int = 30,
    codec: Codec = "h264",
    speed: int = 2,
    frame_jitter: int = 4,
    layout: Literal["participant", "flat"] = "participant",
    validation_every: int = 2,
    corrupt: int = 0,
    missing: int = 0,
) -> SyntheticDataset:
    """Writes an EPIC-Kitchens-100 layout: ``EPIC_100_{train,validation}.csv`` + videos.

    Args:
        root: Output folder.
        participants: Participants ``P01``, ``P02``, ...
        videos_per_participant: Videos ``Pxx_01``, ... per participant.
        segments_per_video: Narrated segments per video.
        segment_frames: Frames per segment (plus ``0..frame_jitter``).
        gap_frames: Background-only frames before each segment and at the end.
        size: Frame size (square side or (H, W), even).
        seed: Seed; the output is a function of the arguments.
        fps: Frame rate of the videos (timestamps use it).
        codec: ``"h264"`` or ``"mpeg4"``.
        speed: Pixels per frame of the moving square.
        frame_jitter: Largest extra length of a segment.
        layout: ``"participant"``: ``{participant_id}/videos/{video_id}.MP4``;
            ``"flat"``: ``videos/{video_id}.MP4``.
        validation_every: Every n-th video of a participant (1-based index
            divisible by n) goes to the validation split; the rest train.
        corrupt: Videos made unreadable (all their segments stay listed).
        missing: Videos listed but not written.

    ``verb_class`` is the direction index; ``start_frame``/``stop_frame`` are
    1-based and inclusive (``stop_frame`` = last frame), timestamps
    ``HH:MM:SS.ff``. Split names in ``items``: ``"train"``, ``"validation"``.
    """
    root = require_empty_folder(root)
    rng = np.random.default_rng(seed)
    data = SyntheticDataset(root, CLASSES, {"train": [], "validation": []})
    rows: dict[str, list[dict]] = {"train": [], "validation": []}
    videos: list[tuple[Path, np.ndarray, list[SyntheticItem]]] = []
    for p in range(1, participants + 1):
        participant = f"P{p:02d}"
        for v in range(1, videos_per_participant + 1):
            video_id = f"{participant}_{v:02d}"
            split = "validation" if v % validation_every == 0 else "train"
            folder = root / participant / "videos" if layout == "participant" else root / "videos"
            path = folder / f"{video_id}.MP4"
            parts, segments, position = [], [], 0
            for k in range(segments_per_video):
                parts.append(static_noise(gap_frames, size, rng))
                position += gap_frames
                direction = int(rng.integers(len(CLASSES)))
                length = segment_frames + int(rng.integers(0, frame_jitter + 1))
                parts.append(moving_square(direction, length, size, rng, speed))
                first, stop = position, position + length
                position = stop
                item = SyntheticItem(f"{video_id}_{k}", path, direction, 0, first=first, stop=stop)
                segments.append(item)
                rows[split].append(
                    dict(
                        narration_id=item.id,
                        participant_id=participant,
                        video_id=video_id,
                        narration_timestamp=format_timestamp(first / fps),
                        start_timestamp=format_timestamp(first / fps),
                        stop_timestamp=format_timestamp(stop / fps),
                        start_frame=first + 1,
                        stop_frame=stop,
                        narration=f"move {CLASSES[direction]} shape",
                        verb=f"move-{CLASSES[direction]}",
                        verb_class=direction,
                        noun="shape",
                        noun_class=0,
                        all_nouns="['shape']",
                        all_noun_classes="[0]",
                    )
                )
            parts.append(static_noise(gap_frames, size, rng))
            frames = np.concatenate(parts)
            for item in segments:
                item.num_frames = len(frames)
            data.items[split].extend(segments)
            videos.append((path, frames, segments))
    bad, absent = _mark_bad(videos, corrupt, missing, rng)
    for index, (path, frames, segments) in enumerate(videos):
        if index in absent:
            status = "missing"
        else:
            write_video(path, frames, fps, codec)
            status = "ok"
            if index in bad:
                corrupt_file(path, "truncated" if index % 2 else "garbage", seed + index)
                status = "corrupt"
        for item in segments:
            item.status = status
    _write_csv(root / "EPIC_100_train.csv", EPIC_COLUMNS, rows["train"])
    _write_csv(root / "EPIC_100_validation.csv", EPIC_COLUMNS, rows["validation"])
    return data
