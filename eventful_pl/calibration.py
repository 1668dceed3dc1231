"""Per-gate thresholds calibrated to a compute budget.

One threshold for every gate treats a gate in the first block like one in the
last, and an MLP gate (8 D^2 operations per updated token) like a projection
gate (D^2), although their error norms have different scales and their errors
reach the output with different weights. :class:`Calibrator` gives each gate
``g`` its own threshold ``h_g = s * a_g`` and fits the scale ``s`` to a budget
by running the model on calibration streams:

1. Per-token cost ``c_g`` of each gate: operations an updated token adds to
   its block, counted on one flush and four incremental frames of random
   tokens (:func:`gate_token_costs`).
2. Sensitivity ``w_g`` of the output to an error at each gate: the mean
   squared norm, per token, of the gradient of a random projection of the
   backbone's output with respect to the gate's output, on a few frames
   (:func:`gate_sensitivities`; ``E ||J^T u||^2 = ||J||_F^2``).
3. Skipping a token of error ``e`` costs about ``w_g |e|^2`` in squared output
   error and saves ``c_g`` operations, so the Lagrangian optimum updates it
   when ``w_g |e|^2 > lambda c_g``: ``h_g = sqrt(lambda) * sqrt(c_g / w_g)``.
   The calibrator tries the shapes ``a_g = (c_g / w_g) ** (gamma / 2)`` for a
   few ``gamma`` (``gamma = 0`` is the single global threshold, ``1`` the
   Lagrangian one), fits ``s`` for each to the budget with measured operation
   counts, and keeps the shape whose outputs are closest to the dense model's.
   So on the calibration streams the result is never worse than the best
   single threshold at the same measured cost.
4. With budget tracking (each gate held at an average update rate, see
   :class:`~eventful_pl.policies.TrackingThresholdPolicy`), two sets of
   rates compete: the per-gate rates the chosen thresholds updated in the
   fit, and one rate ``u`` for every gate (top-r's rate at the budget, with
   the fitted thresholds or each gate's threshold at rate ``u`` on the
   calibration streams, the better; the thresholds then only say which
   frames get more updates). The one whose
   tracked outputs are closer to the dense model's on the calibration
   streams is kept. Uneven rates pay at small budgets; at large ones an even
   spread (as top-r's) can be better.

Fitting ``s``: each run records every gate's error norms; the count of tokens
over a candidate threshold predicts the next run's cost, which is then
measured. Once measured runs bracket the budget, the scale is interpolated
between them (in log scale) until the cost is within the tolerance.

Units: GFlops per frame of the backbone (a frame of one stream), averaged over
all frames of the calibration streams, first (flush) frames included; the
error is the relative L2 error of the backbone's output tokens against the
dense model's over all frames after the first of each stream.

Streams are lists of token frames (B, N, D) (the backbone's input, e.g. patch
embeddings); a frame holds B independent streams.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from eventful_pl.counting import OpCounter, attach_counter, count_ops
from eventful_pl.gates import TokenGate, set_policy
from eventful_pl.policies import (
    CalibratedThresholdPolicy,
    PerGatePolicy,
    ThresholdPolicy,
    TokenPolicy,
    TopRPolicy,
    counts_over_threshold,
    gate_key,
)
from eventful_pl.state import reset_stream_state

#: A stream: token frames (B, N, D) in order (B independent streams).
Stream = Sequence[Tensor]

#: Which average update rates a tracked calibrated policy holds
#: (:meth:`Calibrator.calibrate`): the better of the two, each gate's fitted
#: rate, or one rate for every gate.
RATES = ("best", "per-gate", "uniform")


def token_gates(model: nn.Module) -> dict[str, TokenGate]:
    """The token gates of ``model`` by key (:func:`~eventful_pl.policies.gate_key`), in order."""
    return {gate_key(n): m for n, m in model.named_modules() if isinstance(m, TokenGate)}


def _check_streams(streams: Sequence[Stream], what: str = "streams") -> None:
    if not streams or any(len(s) < 2 for s in streams):
        raise ValueError(
            f"{what}: need at least one stream, each of at least 2 frames (a flush and an "
            "incremental frame); use longer or more clips"
        )


def _frame_counts(
    stacked: Sequence[Tensor], threshold: float, max_tokens: int | None = None
) -> list[Tensor]:
    """Tokens a threshold policy updates on each recorded frame: for each
    (F, B, N) block of error norms, the (F,) counts over ``threshold`` (the
    largest of the batch, as the policy takes it), capped at ``max_tokens``."""
    counts = [counts_over_threshold(norms, threshold) for norms in stacked]
    if max_tokens is not None:
        counts = [c.clamp(max=max_tokens) for c in counts]
    return counts


def _bisect_log(
    decreasing: Callable[[float], float], target: float, a: float, b: float
) -> tuple[float, float]:
    """The bracket ``(a, b)`` of ``log x``, narrowed from the given one by 40
    halvings, around where ``decreasing`` (non-increasing in ``x``) crosses
    ``target``: ``decreasing(e^a) > target >= decreasing(e^b)``."""
    for _ in range(40):
        mid = 0.5 * (a + b)
        if decreasing(math.exp(mid)) > target:
            a = mid
        else:
            b = mid
    return a, b


@dataclass
class RunResult:
    """Outcome of running the backbone on streams under one policy.

    ``gflops``: backbone GFlops per frame (all frames); ``error``: relative L2
    error of the outputs against the reference over the frames after the
    first; ``updated``: mean fraction of tokens each gate updated on
    incremental frames; ``frames``: frames counted (streams x B x T).
    """

    gflops: float
    error: float
    updated: dict[str, float] = field(default_factory=dict)
    frames: int = 0


class _Recorder(TokenPolicy):
    """Wraps one gate's policy; records the error norms (B, N) it sees and k."""

    def __init__(self, inner: TokenPolicy) -> None:
        self.inner = inner
        self.refresh_every = inner.refresh_every
        self.norms: list[Tensor] = []
        self.selected = 0
        self.offered = 0
        self._stacked: list[Tensor] | None = None

    def stacked(self) -> list[Tensor]:
        """The recorded norms as (F, B, N) tensors, one per batch size B."""
        if self._stacked is None:
            groups: dict[int, list[Tensor]] = {}
            for norms in self.norms:
                groups.setdefault(norms.shape[0], []).append(norms)
            self._stacked = [torch.stack(g) for g in groups.values()]
        return self._stacked

    def num_selected(self, num_tokens: int) -> int | None:
        return self.inner.num_selected(num_tokens)

    def select(self, norms: Tensor) -> Tensor:
        index = self.inner.select(norms)
        self.norms.append(norms.detach().float().clone())
        self.selected += index.numel()
        self.offered += norms.numel()
        return index


