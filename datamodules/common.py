"""Shared data-module helpers: format errors, skip accounting, rank sharding,
atomic file writes and the training/evaluation DataLoaders."""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

T = TypeVar("T")


class DataFormatError(ValueError):
    """A dataset file is malformed; the message names the file (and line)."""

    def __init__(self, path: str | Path, message: str, line: int | None = None) -> None:
        where = f"{path}" if line is None else f"{path}, line {line}"
        super().__init__(f"{where}: {message}")
        self.path = Path(path)
        self.line = line


class SkipLog:
    """Counts items a dataset skipped (missing, unreadable), by reason, and
    items it kept after fixing them (``adjust``: a segment clipped to its
    video, boxes scaled to the real image size).

    ``skip`` and ``adjust`` warn once per reason (not once per item);
    ``summary`` gives one line with the totals, for the data module's setup
    message.
    """

    def __init__(self, dataset: str) -> None:
        self.dataset = dataset
        self.reasons: Counter[str] = Counter()
        self.examples: dict[str, str] = {}
        #: Items kept after a fix, by reason.
        self.adjusted: Counter[str] = Counter()

    def skip(self, reason: str, item: str | Path) -> None:
        """Counts a dropped item; warns on the first of each reason."""
        self._count(self.reasons, reason, item, f"skipping {item} ({reason})", "skipped")

    def adjust(self, reason: str, item: str | Path) -> None:
        """Counts an item that is kept after a fix; warns on the first of each reason."""
        self._count(self.adjusted, reason, item, f"{item} ({reason})", "adjusted")

    def _count(self, counts: Counter, reason: str, item: str | Path, what: str, verb: str) -> None:
        if reason not in counts:
            warnings.warn(
                f"{self.dataset}: {what}; further items {verb} for this reason are counted "
                "in the summary",
                stacklevel=3,
            )
            self.examples[reason] = str(item)
        counts[reason] += 1

    @property
    def total(self) -> int:
        return sum(self.reasons.values())

    def summary(self, found: int) -> str:
        """E.g. ``"kinetics400 train: 980 items, 20 skipped (missing: 15, unreadable: 5)"``,
        followed by ``"; 3 adjusted (segment clipped to video end: 3)"`` if any were."""
        detail = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.reasons.items()))
        text = f"{self.dataset}: {found} items, {self.total} skipped"
        text += f" ({detail})" if detail else ""
        if self.adjusted:
            fixes = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.adjusted.items()))
            text += f"; {sum(self.adjusted.values())} adjusted ({fixes})"
        return text


def rank_and_world_size() -> tuple[int, int]:
    """This process's rank and the world size (0, 1 without torch.distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Items ``rank, rank + world, ...``: distinct per rank, none repeated, none lost."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid rank {rank} for world_size {world_size}")
    return list(items[rank::world_size])


def write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Writes ``path`` all at once: ``write(file)`` fills a temporary file, which
    is flushed, fsynced and then moved onto ``path`` with ``os.replace``.

    Readers see the old file or the whole new one, never a part, even if the
    process dies or the machine loses power midway. The temporary file lies in
    ``path``'s folder (the same file system, so the move is atomic) and is
    named ``.<name>.<pid>.tmp``: this process's own, so ranks writing the same
    file at once do not take each other's. If ``write`` raises, it is left
    behind (the feature-cache writer removes its shard's stale ones). The
    folder must exist.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: Any) -> None:
    """``data`` as JSON in ``path`` via :func:`write_atomic` (creates the folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: f.write(json.dumps(data).encode()))


def decode_utf8(path: str | Path, data: bytes) -> str:
    """``data`` as UTF-8 text, without a leading byte-order mark (Excel writes one).

    Raises DataFormatError naming the file, the line and the column of the first
    byte that is not UTF-8 (e.g. a file saved as Latin-1 or Windows-1252).
    """
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line_start = data.rfind(b"\n", 0, error.start) + 1
        column = len(data[line_start : error.start].decode("utf-8")) + 1
        bad = data[error.start : error.end].hex(" ")
        raise DataFormatError(
            path,
            f"not UTF-8 text: byte {bad} at column {column} (save the file as UTF-8)",
            data.count(b"\n", 0, error.start) + 1,
        ) from None


