"""Shared data-module helpers: format errors, skip accounting, rank sharding."""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

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
    """Counts items a dataset skipped (missing, unreadable), by reason.

    ``skip`` warns once per reason (not once per item); ``summary`` gives one
    line with the totals, for the data module's setup message.
    """

    def __init__(self, dataset: str) -> None:
        self.dataset = dataset
        self.reasons: Counter[str] = Counter()
        self.examples: dict[str, str] = {}

    def skip(self, reason: str, item: str | Path) -> None:
        if reason not in self.reasons:
            warnings.warn(
                f"{self.dataset}: skipping {item} ({reason}); further items skipped for "
                "this reason are counted in the summary",
                stacklevel=2,
            )
            self.examples[reason] = str(item)
        self.reasons[reason] += 1

    @property
    def total(self) -> int:
        return sum(self.reasons.values())

    def summary(self, found: int) -> str:
        """E.g. ``"kinetics400 train: 980 items, 20 skipped (missing: 15, unreadable: 5)"``."""
        detail = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.reasons.items()))
        text = f"{self.dataset}: {found} items, {self.total} skipped"
        return text + (f" ({detail})" if detail else "")


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


def read_csv_rows(path: str | Path, required: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    """Rows of a CSV file with a header, as ``(line number, {column: text})``.

    Raises DataFormatError naming the file (line 1) if a ``required`` column is
    absent from the header, and naming the line if a row lacks a value for one.
    Line numbers count physical lines (1 = header), as an editor shows them.
    """
    import csv

    path = Path(path)
    try:
        handle = path.open(newline="", encoding="utf-8")
    except OSError as error:
        raise DataFormatError(path, f"cannot read annotation file ({error})") from error
    with handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
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
    return rows


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
