"""Reset semantics and independence of the B streams of a batch."""

import pytest
import torch

from eventful_pl import OpCounter, attach_counter, reset_stream_state
from eventful_pl.policies import TopRPolicy
from tests.helpers import DIM, EVENTFUL_VARIANTS, make_backbones, make_pair, video_stream

# Each test runs in each autograd mode; the fixture enters it (bodies do not).
pytestmark = pytest.mark.usefixtures("grad_mode")


@pytest.mark.parametrize("variant", EVENTFUL_VARIANTS)
def test_first_frame_after_reset_is_a_flush(variant):
    dense, eventful = make_pair(variant, policy=TopRPolicy(5), input_size=(6, 6))
    counter = attach_counter(eventful, OpCounter())
    stream = video_stream(4, 2, 36, DIM)
    other = video_stream(3, 2, 36, DIM, seed=1)
    for frame in stream:
        eventful(frame)
    assert counter.counts["gate"] > 0  # the last call was incremental
    reset_stream_state(eventful)
    counter.reset()
    out = eventful(other[0])
    torch.testing.assert_close(out, dense(other[0]), rtol=1e-5, atol=1e-5)
    assert counter.counts["gate"] == 0
    counter.reset()
    eventful(other[1])
    assert counter.counts["gate"] > 0


@pytest.mark.parametrize("variant", EVENTFUL_VARIANTS)
def test_batch_streams_are_independent(variant):
    """Two streams in one batch give the same outputs as each stream run alone."""
    _, batched = make_pair(variant, policy=TopRPolicy(7), input_size=(6, 6))
    _, alone = make_pair(variant, policy=TopRPolicy(7), input_size=(6, 6))
    a = video_stream(6, 1, 36, DIM, seed=3)
    b = video_stream(6, 1, 36, DIM, seed=4, change=2.0)
    out_batched = [batched(torch.cat([fa, fb])) for fa, fb in zip(a, b)]
    out_a = [alone(f) for f in a]
    reset_stream_state(alone)
    out_b = [alone(f) for f in b]
    for t in range(6):
        torch.testing.assert_close(out_batched[t][0:1], out_a[t], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out_batched[t][1:2], out_b[t], rtol=1e-5, atol=1e-5)


def test_backbone_reset_restarts_every_block():
    _, eventful = make_backbones("full", dim=DIM, depth=3, heads=4, input_size=5, class_token=True)
    eventful.set_policy(TopRPolicy(4))
    stream = video_stream(4, 2, 25, DIM)
    first = [eventful(f) for f in stream]
    eventful.reset()
    second = [eventful(f) for f in stream]
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_eventful_r_less_than_n_differs_from_dense_but_stays_close():
    """r < N is an approximation: not exact, but close on a slowly changing stream."""
    dense, eventful = make_backbones("full", dim=DIM, depth=2, heads=4, input_size=6)
    eventful.set_policy(TopRPolicy(18))
    stream = video_stream(5, 1, 36, DIM)
    for t, frame in enumerate(stream):
        ref, out = dense(frame), eventful(frame)
        rel = ((out - ref).norm() / ref.norm()).item()
        if t == 0:
            assert rel < 1e-5
        else:
            assert 0 < rel < 0.5
