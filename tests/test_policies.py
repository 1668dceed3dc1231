"""Token selection policies, per batch item."""

import pytest
import torch

from eventful_pl import OpCounter, attach_counter
from eventful_pl.gates import TokenGate
from eventful_pl.policies import (
    ThresholdPolicy,
    TopFractionPolicy,
    TopRPolicy,
    build_policy,
)
from tests.helpers import DIM, EVENTFUL_VARIANTS, make_pair, video_stream


def test_top_r_selects_the_largest_norms_per_item():
    norms = torch.tensor([[0.1, 5.0, 0.3, 4.0], [9.0, 0.0, 8.0, 0.2]])
    index = TopRPolicy(2).select(norms)
    assert index.shape == (2, 2)
    assert sorted(index[0].tolist()) == [1, 3]
    assert sorted(index[1].tolist()) == [0, 2]


def test_top_fraction_floors():
    norms = torch.rand(3, 10)
    assert TopFractionPolicy(0.25).select(norms).shape == (3, 2)
    assert TopFractionPolicy(1.0).select(norms).shape == (3, 10)
    assert TopFractionPolicy(0.0).select(norms).shape == (3, 0)


def test_threshold_batch_takes_each_items_over_threshold_tokens():
    norms = torch.tensor([[2.0, 0.1, 3.0, 0.2, 0.3], [0.1, 0.2, 5.0, 0.0, 0.1]])
    index = ThresholdPolicy(1.0).select(norms)
    assert index.shape == (2, 2)  # k = the largest per-item count
    assert sorted(index[0].tolist()) == [0, 2]
    assert 2 in index[1].tolist()  # item 1's own over-threshold token is included
    assert ThresholdPolicy(10.0).select(norms).shape == (2, 0)


def test_token_gate_accumulates_error_until_selected():
    gate = TokenGate(TopRPolicy(1))
    c0 = torch.zeros(1, 3, 2)
    gate(c0)
    c1 = torch.tensor([[[1.0, 0.0], [0.6, 0.0], [0.0, 0.0]]])
    out, index = gate(c1)
    assert index.tolist() == [[0]]
    torch.testing.assert_close(out, c1[:, :1])
    # Token 1 was not sent: its reference is still 0, so its error grows.
    c2 = torch.tensor([[[1.0, 0.0], [0.7, 0.0], [0.0, 0.0]]])
    out, index = gate(c2)
    assert index.tolist() == [[1]]
    torch.testing.assert_close(gate.p, torch.tensor([[[1.0, 0.0], [0.7, 0.0], [0.0, 0.0]]]))


def test_threshold_zero_updates_every_changed_token():
    _, eventful = make_pair("full", policy=ThresholdPolicy(0.0), input_size=(6, 6))
    counter = attach_counter(eventful, OpCounter())
    frames = video_stream(3, 2, 36, DIM)
    with torch.no_grad():
        eventful(frames[0])
        counter.reset()
        eventful(frames[1])
    # qkv linear on all 2 x 36 tokens.
    assert counter.counts["linear"] == 2 * 36 * 12 * DIM * DIM


@pytest.mark.parametrize("variant", EVENTFUL_VARIANTS)
def test_large_threshold_updates_nothing_and_reuses_cached_branches(variant):
    """h huge: no token is updated; every branch returns its cached output."""
    _, eventful = make_pair(variant, policy=ThresholdPolicy(1e9), input_size=(6, 6))
    counter = attach_counter(eventful, OpCounter())
    frames = video_stream(3, 2, 36, DIM)
    with torch.no_grad():
        first = eventful(frames[0])
        counter.reset()
        second = eventful(frames[1])
    assert counter.counts["linear"] == 0 and counter.counts["bias"] == 0
    # The residual stream carries the new input; the branches are cached.
    torch.testing.assert_close(second - frames[1], first - frames[0], rtol=1e-5, atol=1e-5)
    assert eventful.mlp_buffer.b.shape == (2, 36, DIM)