def read_csv_rows(path: str | Path, required: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    """Rows of a UTF-8 CSV file with a header, as ``(line number, {column: text})``.

    A leading UTF-8 byte-order mark is ignored. Raises DataFormatError naming
    the file: at line 1 if a ``required`` column is absent from the header; at
    the line of a row that lacks a value for one, of the first byte that is not
    UTF-8, or where the record starts that the ``csv`` module gives up on (e.g.
    an unbalanced quote that swallows the rest of the file). Line numbers count physical lines
    (1 = header), as an editor shows them.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DataFormatError(path, f"cannot read annotation file ({error})") from error
    reader = csv.DictReader(io.StringIO(decode_utf8(path, data), newline=""))
    done = 0  # the last line of the last complete record (1: the header)
    try:
        header = reader.fieldnames or []
        done = reader.line_num
        absent = [name for name in required if name not in header]
        if absent:
            raise DataFormatError(path, f"missing column(s) {absent}; header is {header}", 1)
        rows = []
        for row in reader:
            line = reader.line_num
            empty = [name for name in required if row.get(name) in (None, "")]
            if empty:
                raise DataFormatError(path, f"no value for column(s) {empty}", line)
            rows.append((line, row))
            done = line
    except csv.Error as error:
        raise DataFormatError(
            path,
            f"malformed CSV in the record that starts on this line ({error}; look for an "
            "unbalanced double quote)",
            done + 1,
        ) from None
    return rows


def first_of_each_id(
    path: str | Path, entries: Sequence[tuple[str, int, Mapping[str, Any]]]
) -> list[int]:
    """Positions in ``entries`` of the first entry of each id, in order.

    ``entries`` are ``(id, line, fields)`` of one annotation file. An id listed
    again with equal ``fields`` is a duplicate: left out, and all duplicates
    are reported in one warning with their count and an example. An id listed
    again with other ``fields`` (e.g. another label) is a DataFormatError
    naming both lines (``file:line``) and the fields that differ.
    """
    first: dict[str, tuple[int, Mapping[str, Any]]] = {}
    kept: list[int] = []
    repeats, example = 0, ""
    for position, (key, line, fields) in enumerate(entries):
        if key not in first:
            first[key] = (line, fields)
            kept.append(position)
            continue
        first_line, first_fields = first[key]
        differ = [name for name in fields if fields[name] != first_fields.get(name)]
        if differ:
            was = ", ".join(f"{name} {first_fields.get(name)!r}" for name in differ)
            now = ", ".join(f"{name} {fields[name]!r}" for name in differ)
            raise DataFormatError(
                path,
                f"id {key!r} is listed twice with conflicting values: {path}:{first_line} "
                f"has {was}, {path}:{line} has {now}",
                line,
            )
        repeats += 1
        example = example or f"{key!r} on line {line} repeats line {first_line}"
    if repeats:
        warnings.warn(
            f"{path}: {repeats} duplicate row(s) (an id listed again with the same values) "
            f"ignored, e.g. {example}",
            stacklevel=2,
        )
    return kept


def parse_int(path: str | Path, line: int, column: str, text: str) -> int:
    """``int(text)``, or DataFormatError naming the file, line and column."""
    try:
        return int(text.strip())
    except ValueError:
        raise DataFormatError(path, f"{column} must be an integer, got {text!r}", line) from None


WORKER_START_METHODS = ("spawn", "forkserver", "fork")


def check_start_method(method: str, option: str) -> str:
    """``method`` if it is a multiprocessing start method, else a ValueError naming ``option``."""
    if method not in WORKER_START_METHODS:
        raise ValueError(f"{option} must be one of {WORKER_START_METHODS}, got {method!r}")
    return method


def training_sampler(dataset: Dataset, trainer: Any | None) -> DistributedSampler | None:
    """The shuffling sampler of a training loader run by a one-process Trainer, else None.

    Under a Trainer with one process it is a one-replica ``DistributedSampler``
    seeded like the one Lightning puts in under DDP (``PL_GLOBAL_SEED``,
    re-shuffled each epoch by Lightning's ``set_epoch``), so one process visits
    the items in the global order that the ranks of a DDP run share out (rank k
    takes items k, k + world, ...): a batch of ``world x b`` here holds what
    the ranks' batches of b hold there. Under DDP (Lightning adds its own
    sampler) and without a Trainer it returns None: shuffle the loader then.
    """
    if trainer is None or getattr(trainer, "world_size", 1) > 1:
        return None
    seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
    return DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=seed)


def training_loader(
    dataset: Dataset,
    trainer: Any | None,
    batch_size: int,
    num_workers: int = 0,
    **kwargs: Any,
) -> DataLoader:
    """A shuffled training DataLoader: :func:`training_sampler`'s order under a
    one-process Trainer, Lightning's DistributedSampler under DDP, torch's
    shuffle without a Trainer. ``kwargs`` go to the DataLoader."""
    sampler = training_sampler(dataset, trainer)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=sampler is None,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        **kwargs,
    )


class LocalShardSampler(DistributedSampler):
    """Every index, in order, of a dataset that already holds only this rank's shard.

    Being a ``DistributedSampler``, Lightning keeps it instead of injecting its
    own, which would split the shard again and pad it with repeated items.

    Args:
        dataset: This rank's shard (e.g. from :func:`shard`).
    """

    def __init__(self, dataset: Dataset) -> None:
        super().__init__(dataset, num_replicas=1, rank=0, shuffle=False, drop_last=False)

    def __iter__(self) -> Iterator[int]:
        return iter(range(len(self.dataset)))


def eval_loader(
    dataset: Dataset, batch_size: int | None, num_workers: int = 0, **kwargs: Any
) -> DataLoader:
    """The evaluation DataLoader of this rank's shard: every item once, in order
    (:class:`LocalShardSampler`, which Lightning leaves in place under DDP).

    ``kwargs`` go to the DataLoader (``collate_fn``, ``pin_memory``,
    ``multiprocessing_context``, ``persistent_workers``, ...).
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=LocalShardSampler(dataset),
        num_workers=num_workers,
        **kwargs,
    )
