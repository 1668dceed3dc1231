"""Per-gate thresholds calibrated to a compute budget: policies, files, calibrator."""

import json

import numpy as np
import pytest
import torch

from datamodules.synthetic_video import moving_square
from eventful_pl.backbone import ViTBackbone
from eventful_pl.calibration import (
    BudgetError,
    Calibrator,
    RunResult,
    dense_outputs,
    token_gates,
)
from eventful_pl.gates import TokenGate, set_policy
from eventful_pl.lightning.calibrate_command import clip_stream, target_of
from eventful_pl.models.vitdet import create_vitdet
from eventful_pl.models.vivit import create_vivit
from eventful_pl.policies import (
    CalibratedThresholdPolicy,
    PerGatePolicy,
    ThresholdPolicy,
    TopRPolicy,
    TrackingThresholdPolicy,
    gate_key,
    read_calibration,
    write_calibration,
)
from tests.helpers import video_stream


def tiny_backbone(seed: int = 0) -> ViTBackbone:
    torch.manual_seed(seed)
    return ViTBackbone(dim=32, depth=2, heads=4, input_size=(6, 6), block_variant="full").eval()


def gate_ks(model, frames):
    """Runs ``frames`` as one stream; returns {gate key: [k per incremental frame]}."""
    ks = {}
    hooks = [
        gate.register_forward_hook(
            lambda m, a, out, key=key: ks.setdefault(key, []).append(
                None if out[1] is None else out[1].shape[1]
            )
        )
        for key, gate in token_gates(model).items()
    ]
    model.reset()
    with torch.no_grad():
        outs = [model(f) for f in frames]
    for hook in hooks:
        hook.remove()
    return {k: v[1:] for k, v in ks.items()}, outs


# ------------------------------------------------------------------------ policies


def test_gate_key_strips_the_model_path():
    assert gate_key("spatial.blocks.3.qkv_gate") == "blocks.3.qkv_gate"
    assert gate_key("blocks.11.mlp_gate") == "blocks.11.mlp_gate"
    assert gate_key("model.backbone.blocks.0.proj_gate") == "blocks.0.proj_gate"


def test_calibration_file_round_trip(tmp_path):
    model = tiny_backbone()
    keys = list(token_gates(model))
    first = CalibratedThresholdPolicy({k: 0.1 * i for i, k in enumerate(keys)}, max_tokens=5)
    first.budget = 60.0
    second = CalibratedThresholdPolicy({k: 1.0 + i for i, k in enumerate(keys)}, refresh_every=4)
    second.budget = 90.0
    path = write_calibration(tmp_path / "c.json", [first, second], unit="GFlops per frame")
    data = json.loads(path.read_text())
    assert data["unit"] == "GFlops per frame" and len(data["policies"]) == 2
    loaded = CalibratedThresholdPolicy(path=str(path), budget=90)
    assert loaded.thresholds == second.thresholds
    assert loaded.refresh_every == 4 and loaded.max_tokens is None
    loaded = CalibratedThresholdPolicy(path=str(path), budget=60)
    assert loaded.thresholds == first.thresholds and loaded.max_tokens == 5
    assert not loaded.track_budget and loaded.targets == {}
    # Written again, the file reads back the same.
    again = write_calibration(tmp_path / "d.json", [loaded], unit="GFlops per frame")
    assert CalibratedThresholdPolicy(path=str(again)).thresholds == first.thresholds


def test_calibration_file_errors_name_the_remedy(tmp_path):
    policy = CalibratedThresholdPolicy({"blocks.0.qkv_gate": 1.0})
    policy.budget = 60.0
    path = write_calibration(tmp_path / "c.json", [policy, policy], unit="GFlops per frame")
    with pytest.raises(ValueError, match="choose one with budget"):
        CalibratedThresholdPolicy(path=str(path))
    with pytest.raises(ValueError, match="--budget_gflops 75"):
        CalibratedThresholdPolicy(path=str(path), budget=75)
    with pytest.raises(ValueError, match="cli.py calibrate"):
        CalibratedThresholdPolicy(path=str(tmp_path / "missing.json"))
    (tmp_path / "other.json").write_text(json.dumps({"a": 1}))
    with pytest.raises(ValueError, match="not a calibration file"):
        read_calibration(tmp_path / "other.json")
    with pytest.raises(ValueError, match="one of them"):
        CalibratedThresholdPolicy()


