"""The full eventful block (:class:`EventfulBlock`, variant ``"full"``, the paper's
method): state layout, flush, incremental and recovery frames, and the dispatch
between the fused kernels (:mod:`eventful_pl.kernels`) and the PyTorch maths
(:mod:`eventful_pl.blocks.softmax`)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from eventful_pl import kernels, triton_kernels
from eventful_pl.attention import merge_heads, pool_token_index
from eventful_pl.blocks import softmax
from eventful_pl.blocks.dense import BlockVariant
from eventful_pl.blocks.query_key import QueryKeyEventfulBlock
from eventful_pl.gates import DeltaGate
from eventful_pl.indexing import expand_col_index, flat_row_index, gather_rows, gather_tokens
from eventful_pl.workspace import Workspaces


def nonfinite_streams(x: Tensor) -> Tensor:
    """(B,) bool: the streams (batch items) of ``x`` (B, ...) holding a NaN or infinity."""
    return torch.isfinite(x.detach()).flatten(1).all(dim=1).logical_not_()


class EventfulBlock(QueryKeyEventfulBlock):
    """The paper's method: also updates ``A @ V`` incrementally (variant 3).

    A delta gate on V and a column delta gate on the softmaxed A, both forced
    to the updated key index, give ``A_new[:, idx]``, ``dA[:, idx]``,
    ``V_new[idx]``, ``dV[idx]``; the cached output is updated in place with
    ``Y += A_new[:, idx] @ dV[idx] + dA[:, idx] @ (V_new[idx] - dV[idx])``.

    Only the m selected key columns of A are ever formed on an incremental
    frame, never the whole matrix, its logits or its error. State: the row
    log-normalisers of the softmax (B, H, N), the scaled queries and the keys
    they were computed with (channel-major, (B, H, d, N), so that products
    with them stream whole rows), per-query relative-position terms, the gate
    references (A stored key-major, (B, H, Nk, N), so key columns are
    contiguous rows) and the output (B, H, N, d). Without pooling that is all
    an incremental frame needs from the updated tokens' q, k and v, so there
    is no qkv buffer; the projection gate reads the output heads in place.

    Updated query rows get an exact normaliser from their recomputed row;
    every other row's normaliser is updated from the old and new logits of
    the updated columns only (its query is unchanged, so only those logits
    moved). If that update would lose precision (the replaced columns held
    nearly all of a row's mass, or a normaliser moved by more than
    ``max_log_shift``), the normalisers are recomputed from the full logits
    for that frame.

    A non-finite value (NaN or infinity) among a frame's new values cannot be
    removed from the incremental state (``NaN - NaN`` is NaN): the stream it
    reached is then recomputed from the block's query, key and value state,
    as on a flush, on every frame until its output is finite again. That
    happens once the gates have updated the bad tokens, which they always do
    next (a NaN error counts as infinite). The other streams of the batch
    stay incremental. Finding it costs one reduction over the new values.

    With gradients off on CPU in float32 (in AVX-512 builds: see
    :func:`eventful_pl.kernels.fused_attention_preferred`), the fused kernels of
    :mod:`eventful_pl.kernels` take an incremental frame from the updated
    queries and keys to the new softmax columns without storing a logit (no
    relative position), and update the output from the gate references in
    one pass (head sizes that are multiples of 16, up to 64); elsewhere the
    same steps run as PyTorch ops.

    State is updated in place, so incremental frames run under autograd but
    cannot be backpropagated (flush frames train like the dense block; the
    ``tokenwise`` and ``query_key`` variants backpropagate through incremental
    frames too). Run streams under ``torch.no_grad()``, which is also faster.
    """

    variant: BlockVariant = "full"
    #: Smallest softmax mass a row may keep outside the replaced columns
    #: before its normaliser is recomputed exactly.
    min_kept_mass: float = 1e-3
    #: Largest change of a row's log-normaliser in one frame handled
    #: incrementally (exponentials relative to the old normaliser stay in range).
    max_log_shift: float = 60.0

    def __init__(self, dim: int, heads: int, **kwargs) -> None:
        super().__init__(dim, heads, **kwargs)
        self.v_gate = DeltaGate("row")
        self.a_gate = DeltaGate("row")  # on A^T: key columns as rows
        self.output: Tensor | None = None
        self.log_norm: Tensor | None = None
        self.keys_t: Tensor | None = None
        self.q_scaled_t: Tensor | None = None
        self.rel_h_t: Tensor | None = None
        self.rel_w_t: Tensor | None = None
        self.workspaces = Workspaces()
        # (B,) bool: the streams whose attention state holds a non-finite
        # value (recomputed every frame until finite); None when there is none.
        self.nonfinite_items: Tensor | None = None
        # The range (min, max) of an incremental frame's new values, and its
        # values once read (by the softmax checks, or by _incremental).
        self._new_range: tuple[Tensor, Tensor] | None = None
        self._new_range_read: list[float] | None = None
        # Static frames: (B,) bool device flags of the streams whose
        # incremental update was not exact (see eventful_pl.static_frame).
        self.static_flags: Tensor | None = None
        self._static_failed: Tensor | None = None

    def reset_state(self) -> None:
        super().reset_state()
        self.nonfinite_items = None
        self.output = None
        self.log_norm = None
        self.keys_t = None
        self.q_scaled_t = None
        self.rel_h_t = None
        self.rel_w_t = None

    def _full_logits(
        self, q_scaled_t: Tensor, keys_t: Tensor, counted: bool, items: Tensor | None = None
    ) -> Tensor:
        """Logits (B, H, N, Nk) of channel-major scaled queries (B, H, d, N) and
        keys (B, H, d, Nk), with relative position from the cached terms (of
        the batch items in ``items``, if given)."""
        logits = q_scaled_t.transpose(-2, -1) @ keys_t
        if counted:
            self.count("matmul", logits.numel() * q_scaled_t.shape[-2])
        if self.rel_pos is not None:
            rel_h, rel_w = self.rel_h_t, self.rel_w_t
            if items is not None:
                rel_h, rel_w = rel_h.index_select(0, items), rel_w.index_select(0, items)
            self.rel_pos.add_to(logits, rel_h.transpose(-1, -2), rel_w.transpose(-1, -2), counted)
        return logits

    def attention_branch(self, qkv: Tensor, index: Tensor | None) -> Tensor:
        """Without pooling an incremental frame needs only the updated tokens'
        q, k and v (the block keeps its own query, key and value state), so qkv
        (B, r, 3D) is used as is and nothing is buffered. With pooling a pooled
        key mixes updated and unchanged tokens: the qkv of every token is buffered.
        """
        if self.pool_size is not None:
            return super().attention_branch(qkv, index)
        if index is None or torch.is_grad_enabled() or self.cast_dtype is not None:
            return self.eventful_attention(qkv, index)
        # The projection gate reads the heads in place: (B, N, H, d), no merged copy.
        return self._incremental(qkv, index, qkv.dtype).transpose(1, 2)

    def eventful_attention(self, qkv: Tensor, index: Tensor | None) -> Tensor:
        """qkv: (B, N, 3D) on a flush; on an incremental frame the updated
        tokens' (B, r, 3D), or every token's (B, N, 3D) with pooling -> (B, N, D)."""
        dtype = self.cast_dtype or qkv.dtype
        if index is None:
            out = self._flush(*self.split_qkv(qkv), dtype)
        else:
            out = self._incremental(qkv, index, dtype)
        return self._merge_heads(out, qkv.dtype)

    def _merge_heads(self, out: Tensor, dtype: torch.dtype) -> Tensor:
        """(B, H, N, d) -> (B, N, H * d) of ``dtype``, in a reused workspace when
        gradients are off (the projection gate copies what it keeps)."""
        b, heads, n, d = out.shape
        merged = self.workspaces.get("merged", (b, n, heads * d), out)
        if merged is None or out.dtype != dtype:
            return merge_heads(out).to(dtype)
        merged.view(b, n, heads, d).copy_(out.transpose(1, 2))
        return merged

    def _flush(self, q: Tensor, k: Tensor, v: Tensor, dtype: torch.dtype) -> Tensor:
        if self.rel_pos is not None:
            rel_h, rel_w = self.rel_pos.terms(q)
            self.rel_h_t = rel_h.transpose(-1, -2).contiguous()
            self.rel_w_t = rel_w.transpose(-1, -2).contiguous()
        # State: the scaled queries and the keys, channel-major (B, H, d, N), so
        # that the products with them stream whole rows; later frames replace
        # the updated tokens' columns.
        q_scaled_t = (q / self.sqrt_head_dim).transpose(-1, -2).contiguous()
        self.q_scaled_t = q_scaled_t.detach().clone() if torch.is_grad_enabled() else q_scaled_t
        self.keys_t = k.detach().transpose(-1, -2).contiguous()
        logits = self._full_logits(q_scaled_t, k.transpose(-1, -2), counted=True)
        self.log_norm = torch.logsumexp(logits.float(), dim=-1)
        if torch.is_grad_enabled():  # logsumexp's backward needs the logits
            probs = (logits - self.log_norm.unsqueeze(-1)).exp().to(dtype)
            self.log_norm = self.log_norm.detach()
        else:
            probs = softmax.exp_shifted_(logits, self.log_norm.unsqueeze(-1)).to(dtype)
        v = v.to(dtype)
        self.v_gate.flush(v)
        self.a_gate.flush(probs.transpose(-1, -2).contiguous(), copy=False)
        self.output = self.matmul(probs, v)
        nonfinite = nonfinite_streams(self.output)
        self.nonfinite_items = nonfinite if bool(nonfinite.any()) else None
        return self.output

    def _updated_qkv(
        self, qkv: Tensor, index: Tensor, key_index: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """q (B, H, r, d), k and v (B, H, m, d) of the updated tokens, contiguous."""
        b, r = index.shape
        heads, d = self.heads, self.dim // self.heads
        if self.pool_size is None:
            # qkv holds the updated tokens' rows: one copy separates q, k and v.
            fused = qkv.view(b, r, 3, heads, d).permute(2, 0, 3, 1, 4)
            scratch = self.workspaces.get("qkv_new", tuple(fused.shape), qkv)
            q_new, k_new, v_new = fused.contiguous() if scratch is None else scratch.copy_(fused)
        else:
            q_new = gather_tokens(qkv[..., : self.dim], index).view(b, r, heads, d).transpose(1, 2)
            _, k, v = self.split_qkv(qkv)
            k_new, v_new = gather_rows(k, key_index), gather_rows(v, key_index)
            q_new = q_new.contiguous()
        return q_new, k_new, v_new

    def _incremental(self, qkv: Tensor, index: Tensor, dtype: torch.dtype) -> Tensor:
        """Updates the cached output (B, H, N, d) from the updated tokens' qkv; returns it."""
        if self.output is None:
            raise RuntimeError(
                f"{type(self).__name__}: its attention state was reset but not its gates; "
                "reset whole models with eventful_pl.reset_stream_state(model)"
            )
        b, heads, d, n = self.q_scaled_t.shape
        nk = self.keys_t.shape[3]
        key_index = index
        if self.pool_size is not None:
            key_index = pool_token_index(index, self.attention_size, self.pool_size)
        r, m = index.shape[1], key_index.shape[1]
        q_new, k_new, v_new = self._updated_qkv(qkv, index, key_index)
        static = self.static_frame
        if static:
            # Static frames never read a value on the host: the streams with a
            # non-finite new value are flagged on the device instead.
            self._new_range = None
            self._static_failed = nonfinite_streams(qkv)
        else:
            # One reduction: a NaN or infinity among the new values makes their
            # range non-finite (read with the softmax checks' sync if there is one).
            self._new_range = torch.aminmax(qkv.detach()) if qkv.numel() else None
        self._new_range_read = None
        if self.rel_pos is not None:
            rel_h_rows, rel_w_rows = self.rel_pos.terms_for_rows(q_new, index)
        q_rows = (
            q_new / self.sqrt_head_dim
            if torch.is_grad_enabled()
            else q_new.div_(self.sqrt_head_dim)
        )
        # State: only the updated queries and keys changed (their columns of
        # the channel-major states). One flat row index serves every key-major
        # state (V and A references).
        key_rows = flat_row_index(key_index, heads, nk)
        self.q_scaled_t.scatter_(
            3, expand_col_index(index, (b, heads, d, r)), q_rows.transpose(-1, -2)
        )
        key_cols = expand_col_index(key_index, (b, heads, d, m))
        k_old = self.keys_t.gather(3, key_cols).transpose(-1, -2)  # (B, H, m, d), strided
        self.keys_t.scatter_(3, key_cols, k_new.transpose(-1, -2))
        if self.rel_pos is None:
            a_new = self._softmax_columns(q_rows, k_new, k_old, index, key_index)
        else:
            rel_rows = (rel_h_rows, rel_w_rows)
            a_new = self._softmax_columns_relative(q_rows, k_new, k_old, index, key_index, rel_rows)
        # Counted as the method defines it: the updated rows and key columns of A.
        self.count("matmul", b * heads * (r * nk + m * n) * d)
        a_new = a_new.to(dtype)
        v_new = v_new.to(dtype)
        out = self.output.view(b * heads, n, d)
        if kernels.attention_update_supported(d) and kernels.fused_attention_available(
            out, a_new, v_new, self.a_gate.p, self.v_gate.p
        ):
            # Reads the old columns and values from the gate references and
            # writes the new columns into the A reference in the same pass: no
            # gathered copies, no deltas.
            kernels.attention_update(
                out,
                a_new.reshape(b * heads, m, n),
                v_new.reshape(b * heads, m, d),
                self.a_gate.p.view(b * heads, nk, n),
                self.v_gate.p.view(b * heads, nk, d),
                key_index,
            )
            self.v_gate.commit_selected(v_new, key_index, flat_rows=key_rows)
            self.a_gate.commit_selected(a_new, key_index, written=True)
        else:
            v_new, v_delta = self.v_gate.update_selected(v_new, key_index, flat_rows=key_rows)
            a_new, a_delta = self.a_gate.update_selected(a_new, key_index, flat_rows=key_rows)
            softmax.update_output(
                out,
                a_new.reshape(b * heads, m, n),
                a_delta.reshape(b * heads, m, n),
                v_new.reshape(b * heads, m, d),
                v_delta.reshape(b * heads, m, d),
            )
        self.count("matmul", 2 * out.numel() * m)
        self.count("accumulator", v_new.numel() + 2 * out.numel())
        if static:
            # (B,) bool on the device: streams to recompute before the next
            # frame (see eventful_pl.static_frame).
            self.static_flags = self._static_failed
            self._static_failed = None
            return self.output
        new_range = self._new_range_read
        if new_range is None and self._new_range is not None:
            new_range = [value.item() for value in self._new_range]
        self._new_range = None
        nonfinite = self.nonfinite_items
        if new_range is not None and not all(map(math.isfinite, new_range)):
            new = nonfinite_streams(qkv)
            nonfinite = new if nonfinite is None else new.logical_or_(nonfinite)
        if nonfinite is not None:
            self._recompute_items(nonfinite)
        return self.output

    def _recompute_items(self, items: Tensor) -> None:
        """Recomputes the normalisers, the A reference and the output of the
        streams in ``items`` ((B,) bool) from their query, key and value state,
        as a flush would: taken when a non-finite value reached a stream's
        state, which the incremental update cannot remove (``NaN - NaN`` is
        NaN). The gates always update a token whose error is NaN, so once the
        bad tokens have been updated again the state is finite, the recomputed
        output is finite and exact, and the stream's next frames are
        incremental again. The other streams are not touched.
        """
        rows = items.nonzero().squeeze(1)
        logits = self._full_logits(
            self.q_scaled_t.index_select(0, rows), self.keys_t.index_select(0, rows), True, rows
        )
        log_norm = torch.logsumexp(logits.float(), dim=-1)
        v = self.v_gate.p.index_select(0, rows)
        probs = softmax.exp_shifted_(logits, log_norm.unsqueeze(-1)).to(v.dtype)
        output = self.matmul(probs, v)
        self.log_norm.index_copy_(0, rows, log_norm)
        self.a_gate.p.index_copy_(0, rows, probs.transpose(-1, -2))
        self.output.index_copy_(0, rows, output.to(self.output.dtype))
        still = nonfinite_streams(output)
        self.nonfinite_items = None
        if bool(still.any()):
            self.nonfinite_items = torch.zeros_like(items).index_copy_(0, rows, still)

    def _softmax_columns(
        self, q_rows: Tensor, k_new: Tensor, k_old: Tensor, index: Tensor, key_index: Tensor
    ) -> Tensor:
        """New softmax columns (B, H, m, N) of the updated keys, normalisers
        updated (no relative position): :func:`softmax.incremental_softmax`,
        or its fused kernel (which never stores a logit) where it applies.

        q_rows (B, H, r, d) scaled; k_new, k_old (B, H, m, d).
        """
        b, heads, d, n = self.q_scaled_t.shape
        nk, r, m = self.keys_t.shape[3], index.shape[1], key_index.shape[1]
        g = b * heads
        args = (
            q_rows.reshape(g, r, d),
            self.keys_t.view(g, d, nk),
            k_new.reshape(g, m, d),
            k_old.reshape(g, m, d),
            self.q_scaled_t.view(g, d, n),
            self.log_norm.view(g, n),
            index,
        )
        scratch = self.workspaces
        if self.static_frame:
            buffers = (
                scratch.get("rows", (g, r, nk), q_rows),
                scratch.get("cols_old", (g, m, n), q_rows),
                scratch.get("cols_new", (g, m, n), q_rows),
            )
            fused = triton_kernels.available(q_rows) and all(t is not None for t in buffers)
            probs, failed = softmax.incremental_softmax_flagged(
                *args,
                self.min_kept_mass,
                self.max_log_shift,
                buffers,
                triton_kernels.update_softmax if fused else None,
            )
            self._static_failed.logical_or_(failed)
            return probs.view(b, heads, m, n)
        if kernels.fused_attention_available(q_rows, self.q_scaled_t, self.log_norm):
            probs = scratch.get("cols_new", (g, m, n), q_rows)
            if kernels.incremental_softmax(*args, probs, self.min_kept_mass, self.max_log_shift):
                return probs.view(b, heads, m, n)
            return self._exact_softmax_columns(key_index)
        buffers = (
            scratch.get("rows", (g, r, nk), q_rows),
            scratch.get("cols_old", (g, m, n), q_rows),
            scratch.get("cols_new", (g, m, n), q_rows),
        )
        probs, new_range = softmax.incremental_softmax(
            *args, self.min_kept_mass, self.max_log_shift, buffers, self._new_range or ()
        )
        self._new_range_read = new_range or None
        if probs is None:
            return self._exact_softmax_columns(key_index)
        return probs.view(b, heads, m, n)

    def _softmax_columns_relative(
        self,
        q_rows: Tensor,
        k_new: Tensor,
        k_old: Tensor,
        index: Tensor,
        key_index: Tensor,
        rel_rows: tuple[Tensor, Tensor],
    ) -> Tensor:
        """:meth:`_softmax_columns` with relative position: the logits of the
        updated query rows (all keys; the key state already holds the new
        keys) and of the updated key columns (all queries, key-major), before
        and after, with their relative-position terms, then
        :meth:`_update_softmax`. rel_rows: the updated rows' terms.
        """
        b, heads, d, n = self.q_scaled_t.shape
        nk, r, m = self.keys_t.shape[3], index.shape[1], key_index.shape[1]
        q_scaled_t = self.q_scaled_t.view(b * heads, d, n)
        scratch = self.workspaces
        rows = torch.bmm(
            q_rows.reshape(b * heads, r, d),
            self.keys_t.view(b * heads, d, nk),
            out=scratch.get("rows", (b * heads, r, nk), q_rows),
        )
        cols_new = scratch.get("cols_new", (b * heads, m, n), q_rows)
        cols_old = scratch.get("cols_old", (b * heads, m, n), q_rows)
        k_new, k_old = k_new.reshape(b * heads, m, d), k_old.reshape(b * heads, m, d)
        rel_h_rows, rel_w_rows = rel_rows
        kh, kw = self.rel_pos.key_size
        rows = rows.view(b, heads, r, nk)
        self.rel_pos.add_to(rows, rel_h_rows, rel_w_rows, counted=False)
        # Old terms of unchanged rows equal the new ones; updated rows are
        # recomputed exactly below, so one term serves both.
        self.rel_h_t.scatter_(
            3, expand_col_index(index, self.rel_h_t.shape), rel_h_rows.transpose(-1, -2)
        )
        self.rel_w_t.scatter_(
            3, expand_col_index(index, self.rel_w_t.shape), rel_w_rows.transpose(-1, -2)
        )
        rel = gather_rows(self.rel_h_t, key_index // kw, out=cols_old)
        rel_w = gather_rows(self.rel_w_t, key_index % kw, out=cols_new)
        rel = rel.add_(rel_w).view(b * heads, m, n)
        if cols_new is None:
            cols_new = torch.baddbmm(rel, k_new, q_scaled_t)
        else:
            torch.baddbmm(rel, k_new, q_scaled_t, out=cols_new)
        cols_old = rel.baddbmm_(k_old, q_scaled_t)
        # Counted as the method defines it: terms and adds over the full matrix.
        self.count("einsum", b * heads * n * (kh + kw) * d)
        self.count("add", 2 * b * heads * n * nk)
        return self._update_softmax(
            rows,
            cols_old.view(b, heads, m, n),
            cols_new.view(b, heads, m, n),
            index,
            key_index,
        )

    def _update_softmax(
        self,
        rows: Tensor,
        cols_old: Tensor,
        cols_new: Tensor,
        index: Tensor,
        key_index: Tensor,
    ) -> Tensor:
        """Updates the row log-normalisers (B, H, N) in place from the changed
        logits (:func:`softmax.update_softmax`, or its fused kernel); returns
        the new softmax columns of the updated keys (B, H, m, N). If the
        update would lose precision, the normalisers are recomputed from the
        full logits for that frame instead.

        rows (B, H, r, Nk), cols_old and cols_new (B, H, m, N); all overwritten.
        """
        log_norm = self.log_norm
        if self.static_frame:
            fused = triton_kernels.available(rows) and cols_new.is_contiguous()
            update = triton_kernels.update_softmax if fused else softmax.update_softmax_flagged
            probs, failed = update(
                rows, cols_old, cols_new, log_norm, index, self.min_kept_mass, self.max_log_shift
            )
            self._static_failed.logical_or_(failed)
            return probs
        fused = kernels.fused_attention_available(rows, cols_old, cols_new, log_norm)
        if fused and cols_new.is_contiguous():
            if kernels.update_softmax(
                rows, cols_old, cols_new, log_norm, index, self.min_kept_mass, self.max_log_shift
            ):
                return cols_new
            return self._exact_softmax_columns(key_index)
        # The incremental frame's finiteness check reads its values in the
        # same sync as the precision checks (see _incremental).
        probs, new_range = softmax.update_softmax(
            rows,
            cols_old,
            cols_new,
            log_norm,
            index,
            self.min_kept_mass,
            self.max_log_shift,
            self._new_range or (),
        )
        self._new_range_read = new_range or None
        if probs is None:
            return self._exact_softmax_columns(key_index)
        return probs

    def _exact_softmax_columns(self, key_index: Tensor) -> Tensor:
        """The fallback: recomputes the normalisers (B, H, N) from the full
        logits; returns the softmax columns of the keys in ``key_index`` (B, H, m, N)."""
        logits = self._full_logits(self.q_scaled_t, self.keys_t, counted=False)
        self.log_norm.copy_(torch.logsumexp(logits.float(), dim=-1))
        cols = logits.gather(3, expand_col_index(key_index, logits.shape))
        shift = self.log_norm.unsqueeze(-2)
        return softmax.exp_shifted_(cols.transpose(-1, -2), shift).contiguous()
