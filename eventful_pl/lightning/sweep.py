"""Evaluation sweeps over test-time policies, and operation counts gathered while evaluating.

A sweep is a list of settings (dense, top-r values, thresholds); evaluation
runs every batch under each setting, and each setting's metrics and GFlops
are logged under its own name (``val/r=50/top1``, ``val/r=50/gflops``).

:class:`OpsMeter` adds up the operations counted during evaluation, per
setting, and the number of units (videos for ViViT, frames for ViTDet) they
cover; :meth:`OpsMeter.gflops` gives GFlops per unit, by kind, summed over all
ranks under DDP.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from eventful_pl.counting import OP_KINDS
from eventful_pl.policies import ThresholdPolicy, TokenPolicy, TopRPolicy


@dataclass(frozen=True)
class EvalSetting:
    """One evaluation setting: the model's own policy (``r`` and ``threshold``
    None, named ``name``), a top-r, a threshold, or the dense model (``dense``:
    every token recomputed, counted as the dense model)."""

    name: str
    r: int | None = None
    threshold: float | None = None
    dense: bool = False

    def policy(self) -> TokenPolicy | None:
        """The top-r or threshold policy; None for the model's own and for dense."""
        if self.r is not None:
            return TopRPolicy(self.r)
        if self.threshold is not None:
            return ThresholdPolicy(self.threshold)
        return None


def build_sweep(
    r_values: Sequence[int] = (),
    thresholds: Sequence[float] = (),
    default: str = "default",
    dense: bool = False,
) -> list[EvalSetting]:
    """Settings for each r and threshold (with neither, one setting ``default``:
    the model as configured), then ``dense`` if asked for."""
    settings = [EvalSetting(f"r={int(r)}", r=int(r)) for r in r_values]
    settings += [EvalSetting(f"threshold={float(h)}", threshold=float(h)) for h in thresholds]
    names = [s.name for s in settings]
    if len(set(names)) != len(names):
        raise ValueError(f"eval sweep: repeated settings {names}")
    settings = settings or [EvalSetting(default)]
    return settings + ([EvalSetting("dense", dense=True)] if dense else [])


class OpsMeter:
    """Operation counts per setting and the units (videos or frames) they cover."""

    def __init__(self, unit: str) -> None:
        self.unit = unit
        self.counts: dict[str, dict[str, int]] = {}
        self.units: dict[str, int] = {}

    def reset(self) -> None:
        self.counts.clear()
        self.units.clear()

    def add(self, name: str, counts: Mapping[str, int], units: int) -> None:
        total = self.counts.setdefault(name, dict.fromkeys(OP_KINDS, 0))
        for kind, value in counts.items():
            total[kind] += int(value)
        self.units[name] = self.units.get(name, 0) + int(units)

    def synced(self, names: Sequence[str], device: torch.device | str = "cpu") -> OpsMeter:
        """A copy with the settings ``names`` summed over all ranks (every rank
        must call it with the same names; a rank without data adds zeros)."""
        if not (dist.is_available() and dist.is_initialized()):
            return self
        zero = dict.fromkeys(OP_KINDS, 0)
        table = torch.tensor(
            [
                [self.counts.get(n, zero)[k] for k in OP_KINDS] + [self.units.get(n, 0)]
                for n in names
            ],
            dtype=torch.float64,
            device=device,
        ).reshape(len(names), len(OP_KINDS) + 1)
        dist.all_reduce(table)
        out = OpsMeter(self.unit)
        for name, row in zip(names, table.tolist()):
            if row[-1] == 0:
                continue
            out.add(name, dict(zip(OP_KINDS, (round(v) for v in row[:-1]))), round(row[-1]))
        return out

    def gflops(self, name: str) -> dict[str, float]:
        """GFlops per unit of setting ``name``: ``{"total": ..., kind: ...}``."""
        units = self.units.get(name, 0)
        if not units:
            raise KeyError(f"no operations recorded for setting {name!r}")
        per = {kind: self.counts[name][kind] / units / 1e9 for kind in OP_KINDS}
        return {"total": sum(per.values()), **per}
