"""A stream recovers from a bad frame: after a frame with a non-finite token,
finite frames give finite outputs again (every block variant, with and without
the fused CPU kernels), and the other streams of a batch never notice."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from eventful_pl import kernels, reset_stream_state
from eventful_pl.gates import TokenGate
from eventful_pl.policies import ThresholdPolicy, TopRPolicy
from tests.helpers import DIM, make_backbones, make_pair, video_stream

VARIANTS = ["dense", "tokenwise", "query_key", "full"]
FRAMES = 7
# Backbone options: plain global attention (the fused softmax kernel), and
# relative position with pooling (the PyTorch softmax path, pooled keys).
OPTIONS = {
    "global": dict(input_size=6),
    "relpos-pooled": dict(input_size=6, relative_embedding_size=6, pool_size=2),
}


@pytest.fixture(params=[False, True], ids=["torch-ops", "fused"])
def fused(request):
    """Runs the test with the fused CPU kernels off and on."""
    if request.param and shutil.which("c++") is None:
        pytest.skip("no C++ compiler to build the fused kernels")
    was = kernels._enabled
    kernels.set_fused_kernels(request.param)
    if request.param:
        assert kernels.load_extension() is not None
    yield request.param
    kernels.set_fused_kernels(was)


def backbones(variant: str, options: str):
    return make_backbones(variant, dim=DIM, depth=3, heads=2, **OPTIONS[options])


def bad_stream(batch: int, bad_frame: int, value: float = math.nan, seed: int = 1):
    """A video stream whose first item has one non-finite token on ``bad_frame``."""
    frames = video_stream(FRAMES, batch, 36, DIM, seed=seed)
    frames[bad_frame] = frames[bad_frame].clone()
    frames[bad_frame][0, 5] = value
    return frames


def finite(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x).all())


@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.slow
def test_stream_recovers_after_a_nan_token(variant, batch, options, fused):
    """Frames after the bad one are finite and close to dense (r < N is an
    approximation); a second stream in the batch gives its outputs alone."""
    dense, eventful = backbones(variant, options)
    _, alone = backbones(variant, options)
    for model in (eventful, alone):
        model.set_policy(TopRPolicy(10))
    bad = 2
    frames = bad_stream(batch, bad)
    with torch.no_grad():
        outs = [eventful(f) for f in frames]
        refs = [dense(f) for f in frames]
        others = [alone(f[1:]) for f in frames] if batch == 2 else []
    for t in range(FRAMES):
        for item in range(batch):
            if item == 0 and t == bad:
                continue
            out, ref = outs[t][item], refs[t][item]
            assert finite(out), f"frame {t}, item {item}: {(~torch.isfinite(out)).any(-1).sum()}"
            rel = ((out - ref).norm() / ref.norm()).item()
            assert rel < 0.5, f"frame {t}, item {item}: relative error {rel}"
    if options == "global":
        # Without pooling the streams of a batch are independent: the NaN in
        # stream 0 changes nothing in stream 1. (Pooled keys are selected for
        # the batch as a whole, so a pooled stream 1 legitimately differs.)
        for out, other in zip(outs, others):
            torch.testing.assert_close(out[1:], other, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bad", [0, 2], ids=["flush-frame", "incremental-frame"])
@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.slow
def test_every_token_updated_gives_the_dense_outputs_again(variant, value, bad, fused):
    """With every token updated on every frame, the frames after the bad one
    equal a fresh stream's (the dense outputs), for both streams of a batch."""
    dense, eventful = backbones(variant, "global")
    eventful.set_policy(TopRPolicy(36))
    frames = bad_stream(2, bad, value)
    with torch.no_grad():
        for t, frame in enumerate(frames):
            out, ref = eventful(frame), dense(frame)
            if t > bad:
                torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
            else:
                torch.testing.assert_close(out[1:], ref[1:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_threshold_policy_stream_recovers(variant, fused):
    """A NaN error counts as infinite: under a threshold policy the NaN
    references a bad frame left are updated on the next frame even when no
    finite change exceeds the threshold (a still scene after a cut)."""
    dense, eventful = backbones(variant, "global")
    eventful.set_policy(ThresholdPolicy(0.5))
    gen = torch.Generator().manual_seed(0)
    still = torch.randn(1, 36, DIM, generator=gen)
    cut = still + 3 * torch.randn(1, 36, DIM, generator=gen)  # every token over the threshold
    bad = cut.clone()
    bad[0, 5] = math.nan
    with torch.no_grad():
        eventful(still)
        eventful(bad)
        outs = [eventful(cut) for _ in range(3)]
    for out in outs:
        assert finite(out)
        torch.testing.assert_close(out, dense(cut), rtol=1e-4, atol=1e-4)


@pytest.mark.usefixtures("grad_mode")
@pytest.mark.parametrize("variant", ["tokenwise", "full"])
def test_recovery_in_every_autograd_mode(variant):
    dense, eventful = backbones(variant, "global")
    eventful.set_policy(TopRPolicy(10))
    frames = bad_stream(2, 2)
    outs = [eventful(f).detach() for f in frames]
    assert all(finite(out) for out in outs[3:])
    assert all(finite(out[1:]) for out in outs)


@pytest.mark.parametrize("policy", [ThresholdPolicy(10.0), TopRPolicy(1)], ids=repr)
def test_gate_updates_a_nan_reference(policy):
    """TokenGate: a token whose reference is NaN is selected (its error is NaN)
    even when no finite error exceeds the threshold; then it is clean."""
    gate = TokenGate(policy)
    x = torch.randn(1, 6, 8)
    bad = x.clone()
    bad[0, 3] = math.nan
    with torch.no_grad():
        gate(x)
        _, index = gate(bad)
        assert index.tolist() == [[3]]
        _, index = gate(x)
        assert index.tolist() == [[3]]
        assert finite(gate.p)


def test_full_block_recomputes_only_the_bad_stream_until_it_is_finite(fused):
    """EventfulBlock: a non-finite value in a stream's attention state marks
    that stream; its frames are recomputed from the state until its output is
    finite again, then incremental frames resume (matching the dense block with
    r = N). The other stream stays incremental throughout."""
    dense, block = make_pair("full", input_size=(6, 6))
    block.policy = TopRPolicy(36)
    frames = video_stream(5, 2, 36, DIM, seed=2)
    frames[1] = frames[1].clone()
    frames[1][1, 4] = math.nan
    with torch.no_grad():
        block(frames[0])
        assert block.nonfinite_items is None
        out = block(frames[1])
        assert finite(out[0]) and not torch.isfinite(out[1]).any()
        assert block.nonfinite_items.tolist() == [False, True]
        for frame in frames[2:]:
            torch.testing.assert_close(block(frame), dense(frame), rtol=1e-4, atol=1e-4)
            assert block.nonfinite_items is None
        reset_stream_state(block)
        frames[0][0, 0] = math.inf  # a bad flush frame
        block(frames[0])
        assert block.nonfinite_items.tolist() == [True, False]
        torch.testing.assert_close(block(frames[2]), dense(frames[2]), rtol=1e-4, atol=1e-4)
        assert block.nonfinite_items is None
