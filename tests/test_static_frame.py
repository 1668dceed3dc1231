"""Static eventful frames (eventful_pl.static_frame) against the eager path.

On CPU the runner's ``"eager"`` mode drives the same code as a CUDA-graph
capture: the blocks' sync-free static path, the copy of flushed state into the
recorded buffers, the recorded operation counts and the deferred recovery.
With the fused CPU kernels off both paths run the same PyTorch ops, so
outputs, state and counts must be bitwise equal.
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch

from eventful_pl import kernels
from eventful_pl.blocks import EventfulBlock
from eventful_pl.blocks.softmax import update_softmax, update_softmax_flagged
from eventful_pl.counting import count_ops
from eventful_pl.policies import ThresholdPolicy, TopFractionPolicy, TopRPolicy
from eventful_pl.static_frame import StaticFrameRunner
from tests.helpers import DIM, EVENTFUL_VARIANTS, make_backbones, video_stream

CONFIGS = {
    "global": dict(input_size=6),
    "classtoken": dict(input_size=6, class_token=True),
    "relpos": dict(input_size=6, relative_embedding_size=4),
    "window-relpos": dict(
        input_size=(7, 5), window_size=3, window_block_indices=(0,), relative_embedding_size=3
    ),
}


@pytest.fixture(autouse=True)
def _unfused():
    kernels.set_fused_kernels(False)
    yield
    kernels.set_fused_kernels(True)


def _pair(variant: str, config: str, policy) -> tuple[torch.nn.Module, torch.nn.Module]:
    kwargs = CONFIGS[config]
    window_variant = "tokenwise" if "window_block_indices" in kwargs else None
    _, eager = make_backbones(
        variant, window_variant=window_variant, dim=DIM, depth=2, heads=4, **kwargs
    )
    eager.set_policy(policy)
    return eager, copy.deepcopy(eager)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor attribute of every module (stream state), by name."""
    out = {}
    for prefix, module in model.named_modules():
        for name, value in vars(module).items():
            if isinstance(value, torch.Tensor) and name not in ("static_flags", "_error"):
                out[f"{prefix}.{name}"] = value
    return out


def _compare_stream(eager, static_model, runner, frames, resets=(), tol=0.0, per_frame=True):
    """Outputs (and counts per frame, or over the stream) of each frame, then
    the state at the end."""
    totals = [Counter(), Counter()]
    with torch.no_grad():
        for i, frame in enumerate(frames):
            if i in resets:
                eager.reset()
                runner.reset()
            with count_ops(eager) as expected:
                a = eager(frame)
            with count_ops(static_model) as got:
                b = runner(frame)
            torch.testing.assert_close(b, a, rtol=tol, atol=tol, equal_nan=True, msg=f"frame {i}")
            totals[0].update(expected.counts)
            totals[1].update(got.counts)
            assert not per_frame or got.counts == expected.counts, f"frame {i}"
        if not per_frame:  # a deferred recovery counts on the next frame
            runner._recover()
            with count_ops(static_model) as got:
                runner._recover()
            assert got.total == 0
    assert totals[0] == totals[1]
    state_a, state_b = _state(eager), _state(static_model)
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        torch.testing.assert_close(
            state_b[name], state_a[name], rtol=tol, atol=tol, equal_nan=True, msg=name
        )


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("variant", EVENTFUL_VARIANTS)
def test_static_frames_equal_eager(variant, batch):
    eager, static_model = _pair(variant, "global", TopRPolicy(10))
    runner = StaticFrameRunner(static_model, mode="eager")
    _compare_stream(eager, static_model, runner, video_stream(6, batch, 36, DIM), resets=(4,))
    assert runner.stats == {"flush": 2, "eager": 0, "static": 4, "recovered": 0}


@pytest.mark.parametrize("config", ["classtoken", "relpos", "window-relpos"])
def test_static_frames_equal_eager_options(config):
    eager, static_model = _pair("full", config, TopFractionPolicy(0.3))
    runner = StaticFrameRunner(static_model, mode="eager")
    tokens = 36 if config != "window-relpos" else 35
    _compare_stream(eager, static_model, runner, video_stream(5, 2, tokens, DIM))
    assert runner.stats["static"] == 4


