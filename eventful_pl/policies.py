"""Token selection policies: which tokens a gate updates on an incremental frame.

A policy maps the per-token error norms of a batch, shape (B, N), to an index of
shape (B, k): k token positions for each of the B independent streams.

Batches and the threshold policy: each item needs a different number of
tokens, but the index is one (B, k) tensor (static per call, no Python loop).
:class:`ThresholdPolicy` therefore sets k to the largest per-item count and
gives every item its k largest-error tokens: each item updates at least all of
its own over-threshold tokens, plus (if another item needed more) its next
largest errors. Updating more tokens than needed only makes a gate more exact,
and operation counts report the k tokens actually computed. With B = 1 the
selection is exactly the over-threshold set.

Per-gate policies: :meth:`TokenPolicy.for_gate` gives the policy one gate uses,
from the gate's module name; :func:`eventful_pl.gates.set_policy` calls it for
each gate. Most policies return themselves. :class:`PerGatePolicy` (e.g. a
top-r per gate) and :class:`CalibratedThresholdPolicy` (a threshold per gate,
read from a calibration file written by ``cli.py calibrate``) return each
gate's own policy. Gates are named ``blocks.<i>.<qkv|proj|mlp>_gate`` (the
module path inside the backbone, :func:`gate_key`).
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


class TokenPolicy(ABC):
    """Chooses tokens to update from their error norms."""

    #: Update every token on each ``refresh_every``-th incremental frame of a
    #: gate (counted from its flush); None: never (the default).
    refresh_every: int | None = None

    def for_gate(self, name: str) -> TokenPolicy:
        """The policy the gate named ``name`` uses (this one, unless per gate)."""
        return self

    @abstractmethod
    def select(self, norms: Tensor) -> Tensor:
        """Error norms (B, N) -> token index (B, k), dtype long."""

    def num_selected(self, num_tokens: int) -> int | None:
        """The static k for ``num_tokens`` tokens, or None if it varies."""
        return None

    def validate(self, num_tokens: int) -> None:  # noqa: B027 (optional hook)
        """Raises ValueError if the policy cannot run on ``num_tokens`` tokens."""

    def __call__(self, norms: Tensor) -> Tensor:
        return self.select(norms)


def counts_over_threshold(norms: Tensor, threshold: float) -> Tensor:
    """The largest per-item count of error norms (..., B, N) over
    ``threshold``: the tokens a threshold policy updates, shape (...)."""
    return norms.gt(threshold).sum(dim=-1).amax(dim=-1)


def over_threshold(norms: Tensor, threshold: float) -> int:
    """The largest per-item count of error norms (B, N) over ``threshold``."""
    return int(counts_over_threshold(norms, threshold))


def all_tokens(norms: Tensor) -> Tensor:
    """The index (B, N) of every token, for norms (B, N)."""
    b, n = norms.shape
    return torch.arange(n, device=norms.device).expand(b, n)


class TopRPolicy(TokenPolicy):
    """Selects the ``r`` tokens with the largest error norm (static shape).

    Args:
        r: Tokens updated per frame and batch item, ``1 <= r <= N``.
    """

    def __init__(self, r: int) -> None:
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"top-r policy: r must be a positive integer, got r={r!r}")
        self.r = r

    def validate(self, num_tokens: int) -> None:
        if self.r > num_tokens:
            raise ValueError(
                f"top-r policy: r={self.r} exceeds the number of tokens N={num_tokens}; "
                f"use r <= {num_tokens} (r = N updates every token)"
            )

    def num_selected(self, num_tokens: int) -> int:
        return self.r

    def select(self, norms: Tensor) -> Tensor:
        n = norms.shape[-1]
        self.validate(n)
        if self.r == n:
            return all_tokens(norms)
        return norms.topk(self.r, dim=-1, sorted=False).indices

    def __repr__(self) -> str:
        return f"TopRPolicy(r={self.r})"


class TopFractionPolicy(TokenPolicy):
    """Top-r with ``r = floor(fraction * N)``.

    Args:
        fraction: Fraction of tokens updated per frame, in [0, 1].
    """

    def __init__(self, fraction: float) -> None:
        if not 0.0 <= float(fraction) <= 1.0:
            raise ValueError(
                f"top-fraction policy: fraction must lie in [0, 1], got fraction={fraction!r}"
            )
        self.fraction = float(fraction)

    def num_selected(self, num_tokens: int) -> int:
        return math.floor(self.fraction * num_tokens)

    def select(self, norms: Tensor) -> Tensor:
        n = norms.shape[-1]
        k = self.num_selected(n)
        if k == n:
            return all_tokens(norms)
        return norms.topk(k, dim=-1, sorted=False).indices

    def __repr__(self) -> str:
        return f"TopFractionPolicy(fraction={self.fraction})"


def _check_optional_positive(value: int | None, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{what} must be a positive integer or None (off), got {value!r}")
    return value


def _check_adaptivity(value: float, what: str) -> float:
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{what}: adaptivity must lie in [0, 1], got {value!r}")
    return float(value)


class ThresholdPolicy(TokenPolicy):
    """Selects every token whose error norm exceeds ``threshold``.

    In a batch, k is the largest per-item count and each item takes its k
    largest errors (so at least all its own over-threshold tokens); see the
    module docstring.

    Args:
        threshold: Norm threshold h >= 0.
        max_tokens: At most this many tokens per frame (the largest errors), so
            that a scene cut cannot blow a frame's budget; None: no cap.
        refresh_every: Update every token on each K-th incremental frame
            (None: never).
    """

    def __init__(
        self,
        threshold: float,
        max_tokens: int | None = None,
        refresh_every: int | None = None,
    ) -> None:
        if not float(threshold) >= 0.0:
            raise ValueError(
                f"threshold policy: threshold must be >= 0, got threshold={threshold!r}"
            )
        self.threshold = float(threshold)
        self.max_tokens = _check_optional_positive(max_tokens, "threshold policy: max_tokens")
        self.refresh_every = _check_optional_positive(
            refresh_every, "threshold policy: refresh_every"
        )

    def select(self, norms: Tensor) -> Tensor:
        return self.select_at(norms, self.threshold)

    def select_at(self, norms: Tensor, threshold: float) -> Tensor:
        """The selection for error norms (B, N) at ``threshold`` (with the cap)."""
        return self.take(norms, over_threshold(norms, threshold))

    def take(self, norms: Tensor, k: int) -> Tensor:
        """The ``k`` largest errors of each item (at most the cap): index (B, k)."""
        if self.max_tokens is not None:
            k = min(k, self.max_tokens)
        if k == norms.shape[-1]:
            return all_tokens(norms)
        return norms.topk(k, dim=-1, sorted=False).indices

    def __repr__(self) -> str:
        extra = "".join(
            f", {name}={value}"
            for name, value in (
                ("max_tokens", self.max_tokens),
                ("refresh_every", self.refresh_every),
            )
            if value is not None
        )
        return f"ThresholdPolicy(threshold={self.threshold}{extra})"


class TrackingThresholdPolicy(ThresholdPolicy):
    """A threshold that tracks a target update rate, so that a budget
    calibrated on some clips holds on other content.

    Each frame, the calibrated ``threshold`` says how many tokens it would
    update (``k``, the largest per-item count over the threshold). The gate
    keeps a running ratio of those counts to its target (``activity``: 2
    when the content so far moves twice as much as the calibration clips')
    and updates the ``k / activity`` largest errors instead: busy frames
    still get more updates than quiet ones, and from the first frame on the
    average stays near ``target``. What is left over (updates beyond
    ``target`` times the tokens seen, in units of one frame's target) scales
    the next frame's count by ``exp(-gain * excess)``. Until some error has
    crossed the threshold (content quieter than any calibration frame), the
    threshold itself is lowered by that factor instead, so that quiet content
    also spends the target.

    ``adaptivity`` (beta) sets how far a frame's count follows its content:
    the count is ``m * (k / m) ** beta`` over its running mean, with ``m``
    the target's tokens per frame. 1: in proportion to ``k`` (as above);
    0: ``m`` on every frame (top-r at the target rate, fractional rates
    kept on average by the excess); in between, busy frames get more
    updates than quiet ones, but less than in proportion.

    Args:
        threshold: The calibrated threshold h >= 0.
        target: Fraction of tokens to update on average, in (0, 1].
        gain: Log-change of the next frame's count (or threshold) per frame's
            worth of excess updates.
        adaptivity: Exponent beta in [0, 1] of a frame's count on its
            over-threshold count.
        max_tokens, refresh_every: See :class:`ThresholdPolicy`.
    """

    def __init__(
        self,
        threshold: float,
        target: float,
        gain: float = 0.3,
        adaptivity: float = 1.0,
        max_tokens: int | None = None,
        refresh_every: int | None = None,
    ) -> None:
        super().__init__(threshold, max_tokens=max_tokens, refresh_every=refresh_every)
        if not 0.0 < float(target) <= 1.0:
            raise ValueError(f"tracking threshold: target must lie in (0, 1], got {target!r}")
        self.target = float(target)
        self.gain = float(gain)
        self.adaptivity = _check_adaptivity(adaptivity, "tracking threshold")
        self.selected = 0  # tokens updated (k x B per frame)
        self.offered = 0  # tokens seen (N x B per frame)
        self.weight = 0.0  # sum over frames of B x the count before normalising

    def excess(self, tokens_per_frame: int) -> float:
        """Updates beyond the target so far, in frames' worth of target
        (``tokens_per_frame``: B x N)."""
        return (self.selected - self.target * self.offered) / (self.target * tokens_per_frame)

    def correction(self, tokens_per_frame: int) -> float:
        """``exp(gain * excess)`` (bounded): the next frame's count is divided
        by it, or, before any error crossed the threshold, the threshold
        multiplied by it."""
        return math.exp(min(max(self.gain * self.excess(tokens_per_frame), -30.0), 30.0))

    def current_threshold(self, tokens_per_frame: int) -> float:
        """The threshold while no error has crossed the calibrated one."""
        return self.threshold * self.correction(tokens_per_frame)

    def select(self, norms: Tensor) -> Tensor:
        batch, n = norms.shape
        over = over_threshold(norms, self.threshold)
        if self.adaptivity == 1.0:  # the count itself, exactly (no float round trip)
            count = float(over)
        else:
            per_frame = self.target * n
            count = per_frame * (over / per_frame) ** self.adaptivity
        self.weight += count * batch
        if self.weight == 0:
            index = self.select_at(norms, self.current_threshold(norms.numel()))
        else:
            # Running mean of the counts relative to the target's.
            activity = self.weight / (self.target * (self.offered + norms.numel()))
            k = round(count / activity / self.correction(norms.numel()))
            index = self.take(norms, min(n, k))
        self.selected += index.numel()
        self.offered += norms.numel()
        return index

    def __repr__(self) -> str:
        extra = f", adaptivity={self.adaptivity}" if self.adaptivity != 1.0 else ""
        return f"TrackingThresholdPolicy(threshold={self.threshold}, target={self.target}{extra})"


def gate_key(name: str) -> str:
    """A gate's key in per-gate policies: its module path from the backbone's
    ``blocks`` on (``spatial.blocks.3.qkv_gate`` -> ``blocks.3.qkv_gate``)."""
    parts = name.split(".")
    if "blocks" in parts:
        last = len(parts) - 1 - parts[::-1].index("blocks")
        return ".".join(parts[last:])
    return name


class _PerGate(TokenPolicy):
    """Shared parts of the per-gate policies: they choose tokens only through
    the policy :meth:`for_gate` gives each gate."""

    def select(self, norms: Tensor) -> Tensor:
        raise RuntimeError(
            f"{type(self).__name__} holds one policy per gate and cannot select tokens "
            "itself: give it to the gates with model.set_policy(policy) (or "
            "eventful_pl.set_policy(model, policy)), which hands each gate its own"
        )


class PerGatePolicy(_PerGate):
    """A policy of its own for each gate, e.g. a top-r per gate.

    Args:
        policies: Gate key (:func:`gate_key`, e.g. ``"blocks.0.mlp_gate"``) ->
            that gate's policy.
        default: The policy of gates not in ``policies`` (None: every gate must
            be listed).
    """

    def __init__(
        self, policies: Mapping[str, TokenPolicy], default: TokenPolicy | None = None
    ) -> None:
        self.policies = {gate_key(k): v for k, v in policies.items()}
        self.default = default

    def for_gate(self, name: str) -> TokenPolicy:
        policy = self.policies.get(gate_key(name), self.default)
        if policy is None:
            raise ValueError(
                f"PerGatePolicy has no policy for gate {gate_key(name)!r} (it lists "
                f"{sorted(self.policies)[:4]}...): add it, or give a default policy"
            )
        return policy.for_gate(name)

    def validate(self, num_tokens: int) -> None:
        for policy in [*self.policies.values(), self.default]:
            if policy is not None:
                policy.validate(num_tokens)

    def __repr__(self) -> str:
        return f"PerGatePolicy({len(self.policies)} gates, default={self.default!r})"


#: The ``format`` field of a calibration file.
CALIBRATION_FORMAT = "eventful-pl-calibration"
CALIBRATION_VERSION = 1


def read_calibration(path: str | Path) -> dict[str, Any]:
    """A calibration file's contents (checked): ``{"format", "version", "unit",
    "policies": [{"budget", "thresholds", ...}, ...], ...}``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as error:
        raise ValueError(
            f"calibration file {path} does not exist: write it with `python cli.py calibrate "
            "--config <config> --budget_gflops <budget>` (or fix the path)"
        ) from error
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"calibration file {path} is not readable JSON: {error}") from error
    if not isinstance(data, dict) or data.get("format") != CALIBRATION_FORMAT:
        raise ValueError(
            f"{path} is not a calibration file (no format {CALIBRATION_FORMAT!r}); "
            "write one with `python cli.py calibrate`"
        )
    if data.get("version") != CALIBRATION_VERSION:
        raise ValueError(
            f"calibration file {path} has version {data.get('version')!r}; this code reads "
            f"version {CALIBRATION_VERSION}: calibrate again"
        )
    policies = data.get("policies")
    if not isinstance(policies, list) or not policies:
        raise ValueError(f"calibration file {path} holds no policies: calibrate again")
    for entry in policies:
        thresholds = entry.get("thresholds") if isinstance(entry, dict) else None
        if not isinstance(thresholds, dict) or not thresholds:
            raise ValueError(f"calibration file {path}: a policy without thresholds")
    return data


