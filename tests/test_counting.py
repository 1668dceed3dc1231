"""Operation counts by the rules of docs/counting.md, checked against hand counts."""

import torch

from eventful_pl import OpCounter, attach_counter, count_ops
from eventful_pl.backbone import ViTBackbone
from eventful_pl.policies import ThresholdPolicy, TopRPolicy
from tests.helpers import DIM, make_backbones, make_pair, video_stream


def dense_block_ops(b: int, n: int, d: int, mlp: int = 4) -> dict[str, int]:
    """Hand count of one dense global block without relative position."""
    return {
        "linear": b * n * d * (3 * d + d + 2 * mlp * d),
        "bias": b * n * (3 * d + d + mlp * d + d),
        "matmul": 2 * b * n * n * d,
        "add": 2 * b * n * d,
    }


def test_dense_backbone_matches_hand_count():
    backbone = ViTBackbone(dim=DIM, depth=3, heads=4, input_size=4, class_token=True).eval()
    with torch.no_grad(), count_ops(backbone) as counter:
        backbone(torch.randn(2, 16, DIM))
    block = dense_block_ops(2, 17, DIM)
    expected = {kind: 3 * n for kind, n in block.items()}
    expected["add"] += 2 * 17 * DIM  # position encoding
    assert {k: v for k, v in counter.counts.items() if v} == expected


def test_full_eventful_incremental_hand_count():
    b, n, d, h, r = 2, 36, DIM, 4, 5
    _, block = make_pair("full", policy=TopRPolicy(r), input_size=(6, 6))
    counter = attach_counter(block, OpCounter())
    frames = video_stream(2, b, n, d)
    with torch.no_grad():
        block(frames[0])
        assert counter.counts == {**dict.fromkeys(counter.counts, 0), **dense_block_ops(b, n, d)}
        counter.reset()
        block(frames[1])
    assert counter.counts == {
        "linear": b * r * d * 12 * d,
        "bias": b * r * 9 * d,
        "matmul": 2 * b * h * r * n * (d // h) + 2 * b * h * n * r * (d // h),
        "einsum": 0,
        "add": 2 * b * n * d,
        "gate": 3 * b * n * d + b * h * n * (d // h) + b * h * n * n,
        "accumulator": b * h * r * (d // h) + 2 * b * h * n * (d // h),
    }
    assert counter.total == sum(counter.counts.values())
    assert counter.gflops()["total"] == counter.total / 1e9


def test_threshold_counts_what_is_computed():
    """k differs per call; counts follow the number of tokens actually computed."""
    _, block = make_pair("tokenwise", policy=ThresholdPolicy(1.0), input_size=(6, 6))
    counter = attach_counter(block, OpCounter())
    frames = video_stream(3, 2, 36, DIM)
    with torch.no_grad():
        block(frames[0])
        counter.reset()
        block(frames[1])
    assert 0 < counter.counts["linear"] < 2 * 36 * 12 * DIM * DIM
    assert counter.counts["linear"] % (DIM * DIM) == 0


def test_counting_off_costs_nothing_and_changes_nothing():
    dense, eventful = make_backbones("full", dim=DIM, depth=2, heads=4, input_size=4)
    eventful.set_policy(TopRPolicy(5))
    frames = video_stream(3, 1, 16, DIM)
    with torch.no_grad():
        with count_ops(eventful) as counter:
            counted = [eventful(f) for f in frames]
        assert counter.total > 0
        assert all(m.counter is None for m in eventful.modules() if hasattr(m, "counter"))
        eventful.reset()
        plain = [eventful(f) for f in frames]
    for a, b in zip(counted, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_disabled_counter_ignores_adds():
    counter = OpCounter(enabled=False)
    counter.add("linear", 10)
    assert counter.total == 0
    assert counter.as_flops_dict() == {}