def test_threshold_policy_keeps_the_eager_path():
    eager, static_model = _pair("full", "global", ThresholdPolicy(0.5))
    runner = StaticFrameRunner(static_model, mode="eager")
    _compare_stream(eager, static_model, runner, video_stream(4, 2, 36, DIM))
    assert runner.stats == {"flush": 1, "eager": 3, "static": 0, "recovered": 0}


def test_nonfinite_frame_recovers_like_eager():
    """A NaN token in stream 0: both paths give NaN for that stream on that
    frame and finite outputs after. (The eager path's precision fallback then
    recomputes every stream's normalisers, the static path only stream 0's:
    stream 1 agrees to rounding.)"""
    eager, static_model = _pair("full", "global", TopRPolicy(12))
    runner = StaticFrameRunner(static_model, mode="eager")
    frames = video_stream(7, 2, 36, DIM)
    frames[3] = frames[3].clone()
    frames[3][0, 5, 0] = float("nan")
    _compare_stream(eager, static_model, runner, frames, tol=1e-5, per_frame=False)
    assert runner.stats["recovered"] >= 1
    assert runner.stats["eager"] >= 1  # the frame after a non-finite state
    assert runner.stats["static"] >= 2  # and static frames again once finite


def test_precision_failure_recomputes_the_stream():
    """Forced precision failures: the static path flags the streams and the
    runner recomputes their normalisers exactly before the next frame."""
    eager, static_model = _pair("full", "global", TopRPolicy(12))
    runner = StaticFrameRunner(static_model, mode="eager")
    blocks = [m for m in static_model.modules() if isinstance(m, EventfulBlock)]
    with torch.no_grad():
        frames = video_stream(4, 2, 36, DIM)
        for frame in frames[:2]:
            eager(frame)
            runner(frame)
        for block in blocks + [m for m in eager.modules() if isinstance(m, EventfulBlock)]:
            block.min_kept_mass = 2.0  # every row fails
        for frame in frames[2:]:
            a, b = eager(frame), runner(frame)
            # Eager keeps an incremental output with exact normalisers; the
            # recovery recomputes the output too: close, not equal.
            assert torch.isfinite(b).all()
            torch.testing.assert_close(b, a, rtol=0.2, atol=0.2)
        runner._recover()
    assert runner.stats["recovered"] == 2 * len(blocks)
    for block in blocks:
        logits = block.q_scaled_t.transpose(-1, -2) @ block.keys_t
        torch.testing.assert_close(block.log_norm, torch.logsumexp(logits, -1))


def test_update_softmax_flagged_matches_checked_update():
    gen = torch.Generator().manual_seed(3)
    b, h, n, r = 2, 3, 9, 3
    logits = torch.randn(b, h, n, n, generator=gen, dtype=torch.float64)
    log_norm = torch.logsumexp(logits, dim=-1)
    index = torch.stack([torch.randperm(n, generator=gen)[:r] for _ in range(b)])
    cols_old = logits.gather(3, index[:, None, None, :].expand(b, h, n, r)).transpose(-1, -2)
    cols_new = cols_old + 0.3 * torch.randn(cols_old.shape, generator=gen, dtype=torch.float64)
    rows = torch.randn(b, h, r, n, generator=gen, dtype=torch.float64)
    args = (rows, cols_old.contiguous(), cols_new)
    ref_norm = log_norm.clone()
    ref, _ = update_softmax(*[a.clone() for a in args], ref_norm, index, 1e-3, 60.0)
    got_norm = log_norm.clone()
    got, failed = update_softmax_flagged(*[a.clone() for a in args], got_norm, index, 1e-3, 60.0)
    assert ref is not None and not failed.any()
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    torch.testing.assert_close(got_norm, ref_norm, rtol=0, atol=0)
    _, failed = update_softmax_flagged(*[a.clone() for a in args], log_norm, index, 2.0, 60.0)
    assert failed.all()


def test_runner_errors_name_the_remedy():
    dense, _ = make_backbones("full", dim=DIM, depth=1, heads=4, input_size=6)
    with pytest.raises(ValueError, match="eventful block_variant"):
        StaticFrameRunner(dense)
    _, pooled = make_backbones("full", dim=DIM, depth=1, heads=4, input_size=6, pool_size=2)
    with pytest.raises(ValueError, match="run pooled"):
        StaticFrameRunner(pooled)
    _, eventful = make_backbones("full", dim=DIM, depth=1, heads=4, input_size=6)
    with pytest.raises(ValueError, match="mode must be one of"):
        StaticFrameRunner(eventful, mode="graph")
    eventful.set_policy(TopRPolicy(5))
    runner = StaticFrameRunner(eventful, mode="cuda_graph")
    frames = video_stream(2, 1, 36, DIM)
    with torch.no_grad():
        runner(frames[0])
        with pytest.raises(ValueError, match="use mode='eager'"):
            runner(frames[1])