class CalibratedThresholdPolicy(_PerGate):
    """A threshold of its own for each gate, chosen to meet a compute budget.

    Give ``thresholds`` directly, or ``path``: a calibration file written by
    ``cli.py calibrate`` (JSON; one policy per budget), with ``budget`` naming
    the policy when the file holds several.

    Each gate gets a :class:`ThresholdPolicy` (see :meth:`for_gate`) when the
    policy is set with ``model.set_policy(policy)`` (or
    :func:`eventful_pl.gates.set_policy`); a gate built with the policy
    itself refuses to select. In a LightningModule's YAML, name the budgets
    instead (``eval_budgets: [90]``, ``calibration: vitdet_b.calibration.json``):
    each becomes an evaluation setting that sets the policy.

    Args:
        thresholds: Gate key (:func:`gate_key`) -> threshold h >= 0.
        path: Calibration file to read the thresholds from (instead).
        budget: Which of the file's policies (its ``budget``, in the file's
            unit); None: the file's only one.
        default: Threshold of gates not listed (None: every gate must be listed).
        max_tokens: Per-gate cap on the tokens updated per frame (one number
            for every gate, or gate key -> cap); None: the file's (or no) cap.
        refresh_every: Update every token each K-th frame; None: the file's
            (or never).
        track_budget: Give each gate a :class:`TrackingThresholdPolicy` that
            keeps its average update rate at its target (``targets``), so that
            the budget holds on content unlike the calibration clips; None:
            the file's (or off).
        targets: Gate key -> the fraction of tokens the gate updates on
            average: the rate it reached in calibration, or one rate for
            every gate (read from the file with ``path``).
        adaptivity: With ``track_budget``, how far a frame's updates follow
            its content (see :class:`TrackingThresholdPolicy`); None: the
            file's (or 1).
    """

    def __init__(
        self,
        thresholds: Mapping[str, float] | None = None,
        path: str | None = None,
        budget: float | None = None,
        default: float | None = None,
        max_tokens: int | Mapping[str, int] | None = None,
        refresh_every: int | None = None,
        track_budget: bool | None = None,
        targets: Mapping[str, float] | None = None,
        adaptivity: float | None = None,
    ) -> None:
        if (thresholds is None) == (path is None):
            raise ValueError("CalibratedThresholdPolicy: give thresholds or path (one of them)")
        self.path = None if path is None else str(path)
        self.budget = None if budget is None else float(budget)
        self.info: dict[str, Any] = {}
        if path is not None:
            entry = self._entry(read_calibration(path))
            thresholds = entry["thresholds"]
            max_tokens = entry.get("max_tokens") if max_tokens is None else max_tokens
            refresh_every = entry.get("refresh_every") if refresh_every is None else refresh_every
            track_budget = entry.get("track_budget") if track_budget is None else track_budget
            targets = entry.get("targets") if targets is None else targets
            adaptivity = entry.get("adaptivity") if adaptivity is None else adaptivity
            self.info = {
                k: v
                for k, v in entry.items()
                if k not in ("thresholds", "targets", "track_budget", "adaptivity")
            }
        self.thresholds = {gate_key(k): float(v) for k, v in thresholds.items()}
        for key, h in [*self.thresholds.items(), ("default", default)]:
            if h is not None and not float(h) >= 0.0:
                raise ValueError(f"CalibratedThresholdPolicy: threshold of {key} must be >= 0")
        self.default = None if default is None else float(default)
        if isinstance(max_tokens, Mapping):
            self.max_tokens: int | dict[str, int] | None = {
                gate_key(k): _check_optional_positive(v, f"max_tokens of {k}")
                for k, v in max_tokens.items()
            }
        else:
            self.max_tokens = _check_optional_positive(max_tokens, "max_tokens")
        self.refresh_every = _check_optional_positive(refresh_every, "refresh_every")
        self.targets = {gate_key(k): float(v) for k, v in (targets or {}).items()}
        self.track_budget = bool(track_budget)
        self.adaptivity = _check_adaptivity(
            1.0 if adaptivity is None else adaptivity, "CalibratedThresholdPolicy"
        )
        if self.track_budget and not self.targets:
            raise ValueError(
                "CalibratedThresholdPolicy: track_budget needs the calibration's per-gate "
                "update rates (targets); calibrate again to write them"
            )
        # One tracking policy per gate, kept across set_policy calls (its counts).
        self._tracking: dict[str, TrackingThresholdPolicy] = {}

    def _entry(self, data: dict[str, Any]) -> dict[str, Any]:
        policies = data["policies"]
        budgets = [p.get("budget") for p in policies]
        if self.budget is None:
            if len(policies) != 1:
                raise ValueError(
                    f"calibration file {self.path} holds policies for budgets {budgets}: "
                    "choose one with budget"
                )
            return policies[0]
        for entry in policies:
            if entry.get("budget") is not None and math.isclose(
                float(entry["budget"]), self.budget, rel_tol=1e-6
            ):
                return entry
        raise ValueError(
            f"calibration file {self.path} has no policy for budget {self.budget:g} "
            f"(it has {budgets}); calibrate for it with --budget_gflops {self.budget:g}"
        )

    def cap(self, key: str) -> int | None:
        """The token cap of gate ``key`` (None: no cap)."""
        if isinstance(self.max_tokens, dict):
            return self.max_tokens.get(key)
        return self.max_tokens

    def for_gate(self, name: str) -> ThresholdPolicy:
        """The :class:`ThresholdPolicy` of gate ``name`` (its threshold, cap and refresh)."""
        key = gate_key(name)
        h = self.thresholds.get(key, self.default)
        if h is None:
            raise ValueError(
                f"CalibratedThresholdPolicy has no threshold for gate {key!r} (it knows "
                f"{len(self.thresholds)} gates, e.g. {sorted(self.thresholds)[:3]}): the "
                "calibration was made for another model; calibrate this one, or set default"
            )
        if not self.track_budget:
            return ThresholdPolicy(h, max_tokens=self.cap(key), refresh_every=self.refresh_every)
        if key not in self._tracking:
            target = min(max(self.targets.get(key, 1.0), 1e-3), 1.0)
            self._tracking[key] = TrackingThresholdPolicy(
                h,
                target,
                adaptivity=self.adaptivity,
                max_tokens=self.cap(key),
                refresh_every=self.refresh_every,
            )
        return self._tracking[key]

    def to_dict(self) -> dict[str, Any]:
        """This policy as one entry of a calibration file."""
        return {
            **self.info,
            "budget": self.budget,
            "thresholds": dict(self.thresholds),
            "max_tokens": self.max_tokens,
            "refresh_every": self.refresh_every,
            "track_budget": self.track_budget,
            "targets": dict(self.targets),
            "adaptivity": self.adaptivity,
        }

    def __repr__(self) -> str:
        where = f"path={self.path!r}, budget={self.budget}" if self.path else ""
        return (
            f"CalibratedThresholdPolicy({len(self.thresholds)} gates{', ' if where else ''}{where})"
        )


def write_calibration(
    path: str | Path,
    policies: list[CalibratedThresholdPolicy],
    unit: str,
    **fields: Any,
) -> Path:
    """Writes ``policies`` (one per budget) to the calibration file ``path``
    (JSON), with ``unit`` (what the budgets count, e.g. ``"GFlops per frame"``)
    and any other ``fields`` (model, clips, ...). Returns the path."""
    path = Path(path)
    data = {
        "format": CALIBRATION_FORMAT,
        "version": CALIBRATION_VERSION,
        "unit": unit,
        **fields,
        "policies": [p.to_dict() for p in policies],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)
    return path


POLICIES: dict[str, type[TokenPolicy]] = {
    "top_r": TopRPolicy,
    "threshold": ThresholdPolicy,
    "top_fraction": TopFractionPolicy,
}

#: Policies that hold one policy per gate (not built by name).
PER_GATE_POLICIES: tuple[type[TokenPolicy], ...] = (PerGatePolicy, CalibratedThresholdPolicy)


def build_policy(name: str, value: float) -> TokenPolicy:
    """Builds a policy by name: ``build_policy("top_r", 50)``."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}")
    if name == "top_r":
        return TopRPolicy(int(value))
    return POLICIES[name](value)