def test_per_gate_policy_must_be_bound_and_must_know_every_gate():
    model = tiny_backbone()
    policy = CalibratedThresholdPolicy({"blocks.0.qkv_gate": 1.0})
    with pytest.raises(RuntimeError, match="set_policy"):
        policy.select(torch.rand(1, 4))
    with pytest.raises(ValueError, match="calibrate this one"):
        set_policy(model, policy)
    set_policy(model, CalibratedThresholdPolicy({"blocks.0.qkv_gate": 1.0}, default=2.0))
    assert model.blocks[0].qkv_gate.policy.threshold == 1.0
    assert model.blocks[1].mlp_gate.policy.threshold == 2.0


def test_each_gate_uses_its_own_threshold():
    """Gates given a huge threshold update nothing, gates given 0 every changed
    token, and a middle threshold exactly the tokens whose error exceeds it."""
    model = tiny_backbone()
    keys = list(token_gates(model))
    closed = {"blocks.0.mlp_gate", "blocks.1.proj_gate"}
    thresholds = {k: (1e9 if k in closed else 0.0) for k in keys}
    set_policy(model, CalibratedThresholdPolicy(thresholds))
    for key, gate in token_gates(model).items():
        assert isinstance(gate.policy, ThresholdPolicy)
        assert gate.policy.threshold == thresholds[key]
    ks, _ = gate_ks(model, video_stream(4, 1, 36, 32, seed=1))
    for key in keys:
        assert ks[key] == ([0, 0, 0] if key in closed else [36, 36, 36]), key
    # A middle threshold at one gate: its index is exactly the over-threshold set.
    gate = model.blocks[1].mlp_gate
    seen = []
    gate.register_forward_hook(
        lambda m, args, kwargs, out: seen.append((args[0].clone(), kwargs.get("norm"), out[1])),
        with_kwargs=True,
    )
    set_policy(model, CalibratedThresholdPolicy({}, default=0.0))
    gate.policy = ThresholdPolicy(0.5)
    frames = video_stream(3, 1, 36, 32, seed=2, change=0.3)
    model.reset()
    with torch.no_grad():
        model(frames[0])
        reference = gate.p.clone()
        model(frames[1])
        x, norm, index = seen[1]
        c = norm(x) if norm is not None else x
    errors = (c - reference).norm(dim=-1)[0]
    expected = errors.gt(0.5).nonzero()[:, 0]
    assert 0 < len(expected) < 36
    assert sorted(index[0].tolist()) == sorted(expected.tolist())


def test_token_cap_bounds_a_scene_cut():
    norms = torch.tensor([[5.0, 0.1, 4.0, 3.0, 0.2, 6.0]])
    index = ThresholdPolicy(1.0, max_tokens=2).select(norms)
    assert sorted(index[0].tolist()) == [0, 5]  # the two largest errors
    assert ThresholdPolicy(1.0, max_tokens=10).select(norms).shape == (1, 4)
    # A scene cut changes every token: with the cap no gate updates more.
    model = tiny_backbone()
    set_policy(model, CalibratedThresholdPolicy({}, default=0.0, max_tokens=7))
    cut = [torch.randn(1, 36, 32), torch.randn(1, 36, 32) * 3]
    ks, _ = gate_ks(model, cut)
    assert all(v == [7] for v in ks.values())
    with pytest.raises(ValueError, match="max_tokens"):
        ThresholdPolicy(1.0, max_tokens=0)