COMPILED_CASES = [
    ("full", "relpos", 2),
    ("query_key", "window-relpos", 1),
    ("tokenwise", "global", 2),
]


@pytest.mark.parametrize(("variant", "config", "batch"), COMPILED_CASES)
def test_inductor_static_frames_equal_eager(variant, config, batch):
    """torch.compile with inductor (fused generated kernels) of the static
    frame: outputs within float reordering of the eager path, the same counts
    and state, no recompilation on later frames or after a new stream."""
    eager, static_model = _pair(variant, config, TopRPolicy(10))
    runner = StaticFrameRunner(static_model, mode="compile")
    tokens = 35 if config == "window-relpos" else 36
    frames = video_stream(9, batch, tokens, DIM)
    _compare_stream(eager, static_model, runner, frames[:6], resets=(3,), tol=1e-5)
    with torch._dynamo.config.patch(error_on_recompile=True):
        _compare_stream(eager, static_model, runner, frames[6:], tol=1e-5)
    assert runner.stats == {"flush": 2, "eager": 0, "static": 7, "recovered": 0}
    assert runner._compile_options["backend"] == "inductor"


@pytest.mark.slow
def test_compiled_static_frames_equal_eager():
    """torch.compile with dynamo's eager backend: traced code, eager kernels."""
    eager, static_model = _pair("full", "relpos", TopRPolicy(10))
    runner = StaticFrameRunner(static_model, mode="compile", compile_options={"backend": "eager"})
    _compare_stream(eager, static_model, runner, video_stream(5, 2, 36, DIM), resets=(3,))
    assert runner.stats["static"] == 3


def test_compile_warm_up_restores_the_stream_state():
    """The compile-then-capture mode runs the compiled frame once before the
    capture; afterwards state (and so the next frame) is as if it never ran."""
    eager, static_model = _pair("full", "relpos", TopRPolicy(10))
    runner = StaticFrameRunner(static_model, mode="eager")
    frames = video_stream(5, 2, 36, DIM)
    with torch.no_grad():
        for frame in frames[:3]:
            eager(frame)
            runner(frame)
        before = {k: v.clone() for k, v in _state(static_model).items()}
        compiled = torch.compile(runner._frame, backend="eager")
        runner._warm_up(compiled, frames[3] * 3.0)
        after = _state(static_model)
        assert before.keys() == after.keys()
        changed = [k for k in before if not torch.equal(before[k], after[k])]
        assert not changed, changed
    _compare_stream(eager, static_model, runner, frames[3:])


def test_warm_up_refuses_a_replaced_state_tensor():
    eager, static_model = _pair("tokenwise", "global", TopRPolicy(10))
    runner = StaticFrameRunner(static_model, mode="eager")
    frames = video_stream(3, 1, 36, DIM)
    gate = runner._gates[0]

    def replacing_frame(x):
        gate.p = gate.p.clone()  # rebinds state: a capture would miss it
        return runner._frame(x)

    with torch.no_grad():
        runner(frames[0])
        runner(frames[1])
        with pytest.raises(RuntimeError, match="in place"):
            runner._warm_up(replacing_frame, frames[2])


@pytest.mark.parametrize("variant", EVENTFUL_VARIANTS)
def test_static_frame_traces_as_one_graph_with_fused_kernels_on(variant):
    """ViT-B's head size (64) with the CPU kernels switched on: under
    torch.compile neither the fused-kernel checks nor the CPU capability query
    break the frame's graph (fullgraph=True raises on any break)."""
    from eventful_pl.backbone import ViTBackbone

    kernels.set_fused_kernels(True)
    torch.manual_seed(0)
    model = ViTBackbone(dim=128, depth=1, heads=2, input_size=4, block_variant=variant).eval()
    model.set_policy(TopRPolicy(4))
    runner = StaticFrameRunner(
        model, mode="compile", compile_options={"backend": "eager", "fullgraph": True}
    )
    with torch.no_grad():
        for frame in video_stream(3, 1, 16, 128):
            runner(frame)
    assert runner.stats["static"] == 2