@contextmanager
def _policy_set(model: nn.Module, policy: TokenPolicy) -> Iterator[dict[str, _Recorder]]:
    """Sets ``policy`` on ``model``'s gates, each wrapped in a recorder; restores
    the gates' own policies afterwards."""
    gates = token_gates(model)
    saved = {k: g.policy for k, g in gates.items()}
    set_policy(model, policy)
    recorders = {}
    for key, gate in gates.items():
        recorders[key] = gate.policy = _Recorder(gate.policy)
    try:
        yield recorders
    finally:
        for key, gate in gates.items():
            gate.policy = saved[key]
        reset_stream_state(model)


def _frames_of(streams: Sequence[Stream]) -> int:
    return sum(len(s) * s[0].shape[0] for s in streams)


@torch.no_grad()
def dense_outputs(model: nn.Module, streams: Sequence[Stream]) -> tuple[list[list[Tensor]], float]:
    """The dense outputs of every frame (each frame run as a flush, which
    recomputes every token) and the dense cost in GFlops per frame."""
    _check_streams(streams)
    outputs = []
    with count_ops(model) as counter:
        for stream in streams:
            outs = []
            for frame in stream:
                reset_stream_state(model)
                outs.append(model(frame).clone())
            outputs.append(outs)
    reset_stream_state(model)
    return outputs, counter.total / 1e9 / _frames_of(streams)


