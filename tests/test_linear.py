"""The pre-packed oneDNN linear path and its fallbacks; the blocks' linear-layer
contract (replaced and hooked layers are called as modules) and the block
attributes and helpers a timm reader meets (``sqrt_head_dim``, ``drop_path``,
``to_pair``)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from eventful_pl import linear as linear_module
from eventful_pl.blocks import Block, build_block, drop_path, is_plain_linear, to_pair
from eventful_pl.counting import OpCounter, attach_counter
from eventful_pl.linear import linear, prepacked_linear_available, set_prepacked_linear
from eventful_pl.policies import TopRPolicy
from tests.helpers import video_stream

needs_mkldnn = pytest.mark.skipif(
    not linear_module._MKLDNN_LINEAR, reason="PyTorch built without oneDNN"
)


@needs_mkldnn
@pytest.mark.parametrize("shape", [(1, 768), (7, 768), (2, 50, 768)])
@pytest.mark.parametrize("gelu", [False, True])
def test_prepacked_matches_f_linear(shape, gelu):
    layer = nn.Linear(768, 512)
    x = torch.randn(shape)
    expected = F.linear(x, layer.weight, layer.bias)
    if gelu:
        expected = F.gelu(expected)
    with torch.no_grad():
        assert prepacked_linear_available(x, layer.weight)
        out = linear(x, layer.weight, layer.bias, gelu=gelu)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@needs_mkldnn
def test_packed_weight_refreshes_after_in_place_update():
    layer = nn.Linear(64, 32)
    x = torch.randn(5, 64)
    with torch.no_grad():
        before = linear(x, layer.weight, layer.bias)
        layer.weight.mul_(2.0)
        after = linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(after - layer.bias, 2.0 * (before - layer.bias))


def test_autograd_and_switch_use_f_linear():
    layer = nn.Linear(16, 8)
    x = torch.randn(3, 16, requires_grad=True)
    assert not prepacked_linear_available(x, layer.weight)
    linear(x, layer.weight, layer.bias, gelu=True).sum().backward()
    assert x.grad is not None and layer.weight.grad is not None
    set_prepacked_linear(False)
    try:
        with torch.no_grad():
            assert not prepacked_linear_available(x, layer.weight)
    finally:
        set_prepacked_linear(True)


def test_inference_mode_weights_fall_back():
    with torch.inference_mode():
        layer = nn.Linear(16, 8)
        x = torch.randn(3, 16)
        assert not prepacked_linear_available(x, layer.weight)
        torch.testing.assert_close(linear(x, layer.weight, layer.bias), layer(x))


# The blocks' linear-layer contract.

DIM, HEADS, GRID = 32, 4, (4, 4)
LINEARS = ("qkv", "proj", "fc1", "fc2")


def block_pair(variant: str) -> tuple[Block, Block]:
    """Two blocks of ``variant`` with the same weights; the eventful ones
    recompute every token (r = N), so they equal the dense block."""
    torch.manual_seed(0)
    policy = TopRPolicy(GRID[0] * GRID[1])
    a = build_block(variant, DIM, HEADS, input_size=GRID, policy=policy).eval()
    b = build_block(variant, DIM, HEADS, input_size=GRID, policy=policy).eval()
    b.load_state_dict(a.state_dict())
    return a, b


def run_stream(block: Block, frames) -> list[torch.Tensor]:
    with torch.no_grad():
        return [block(x.clone()) for x in frames]


class LowRankLinear(nn.Linear):
    """An nn.Linear subclass with its own forward: ``W x + b + B (A x)`` (LoRA-like)."""

    def __init__(self, base: nn.Linear, rank: int = 2) -> None:
        super().__init__(base.in_features, base.out_features)
        self.load_state_dict(base.state_dict())
        self.down = nn.Parameter(torch.randn(rank, base.in_features) * 0.3)
        self.up = nn.Parameter(torch.randn(base.out_features, rank) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + F.linear(F.linear(x, self.down), self.up)


def test_plain_linear_detection():
    layer = nn.Linear(4, 4)
    assert is_plain_linear(layer)
    assert not is_plain_linear(LowRankLinear(layer))
    handle = layer.register_forward_hook(lambda module, args, out: out)
    assert not is_plain_linear(layer)
    handle.remove()
    handle = layer.register_forward_pre_hook(lambda module, args: None)
    assert not is_plain_linear(layer)
    handle.remove()
    handle = nn.modules.module.register_module_forward_hook(lambda module, args, out: out)
    try:
        assert not is_plain_linear(layer)
    finally:
        handle.remove()
    assert is_plain_linear(layer)


def test_plain_linears_skip_the_module_call(monkeypatch):
    """The fast path: plain nn.Linear layers run from their weights, never
    through ``nn.Linear.forward``."""
    block = build_block("full", DIM, HEADS, input_size=GRID, policy=TopRPolicy(5)).eval()

    def refuse(self, x):
        raise AssertionError("nn.Linear.forward called on the fast path")

    monkeypatch.setattr(nn.Linear, "forward", refuse)
    run_stream(block, video_stream(3, 2, 16, DIM))


@pytest.mark.parametrize("variant", ["dense", "tokenwise", "query_key", "full"])
@pytest.mark.parametrize("name", LINEARS)
def test_forward_hook_on_a_linear_fires_and_changes_the_output(variant, name):
    """A forward hook that doubles a layer's output acts like doubling its
    weight and bias, on flush and incremental frames."""
    hooked, doubled = block_pair(variant)
    calls = []

    def double(module, args, out):
        calls.append(args[0].shape)
        return 2 * out

    getattr(hooked, name).register_forward_hook(double)
    with torch.no_grad():
        layer = getattr(doubled, name)
        layer.weight.mul_(2)
        layer.bias.mul_(2)
    frames = video_stream(3, 2, 16, DIM)
    for got, expected in zip(run_stream(hooked, frames), run_stream(doubled, frames), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert len(calls) == len(frames)


@pytest.mark.parametrize("variant", ["dense", "tokenwise", "query_key", "full"])
def test_linear_subclass_forward_is_honoured(variant):
    """An nn.Linear subclass with its own forward (low-rank update) in place of
    fc1 and qkv equals a plain layer holding the merged weight ``W + B A``;
    counts are those of the plain layers."""
    replaced, merged = block_pair(variant)
    for name in ("qkv", "fc1"):
        layer = LowRankLinear(getattr(replaced, name))
        setattr(replaced, name, layer)
        with torch.no_grad():
            getattr(merged, name).weight.add_(layer.up @ layer.down)
    counters = OpCounter(), OpCounter()
    attach_counter(replaced, counters[0])
    attach_counter(merged, counters[1])
    frames = video_stream(3, 2, 16, DIM)
    for got, expected in zip(run_stream(replaced, frames), run_stream(merged, frames), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert counters[0].counts == counters[1].counts


def test_hooked_linear_trains_through_the_module():
    """Gradients reach a replaced layer's own parameters."""
    block, _ = block_pair("dense")
    block.fc1 = LowRankLinear(block.fc1)
    block.train()
    block(torch.randn(2, 16, DIM)).sum().backward()
    assert block.fc1.down.grad is not None and block.fc1.weight.grad is not None


