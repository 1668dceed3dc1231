"""Evaluation sweeps over test-time policies, and operation counts gathered while evaluating.

A sweep is a list of settings (dense, top-r values, thresholds); evaluation
runs every batch under each setting, and each setting's metrics and GFlops
are logged under its own name: ``r50`` for top-r 50, ``h0.1`` for threshold
0.1, ``b90`` for the calibrated per-gate thresholds of budget 90 (read
from a calibration file written by ``cli.py calibrate``), ``dense`` for the
dense model (``val/r50/top1``, ``val/h0.1/gflops``, ``val/b90/top1``,
``val/dense/top1``). Names never hold ``=``, so they work as metric names,
checkpoint file names and ``ModelCheckpoint(monitor=...)`` keys.

:class:`OpsMeter` adds up the operations counted during evaluation, per
setting, and the number of units (videos for ViViT, frames for ViTDet) they
cover; :meth:`OpsMeter.gflops` gives GFlops per unit, by kind, summed over all
ranks under DDP. :func:`sweep_figure` plots a sweep's accuracy against its GFlops.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from eventful_pl.counting import OP_KINDS
from eventful_pl.policies import (
    CalibratedThresholdPolicy,
    ThresholdPolicy,
    TokenPolicy,
    TopRPolicy,
    read_calibration,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass(frozen=True)
class EvalSetting:
    """One evaluation setting: the model's own policy (``r`` and ``threshold``
    None, named ``name``), a top-r, a threshold, or the dense model (``dense``:
    every token recomputed, counted as the dense model)."""

    name: str
    r: int | None = None
    threshold: float | None = None
    dense: bool = False
    #: A compute budget: the calibrated per-gate thresholds filed under it in
    #: the calibration file ``calibration``.
    budget: float | None = None
    calibration: str | None = None

    def policy(self) -> TokenPolicy | None:
        """The top-r, threshold or calibrated policy; None for the model's own and for dense."""
        if self.r is not None:
            return TopRPolicy(self.r)
        if self.threshold is not None:
            return ThresholdPolicy(self.threshold)
        if self.budget is not None:
            return _calibrated(str(self.calibration), self.budget)
        return None


_CALIBRATED: dict[tuple[str, float, float], CalibratedThresholdPolicy] = {}


def _calibrated(path: str, budget: float) -> CalibratedThresholdPolicy:
    """The calibrated policy of ``budget`` in file ``path`` (read again when the file changes)."""
    from pathlib import Path

    try:
        stamp = Path(path).stat().st_mtime
    except OSError:
        stamp = -1.0  # missing: the policy's reader names the file and the remedy
    key = (path, float(budget), stamp)
    if key not in _CALIBRATED:
        _CALIBRATED[key] = CalibratedThresholdPolicy(path=path, budget=budget)
    return _CALIBRATED[key]


def budget_settings(budgets: Sequence[float], calibration: str | None) -> list[EvalSetting]:
    """One setting per budget (``b90``), each the calibrated policy of that
    budget in the calibration file (checked now: it must hold every budget)."""
    if not budgets:
        return []
    if calibration is None:
        raise ValueError(
            "eval_budgets needs calibration: the calibration file written by "
            "`python cli.py calibrate --config <config> --budget_gflops <budgets>`"
        )
    read_calibration(calibration)  # a clear error for a missing or foreign file
    settings = []
    for budget in budgets:
        if float(budget) <= 0:
            raise ValueError(f"eval_budgets: every budget must be positive, got {list(budgets)}")
        _calibrated(calibration, float(budget))  # raises naming the budgets the file has
        settings.append(
            EvalSetting(f"b{float(budget):g}", budget=float(budget), calibration=calibration)
        )
    return settings


def setting_name(r: int | None = None, threshold: float | None = None) -> str:
    """The name of a top-r (``r16``) or threshold (``h0.1``) setting."""
    if (r is None) == (threshold is None):
        raise ValueError("setting_name: give r or threshold")
    return f"r{int(r)}" if r is not None else f"h{float(threshold)!r}"


