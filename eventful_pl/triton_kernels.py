"""Fused GPU kernels (Triton) for static eventful frames.

- :func:`update_softmax`: the full block's softmax-normaliser update
  (:func:`eventful_pl.blocks.softmax.update_softmax_flagged`) in two kernels
  instead of about 25 element-wise ones: the masses of the updated query rows,
  then one pass per query column over the old and new key columns that
  updates the log-normaliser, writes the new softmax columns and flags the
  streams whose update lost precision. Arithmetic is float32 whatever the
  storage dtype.
- :func:`error_norms`: a gate's ``||c - p||`` per token in one pass (no
  error tensor), ``c`` possibly a strided (B, N, G, C) view of heads.

Each has an exact PyTorch fallback (the functions it replaces); callers use
:func:`available` to choose. The kernels run on CUDA tensors, and on CPU
tensors under ``TRITON_INTERPRET=1`` (Triton's interpreter, for tests). Turn
them off with ``set_triton_kernels(False)`` or ``EVENTFUL_PL_TRITON=0``.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

# Imported on first use (``_load``): Triton reads TRITON_INTERPRET when it is
# imported, and importing it costs time that a CPU-only run never needs.
triton = None
tl = None
_import_failed = False


def _load() -> bool:
    """Imports Triton once; whether it is there (it ships with CUDA builds of PyTorch)."""
    global triton, tl, _import_failed
    if triton is None and not _import_failed:
        try:
            import triton as triton_module
            import triton.language as tl_module
        except ImportError:  # pragma: no cover - depends on the installation
            _import_failed = True
        else:
            triton, tl = triton_module, tl_module
    return triton is not None


ENV_SWITCH = "EVENTFUL_PL_TRITON"
_enabled = os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def set_triton_kernels(enabled: bool) -> None:
    """Turns the Triton kernels on or off (on by default unless ``EVENTFUL_PL_TRITON=0``)."""
    global _enabled
    _enabled = bool(enabled)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(*tensors: Tensor) -> bool:
    """Whether the kernels apply: enabled, Triton importable, gradients off,
    and the tensors on CUDA (or on CPU under ``TRITON_INTERPRET=1``); never
    under ``torch.compile``, whose inductor backend fuses the same PyTorch ops
    into its own kernels."""
    if not _enabled or torch.is_grad_enabled() or torch.compiler.is_compiling() or not _load():
        return False
    device = "cpu" if _interpreting() else "cuda"
    return all(t.device.type == device for t in tensors)


# The kernels' bodies (plain functions, jitted on first use by ``_kernel``).


def _row_mass_kernel(
    rows_ptr, log_norm_ptr, index_ptr, mass_ptr, heads, r, nk, n,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    # One program per updated row (g, i): sum_k exp(rows[g, i, k] - L[g, index[b, i]]).
    pid = tl.program_id(0)
    g = pid // r
    i = pid % r
    b = g // heads
    row = tl.load(index_ptr + b * r + i)
    shift = tl.load(log_norm_ptr + g * n + row).to(tl.float32)
    total = tl.zeros([BLOCK_K], dtype=tl.float32)
    base = rows_ptr + pid.to(tl.int64) * nk
    for start in range(0, nk, BLOCK_K):
        offs = start + tl.arange(0, BLOCK_K)
        x = tl.load(base + offs, mask=offs < nk, other=float("-inf")).to(tl.float32)
        total += tl.exp(x - shift)
    tl.store(mass_ptr + pid, tl.sum(total, axis=0))


def _column_kernel(
    cols_old_ptr, cols_new_ptr, log_norm_ptr, index_ptr, mass_ptr, failed_ptr,
    heads, r, m, n, min_kept_mass, max_log_shift,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # One program per (g, block of query columns).
    g = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    inside = cols < n
    b = g // heads
    shift = tl.load(log_norm_ptr + g * n + cols, mask=inside, other=0.0).to(tl.float32)
    removed = tl.zeros([BLOCK_N], dtype=tl.float32)
    added = tl.zeros([BLOCK_N], dtype=tl.float32)
    base = g.to(tl.int64) * m * n
    for j in range(0, m):
        old = tl.load(cols_old_ptr + base + j * n + cols, mask=inside, other=0.0)
        new = tl.load(cols_new_ptr + base + j * n + cols, mask=inside, other=0.0)
        removed += tl.exp(old.to(tl.float32) - shift)
        added += tl.exp(new.to(tl.float32) - shift)
    # Updated query rows: exact mass of the recomputed row instead.
    slots = tl.arange(0, BLOCK_R)
    slot_ok = slots < r
    updated = tl.load(index_ptr + b * r + slots, mask=slot_ok, other=-1)
    mass = tl.load(mass_ptr + g * r + slots, mask=slot_ok, other=0.0)
    match = cols[:, None] == updated[None, :]
    is_row = tl.sum(match.to(tl.int32), axis=1) > 0
    row_mass = tl.sum(tl.where(match, mass[None, :], 0.0), axis=1)
    kept = tl.where(is_row, 1.0, 1.0 - removed)
    total = tl.where(is_row, row_mass, added + kept)
    log_total = tl.log(total)
    good = (kept >= min_kept_mass) & (log_total > -max_log_shift) & (log_total < max_log_shift)
    bad = tl.sum((inside & (good == 0)).to(tl.int32), axis=0)
    tl.atomic_max(failed_ptr + b, tl.minimum(bad, 1))
    tl.store(
        log_norm_ptr + g * n + cols,
        (shift + log_total).to(log_norm_ptr.dtype.element_ty),
        mask=inside,
    )
    scale = 1.0 / total
    for j in range(0, m):
        ptr = cols_new_ptr + base + j * n + cols
        new = tl.load(ptr, mask=inside, other=0.0).to(tl.float32)
        tl.store(ptr, (tl.exp(new - shift) * scale).to(ptr.dtype.element_ty), mask=inside)


def _error_norms_kernel(
    c_ptr, p_ptr, out_ptr, n, groups, channels, stride_b, stride_n, stride_g,
    BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # One program per token (b, t): ||c[b, t] - p[b, t]|| over (G, C).
    pid = tl.program_id(0)
    b = pid // n
    t = pid % n
    g = tl.arange(0, BLOCK_G)[:, None]
    ch = tl.arange(0, BLOCK_C)[None, :]
    mask = (g < groups) & (ch < channels)
    c_base = c_ptr + b.to(tl.int64) * stride_b + t.to(tl.int64) * stride_n
    c = tl.load(c_base + g * stride_g + ch, mask=mask, other=0.0).to(tl.float32)
    p_base = p_ptr + pid.to(tl.int64) * groups * channels
    p = tl.load(p_base + g * channels + ch, mask=mask, other=0.0).to(tl.float32)
    e = c - p
    tl.store(out_ptr + pid, tl.sqrt(tl.sum(tl.sum(e * e, axis=1), axis=0)))


def _require_triton() -> None:
    if not _load():
        raise RuntimeError(
            "eventful_pl.triton_kernels: Triton is not installed; use the PyTorch path "
            "(triton_kernels.available() tells callers which to take)"
        )


_jitted: dict[tuple[str, bool], object] = {}


def _kernel(fn):
    """``triton.jit(fn)``, made on first use (and again for the interpreter,
    which Triton chooses when a kernel is made, from ``TRITON_INTERPRET``)."""
    key = (fn.__name__, _interpreting())
    if key not in _jitted:
        _jitted[key] = triton.jit(fn)
    return _jitted[key]


def update_softmax(
    rows: Tensor,
    cols_old: Tensor,
    cols_new: Tensor,
    log_norm: Tensor,
    index: Tensor,
    min_kept_mass: float,
    max_log_shift: float,
) -> tuple[Tensor, Tensor]:
    """The fused :func:`eventful_pl.blocks.softmax.update_softmax_flagged`.

    rows (B, H, r, Nk), cols_old and cols_new (B, H, m, N) contiguous,
    log_norm (B, H, N) contiguous (updated in place), index (B, r). Returns
    (columns (B, H, m, N) written into ``cols_new``, failed (B,) int32, 1
    where a row kept less than ``min_kept_mass``, a normaliser moved by
    ``max_log_shift`` or more, or a value was NaN).
    """
    _require_triton()
    b, heads, r, nk = rows.shape
    m, n = cols_new.shape[2], cols_new.shape[3]
    for name, t in (("rows", rows), ("cols_old", cols_old), ("cols_new", cols_new)):
        if not t.is_contiguous():
            raise ValueError(f"triton_kernels.update_softmax: {name} must be contiguous")
    if not log_norm.is_contiguous():
        raise ValueError("triton_kernels.update_softmax: log_norm must be contiguous")
    index = index.contiguous()
    g = b * heads
    mass = torch.empty(g * r, dtype=torch.float32, device=rows.device)
    failed = torch.zeros(b, dtype=torch.int32, device=rows.device)
    if r:
        block_k = min(triton.next_power_of_2(nk), 1024)
        _kernel(_row_mass_kernel)[(g * r,)](
            rows, log_norm, index, mass, heads, r, nk, n, BLOCK_K=block_k
        )
    block_n = 64
    block_r = max(triton.next_power_of_2(max(r, 1)), 16)
    grid = (g, triton.cdiv(n, block_n))
    _kernel(_column_kernel)[grid](
        cols_old, cols_new, log_norm, index, mass, failed, heads, r, m, n,
        float(min_kept_mass), float(max_log_shift), BLOCK_N=block_n, BLOCK_R=block_r,
    )  # fmt: skip
    return cols_new, failed


def error_norms(c: Tensor, p: Tensor) -> Tensor:
    """``||c - p||`` per token, float32: c (B, N, D) or (B, N, G, C) (channels
    contiguous, any other strides), p contiguous with B * N * D elements -> (B, N)."""
    _require_triton()
    if c.ndim == 3:
        c = c.unsqueeze(2)
    if c.stride(-1) != 1:
        c = c.contiguous()
    b, n, groups, channels = c.shape
    if p.numel() != c.numel() or not p.is_contiguous():
        raise ValueError("triton_kernels.error_norms: p must be contiguous with c's elements")
    out = torch.empty(b, n, dtype=torch.float32, device=c.device)
    _kernel(_error_norms_kernel)[(b * n,)](
        c, p, out, n, groups, channels, c.stride(0), c.stride(1), c.stride(2),
        BLOCK_G=triton.next_power_of_2(groups), BLOCK_C=triton.next_power_of_2(channels),
    )  # fmt: skip
    return out