# Block attributes and helpers a timm reader meets.


def test_sqrt_head_dim_and_the_deprecated_scale_alias():
    """``sqrt_head_dim`` is what the queries are divided by (timm's
    ``Attention.scale`` is its inverse); ``scale`` still reads and writes it,
    with a DeprecationWarning."""
    block = build_block("full", DIM, HEADS, input_size=GRID, policy=TopRPolicy(5))
    assert block.sqrt_head_dim == math.sqrt(DIM // HEADS)
    with pytest.warns(DeprecationWarning, match="sqrt_head_dim"):
        assert block.scale == block.sqrt_head_dim
    with pytest.warns(DeprecationWarning, match="sqrt_head_dim"):
        block.scale = 3.0
    assert block.sqrt_head_dim == 3.0
    assert "scale" not in block.state_dict() and "sqrt_head_dim" not in block.state_dict()


def test_drop_path_is_timms():
    """Stochastic depth is timm's: the same samples kept (same random draws) and
    scaled by 1 / (1 - rate); identity in eval or at rate 0."""
    timm_layers = pytest.importorskip("timm.layers")
    x = torch.randn(64, 3, 5)
    assert drop_path(x, 0.0, True) is x and drop_path(x, 0.3, False) is x
    torch.manual_seed(1)
    got = drop_path(x, 0.3, True)
    torch.manual_seed(1)
    assert torch.equal(got, timm_layers.drop_path(x, 0.3, True))
    torch.manual_seed(1)
    keep = x.new_empty(64, 1, 1).bernoulli_(0.7)
    torch.testing.assert_close(got, x * keep / 0.7)


def test_to_pair():
    """Sizes are optional int pairs (unlike timm's to_2tuple, None stays None
    and sequence items become ints)."""
    assert to_pair(None) is None
    assert to_pair(3) == (3, 3)
    assert to_pair([4, 5]) == (4, 5)
    assert to_pair((14.0, 14.0)) == (14, 14)
    assert all(type(v) is int for v in to_pair((14.0, 14.0)))