def build_sweep(
    r_values: Sequence[int] = (),
    thresholds: Sequence[float] = (),
    default: str = "default",
    dense: bool = False,
    own: EvalSetting | None = None,
    budgets: Sequence[EvalSetting] = (),
) -> list[EvalSetting]:
    """The settings of an evaluation sweep, in order.

    One setting per r (``r16``) and threshold (``h0.1``); ``own`` (the run's
    own top-r or threshold) goes first when the sweep does not already hold
    it, so the run's own setting is always evaluated. With no r, threshold or
    ``own``: one setting named ``default`` (the model as configured). Then
    ``dense`` if asked for. ``budgets``: calibrated settings
    (:func:`budget_settings`), after the thresholds.
    """
    settings = [EvalSetting(setting_name(r=r), r=int(r)) for r in r_values]
    settings += [EvalSetting(setting_name(threshold=h), threshold=float(h)) for h in thresholds]
    settings += list(budgets)
    names = [s.name for s in settings]
    if len(set(names)) != len(names):
        raise ValueError(f"eval sweep: repeated settings {names}; list each r and threshold once")
    if own is not None and own.name not in names:
        settings.insert(0, own)
    settings = settings or [EvalSetting(default)]
    return settings + ([EvalSetting("dense", dense=True)] if dense else [])


def own_setting(r: int | None = None, threshold: float | None = None) -> EvalSetting | None:
    """The setting of a run's own policy (top-r or threshold); None without one."""
    if r is not None:
        return EvalSetting(setting_name(r=r), r=int(r))
    if threshold is not None:
        return EvalSetting(setting_name(threshold=threshold), threshold=float(threshold))
    return None


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


def sweep_figure(
    sweep: Sequence[EvalSetting],
    results: Mapping[str, Mapping[str, float]],
    gflops: Mapping[str, Mapping[str, float]],
    metric: str,
    unit: str = "video",
    own: str | None = None,
    title: str | None = None,
) -> Figure | None:
    """Accuracy vs GFlops of an evaluation sweep, as a matplotlib figure (800 x 500 px).

    One line per family of settings (top-r, thresholds, calibrated budgets,
    each ordered by GFlops and labelled with its name), a point for ``dense`` and
    for any other setting, and a ring around the run's ``own`` setting.
    ``results``: ``{setting: {metric: value}}``; ``gflops``: ``{setting:
    {"total": GFlops per unit}}``. None when no setting has both numbers.
    """
    from matplotlib.figure import Figure

    points = {
        s.name: (gflops[s.name]["total"], results[s.name][metric])
        for s in sweep
        if s.name in gflops and metric in results.get(s.name, {})
    }
    if not points:
        return None
    families = {
        "top-r": [s for s in sweep if s.r is not None and s.name in points],
        "threshold": [s for s in sweep if s.threshold is not None and s.name in points],
        "calibrated": [s for s in sweep if s.budget is not None and s.name in points],
    }
    figure = Figure(figsize=(8, 5), dpi=100)
    axes = figure.add_subplot()
    for label, settings in families.items():
        if not settings:
            continue
        settings = sorted(settings, key=lambda s: points[s.name][0])
        xs, ys = zip(*(points[s.name] for s in settings))
        axes.plot(xs, ys, marker="o", label=label)
        for setting, x, y in zip(settings, xs, ys):
            axes.annotate(setting.name, (x, y), textcoords="offset points", xytext=(4, 4))
    for setting in sweep:
        if setting.name in points and all(
            v is None for v in (setting.r, setting.threshold, setting.budget)
        ):
            x, y = points[setting.name]
            marker = "*" if setting.dense else "s"
            axes.plot([x], [y], marker=marker, markersize=12, linestyle="none", label=setting.name)
    if own in points:
        x, y = points[own]
        axes.plot(
            [x], [y], marker="o", markersize=16, markerfacecolor="none", markeredgecolor="black",
            linestyle="none", label=f"own setting ({own})",
        )  # fmt: skip
    axes.set_xlabel(f"GFlops per {unit}")
    axes.set_ylabel(metric)
    axes.grid(alpha=0.3)
    axes.legend()
    if title:
        axes.set_title(title)
    figure.tight_layout()
    return figure