def test_periodic_refresh_updates_every_token():
    model = tiny_backbone()
    set_policy(model, CalibratedThresholdPolicy({}, default=1e9, refresh_every=2))
    frames = video_stream(6, 2, 36, 32, seed=3)
    ks, outs = gate_ks(model, frames)
    assert all(v == [0, 36, 0, 36, 0] for v in ks.values())
    # A refresh frame's output is the dense model's.
    reference, _ = dense_outputs(model, [frames])
    torch.testing.assert_close(outs[2], reference[0][2], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(outs[1], reference[0][1], atol=1e-3)
    # Refresh counts from the flush: a reset starts over.
    ks, _ = gate_ks(model, frames[:3])
    assert all(v == [0, 36] for v in ks.values())


def test_tracking_threshold_keeps_the_target_rate():
    """Busy content (every error above the threshold) and quiet content (none
    above it): the tracked rate converges to the target either way."""
    gen = torch.Generator().manual_seed(0)
    for scale in (10.0, 0.1):
        policy = TrackingThresholdPolicy(1.0, target=0.2)
        for _ in range(300):
            policy.select(torch.rand(2, 50, generator=gen) * scale)
        assert policy.selected / policy.offered == pytest.approx(0.2, abs=0.02), scale
    # Content moving 2-9x more than the calibration's: the rate is on target
    # within a few frames, not only after the excess has built up.
    for scale in (3.0, 1.2):
        policy = TrackingThresholdPolicy(1.0, target=0.2)
        for t in range(10):
            policy.select(torch.rand(1, 500, generator=gen) * scale * (1 + t % 3))
        assert policy.selected / policy.offered == pytest.approx(0.2, abs=0.01), scale
    with pytest.raises(ValueError, match="target"):
        TrackingThresholdPolicy(1.0, target=0.0)
    with pytest.raises(ValueError, match="calibrate again"):
        CalibratedThresholdPolicy({"blocks.0.qkv_gate": 1.0}, track_budget=True)
    # One tracking policy per gate, kept across set_policy calls.
    model = tiny_backbone()
    keys = list(token_gates(model))
    policy = CalibratedThresholdPolicy(
        dict.fromkeys(keys, 0.5), targets=dict.fromkeys(keys, 0.3), track_budget=True
    )
    set_policy(model, policy)
    first = model.blocks[0].mlp_gate.policy
    set_policy(model, policy)
    assert isinstance(first, TrackingThresholdPolicy)
    assert model.blocks[0].mlp_gate.policy is first and first.target == 0.3


@pytest.mark.parametrize("adaptivity", [0.0, 0.5, 1.0])
def test_tracking_adaptivity_sets_how_far_counts_follow_the_content(adaptivity):
    """Quiet frames (30 errors over the threshold) and busy ones (120) in a
    random order: each frame's count is ``m (k / m) ** beta`` over its
    running mean, so busy frames get 4 ** beta times the updates of quiet
    ones (0: top-r at the rate), and the average rate is the target
    whatever beta."""
    target, n = 0.2, 500
    quiet = torch.cat([torch.full((30,), 2.0), torch.zeros(n - 30)])[None]  # (1, N)
    busy = torch.cat([torch.full((120,), 2.0), torch.zeros(n - 120)])[None]
    order = torch.rand(400, generator=torch.Generator().manual_seed(0)) < 0.5
    policy = TrackingThresholdPolicy(1.0, target=target, adaptivity=adaptivity)
    counts = torch.tensor([policy.select(busy if b else quiet).shape[-1] for b in order])
    assert policy.selected / policy.offered == pytest.approx(target, abs=0.01)
    late, is_busy = counts[100:].double(), order[100:]
    ratio = late[is_busy].mean() / late[~is_busy].mean()
    assert float(ratio) == pytest.approx(4.0**adaptivity, rel=0.05)
    if adaptivity == 0.0:  # top-r at the target rate, whatever the content
        assert set(late.tolist()) == {target * n}
    with pytest.raises(ValueError, match="adaptivity"):
        TrackingThresholdPolicy(1.0, target=0.2, adaptivity=1.5)


def test_adaptivity_is_saved_with_the_calibration(tmp_path):
    keys = ["blocks.0.qkv_gate", "blocks.0.mlp_gate"]
    policy = CalibratedThresholdPolicy(
        dict.fromkeys(keys, 0.5),
        budget=10.0,
        track_budget=True,
        targets=dict.fromkeys(keys, 0.3),
        adaptivity=0.5,
    )
    path = write_calibration(tmp_path / "c.json", [policy], unit="GFlops per frame")
    loaded = CalibratedThresholdPolicy(path=str(path))
    assert loaded.adaptivity == 0.5
    assert loaded.for_gate("blocks.0.mlp_gate").adaptivity == 0.5
    assert CalibratedThresholdPolicy(dict.fromkeys(keys, 0.5)).adaptivity == 1.0
    with pytest.raises(ValueError, match="adaptivity"):
        CalibratedThresholdPolicy(dict.fromkeys(keys, 0.5), adaptivity=-0.1)


def test_per_gate_top_r():
    model = tiny_backbone()
    set_policy(model, PerGatePolicy({"blocks.1.mlp_gate": TopRPolicy(3)}, default=TopRPolicy(9)))
    ks, _ = gate_ks(model, video_stream(3, 2, 36, 32))
    assert ks["blocks.1.mlp_gate"] == [3, 3]
    assert ks["blocks.0.qkv_gate"] == [9, 9]


# ---------------------------------------------------------------------- calibrator


def square_clips(count: int, frames: int, size: int, seed: int) -> list[torch.Tensor]:
    """Synthetic clips (T, 3, H, W) uint8: a square moving over static noise."""
    rng = np.random.default_rng(seed)
    return [
        torch.from_numpy(moving_square(i % 4, frames, size, rng, speed=3)).permute(0, 3, 1, 2)
        for i in range(count)
    ]


@pytest.fixture(scope="module")
def vitdet_case():
    """Tiny eventful ViTDet, 8 calibration and 8 held-out synthetic clips, and
    a calibration at 45% of the way from the cheapest to the dense cost.
    (Single clips differ in cost by about 10%: the budget holds on average.)"""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    network = create_vitdet("vitdet_tiny", variant="eventful").eval()
    clips = square_clips(16, 8, 128, seed=0)
    streams = [clip_stream(network, c) for c in clips]
    calibrator = Calibrator(target_of(network).backbone, streams[:8])
    budget = calibrator.min_gflops + 0.45 * (calibrator.dense_gflops - calibrator.min_gflops)
    result = calibrator.calibrate(budget)
    yield calibrator, result, streams[8:]
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_calibrated_policy_beats_a_global_threshold_at_equal_gflops(vitdet_case):
    calibrator, result, held = vitdet_case
    global_gflops, global_error = result.tried[0.0]
    tolerance = calibrator.tolerance * result.budget
    assert abs(result.gflops - result.budget) <= tolerance
    assert abs(global_gflops - result.budget) <= tolerance
    assert result.gamma > 0
    assert result.error < 0.9 * global_error
    # Held out: still lower error than the global threshold, at near-equal cost.
    ours = calibrator.run(result.thresholds, held)
    theirs = calibrator.run(result.candidates[0.0], held)
    assert ours.error < theirs.error
    assert ours.gflops <= theirs.gflops * 1.05


@pytest.mark.slow
def test_budget_met_on_held_out_clips(vitdet_case):
    calibrator, result, held = vitdet_case
    measured = calibrator.run(result.policy(), held)
    assert abs(measured.gflops - result.budget) <= 0.05 * result.budget
    assert 0 < measured.error < 1


@pytest.mark.slow
def test_budget_tracking_holds_the_budget_on_faster_motion(vitdet_case):
    """Clips moving three times faster than the calibration clips cost more
    under the plain thresholds; with track_budget the gates keep their
    calibrated update rates and the cost stays within 5% of the budget."""
    calibrator, result, _ = vitdet_case
    network = create_vitdet("vitdet_tiny", variant="eventful").eval()
    rng = np.random.default_rng(7)
    fast = [
        clip_stream(
            network,
            torch.from_numpy(moving_square(i % 4, 8, 128, rng, speed=9)).permute(0, 3, 1, 2),
        )
        for i in range(8)
    ]
    plain = calibrator.run(result.policy(), fast)
    tracked = calibrator.run(result.policy(track_budget=True), fast)
    assert plain.gflops > 1.05 * result.budget
    assert abs(tracked.gflops - result.budget) <= 0.05 * result.budget
    assert abs(tracked.gflops - result.budget) < abs(plain.gflops - result.budget)


@pytest.mark.slow
def test_tracked_rates_are_the_closer_of_per_gate_and_uniform(vitdet_case, monkeypatch):
    """With track_budget the calibrator fits one rate for every gate to the
    budget beside the fitted per-gate rates and keeps the one whose tracked
    outputs are closer to the dense model's; the policy it returns is that run."""
    calibrator, _, _ = vitdet_case
    budget = calibrator.min_gflops + 0.6 * (calibrator.dense_gflops - calibrator.min_gflops)
    result = calibrator.calibrate(budget, track_budget=True)
    assert set(result.tracked) == {"per-gate", "uniform"}
    for gflops, _ in result.tracked.values():
        assert abs(gflops - budget) <= 0.03 * budget
    errors = {k: e for k, (_, e) in result.tracked.items()}
    assert result.rates == min(errors, key=errors.get)
    rates = set(result.targets.values())
    assert (len(rates) == 1) == (result.rates == "uniform")
    assert all(0 < r <= 1 for r in rates)
    rerun = calibrator.run(result.policy(track_budget=True))
    assert (rerun.gflops, rerun.error) == pytest.approx(result.tracked[result.rates], rel=1e-9)
    assert result.policy().info["rates"] == result.rates
    # The cost guard: one rate for every gate is only taken within the
    # tracking tolerance of the budget or no further from it than the per-gate run.
    with monkeypatch.context() as patch:
        patch.setattr(calibrator, "tracking_tolerance", 0.0)
        strict = calibrator.calibrate(budget, track_budget=True)
    (ug, ue), (og, oe) = strict.tracked["uniform"], strict.tracked["per-gate"]
    closer = ue < oe and abs(ug - budget) <= abs(og - budget)
    assert strict.rates == ("uniform" if closer else "per-gate")
    # Without tracking nothing else is fitted; either set of rates on request.
    assert calibrator.calibrate(budget).tracked == {}
    own = calibrator.calibrate(budget, track_budget=True, rates="per-gate")
    assert own.tracked == {} and own.rates == "per-gate" and len(set(own.targets.values())) > 1
    even = calibrator.calibrate(budget, track_budget=True, rates="uniform")
    assert set(even.tracked) == {"uniform"} and len(set(even.targets.values())) == 1
    with pytest.raises(ValueError, match="rates"):
        calibrator.calibrate(budget, track_budget=True, rates="even")


def test_uniform_rates_win_within_the_tracking_tolerance(vitdet_case, monkeypatch):
    """A tracker's cost on short clips drifts by a few percent: one rate for
    every gate with a lower error at +2% of the budget (per-gate rates at
    +0.5%) is taken at the default 3% tracking tolerance, not at 1%; a higher
    error is never taken."""
    calibrator, _, _ = vitdet_case
    own = RunResult(gflops=100.5, error=0.010)
    uniform = RunResult(gflops=102.0, error=0.008)
    assert calibrator.tracking_tolerance == 0.03
    assert calibrator.prefers_uniform(uniform, own, 100.0)
    assert not calibrator.prefers_uniform(RunResult(102.0, 0.011), own, 100.0)
    with monkeypatch.context() as patch:
        patch.setattr(calibrator, "tracking_tolerance", 0.01)
        assert not calibrator.prefers_uniform(uniform, own, 100.0)
        assert calibrator.prefers_uniform(RunResult(100.3, 0.008), own, 100.0)


@pytest.mark.slow
def test_one_rate_for_every_gate_is_top_rs_and_holds_on_held_out_clips(vitdet_case):
    """The uniform rate is top-r's at the budget (top-r's cost does not depend
    on the content), so tracked it costs the budget on held-out and on faster
    clips too; its thresholds give each gate that rate on the calibration clips."""
    calibrator, _, held = vitdet_case
    budget = calibrator.min_gflops + 0.5 * (calibrator.dense_gflops - calibrator.min_gflops)
    even = calibrator.calibrate(budget, track_budget=True, rates="uniform")
    (u,) = set(even.targets.values())
    n_tokens = calibrator.reference[0][0].shape[1]
    assert u == pytest.approx(calibrator.top_r_rate(budget), rel=1e-12)
    below, above = (
        calibrator.run(TopRPolicy(r)).gflops for r in (int(u * n_tokens), int(u * n_tokens) + 1)
    )
    assert below <= budget * (1 + 1e-6) and above >= budget * (1 - 1e-6)
    # Its thresholds: the per-gate fit's or each gate's own at rate u, the closer to dense.
    fitted = even.candidates[even.gamma]
    recorders = {}
    given = calibrator.tracked(fitted, even.targets, recorders)
    at_rate = calibrator.rate_thresholds(recorders, u)
    own = calibrator.tracked(at_rate, even.targets)
    assert even.thresholds == (fitted if given.error <= own.error else at_rate)
    assert even.tracked["uniform"] == (
        min(given, own, key=lambda r: r.error).gflops,
        min(given.error, own.error),
    )
    measured = calibrator.run(even.policy(track_budget=True), held)
    assert abs(measured.gflops - budget) <= 0.05 * budget
    assert 0 < measured.error < 1


def test_rate_thresholds_give_each_gate_the_rate():
    """``rate_thresholds``: the threshold a fraction ``rate`` of a gate's
    recorded error norms (per frame: the largest count of the batch) exceeds."""
    model = tiny_backbone()
    streams = [video_stream(6, 2, 36, 32, seed=s) for s in (0, 1)]
    calibrator = Calibrator(model, streams, gammas=(0.0,))
    recorders = {}
    calibrator.run(dict.fromkeys(calibrator.gates, 0.0), recorders=recorders)

    def fraction(norms, h):  # [(F, B, N)] -> mean per-frame count / N
        over = sum(int(n.gt(h).sum(-1).amax(-1).sum()) for n in norms)
        return over / sum(n.shape[0] * n.shape[-1] for n in norms)

    for rate in (0.1, 0.3, 0.7):
        thresholds = calibrator.rate_thresholds(recorders, rate)
        assert set(thresholds) == set(calibrator.gates)
        for key, h in thresholds.items():
            norms = recorders[key].stacked()
            assert fraction(norms, h) <= rate < fraction(norms, h * (1 - 1e-6))


@pytest.mark.slow
def test_calibrated_policy_from_file_runs_the_model(vitdet_case, tmp_path):
    calibrator, result, held = vitdet_case
    path = write_calibration(tmp_path / "c.json", [result.policy(7.5)], unit="GFlops per frame")
    policy = CalibratedThresholdPolicy(path=str(path), budget=7.5)
    direct = calibrator.run(result.thresholds, held[:1])
    loaded = calibrator.run(policy, held[:1])
    assert loaded.gflops == direct.gflops and loaded.error == direct.error


@pytest.mark.slow
def test_budget_out_of_reach_is_refused(vitdet_case):
    calibrator, _, _ = vitdet_case
    with pytest.raises(BudgetError, match="raise the budget"):
        calibrator.calibrate(calibrator.min_gflops * 0.9)
    with pytest.raises(BudgetError, match="lower the budget"):
        calibrator.calibrate(calibrator.dense_gflops * 1.1)


def test_calibration_with_batched_streams():
    """ViViT runs a video's views as one batch (B > 1): the calibration meets
    its budget there, and the policy selects per item."""
    torch.manual_seed(0)
    network = create_vivit("vivit_tiny", spatial_variant="full").eval()
    target = target_of(network)
    clips = square_clips(4, 8, 64, seed=1)
    streams = [clip_stream(network, c) for c in clips]
    assert streams[0][0].shape[0] == network.num_views == 2
    calibrator = Calibrator(target.backbone, streams[:3], gammas=(0.0, 1.0))
    budget = calibrator.min_gflops + 0.5 * (calibrator.dense_gflops - calibrator.min_gflops)
    result = calibrator.calibrate(budget)
    assert abs(result.gflops - budget) <= calibrator.tolerance * budget
    assert result.error <= result.tried[0.0][1]
    # The per-video unit: spatial frames of every view plus the temporal model.
    video = clips[3][None]
    set_policy(target.backbone, result.policy())
    from eventful_pl.counting import count_ops

    with torch.no_grad(), count_ops(network) as counter:
        network(video)
    frames = network.num_views * network.steps
    measured = calibrator.run(result.thresholds, streams[3:])
    assert measured.frames == frames
    assert counter.total / 1e9 == pytest.approx(target.to_unit(measured.gflops), rel=1e-6)


@pytest.mark.slow
def test_gate_costs_follow_the_layer_sizes(vitdet_case):
    calibrator, _, _ = vitdet_case
    costs = calibrator.costs
    dim = 64
    # An updated token costs its MLP 8 D^2 multiply-adds (+ biases), its
    # projection D^2: the measured per-token costs show it.
    assert costs["blocks.0.mlp_gate"] == pytest.approx(8 * dim * dim, rel=0.05)
    assert costs["blocks.0.proj_gate"] == pytest.approx(dim * dim, rel=0.1)
    assert costs["blocks.1.qkv_gate"] > 3 * dim * dim  # qkv plus attention rows/columns
    assert all(v > 0 for v in calibrator.sensitivities.values())
    assert set(costs) == set(token_gates(calibrator.model))
    assert all(isinstance(g, TokenGate) for g in token_gates(calibrator.model).values())


# ------------------------------------------------------------------- evaluation


def calibration_file(tmp_path, model, budgets=(5.0,)) -> str:
    """A calibration file for ``model``'s gates (thresholds from 0.05 up)."""
    keys = list(token_gates(model))
    policies = []
    for budget in budgets:
        policy = CalibratedThresholdPolicy({k: 0.05 * (1 + i % 3) for i, k in enumerate(keys)})
        policy.budget = budget
        policies.append(policy)
    return str(write_calibration(tmp_path / "c.json", policies, unit="GFlops per frame"))


def test_eval_budgets_become_calibrated_settings(tmp_path):
    from eventful_pl.lightning.sweep import budget_settings, build_sweep
    from eventful_pl.lightning.vitdet_module import ViTDetModule

    torch.manual_seed(0)
    network = create_vitdet("vitdet_tiny", variant="eventful")
    path = calibration_file(tmp_path, network, budgets=(5.0, 7.5))
    settings = budget_settings([7.5, 5], path)
    assert [s.name for s in settings] == ["b7.5", "b5"]
    sweep = build_sweep([16], [], budgets=settings)
    assert [s.name for s in sweep] == ["r16", "b7.5", "b5"]
    set_policy(network, sweep[2].policy())
    assert network.backbone.blocks[1].proj_gate.policy.threshold == pytest.approx(0.1)
    lit = ViTDetModule(preset="vitdet_tiny", r=16, eval_budgets=[5.0], calibration=path)
    assert [s.name for s in lit.sweep] == ["r16", "b5"]
    with pytest.raises(ValueError, match="cli.py calibrate"):
        budget_settings([5.0], None)
    with pytest.raises(ValueError, match="--budget_gflops 6"):
        budget_settings([6.0], path)


DDP_SCRIPT = """
import json
import sys

import lightning as L
import torch

sys.path.insert(0, {repo!r})
from datamodules.synthetic_detection import write_synthetic_vid  # noqa: E402
from tests.helpers import quiet_trainer_options  # noqa: E402
from tests.test_lightning_vitdet import datamodule, make_detecting, module  # noqa: E402


def main(devices: int, out: str, calibration: str) -> None:
    data = write_synthetic_vid(
        out + "/data", seed=0, train_snippets=1, val_snippets=3, frames=(4, 4), det_images=1
    )
    L.seed_everything(0)
    lit = module(variant="eventful", r=16, eval_budgets=[5.0], calibration=calibration)
    make_detecting(lit.model)
    trainer = L.Trainer(
        **{{**quiet_trainer_options(out), "devices": devices}},
        strategy="ddp_spawn" if devices > 1 else "auto",
        logger=False,
    )
    results = trainer.validate(lit, datamodule(data), verbose=False)[0]
    with open(out + "/results.json", "w") as handle:
        json.dump({{k: float(v) for k, v in results.items()}}, handle)


if __name__ == "__main__":  # ddp_spawn re-imports this file in its processes
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
"""


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.timeout(600)
def test_ddp_evaluation_of_a_budget_matches_one_process(tmp_path):
    """eval_budgets under DDP (2 gloo processes): the calibrated setting's
    mAP and GFlops per frame equal the single-process ones."""
    from pathlib import Path

    from tests.helpers import run_script

    torch.manual_seed(0)
    path = calibration_file(tmp_path, create_vitdet("vitdet_tiny", variant="eventful"))
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(repo=str(Path(__file__).parents[1])))
    results = {}
    for devices in (1, 2):
        out = tmp_path / f"out{devices}"
        run_script(str(script), str(devices), str(out), path)
        results[devices] = json.loads((out / "results.json").read_text())
    one, two = results[1], results[2]
    assert {"val/b5/map_50", "val/b5/gflops", "val/r16/gflops"} <= set(one)
    assert 0 < one["val/b5/gflops"] < one["val/r16/gflops"] * 10
    assert set(one) == set(two)
    for key in one:
        assert two[key] == pytest.approx(one[key], abs=1e-6), key


