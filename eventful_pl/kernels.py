"""Fused CPU kernels for eventful inference, compiled on first use.

An eventful frame spends much of its non-GEMM time in memory-bound passes
over tokens and attention state: ``LayerNorm(x)`` written out in full only to
feed a gate, ``c - p`` written out and read back for its norms, logits
stored and read back for their exponentials, gathered copies of reference
rows and their deltas. The kernels in ``csrc/fused_cpu.cpp`` do each of these
in one pass that reads every input once:

- :func:`error_norms`: ``||c - p||`` per token, ``c`` possibly a strided
  view with channels in groups (attention heads read in place);
- :func:`layer_norm_error_norms`: ``||LayerNorm(x) - p||`` per token without
  materialising ``LayerNorm(x)``; the gate then normalises only the tokens
  it selects;
- :func:`update_softmax`: the full block's incremental softmax normaliser
  update from given logits (used with relative position);
- :func:`incremental_softmax`: the same from the updated queries and keys,
  computing the logits tile by tile in registers, never storing one;
- :func:`attention_update`: the full block's output update ``A_new dV +
  dA V_old``, reading the old columns and values straight from the delta
  gates' references and writing the new columns back in the same pass.

They are used when gradients are off and the tensors are float32 on CPU
(see :func:`fused_kernels_available`); everything else, and every machine
where the extension cannot be built (no C++ compiler), uses the equivalent
PyTorch ops. The extension is built with ``torch.utils.cpp_extension.load``
into PyTorch's extension cache (``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``) the first time a kernel is needed (about 30 s),
and loaded from there afterwards. ``EVENTFUL_PL_FUSED_KERNELS=0`` or
:func:`set_fused_kernels` switch it off.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor, nn

SOURCE = Path(__file__).resolve().parent / "csrc" / "fused_cpu.cpp"
ENV_SWITCH = "EVENTFUL_PL_FUSED_KERNELS"
# Instruction-set flags per PyTorch CPU capability (the build is named after
# it, so a shared extension cache never hands one CPU another's build).
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mfma", "-mavx2"],
    "AVX2": ["-mavx2", "-mfma"],
}
_enabled = os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def set_fused_kernels(enabled: bool) -> None:
    """Turns the fused CPU kernels on or off (on by default unless
    ``EVENTFUL_PL_FUSED_KERNELS=0``)."""
    global _enabled
    _enabled = bool(enabled)


def _capability() -> str:
    capability = torch.backends.cpu.get_cpu_capability()
    return capability if capability in _ISA_FLAGS else "DEFAULT"


@functools.cache
def load_extension() -> ModuleType | None:
    """Builds (once per machine) and loads the extension; None if that fails,
    with a warning that says why."""
    capability = _capability()
    cpp_logger = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_logger.level
    cpp_logger.setLevel(logging.ERROR)  # "no CUDA runtime" notices: CPU-only build
    try:
        from torch.utils.cpp_extension import load

        return load(
            name=f"eventful_pl_fused_cpu_{capability.lower()}",
            sources=[str(SOURCE)],
            # OpenMP: at::parallel_for runs on PyTorch's own thread pool
            # (torch's bundled libgomp.so.1 satisfies the link by soname).
            extra_cflags=["-O3", "-fopenmp", *_ISA_FLAGS.get(capability, [])],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as err:  # no compiler, no headers, read-only cache, ...
        warnings.warn(
            f"eventful_pl: could not build the fused CPU kernels from {SOURCE} "
            f"({type(err).__name__}: {_error_summary(err)}); using PyTorch ops instead "
            f"(set {ENV_SWITCH}=0 to silence this)",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    finally:
        cpp_logger.setLevel(level)


def _error_summary(err: Exception) -> str:
    """The compiler's error lines of a failed build (else the message's end)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line.lower()]
    return " | ".join((errors or lines)[-3:])[-600:]


def fused_kernels_available(*tensors: Tensor) -> bool:
    """Whether the fused kernels apply to these tensors: enabled, gradients
    off, all float32 on CPU, and the extension builds."""
    if not _enabled or torch.is_grad_enabled():
        return False
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return False
    return load_extension() is not None


