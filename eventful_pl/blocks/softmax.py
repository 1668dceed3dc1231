"""The full eventful block's softmax-normaliser and output-update maths, as
pure functions on tensors (no block state).

These are the PyTorch path of :class:`~eventful_pl.blocks.full.EventfulBlock`
and the reference the fused kernels of :mod:`eventful_pl.kernels` are tested
against; each mirrors one kernel's arguments:

- :func:`update_softmax` (``kernels.update_softmax``): new row normalisers and
  softmax columns from the changed logits only.
- :func:`incremental_softmax` (``kernels.incremental_softmax``): the same from
  the updated queries and keys (forms the logits first).
- :func:`update_output` (the delta form of ``kernels.attention_update``):
  ``out += A_new dV + dA V_old``.

Shapes: B streams, H heads, G = B * H, N queries, Nk keys, r updated query
rows, m updated key columns, d head size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

LOG2E = math.log2(math.e)


def exp_shifted_(x: Tensor, shift: Tensor) -> Tensor:
    """``x = exp(x - shift)`` in place (``shift`` broadcasts to ``x``); returns ``x``.

    With gradients off, computed as ``exp2(x log2(e) - shift log2(e))``: one
    fused multiply-add pass and one ``exp2`` pass (on CPU ``exp2`` is about
    3x faster than ``exp``; the results agree to a few ulp times |x - shift|,
    and may differ in the last ulp with the tensor's size, e.g. between a
    stream run alone and in a batch).
    """
    if torch.is_grad_enabled():
        return x.sub_(shift).exp_()
    return torch.add(shift * -LOG2E, x, alpha=LOG2E, out=x).exp2_()


def _softmax_masses(
    rows: Tensor, cols_old: Tensor, cols_new: Tensor, log_norm: Tensor, index: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The masses of a softmax-normaliser update (shapes as :func:`update_softmax`),
    each relative to the old normaliser of its row.

    Returns (probs, kept, total, log_total): the new columns' exponentials
    (B, H, m, N), written into ``cols_new``; each row's mass outside the old
    columns, ``1 - removed`` (1 for updated rows) (B, H, N); the new total mass
    (B, H, N) and its log.
    """
    b, heads = log_norm.shape[:2]
    row_index = index.unsqueeze(1).expand(b, heads, -1)
    row_mass = exp_shifted_(rows, log_norm.gather(2, row_index).unsqueeze(-1)).sum(
        dim=-1, dtype=torch.float32
    )
    removed = exp_shifted_(cols_old, log_norm.unsqueeze(-2)).sum(dim=-2, dtype=torch.float32)
    probs = exp_shifted_(cols_new, log_norm.unsqueeze(-2))
    kept = torch.rsub(removed, 1.0).scatter_(2, row_index, 1.0)
    total = probs.sum(dim=-2, dtype=torch.float32).add_(kept).scatter_(2, row_index, row_mass)
    return probs, kept, total, total.log()


def update_softmax(
    rows: Tensor,
    cols_old: Tensor,
    cols_new: Tensor,
    log_norm: Tensor,
    index: Tensor,
    min_kept_mass: float,
    max_log_shift: float,
    also_read: Sequence[Tensor] = (),
) -> tuple[Tensor | None, list[float]]:
    """Updates the row log-normalisers in place from the changed logits only;
    returns the new softmax columns of the updated keys.

    rows (B, H, r, Nk): full new rows of the updated queries (``index``
    (B, r)). cols_old, cols_new (B, H, m, N): old and new logits of the
    updated key columns. log_norm (B, H, N). All three logit tensors are
    overwritten. Every exponential is taken relative to the old normaliser of
    its row: an updated row's new mass is the sum of its recomputed row;
    every other row keeps ``1 - removed`` (its mass outside the old columns)
    and adds that of the new ones.

    Returns (columns, values): the new softmax columns (B, H, m, N) (written
    into ``cols_new``), or None when a row would keep less than
    ``min_kept_mass`` or its normaliser would move by more than
    ``max_log_shift`` (precision; also on NaN): then ``log_norm`` is
    untouched and the caller recomputes exactly. ``values``: the scalars in
    ``also_read``, read in the same device sync as the checks.
    """
    probs, kept, total, log_total = _softmax_masses(rows, cols_old, cols_new, log_norm, index)
    # One sync for the checks and the caller's values; NaN fails every comparison.
    least_kept, low, high, *values = torch.stack(
        [kept.amin(), *torch.aminmax(log_total), *also_read]
    ).tolist()
    if not (least_kept >= min_kept_mass and -max_log_shift < low and high < max_log_shift):
        return None, values
    log_norm.add_(log_total)
    return probs.mul_(total.reciprocal_().unsqueeze(-2)), values


