"""The pre-packed oneDNN linear path and its fallbacks."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from eventful_pl import linear as linear_module
from eventful_pl.linear import linear, prepacked_linear_available, set_prepacked_linear

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
