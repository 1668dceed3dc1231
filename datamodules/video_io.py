"""Reading videos with decord: opening, probing and decoding frames.

Videos are read where they lie (no frame extraction): ``decord.VideoReader``
indexes the container and ``get_batch`` decodes only the frames a clip needs.

This module holds :class:`VideoReadError`, :class:`VideoInfo`,
:func:`open_video`, :func:`probe_video`, :func:`read_frames`,
:class:`ReaderCache` (the readers a worker keeps open) and
:func:`probe_videos` (many videos at once, with an optional JSON probe cache).
The clip items and datasets built on them are in :mod:`datamodules.clips`,
the data module in :mod:`datamodules.video` (which re-exports these names).

Usage::

    from datamodules.video_io import probe_video, read_frames

    info = probe_video("clip.mp4")                 # VideoInfo(num_frames=300, fps=30.0)
    frames = read_frames("clip.mp4", [0, 2, 4])    # (3, C, H, W) uint8
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import decord
import numpy as np
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor
from tqdm import tqdm

from datamodules.common import write_json_atomic
from datamodules.transforms import resize, short_side_size

#: :func:`probe_videos` shows a progress bar when it opens at least this many videos.
PROGRESS_MIN = 8


class VideoReadError(RuntimeError):
    """A video file is missing, cannot be opened or cannot be decoded (names the file)."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


@dataclass(frozen=True)
class VideoInfo:
    """Container facts read from the file: frame count and average frame rate."""

    num_frames: int
    fps: float


def open_video(path: str | Path, num_threads: int = 1) -> decord.VideoReader:
    """Opens ``path`` with ``decord.VideoReader`` on the CPU; raises VideoReadError."""
    path = Path(path)
    if not path.is_file():
        raise VideoReadError(path, "file not found")
    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=num_threads)
    except (RuntimeError, decord.DECORDError) as error:
        raise VideoReadError(path, f"cannot open video ({_first_line(error)})") from error
    if len(reader) == 0:
        raise VideoReadError(path, "video has no frames")
    return reader


def probe_video(path: str | Path) -> VideoInfo:
    """Frame count and fps of ``path`` (opens the container, decodes nothing)."""
    reader = open_video(path)
    return VideoInfo(num_frames=len(reader), fps=float(reader.get_avg_fps()))


def read_frames(
    video: str | Path | decord.VideoReader,
    indices: Sequence[int],
    short_side: int | None = None,
    chunk: int = 64,
    path: str | Path | None = None,
) -> Tensor:
    """Decodes the frames ``indices`` -> ``(len(indices), C, H, W) uint8``.

    Repeated indices are decoded once. With ``short_side`` the frames are
    resized (bilinear, antialiased) ``chunk`` frames at a time, so a long clip
    never holds all its full-size frames at once. ``path`` names an open
    reader's file in errors.
    """
    if isinstance(video, (str, Path)):
        path, reader = video, open_video(video)
    else:
        reader = video
    wanted = np.asarray(indices, dtype=np.int64)
    if wanted.size == 0:
        raise ValueError("read_frames needs at least one frame index")
    if wanted.min() < 0 or wanted.max() >= len(reader):
        raise IndexError(
            f"frame indices outside [0, {len(reader)}): {wanted.min()}..{wanted.max()}"
        )
    unique, inverse = np.unique(wanted, return_inverse=True)
    parts = []
    for begin in range(0, unique.size, chunk):
        wanted_chunk = unique[begin : begin + chunk].tolist()
        try:
            array = reader.get_batch(wanted_chunk).asnumpy()
        except (RuntimeError, decord.DECORDError):
            # decord 0.6 cannot batch some frame widths (e.g. 48, 72: it pads
            # rows to 4 bytes per pixel, dmlc/decord#336); read frame by frame.
            array = _read_one_by_one(reader, wanted_chunk, path)
        frames = torch.from_numpy(array).permute(0, 3, 1, 2)  # (t, C, H, W), channels-last
        if short_side is not None:
            frames = resize(frames, short_side_size(*frames.shape[-2:], short_side))
        parts.append(frames)
    frames = torch.cat(parts) if len(parts) > 1 else parts[0]
    if unique.size != wanted.size or not np.array_equal(unique, wanted):
        frames = frames[torch.from_numpy(inverse.reshape(-1))]
    return frames.contiguous()