def error_norms(c: Tensor, p: Tensor) -> Tensor:
    """``||c - p||`` per token: c (B, N, D) or (B, N, G, C) (any strides,
    channels contiguous), p contiguous with B * N * D elements -> (B, N)."""
    if c.ndim == 3:
        c = c.unsqueeze(2)
    if c.stride(-1) != 1:
        c = c.contiguous()
    return load_extension().error_norms(c, p)


def layer_norm_error_norms(x: Tensor, norm: nn.LayerNorm, p: Tensor) -> Tensor:
    """``||norm(x) - p||`` per token without materialising ``norm(x)``:
    x, p (B, N, D) -> (B, N)."""
    weight, bias = norm.weight, norm.bias
    if weight is None:  # elementwise_affine=False
        weight = torch.ones(x.shape[-1], dtype=x.dtype)
    if bias is None:
        bias = torch.zeros(x.shape[-1], dtype=x.dtype)
    return load_extension().layer_norm_error_norms(x.contiguous(), weight, bias, norm.eps, p)


def update_softmax(
    rows: Tensor,
    cols_old: Tensor,
    cols_new: Tensor,
    log_norm: Tensor,
    index: Tensor,
    min_kept_mass: float,
    max_log_shift: float,
) -> bool:
    """The full eventful block's incremental softmax update in two fused passes
    (``EventfulBlock._update_softmax`` documents the method).

    rows (B, H, r, Nk), cols_old and cols_new (B, H, m, N), log_norm (B, H, N),
    index (B, r). On success updates ``log_norm`` in place, overwrites
    ``cols_new`` with the new softmax columns and returns True; returns False
    (``log_norm`` untouched) when the precision checks call for the exact
    fallback.
    """
    b, heads, n = log_norm.shape
    return load_extension().update_softmax(
        rows.reshape(b * heads, rows.shape[-2], rows.shape[-1]),
        cols_old.reshape(b * heads, cols_old.shape[-2], n),
        cols_new.view(b * heads, cols_new.shape[-2], n),
        log_norm.view(b * heads, n),
        index.contiguous(),
        min_kept_mass,
        max_log_shift,
    )


def incremental_softmax(
    q_rows: Tensor,
    keys_t: Tensor,
    k_new: Tensor,
    k_old: Tensor,
    q_t: Tensor,
    log_norm: Tensor,
    index: Tensor,
    probs: Tensor,
    min_kept_mass: float,
    max_log_shift: float,
) -> bool:
    """The full block's incremental logits and softmax update in one kernel
    that never stores a logit (G = B * H groups; no relative position).

    q_rows (G, r, d), keys_t (G, d, Nk), k_new and k_old (G, m, d), q_t
    (G, d, N), log_norm (G, N), index (B, r), probs (G, m, N) (written).
    Same result and fallback contract as :func:`update_softmax` given the
    logits ``q_rows @ keys_t``, ``k_old @ q_t`` and ``k_new @ q_t``.
    """
    return load_extension().incremental_softmax(
        q_rows,
        keys_t,
        k_new,
        k_old,
        q_t,
        log_norm,
        index.contiguous(),
        probs,
        min_kept_mass,
        max_log_shift,
    )


def attention_update(
    out: Tensor,
    a_new: Tensor,
    v_new: Tensor,
    a_ref: Tensor,
    v_ref: Tensor,
    key_index: Tensor,
) -> Tensor:
    """The full block's output update in one pass over ``out``, reading the old
    columns and values straight from the delta gates' references:
    ``out += a_new^T v_new - a_ref[keys]^T v_ref[keys]`` (= ``A_new dV + dA V_old``),
    then ``a_ref[keys] = a_new`` in the same pass (``v_ref`` is only read).

    out (G, N, d), a_new (G, m, N), v_new (G, m, d), a_ref (G, Nk, N), v_ref
    (G, Nk, d), all contiguous, G = B * H; key_index (B, m), no key twice.
    d a multiple of 16, at most 64.
    """
    load_extension().attention_update(out, a_new, v_new, a_ref, v_ref, key_index.contiguous())
    return out


def attention_update_supported(head_size: int) -> bool:
    """Whether :func:`attention_update` handles this head size."""
    return head_size % 16 == 0 and head_size <= 64