# ---------------------------------------------------------------------- command

TINY_VITDET_CONFIG = """
model:
  class_path: eventful_pl.models.vitdet.ViTDet
  init_args:
    num_classes: 3
    image_size: 128
    dim: 64
    depth: 4
    heads: 4
    window_size: 4
    window_block_indices: [0, 2]
    position_encoding_size: 4
    relative_embedding_size: 8
    pyramid_channels: 32
    box_conv_dims: [32, 32]
    box_fc_dims: [64]
    variant: eventful
"""


@pytest.mark.slow
def test_calibrate_command_writes_a_file_the_policy_reads(tmp_path, one_thread, capsys):
    from cli import cli_main
    from datamodules.synthetic_video import write_video

    for i, clip in enumerate(square_clips(4, 6, 128, seed=5)):
        write_video(tmp_path / f"clip{i}.mp4", clip.permute(0, 2, 3, 1).numpy())
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_VITDET_CONFIG)
    output = tmp_path / "tiny.calibration.json"
    args = ["calibrate", "--config", str(config), "--videos", str(tmp_path)]
    args += ["--budget_fraction", "0.5", "--held_out", "1", "--gammas", "0", "1"]
    report = cli_main([*args, "--output", str(output)])  # tracking is on by default
    printed = capsys.readouterr().out
    assert "held-out GFlops" in printed and str(output) in printed
    row = report["results"][0]
    assert row["rates"] in ("per-gate", "uniform") and " rates" in printed
    assert report["calibration_videos"] == 3 and report["held_out_videos"] == 1
    assert row["gflops"] == pytest.approx(0.5 * report["dense_gflops"], rel=0.011)
    assert row["error"] <= row["global_error"]
    data = json.loads(output.read_text())
    assert data["unit"] == "GFlops per frame" and len(data["held_out"]) == 1
    entry = data["policies"][0]
    assert entry["track_budget"] and entry["rates"] == row["rates"]
    assert (len(set(entry["targets"].values())) == 1) == (row["rates"] == "uniform")
    policy = CalibratedThresholdPolicy(path=str(output), budget=row["budget"])
    network = create_vitdet("vitdet_tiny", variant="eventful")
    set_policy(network, policy)
    assert len(policy.thresholds) == len(token_gates(network)) == 12
    plain = tmp_path / "plain.json"
    untracked = cli_main([*args, "--no_track_budget", "--output", str(plain)])
    assert untracked["results"][0]["rates"] is None
    entry = json.loads(plain.read_text())["policies"][0]
    assert not entry["track_budget"] and not CalibratedThresholdPolicy(path=str(plain)).track_budget
    with pytest.raises(ValueError, match="--rates"):
        cli_main([*args, "--rates", "even", "--output", str(tmp_path / "x.json")])
    with pytest.raises(ValueError, match="--overwrite"):
        cli_main([*args, "--output", str(output)])
    with pytest.raises(ValueError, match="--budget_fraction"):
        cli_main([*args[:5], "--budget_fraction", "1.5", "--output", str(tmp_path / "x.json")])