def _read_one_by_one(
    reader: decord.VideoReader, indices: Sequence[int], path: str | Path | None
) -> np.ndarray:
    """Frames ``indices`` -> ``(T, H, W, 3) uint8``, one ``reader[i]`` call each.

    Undoes decord's row padding: a frame it reports as ``(H, W, 4)`` holds
    rows of ``W * 4`` bytes whose first ``W * 3`` are the RGB pixels.
    """
    frames = []
    for index in indices:
        try:
            frame = reader[index].asnumpy()
        except (RuntimeError, decord.DECORDError) as error:
            raise VideoReadError(
                path or "<video>", f"cannot decode frame {index} ({_first_line(error)})"
            ) from error
        if frame.shape[-1] == 4:
            height, width = frame.shape[:2]
            frame = frame.reshape(height, -1)[:, : width * 3].reshape(height, width, 3)
        frames.append(frame)
    return np.stack(frames)


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(error).__name__


class ReaderCache:
    """The last few opened readers of this process (segments of one long video share one).

    Args:
        size: Readers kept open.
        num_threads: Decoder threads per reader (1 suits DataLoader workers).
    """

    def __init__(self, size: int = 2, num_threads: int = 1) -> None:
        self.size = max(1, size)
        self.num_threads = num_threads
        self._readers: dict[Path, decord.VideoReader] = {}

    def get(self, path: Path) -> decord.VideoReader:
        reader = self._readers.pop(path, None)
        if reader is None:
            reader = open_video(path, self.num_threads)
        self._readers[path] = reader  # most recent last
        while len(self._readers) > self.size:
            self._readers.pop(next(iter(self._readers)))
        return reader

    def drop(self, path: Path) -> None:
        self._readers.pop(path, None)


# ---------------------------------------------------------------------- probing


def _probe_one(path: Path) -> VideoInfo | VideoReadError:
    try:
        return probe_video(path)
    except VideoReadError as error:
        return error


def probe_videos(
    paths: Iterable[Path], workers: int = 8, cache_file: str | Path | None = None
) -> dict[Path, VideoInfo | VideoReadError]:
    """Opens every video (in ``workers`` threads): its info, or the error it gave.

    With ``cache_file`` (JSON), results are kept by path, size and modification
    time, so a second run only opens new or changed files. Global rank 0 shows
    a progress bar (tqdm, on stderr) when it opens :data:`PROGRESS_MIN` videos
    or more.
    """
    paths = list(dict.fromkeys(paths))
    cache = _load_probe_cache(cache_file)
    results: dict[Path, VideoInfo | VideoReadError] = {}
    todo: list[Path] = []
    stamps: dict[Path, list[int]] = {}
    for path in paths:
        try:
            stat = path.stat()
        except OSError:
            results[path] = VideoReadError(path, "file not found")
            continue
        stamps[path] = [stat.st_size, stat.st_mtime_ns]
        hit = cache.get(str(path))
        if hit is not None and hit[:2] == stamps[path]:
            value = hit[2]
            results[path] = (
                VideoInfo(int(value[0]), float(value[1]))
                if isinstance(value, list)
                else VideoReadError(path, value)
            )
        else:
            todo.append(path)
    if todo:
        with (
            ThreadPoolExecutor(max(1, workers)) as pool,
            tqdm(
                total=len(todo),
                desc=f"probing {len(todo)} videos",
                unit="video",
                disable=rank_zero_only.rank != 0 or len(todo) < PROGRESS_MIN,
                dynamic_ncols=True,
            ) as progress,
        ):
            for path, result in zip(todo, pool.map(_probe_one, todo)):
                results[path] = result
                progress.update()
        if cache_file is not None:
            for path in todo:
                result = results[path]
                value = (
                    [result.num_frames, result.fps]
                    if isinstance(result, VideoInfo)
                    else result.reason
                )
                cache[str(path)] = [*stamps[path], value]
            write_json_atomic(Path(cache_file), cache)
    return {path: results[path] for path in paths}


def _load_probe_cache(cache_file: str | Path | None) -> dict[str, Any]:
    if cache_file is None or not Path(cache_file).is_file():
        return {}
    try:
        data = json.loads(Path(cache_file).read_text())
    except (OSError, json.JSONDecodeError) as error:
        warnings.warn(f"ignoring unreadable probe cache {cache_file}: {error}", stacklevel=3)
        return {}
    return data if isinstance(data, dict) else {}