def test_large_threshold_on_unchanged_input_returns_cached_output():
    _, eventful = make_pair("full", policy=ThresholdPolicy(1e9), input_size=(6, 6))
    frame = video_stream(1, 2, 36, DIM)[0]
    with torch.no_grad():
        first = eventful(frame)
        torch.testing.assert_close(eventful(frame.clone()), first, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("make", "option"),
    [
        (lambda: TopRPolicy(0), "r"),
        (lambda: TopRPolicy(-3), "r"),
        (lambda: TopFractionPolicy(1.5), "fraction"),
        (lambda: TopFractionPolicy(-0.1), "fraction"),
        (lambda: ThresholdPolicy(-1.0), "threshold"),
        (lambda: build_policy("top_k", 3), "policy"),
    ],
)
def test_bad_policy_arguments(make, option):
    with pytest.raises(ValueError, match=option):
        make()


def test_r_larger_than_n_is_refused():
    with pytest.raises(ValueError, match="r=10"):
        TopRPolicy(10).select(torch.rand(1, 5))


@pytest.mark.parametrize("structure", ["row", "col"])
def test_delta_gate_forced_index_returns_values_and_deltas(structure):
    from eventful_pl.gates import DeltaGate

    gate = DeltaGate(structure)
    c0 = torch.randn(2, 3, 5, 5)
    assert gate(c0)[1] is None  # flush
    c1 = c0 + torch.randn(2, 3, 5, 5)
    index = torch.tensor([[4, 1], [0, 2]])
    c_sel, e_sel, used = gate(c1, forced_index=index)
    assert used is index
    for b in range(2):
        for j, t in enumerate(index[b].tolist()):
            if structure == "row":
                torch.testing.assert_close(c_sel[b, :, j], c1[b, :, t])
                torch.testing.assert_close(e_sel[b, :, j], c1[b, :, t] - c0[b, :, t])
                torch.testing.assert_close(gate.p[b, :, t], c1[b, :, t])
            else:
                torch.testing.assert_close(c_sel[b, ..., j], c1[b, ..., t])
                torch.testing.assert_close(e_sel[b, ..., j], c1[b, ..., t] - c0[b, ..., t])
                torch.testing.assert_close(gate.p[b, ..., t], c1[b, ..., t])
    # Unselected tokens keep their old reference.
    torch.testing.assert_close(
        gate.p[0, :, 3] if structure == "row" else gate.p[0, ..., 3],
        c0[0, :, 3] if structure == "row" else c0[0, ..., 3],
    )


def test_stgt_gate_reference_is_the_previous_frame():
    from eventful_pl.gates import STGTGate

    gate = STGTGate(TopRPolicy(1))
    frames = [torch.zeros(1, 3, 2), torch.tensor([[[1.0, 0], [0.6, 0], [0, 0]]])]
    frames.append(frames[1] + torch.tensor([[[0.0, 0], [0.1, 0], [0, 0]]]))
    gate(frames[0])
    assert gate(frames[1])[1].tolist() == [[0]]
    torch.testing.assert_close(gate.p, frames[1])  # every token, not only the selected
    assert gate(frames[2])[1].tolist() == [[1]]  # small change vs the previous frame


@pytest.mark.parametrize("gate_name", ["TokenGate", "STGTGate"])
@pytest.mark.parametrize("batch", [1, 3])
def test_token_gate_reads_grouped_channels_in_place(gate_name, batch):
    """Heads (B, N, H, d) as a strided view of (B, H, N, d) gate exactly like (B, N, H * d)."""
    from eventful_pl import gates

    heads, n, d = 4, 9, 5
    grouped, merged = (getattr(gates, gate_name)(TopRPolicy(3)) for _ in range(2))
    for t in range(4):
        frame = torch.randn(batch, heads, n, d, generator=torch.Generator().manual_seed(t))
        view = frame.transpose(1, 2)  # (B, N, H, d), not contiguous
        got, got_index = grouped(view)
        want, want_index = merged(view.reshape(batch, n, heads * d))
        assert got.shape == want.shape == (batch, n if t == 0 else 3, heads * d)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        if t:
            assert torch.equal(got_index, want_index)
        torch.testing.assert_close(grouped.p, merged.p, rtol=0, atol=0)
        assert grouped.p.is_contiguous()