def _update_operands(
    q_rows: Tensor,
    keys_t: Tensor,
    k_new: Tensor,
    k_old: Tensor,
    q_t: Tensor,
    log_norm: Tensor,
    index: Tensor,
    buffers: tuple[Tensor | None, Tensor | None, Tensor | None],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The logits products of :func:`incremental_softmax` (shapes as there),
    viewed per stream and head for :func:`update_softmax`: (rows (B, H, r, Nk),
    cols_old and cols_new (B, H, m, N), log_norm (B, H, N), index)."""
    g, r, _ = q_rows.shape
    m, n, nk = k_new.shape[1], q_t.shape[-1], keys_t.shape[-1]
    b = index.shape[0]
    heads = g // b
    rows_out, cols_old_out, cols_new_out = buffers
    rows = torch.bmm(q_rows, keys_t, out=rows_out)
    cols_new = torch.bmm(k_new, q_t, out=cols_new_out)
    cols_old = torch.bmm(k_old, q_t, out=cols_old_out)
    return (
        rows.view(b, heads, r, nk),
        cols_old.view(b, heads, m, n),
        cols_new.view(b, heads, m, n),
        log_norm.view(b, heads, n),
        index,
    )


def incremental_softmax(
    q_rows: Tensor,
    keys_t: Tensor,
    k_new: Tensor,
    k_old: Tensor,
    q_t: Tensor,
    log_norm: Tensor,
    index: Tensor,
    min_kept_mass: float,
    max_log_shift: float,
    buffers: tuple[Tensor | None, Tensor | None, Tensor | None] = (None, None, None),
    also_read: Sequence[Tensor] = (),
) -> tuple[Tensor | None, list[float]]:
    """:func:`update_softmax` from the updated queries and keys (no relative
    position): forms the logits ``q_rows @ keys_t`` (the updated rows, all
    keys), ``k_old @ q_t`` and ``k_new @ q_t`` (the updated key columns,
    before and after, key-major), then updates.

    q_rows (G, r, d) scaled queries of the updated rows, keys_t (G, d, Nk)
    (holding the new keys), k_new and k_old (G, m, d), q_t (G, d, N) scaled
    queries, log_norm (G, N) (updated in place), index (B, r). ``buffers``:
    optional outputs for the three products, (G, r, Nk), (G, m, N) and
    (G, m, N). Returns (columns (G, m, N) or None, values) as
    :func:`update_softmax`.
    """
    g, m, n = k_new.shape[0], k_new.shape[1], q_t.shape[-1]
    probs, values = update_softmax(
        *_update_operands(q_rows, keys_t, k_new, k_old, q_t, log_norm, index, buffers),
        min_kept_mass,
        max_log_shift,
        also_read,
    )
    return (None if probs is None else probs.view(g, m, n)), values


def update_output(
    out: Tensor, a_new: Tensor, a_delta: Tensor, v_new: Tensor, v_delta: Tensor
) -> Tensor:
    """``out += A_new[:, keys] dV[keys] + dA[:, keys] V_old[keys]`` in place
    (``V_old = V_new - dV``); returns ``out``.

    out (G, N, d); a_new, a_delta (G, m, N) (key-major columns of A); v_new,
    v_delta (G, m, d).
    """
    v_old = v_new - v_delta
    out.baddbmm_(a_new.transpose(1, 2), v_delta)
    return out.baddbmm_(a_delta.transpose(1, 2), v_old)


def update_softmax_flagged(
    rows: Tensor,
    cols_old: Tensor,
    cols_new: Tensor,
    log_norm: Tensor,
    index: Tensor,
    min_kept_mass: float,
    max_log_shift: float,
) -> tuple[Tensor, Tensor]:
    """:func:`update_softmax` without a host synchronisation (static frames):
    the update is always applied, and the precision checks come back as a
    device flag per stream instead of a branch.

    Shapes as :func:`update_softmax`. Returns (columns (B, H, m, N) written
    into ``cols_new``, failed (B,) bool): ``failed`` marks the streams where a
    row keeps less than ``min_kept_mass``, a normaliser moves by
    ``max_log_shift`` or more, or a value is NaN. Their normalisers and
    columns are then not exact and the caller must recompute those streams
    (:meth:`eventful_pl.blocks.EventfulBlock._recompute_items`).
    """
    probs, kept, total, log_total = _softmax_masses(rows, cols_old, cols_new, log_norm, index)
    # NaN fails every comparison, so it counts as a failure.
    good = kept.ge(min_kept_mass) & log_total.gt(-max_log_shift) & log_total.lt(max_log_shift)
    failed = good.flatten(1).all(dim=1).logical_not_()
    log_norm.add_(log_total)
    return probs.mul_(total.reciprocal_().unsqueeze(-2)), failed


def incremental_softmax_flagged(
    q_rows: Tensor,
    keys_t: Tensor,
    k_new: Tensor,
    k_old: Tensor,
    q_t: Tensor,
    log_norm: Tensor,
    index: Tensor,
    min_kept_mass: float,
    max_log_shift: float,
    buffers: tuple[Tensor | None, Tensor | None, Tensor | None] = (None, None, None),
    update: Callable[..., tuple[Tensor, Tensor]] | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`incremental_softmax` through :func:`update_softmax_flagged`
    (no host synchronisation), or through ``update`` (the same signature, e.g.
    the fused :func:`eventful_pl.triton_kernels.update_softmax`). Returns
    (columns (G, m, N), failed (B,) bool or int)."""
    g, m, n = k_new.shape[0], k_new.shape[1], q_t.shape[-1]
    probs, failed = (update or update_softmax_flagged)(
        *_update_operands(q_rows, keys_t, k_new, k_old, q_t, log_norm, index, buffers),
        min_kept_mass,
        max_log_shift,
    )
    return probs.view(g, m, n), failed