@torch.no_grad()
def run_policy(
    model: nn.Module,
    streams: Sequence[Stream],
    policy: TokenPolicy,
    reference: Sequence[Sequence[Tensor]],
    recorders: dict[str, _Recorder] | None = None,
) -> RunResult:
    """Runs ``streams`` through ``model`` under ``policy`` (state reset per
    stream), counting operations and comparing the outputs with ``reference``
    (e.g. :func:`dense_outputs`). With ``recorders`` (a dict to fill), keeps
    each gate's recorder (its error norms)."""
    _check_streams(streams)
    err2 = torch.zeros((), dtype=torch.float64)
    ref2 = torch.zeros((), dtype=torch.float64)
    with _policy_set(model, policy) as recs, count_ops(model) as counter:
        for stream, refs in zip(streams, reference, strict=True):
            reset_stream_state(model)
            for t, (frame, ref) in enumerate(zip(stream, refs, strict=True)):
                out = model(frame)
                if t:
                    err2 += (out.double() - ref.double()).square().sum()
                    ref2 += ref.double().square().sum()
        if recorders is not None:
            recorders.update(recs)
        updated = {k: r.selected / r.offered if r.offered else 0.0 for k, r in recs.items()}
    frames = _frames_of(streams)
    error = float(err2.sqrt() / ref2.sqrt().clamp_min(1e-30))
    return RunResult(counter.total / 1e9 / frames, error, updated, frames)