def test_calibrated_policy_given_to_the_constructor():
    """A network built with ``policy=CalibratedThresholdPolicy(...)`` (as from a
    YAML ``policy:``) hands each gate its own threshold, like ``set_policy``."""
    keys = list(token_gates(tiny_backbone()))
    thresholds = {k: 0.05 * (i + 1) for i, k in enumerate(keys)}
    torch.manual_seed(0)
    built = ViTBackbone(
        dim=32,
        depth=2,
        heads=4,
        input_size=(6, 6),
        block_variant="full",
        policy=CalibratedThresholdPolicy(thresholds),
    ).eval()
    for key, gate in token_gates(built).items():
        assert gate.policy.threshold == thresholds[key]
    later = tiny_backbone()
    set_policy(later, CalibratedThresholdPolicy(thresholds))
    frames = video_stream(4, 1, 36, 32, seed=3)
    assert gate_ks(built, frames)[0] == gate_ks(later, frames)[0]


def test_calibrated_policy_selected_in_a_yaml_config(tmp_path):
    """``policy:`` naming :class:`CalibratedThresholdPolicy` in a model's YAML,
    parsed and instantiated the way LightningCLI does, gives every gate the
    file's threshold for the chosen budget."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_subclass_arguments(torch.nn.Module, "model")
    plain = parser.instantiate(parser.parse_string(TINY_VITDET_CONFIG)).model
    path = calibration_file(tmp_path, plain, budgets=(5.0, 7.5))
    config = TINY_VITDET_CONFIG.rstrip() + (
        "\n    policy:\n"
        "      class_path: eventful_pl.policies.CalibratedThresholdPolicy\n"
        f"      init_args: {{path: {path}, budget: 7.5}}\n"
    )
    network = parser.instantiate(parser.parse_string(config)).model
    expected = read_calibration(path)["policies"][1]["thresholds"]
    gates = token_gates(network.backbone)
    assert set(gates) == set(expected) and len(gates) == 12
    for key, gate in gates.items():
        assert gate.policy.threshold == pytest.approx(expected[key])
