"""Linear layers for CPU inference, with weights pre-packed once for oneDNN.

An eventful frame runs its linear layers on a few dozen rows, where a plain
``F.linear`` (MKL GEMM that re-reads and re-blocks the weight every call)
reaches well under half of its large-batch rate on CPU. When gradients are
off, the input is a float32 CPU tensor and PyTorch has oneDNN, :func:`linear`
packs the weight once into oneDNN's blocked layout (a cached copy, refreshed
when the weight changes in place) and calls oneDNN's linear primitive, with
GELU fused into it if asked. bfloat16 takes the same path where oneDNN runs
bfloat16 natively (AVX512-BF16 or AMX: :func:`bf16_prepacked_supported`),
accumulating in float32. Everything else (training, CUDA, float16, bfloat16
on other CPUs, inference-mode weights) uses ``F.linear``. Dense and eventful blocks both go
through here for their plain ``nn.Linear`` layers, so speed comparisons stay
like for like; a replaced or hooked layer is called as a module instead
(:meth:`eventful_pl.blocks.Block.linear`).

Switch it off with ``set_prepacked_linear(False)`` (it holds one packed copy
of each weight used, about the size of the weights).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

_MKLDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(
    torch.ops.mkldnn, "_linear_pointwise"
)
_enabled = True
_bf16_supported: bool | None = None
# weight -> (weight._version when packed, packed weight)
_packed: WeakIdKeyDictionary = WeakIdKeyDictionary()


def set_prepacked_linear(enabled: bool) -> None:
    """Turns the pre-packed CPU inference path on or off (on by default)."""
    global _enabled
    _enabled = bool(enabled)
    if not _enabled:
        _packed.clear()


def bf16_prepacked_supported() -> bool:
    """Whether oneDNN packs and runs bfloat16 linears natively on this CPU
    (AVX512-BF16 or AMX; checked once)."""
    global _bf16_supported
    if _bf16_supported is None:
        check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        try:
            _bf16_supported = bool(_MKLDNN_LINEAR and check is not None and check())
        except RuntimeError:
            _bf16_supported = False
    return _bf16_supported


def prepacked_linear_available(x: Tensor, weight: Tensor) -> bool:
    """Whether :func:`linear` would take the pre-packed path for these tensors."""
    if not (
        _enabled
        and _MKLDNN_LINEAR
        and not torch.compiler.is_compiling()  # inductor packs weights itself
        and not torch.is_grad_enabled()
        and x.device.type == "cpu"
        and x.dtype == weight.dtype
        and not weight.is_inference()
        and x.numel() > 0
    ):
        return False
    return x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and bf16_prepacked_supported())


def _packed_weight(weight: Tensor) -> Tensor:
    cached = _packed.get(weight)
    if cached is not None and cached[0] == weight._version:
        return cached[1]
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
    _packed[weight] = (weight._version, packed)
    return packed


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, gelu: bool = False) -> Tensor:
    """``F.linear(x, weight, bias)``, then exact (erf) GELU if ``gelu``.

    float32 or bfloat16 (float32 accumulation). Shapes: x (..., in),
    weight (out, in), bias (out,) -> (..., out).
    """
    if prepacked_linear_available(x, weight):
        packed = _packed_weight(weight)
        attr, algorithm = ("gelu", "none") if gelu else ("none", "")
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, attr, [], algorithm)
    out = F.linear(x, weight, bias)
    return F.gelu(out) if gelu else out