@torch.no_grad()
def gate_token_costs(model: nn.Module, example: Tensor, seed: int = 0) -> dict[str, float]:
    """Operations one more updated token costs at each gate (in its block).

    Counts, per block, one incremental frame with every gate at top-r ``r0``
    and one with each kind of gate (``qkv_gate``, ``proj_gate``, ...) at
    ``r1``, on random tokens shaped like ``example`` (B, N, D) with B = 1.
    """
    gates = token_gates(model)
    if not gates:
        raise ValueError(f"{type(model).__name__} has no token gates: nothing to calibrate")
    n_tokens = model.num_tokens if hasattr(model, "num_tokens") else example.shape[1]
    r0 = max(1, n_tokens // 8)
    r1 = min(n_tokens, max(r0 + 1, n_tokens // 4))
    blocks: dict[str, list[str]] = {}  # block path (as in the keys) -> its gate keys
    block_modules: dict[str, nn.Module] = {}
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if isinstance(module, TokenGate):
            path = gate_key(name).rsplit(".", 1)[0]
            blocks.setdefault(path, []).append(gate_key(name))
            block_modules[path] = modules[name.rsplit(".", 1)[0]]
    kinds = sorted({key.rsplit(".", 1)[1] for key in gates})
    gen = torch.Generator(device="cpu").manual_seed(seed)
    shape = (1, *example.shape[1:])

    def frame() -> Tensor:
        return torch.randn(shape, generator=gen).to(example)

    counters = {path: OpCounter() for path in blocks}
    saved = {k: g.policy for k, g in gates.items()}
    try:
        reset_stream_state(model)
        set_policy(model, TopRPolicy(r0))
        model(frame())  # flush
        per_kind = {}
        for kind in [None, *kinds]:
            policies = {k: TopRPolicy(r1) for k in gates if k.rsplit(".", 1)[1] == kind}
            set_policy(model, PerGatePolicy(policies, default=TopRPolicy(r0)))
            for path, counter in counters.items():
                counter.reset()
                attach_counter(block_modules[path], counter)
            model(frame())
            per_kind[kind] = {path: c.total for path, c in counters.items()}
            for path in blocks:
                attach_counter(block_modules[path], None)
    finally:
        for key, gate in gates.items():
            gate.policy = saved[key]
        reset_stream_state(model)
    costs = {}
    for path, keys in blocks.items():
        for key in keys:
            kind = key.rsplit(".", 1)[1]
            delta = per_kind[kind][path] - per_kind[None][path]
            costs[key] = max(float(delta) / (r1 - r0), 1.0)
    return costs


def gate_sensitivities(
    model: nn.Module, frames: Sequence[Tensor], seed: int = 0
) -> dict[str, float]:
    """Mean squared gradient norm per token at each gate's output: how strongly
    an error there reaches the backbone's output.

    Each frame (B, N, D) runs as a flush under autograd; the gradient of
    ``(output * u).sum()`` (``u`` standard normal) with respect to every gate's
    output (B, N, D) gives ``mean_t ||grad_t||^2``. Parameters get no gradient.
    """
    gates = token_gates(model)
    captured: dict[str, Tensor] = {}
    hooks = [
        gate.register_forward_hook(
            lambda module, args, out, key=key: captured.__setitem__(key, out[0])
        )
        for key, gate in gates.items()
    ]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    sums = dict.fromkeys(gates, 0.0)
    try:
        with torch.enable_grad():
            for x in frames:
                captured.clear()
                reset_stream_state(model)
                out = model(x.detach().requires_grad_(True))
                u = torch.randn(out.shape, generator=gen).to(out)
                keys = [k for k in gates if k in captured and captured[k].requires_grad]
                grads = torch.autograd.grad(
                    (out * u).sum(), [captured[k] for k in keys], allow_unused=True
                )
                for key, grad in zip(keys, grads):
                    if grad is not None:
                        sums[key] += float(grad.detach().double().square().sum(-1).mean())
    finally:
        for hook in hooks:
            hook.remove()
        captured.clear()
        reset_stream_state(model)
    count = max(len(frames), 1)
    return {k: max(v / count, 1e-30) for k, v in sums.items()}


@dataclass
class CalibrationResult:
    """A calibrated policy for one budget and what it achieved on the
    calibration streams (``gflops`` per frame, ``error`` vs dense), the shape
    exponent ``gamma`` it uses (0: one global threshold) and its scale."""

    budget: float
    gflops: float
    error: float
    thresholds: dict[str, float]
    gamma: float
    scale: float
    max_tokens: int | None = None
    refresh_every: int | None = None
    #: Fraction of tokens each gate updated in the fit (for ``track_budget``).
    targets: dict[str, float] = field(default_factory=dict)
    #: GFlops and error of every shape tried: {gamma: (gflops, error)}.
    tried: dict[float, tuple[float, float]] = field(default_factory=dict)
    #: The thresholds fitted for every shape tried (``candidates[0.0]``: the
    #: single global threshold, if tried).
    candidates: dict[float, dict[str, float]] = field(default_factory=dict)
    #: With budget tracking: ``"per-gate"`` (each gate's fitted rate) or
    #: ``"uniform"`` (one rate for every gate) and the tracked runs of both:
    #: {rates: (gflops, error)}.
    rates: str = "per-gate"
    tracked: dict[str, tuple[float, float]] = field(default_factory=dict)

    def policy(
        self, budget: float | None = None, track_budget: bool = False
    ) -> CalibratedThresholdPolicy:
        """The policy; ``budget``: the value to file it under (default
        ``self.budget``); ``track_budget``: keep each gate's average update
        rate at the calibrated one (see :class:`CalibratedThresholdPolicy`)."""
        policy = CalibratedThresholdPolicy(
            thresholds=self.thresholds,
            max_tokens=self.max_tokens,
            refresh_every=self.refresh_every,
            track_budget=track_budget,
            targets=self.targets,
        )
        policy.budget = self.budget if budget is None else float(budget)
        policy.info = {
            "calibration_gflops": self.gflops,
            "calibration_error": self.error,
            "gamma": self.gamma,
            "rates": self.rates,
        }
        return policy


class BudgetError(ValueError):
    """A budget the model cannot meet (below its cheapest or above its dense cost)."""


class Calibrator:
    """Fits per-gate thresholds of ``model`` (a backbone with token gates) to
    compute budgets on calibration ``streams``; see the module docstring.

    Args:
        model: The eventful backbone (its gates' policies are restored after each run).
        streams: Calibration streams of token frames (B, N, D).
        gammas: Shape exponents to try (0: one global threshold).
        max_tokens: Per-gate token cap of the calibrated policies (None: off).
        refresh_every: Full refresh every K frames (None: off).
        tolerance: Relative distance to the budget at which a fit stops.
        max_runs: Measured runs per fit at most.
        sensitivity_frames: Frames used for the sensitivities.
        tracking_tolerance: Relative distance to the budget within which a
            tracked run's cost counts as on budget when the rates are chosen
            (a tracker's average on a few short clips carries its start-up
            transient, so it is looser than ``tolerance``).
    """

    def __init__(
        self,
        model: nn.Module,
        streams: Sequence[Stream],
        gammas: Sequence[float] = (0.0, 0.5, 1.0),
        max_tokens: int | None = None,
        refresh_every: int | None = None,
        tolerance: float = 0.01,
        max_runs: int = 8,
        sensitivity_frames: int = 2,
        tracking_tolerance: float = 0.03,
    ) -> None:
        _check_streams(streams, "calibration streams")
        if not gammas:
            raise ValueError("gammas: give at least one shape exponent (0: a global threshold)")
        self.model = model
        self.streams = list(streams)
        self.gammas = [float(g) for g in gammas]
        self.max_tokens = max_tokens
        self.refresh_every = refresh_every
        self.tolerance = float(tolerance)
        self.max_runs = int(max_runs)
        self.tracking_tolerance = float(tracking_tolerance)
        self.gates = token_gates(model)
        if not self.gates:
            raise ValueError(f"{type(model).__name__} has no token gates: nothing to calibrate")
        self.reference, self.dense_gflops = dense_outputs(model, self.streams)
        example = self.streams[0][0]
        self.costs = gate_token_costs(model, example)
        picks = [s[len(s) // 2] for s in self.streams][: max(1, sensitivity_frames)]
        self.sensitivities = gate_sensitivities(model, picks)
        # Cheapest: no token updated after the flush.
        self.min_gflops = self.run({k: math.inf for k in self.gates}).gflops
        self._scale_hint: float | None = None
        self._top_r_runs: dict[int, RunResult] = {}  # r -> top-r on the calibration streams

    # ------------------------------------------------------------ building blocks

    def shape(self, gamma: float) -> dict[str, float]:
        """Per-gate factors ``(c_g / w_g) ** (gamma / 2)``, geometric mean 1."""
        logs = {
            k: 0.5 * gamma * math.log(self.costs[k] / self.sensitivities[k]) for k in self.gates
        }
        mean = sum(logs.values()) / len(logs)
        return {k: math.exp(v - mean) for k, v in logs.items()}

    def policy(self, thresholds: dict[str, float]) -> TokenPolicy:
        """The per-gate threshold policy (with this calibrator's cap and refresh)."""
        return PerGatePolicy(
            {
                k: ThresholdPolicy(
                    h if math.isfinite(h) else 1e30,
                    max_tokens=self.max_tokens,
                    refresh_every=self.refresh_every,
                )
                for k, h in thresholds.items()
            }
        )

    def run(
        self,
        thresholds: dict[str, float] | TokenPolicy,
        streams: Sequence[Stream] | None = None,
        reference: Sequence[Sequence[Tensor]] | None = None,
        recorders: dict[str, _Recorder] | None = None,
    ) -> RunResult:
        """Measures a policy (per-gate thresholds or any policy) on the
        calibration streams, or on other ``streams`` with their ``reference``."""
        policy = thresholds if isinstance(thresholds, TokenPolicy) else self.policy(thresholds)
        if streams is None:
            streams, reference = self.streams, self.reference
        elif reference is None:
            reference, _ = dense_outputs(self.model, streams)
        return run_policy(self.model, streams, policy, reference, recorders)

    def _predict(
        self,
        recorders: dict[str, _Recorder],
        shape: dict[str, float],
        scale: float,
    ) -> float:
        """Incremental-frame operations per frame predicted from recorded norms."""
        total = 0.0
        for key, rec in recorders.items():
            if not rec.norms:
                continue
            stacked = rec.stacked()
            counts = _frame_counts(stacked, scale * shape[key], self.max_tokens)
            k = sum(int(c.sum()) * norms.shape[1] for c, norms in zip(counts, stacked))
            total += self.costs[key] * k
        return total / 1e9 / _frames_of(self.streams)

    # ----------------------------------------------------------------- fitting

    def check_budget(self, budget: float) -> None:
        """Raises :class:`BudgetError` if ``budget`` (GFlops per frame) is out of reach."""
        if budget <= self.min_gflops:
            raise BudgetError(
                f"budget {budget:.4g} GFlops per frame is below the cheapest setting on these "
                f"streams ({self.min_gflops:.4g}: first frames dense, no token updated later); "
                "raise the budget or use longer clips"
            )
        if budget >= self.dense_gflops:
            raise BudgetError(
                f"budget {budget:.4g} GFlops per frame is not below the dense cost "
                f"({self.dense_gflops:.4g}); lower the budget"
            )

    def fit_scale(self, shape: dict[str, float], budget: float) -> tuple[float, RunResult]:
        """The scale ``s`` of thresholds ``s * shape`` whose measured cost is
        closest to ``budget`` (within ``tolerance`` when it converges)."""
        self.check_budget(budget)
        lo: tuple[float, float] | None = None  # (scale, gflops) with gflops > budget
        hi: tuple[float, float] | None = None  # (scale, gflops) with gflops <= budget
        scale = self._scale_hint or self._initial_scale(shape)
        best: tuple[float, RunResult] | None = None
        for _ in range(self.max_runs):
            recorders: dict[str, _Recorder] = {}
            result = self.run({k: scale * a for k, a in shape.items()}, recorders=recorders)
            if best is None or abs(result.gflops - budget) < abs(best[1].gflops - budget):
                best = (scale, result)
            if abs(result.gflops - budget) <= self.tolerance * budget:
                break
            if result.gflops > budget:
                lo = (scale, result.gflops) if lo is None or scale > lo[0] else lo
            else:
                hi = (scale, result.gflops) if hi is None or scale < hi[0] else hi
            if lo and hi:
                # Bracketed: interpolate the measured costs in log scale
                # (kept inside the bracket's middle 80%).
                t = (lo[1] - budget) / (lo[1] - hi[1])
                t = min(max(t, 0.1), 0.9)
                scale = math.exp(math.log(lo[0]) + t * (math.log(hi[0]) - math.log(lo[0])))
                continue
            # Not bracketed yet: the cost at other scales predicted from the
            # error norms seen in this run.
            fixed = result.gflops - self._predict(recorders, shape, scale)
            low, high = (lo[0] if lo else scale * 1e-4), (hi[0] if hi else scale * 1e4)
            guess = self._solve(recorders, shape, budget - fixed, low, high)
            if abs(math.log(guess / scale)) < 0.01:  # no progress: step on
                guess = scale * (1.5 if result.gflops > budget else 1 / 1.5)
            scale = guess
        assert best is not None
        self._scale_hint = best[0]
        return best

    def _initial_scale(self, shape: dict[str, float]) -> float:
        recorders: dict[str, _Recorder] = {}
        self.run(dict.fromkeys(self.gates, 0.0), recorders=recorders)
        norms = torch.cat(
            [torch.cat([n.flatten() for n in r.norms]) / shape[k] for k, r in recorders.items()]
        )
        return float(norms.median().clamp_min(1e-12))

    def _solve(
        self,
        recorders: dict[str, _Recorder],
        shape: dict[str, float],
        target: float,
        low: float,
        high: float,
    ) -> float:
        """The scale in [low, high] whose predicted cost is ``target`` (bisection in log)."""
        a, b = _bisect_log(
            lambda scale: self._predict(recorders, shape, scale),
            target,
            math.log(low),
            math.log(high),
        )
        return math.exp(0.5 * (a + b))

    def tracked(
        self,
        thresholds: dict[str, float],
        targets: dict[str, float],
        recorders: dict[str, _Recorder] | None = None,
    ) -> RunResult:
        """Measures the thresholds with budget tracking at ``targets`` (gate
        key -> average fraction of tokens updated) on the calibration streams."""
        policy = CalibratedThresholdPolicy(
            thresholds=thresholds,
            max_tokens=self.max_tokens,
            refresh_every=self.refresh_every,
            track_budget=True,
            targets=targets,
        )
        return self.run(policy, recorders=recorders)

    def rate_thresholds(self, recorders: dict[str, _Recorder], rate: float) -> dict[str, float]:
        """Each gate's threshold over which, on the recorded error norms, a
        fraction ``rate`` of its tokens lies on average (the per-frame count
        as a threshold policy takes it: the largest of the batch)."""
        thresholds = {}
        for key, rec in recorders.items():
            stacked = rec.stacked()  # [(F, B, N)]
            if not stacked:
                continue
            tokens = sum(norms.shape[0] * norms.shape[-1] for norms in stacked)

            def fraction(h: float, stacked: list[Tensor] = stacked, tokens: int = tokens) -> float:
                return sum(int(c.sum()) for c in _frame_counts(stacked, h)) / tokens

            top = max(float(n.max()) for n in stacked)
            if top <= 0.0:
                thresholds[key] = 0.0
                continue
            # fraction(top e^-30) >= rate >= fraction(top)
            _, hi = _bisect_log(fraction, rate, math.log(top) - 30.0, math.log(top))
            thresholds[key] = math.exp(hi)
        return thresholds

    def fit_uniform_rate(
        self, thresholds: dict[str, float], budget: float
    ) -> tuple[float, dict[str, float], RunResult]:
        """One update rate ``u`` for every gate at ``budget``, the per-gate
        thresholds it is tracked with, and the tracked run on the calibration
        streams.

        ``u`` is top-r's rate at the budget (the fractional ``r / N`` whose
        cost, linear in ``r`` and independent of the content, is the
        budget): tracking a rate holds it on average over any content, so the
        cost is the budget's on other clips too. The thresholds only decide
        which frames get more of a gate's updates: ``thresholds`` (the
        per-gate fit's) or each gate's threshold that a fraction ``u`` of its
        error norms exceeds on these streams (no gate is then asked for many
        times the updates its threshold would give), whichever tracked run is
        closer to the dense model."""
        u = self.top_r_rate(budget)
        targets = dict.fromkeys(self.gates, u)
        recorders: dict[str, _Recorder] = {}
        given = self.tracked(thresholds, targets, recorders)
        at_rate = self.rate_thresholds(recorders, u)
        own = self.tracked(at_rate, targets)
        return (u, thresholds, given) if given.error <= own.error else (u, at_rate, own)

    def prefers_uniform(self, uniform: RunResult, own: RunResult, budget: float) -> bool:
        """Whether the tracked run with one rate for every gate beats the one
        with the per-gate rates: lower error, at a cost within
        ``tracking_tolerance`` of ``budget`` or no further from it than ``own``'s."""
        return uniform.error < own.error and abs(uniform.gflops - budget) <= max(
            self.tracking_tolerance * budget, abs(own.gflops - budget)
        )

    def top_r_rate(self, budget: float) -> float:
        """The fraction of tokens top-r updates at ``budget`` (fractional r / N:
        top-r's cost is linear in r and does not depend on the content)."""
        self.check_budget(budget)
        n_tokens = self.reference[0][0].shape[1]
        return min(max(self._top_r_crossing(budget) / n_tokens, 1e-3), 1.0)

    def calibrate(
        self, budget: float, track_budget: bool = False, rates: str = "best"
    ) -> CalibrationResult:
        """Per-gate thresholds for ``budget`` (backbone GFlops per frame): each
        shape fitted to the budget; the one with the smallest error wins (among
        those within the tolerance, if any). With ``track_budget``, the rates
        the policy tracks are chosen too (step 4 of the module docstring):
        ``rates="best"`` tries both, ``"per-gate"`` or ``"uniform"`` takes
        that one without trying the other."""
        if rates not in RATES:
            raise ValueError(f"rates: choose one of {RATES}, got {rates!r}")
        self.check_budget(budget)
        fits = {}
        for gamma in self.gammas:
            shape = self.shape(gamma)
            scale, result = self.fit_scale(shape, budget)
            fits[gamma] = (shape, scale, result)
        within = [
            g for g, (_, _, r) in fits.items() if abs(r.gflops - budget) <= self.tolerance * budget
        ]
        pool = within or list(fits)
        gamma = min(
            pool, key=lambda g: fits[g][2].error if within else abs(fits[g][2].gflops - budget)
        )
        shape, scale, result = fits[gamma]
        thresholds = {k: scale * a for k, a in shape.items()}
        targets, chosen, tracked = dict(result.updated), "per-gate", {}
        if track_budget and rates != "per-gate":
            u, even, uniform = self.fit_uniform_rate(thresholds, budget)
            tracked["uniform"] = (uniform.gflops, uniform.error)
            take = rates == "uniform"
            if not take:
                own = self.tracked(thresholds, targets)
                tracked["per-gate"] = (own.gflops, own.error)
                take = self.prefers_uniform(uniform, own, budget)
            if take:
                targets, chosen = dict.fromkeys(targets, u), "uniform"
                thresholds = even
        return CalibrationResult(
            budget=float(budget),
            gflops=result.gflops,
            error=result.error,
            thresholds=thresholds,
            gamma=gamma,
            scale=scale,
            max_tokens=self.max_tokens,
            refresh_every=self.refresh_every,
            targets=targets,
            tried={g: (r.gflops, r.error) for g, (_, _, r) in fits.items()},
            candidates={g: {k: sc * a for k, a in sh.items()} for g, (sh, sc, _) in fits.items()},
            rates=chosen,
            tracked=tracked,
        )

    def top_r_for_budget(self, budget: float) -> tuple[int, RunResult]:
        """The top-r (same r at every gate) whose measured cost is closest to
        ``budget`` without exceeding it by more than the tolerance."""
        self.check_budget(budget)
        n_tokens = self.reference[0][0].shape[1]
        r = max(1, min(n_tokens, math.floor(self._top_r_crossing(budget))))
        # The line's two ends and the integers around its crossing, in the order measured.
        candidates = dict.fromkeys((max(2, n_tokens // 2), 1, r, min(r + 1, n_tokens)))
        best = min(candidates, key=lambda v: abs(self._top_r(v).gflops - budget))
        return best, self._top_r(best)

    def _top_r(self, r: int) -> RunResult:
        """Top-r on the calibration streams (each r run once)."""
        if r not in self._top_r_runs:
            self._top_r_runs[r] = self.run(TopRPolicy(r))
        return self._top_r_runs[r]

    def _top_r_crossing(self, budget: float) -> float:
        """The fractional r at which top-r's cost is ``budget``: the cost is
        (nearly) linear in r, so two runs (r = 1 and N / 2) give the line."""
        n_tokens = self.reference[0][0].shape[1]
        a, b = 1, max(2, n_tokens // 2)
        slope = (self._top_r(b).gflops - self._top_r(a).gflops) / (b - a)
        return a + (budget - self._top_r(a).gflops) / max(slope, 1e-30)
