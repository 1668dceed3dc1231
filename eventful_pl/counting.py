"""Operation counting by the rules of docs/counting.md.

A multiply-accumulate counts as one operation. Modules that do counted work
report it to an :class:`OpCounter` attached with :func:`attach_counter`; the
counts are plain Python integers computed from tensor shapes, so counting costs
no tensor work and can stay on during evaluation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

OP_KINDS: tuple[str, ...] = (
    "linear",
    "bias",
    "matmul",
    "einsum",
    "add",
    "gate",
    "accumulator",
)


class OpCounter:
    """Accumulates operation counts by kind (see ``OP_KINDS``).

    Args:
        enabled: Whether counting is on. A disabled counter ignores ``add``.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.counts: dict[str, int] = dict.fromkeys(OP_KINDS, 0)

    def add(self, kind: str, n: int) -> None:
        """Adds ``n`` operations of ``kind``."""
        if self.enabled:
            self.counts[kind] += n

    def reset(self) -> None:
        """Sets every count back to zero."""
        for kind in self.counts:
            self.counts[kind] = 0

    @property
    def total(self) -> int:
        """The sum over all kinds."""
        return sum(self.counts.values())

    def as_flops_dict(self, keep_zeros: bool = False) -> dict[str, int]:
        """Counts keyed like the original code (``linear_flops``, ...)."""
        return {f"{kind}_flops": n for kind, n in self.counts.items() if keep_zeros or n}

    def gflops(self) -> dict[str, float]:
        """Counts by kind plus ``total``, in GFlops."""
        out = {kind: n / 1e9 for kind, n in self.counts.items()}
        out["total"] = self.total / 1e9
        return out


class Counted:
    """Mixin for modules that report operation counts to an attached counter."""

    counter: OpCounter | None = None

    def count(self, kind: str, n: int) -> None:
        """Reports ``n`` operations of ``kind`` if a counter is attached."""
        counter = self.counter
        if counter is not None:
            counter.add(kind, n)


def attach_counter(model: nn.Module, counter: OpCounter | None) -> OpCounter | None:
    """Attaches ``counter`` to every counting submodule of ``model``.

    Pass ``None`` to detach (counting off, zero overhead).
    """
    for module in model.modules():
        if isinstance(module, Counted):
            module.counter = counter
    return counter


@contextmanager
def count_ops(model: nn.Module) -> Iterator[OpCounter]:
    """Counts the operations of the calls made inside the ``with`` block.

    Example::

        with count_ops(backbone) as counter:
            backbone(frame)
        print(counter.gflops())
    """
    counter = OpCounter()
    attach_counter(model, counter)
    try:
        yield counter
    finally:
        attach_counter(model, None)
