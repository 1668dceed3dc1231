"""Transformer blocks: the dense ViT block and its eventful variants (DESIGN section 3).

Variants, each adding to the previous one:

- ``"dense"`` (:class:`Block`): pre-norm ViT block, optional windowed attention
  with padding, decomposed relative position, key/value pooling,
  half-precision attention-value product and adaptive token sampling (ATS).
- ``"tokenwise"`` (:class:`TokenwiseEventfulBlock`): gate + buffer around
  ``qkv``, ``proj`` and the MLP; attention is recomputed from buffered qkv.
- ``"query_key"`` (:class:`QueryKeyEventfulBlock`): also caches the logits
  ``q k^T`` and recomputes only updated rows and columns.
- ``"full"`` (:class:`EventfulBlock`, the paper's method): also updates
  ``A @ V`` with deltas of the updated key columns.

Shapes: tokens (B, N, D); a batch is B independent streams.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eventful_pl import kernels
from eventful_pl.attention import (
    merge_heads,
    pool_grid,
    pool_token_index,
    split_heads,
    window_partition,
    window_unpartition,
)
from eventful_pl.counting import Counted
from eventful_pl.gates import DeltaGate, STGTGate, TokenBuffer, TokenGate
from eventful_pl.indexing import (
    expand_col_index,
    expand_row_index,
    flat_row_index,
    gather_rows,
    gather_tokens,
)
from eventful_pl.linear import linear
from eventful_pl.policies import TokenPolicy
from eventful_pl.position import RelativePosition
from eventful_pl.state import StreamState
from eventful_pl.workspace import Workspaces

LN_EPS = 1e-6
LOG2E = math.log2(math.e)
MATMUL_2_CASTS = {None: None, "float16": torch.float16, "bfloat16": torch.bfloat16}
BlockVariant = Literal["dense", "tokenwise", "query_key", "full"]


def to_pair(value: int | tuple[int, int] | list[int] | None) -> tuple[int, int] | None:
    """int -> (int, int); sequences -> tuple; None stays None."""
    if value is None:
        return None
    if isinstance(value, int):
        return (value, value)
    return (int(value[0]), int(value[1]))


def drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth: drops whole samples of a residual branch in training."""
    if rate == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - rate)
    return x * keep / (1.0 - rate)


class Block(Counted, nn.Module):
    """Pre-norm ViT block: ``x + proj(attn(LN(x)))`` then ``x + fc2(GELU(fc1(LN(x))))``.

    Args:
        dim: Token channels D.
        heads: Attention heads (head size D / heads).
        input_size: Token grid (h, w). Required for windows, relative position
            and pooling (then N must equal h * w); optional otherwise.
        mlp_ratio: MLP hidden size / D.
        qkv_bias: Whether ``qkv`` has a bias.
        window_size: Window (wh, ww) for windowed attention, or None (global).
            Grids that are not a multiple are padded bottom/right with "qkv of a
            zero token" (the qkv bias), removed after attention.
        relative_embedding_size: Stored size of the relative-position tables;
            None disables relative position.
        pool_size: Average-pool keys and values over the grid by this factor.
        matmul_2_cast: ``"float16"`` or ``"bfloat16"`` to compute ``A @ V`` in
            half precision.
        ats_fraction: Adaptive token sampling: keep this fraction of the query
            rows (plus the class token, token 0). Dense block only.
        drop_path_rate: Stochastic depth rate (training).

    Shapes: x (B, N, D) -> (B, N, D) (fewer tokens with ATS).
    """

    variant: BlockVariant = "dense"

    def __init__(
        self,
        dim: int,
        heads: int,
        input_size: int | tuple[int, int] | None = None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        window_size: int | tuple[int, int] | None = None,
        relative_embedding_size: int | tuple[int, int] | None = None,
        pool_size: int | tuple[int, int] | None = None,
        matmul_2_cast: str | None = None,
        ats_fraction: float | None = None,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads={heads} must divide dim={dim}")
        self.dim = dim
        self.heads = heads
        self.input_size = to_pair(input_size)
        self.window_size = to_pair(window_size)
        self.pool_size = to_pair(pool_size)
        if matmul_2_cast not in MATMUL_2_CASTS:
            raise ValueError(
                f"matmul_2_cast must be one of {list(MATMUL_2_CASTS)}, got {matmul_2_cast!r}"
            )
        self.matmul_2_cast = matmul_2_cast
        self.cast_dtype = MATMUL_2_CASTS[matmul_2_cast]
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must lie in [0, 1), got {drop_path_rate!r}")
        self.drop_path_rate = drop_path_rate
        needs_grid = (
            self.window_size is not None
            or relative_embedding_size is not None
            or self.pool_size is not None
        )
        if needs_grid and self.input_size is None:
            raise ValueError(
                "input_size (the token grid) is required with window_size, "
                "relative_embedding_size or pool_size"
            )
        self.needs_grid = needs_grid
        if self.window_size is not None:
            if any(w > g for w, g in zip(self.window_size, self.input_size)):
                raise ValueError(
                    f"window_size={self.window_size} is larger than the token grid "
                    f"input_size={self.input_size}"
                )
            if any(w <= 0 for w in self.window_size):
                raise ValueError(f"window_size must be positive, got {self.window_size}")
        self.attention_size = self.window_size or self.input_size
        if self.pool_size is not None and any(
            a % p for a, p in zip(self.attention_size, self.pool_size)
        ):
            raise ValueError(
                f"pool_size={self.pool_size} must divide the attention size {self.attention_size}"
            )
        if ats_fraction is not None:
            if not 0.0 <= ats_fraction <= 1.0:
                raise ValueError(f"ats_fraction must lie in [0, 1], got {ats_fraction!r}")
            if self.window_size is not None or self.pool_size is not None:
                raise ValueError("ats_fraction cannot be combined with window_size or pool_size")
        self.ats_fraction = ats_fraction
        self.scale = math.sqrt(dim // heads)

        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        if relative_embedding_size is not None:
            self.rel_pos: RelativePosition | None = RelativePosition(
                self.attention_size,
                to_pair(relative_embedding_size),
                dim // heads,
                pool_size=self.pool_size,
            )
        else:
            self.rel_pos = None

    # Counted primitives.
    def linear(self, layer: nn.Linear, x: Tensor, gelu: bool = False) -> Tensor:
        """``layer(x)`` (then exact GELU if ``gelu``), counting ``in-elements x
        out_features`` plus the bias (GELU is not counted, as in DESIGN section 5)."""
        out = linear(x, layer.weight, layer.bias, gelu=gelu)
        self.count("linear", x.numel() * layer.out_features)
        if layer.bias is not None:
            self.count("bias", out.numel())
        return out

    def add(self, a: Tensor, b: Tensor, inplace: bool = False) -> Tensor:
        """``a + b`` (counted); with ``inplace`` and gradients off, into ``a``
        (which the caller owns): no fresh (B, N, D) tensor."""
        self.count("add", a.numel())
        if inplace and not torch.is_grad_enabled():
            return a.add_(b)
        return a + b

    def matmul(self, a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
        out = a @ b if out is None else torch.matmul(a, b, out=out)
        self.count("matmul", out.numel() * a.shape[-1])
        return out

    def mlp(self, x: Tensor) -> Tensor:
        if isinstance(self.act, nn.GELU) and self.act.approximate == "none":
            return self.linear(self.fc2, self.linear(self.fc1, x, gelu=True))
        return self.linear(self.fc2, self.act(self.linear(self.fc1, x)))

    def check_tokens(self, x: Tensor) -> None:
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"expected tokens (B, N, {self.dim}), got shape {tuple(x.shape)}")
        if self.needs_grid:
            n = self.input_size[0] * self.input_size[1]
            if x.shape[1] != n:
                raise ValueError(
                    f"expected N={n} tokens for input_size={self.input_size} "
                    f"(no class token with windows, relative position or pooling), "
                    f"got N={x.shape[1]}"
                )

    def forward(self, x: Tensor, owns_input: bool = False) -> Tensor:
        """x (B, N, D) -> (B, N, D). ``owns_input``: the caller hands ``x`` over
        (with gradients off the residual is then added into it, no new tensor)."""
        self.check_tokens(x)
        y, kept = self.attend(self.linear(self.qkv, self.norm1(x)))
        skip = x if kept is None else gather_tokens(x, kept)
        branch = drop_path(self.linear(self.proj, y), self.drop_path_rate, self.training)
        x = self.add(skip, branch, inplace=owns_input or kept is not None)
        # x is this call's own tensor (the first residual made it): add in place.
        mlp = drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)
        return self.add(x, mlp, inplace=True)

    def split_qkv(self, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """qkv (B, N, 3D) -> q (B, H, N, d), k and v (B, H, Nk, d), pooled if configured."""
        q, k, v = split_heads(qkv, self.heads)
        if self.pool_size is not None:
            k = pool_grid(k, self.attention_size, self.pool_size)
            v = pool_grid(v, self.attention_size, self.pool_size)
        return q, k, v

    # Dense attention.
    def attend(self, qkv: Tensor) -> tuple[Tensor, Tensor | None]:
        """Dense attention: qkv (B, N, 3D) -> ((B, N', D), kept ATS index or None)."""
        if self.window_size is not None:
            padded = any(g % w for g, w in zip(self.input_size, self.window_size))
            pad_value = None
            if padded and self.qkv.bias is not None:
                pad_value = self.qkv.bias
                self.count("bias", self.qkv.bias.numel())
            qkv = window_partition(qkv, self.input_size, self.window_size, pad_value)
        q, k, v = self.split_qkv(qkv)
        kept = None
        if self.ats_fraction is not None or self.cast_dtype is not None:
            logits = self.matmul(q / self.scale, k.transpose(-2, -1))
            if self.rel_pos is not None:
                self.rel_pos(logits, q)
            probs = logits.softmax(dim=-1)
            if self.ats_fraction is not None:
                probs, kept = self._adaptive_token_sampling(probs, v)
            dtype = self.cast_dtype or probs.dtype
            out = self.matmul(probs.to(dtype), v.to(dtype)).to(qkv.dtype)
        else:
            bias = None
            if self.rel_pos is not None:
                rel_h, rel_w = self.rel_pos.terms(q)
                bias = (rel_h.unsqueeze(-1) + rel_w.unsqueeze(-2)).flatten(-2)
                self.count("add", 2 * bias.numel())
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            attn_elements = q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2]
            self.count("matmul", 2 * attn_elements * q.shape[-1])
        out = merge_heads(out)
        if self.window_size is not None:
            out = window_unpartition(out, self.input_size, self.window_size)
        return out, kept

    def _adaptive_token_sampling(self, probs: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """ATS (Fayyaz et al. 2022), top-k form: keep the class token and the
        query rows with the largest class-attention x value-norm score.

        probs (B, H, N, N), v (B, H, N, d) -> (B, H, n, N), kept (B, n) sorted.
        """
        scores = probs[:, :, 0, :] * v.norm(dim=-1)
        scores = scores / scores[..., 1:].sum(dim=-1, keepdim=True)
        scores = scores.sum(dim=1)
        scores[:, 0] = float("inf")
        n_keep = int(self.ats_fraction * (scores.shape[-1] - 1)) + 1
        kept = scores.topk(n_keep, dim=-1, sorted=False).indices.sort(dim=-1).values
        return probs.gather(2, expand_row_index(kept, probs.shape)), kept


class TokenwiseEventfulBlock(Block):
    """Gate + buffer around ``qkv``, ``proj`` and the MLP (eventful variant 1).

    Args:
        policy: Token selection policy shared by the block's gates.
        gate_before_ln: Put the qkv and MLP gates before their LayerNorm.
        stgt: Use the STGT gate (reference = previous frame) instead.
        **block_kwargs: See :class:`Block` (no ``ats_fraction``).
    """

    variant: BlockVariant = "tokenwise"

    def __init__(
        self,
        dim: int,
        heads: int,
        policy: TokenPolicy | None = None,
        gate_before_ln: bool = False,
        stgt: bool = False,
        **block_kwargs,
    ) -> None:
        if block_kwargs.get("ats_fraction") is not None:
            raise ValueError("ats_fraction is only supported by the dense block variant")
        super().__init__(dim, heads, **block_kwargs)
        self.gate_before_ln = gate_before_ln
        self.stgt = stgt
        gate_class = STGTGate if stgt else TokenGate
        self.qkv_gate = gate_class(policy)
        self.qkv_buffer = TokenBuffer()
        self.proj_gate = gate_class(policy)
        self.proj_buffer = TokenBuffer()
        self.mlp_gate = gate_class(policy)
        self.mlp_buffer = TokenBuffer()

    @property
    def policy(self) -> TokenPolicy | None:
        return self.qkv_gate.policy

    @policy.setter
    def policy(self, policy: TokenPolicy | None) -> None:
        for gate in (self.qkv_gate, self.proj_gate, self.mlp_gate):
            gate.policy = policy

    def forward(self, x: Tensor, owns_input: bool = False) -> Tensor:
        self.check_tokens(x)
        if self.gate_before_ln:
            h, index = self.qkv_gate(x)
            h = self.norm1(h)
        else:
            h, index = self.qkv_gate(x, norm=self.norm1)
        y = self.attention_branch(self.linear(self.qkv, h), index)

        h, index = self.proj_gate(y)
        x = self.add(x, self.proj_buffer(self.linear(self.proj, h), index), inplace=owns_input)

        if self.gate_before_ln:
            h, index = self.mlp_gate(x)
            h = self.norm2(h)
        else:
            h, index = self.mlp_gate(x, norm=self.norm2)
        # x is this call's own tensor (the first residual made it): add in place.
        return self.add(x, self.mlp_buffer(self.mlp(h), index), inplace=True)

    def attention_branch(self, qkv: Tensor, index: Tensor | None) -> Tensor:
        """qkv of the gated tokens (B, k, 3D) and their index -> attention
        (B, N, D), or its heads (B, N, H, d) for the projection gate to read.

        Buffers the qkv of every token, then attends over the buffer.
        """
        return self.eventful_attention(self.qkv_buffer(qkv, index), index)

    def eventful_attention(self, qkv: Tensor, index: Tensor | None) -> Tensor:
        """Attention over the buffered qkv (B, N, 3D) -> (B, N, D); dense here."""
        return self.attend(qkv)[0]


class QueryKeyEventfulBlock(StreamState, TokenwiseEventfulBlock):
    """Also caches the attention logits ``q k^T / sqrt(d)`` (eventful variant 2).

    On an incremental frame only the rows of updated queries and the columns
    of updated keys are recomputed (with pooling, the columns of every pooled
    cell an updated token falls in, per batch item). Relative-position terms
    depend on the query only, so the cache holds logits with them added and
    per-query terms are cached too: both stay exact and the cache is never
    copied. Global attention only.
    """

    variant: BlockVariant = "query_key"

    def __init__(self, dim: int, heads: int, **kwargs) -> None:
        super().__init__(dim, heads, **kwargs)
        if self.window_size is not None:
            raise ValueError(
                f"window_size={self.window_size}: the {self.variant!r} block variant supports "
                "global attention only; use 'tokenwise' for windowed blocks"
            )
        self.logits: Tensor | None = None
        self.rel_h: Tensor | None = None
        self.rel_w: Tensor | None = None

    def reset_state(self) -> None:
        self.logits = None
        self.rel_h = None
        self.rel_w = None

    def cached_logits(
        self, qkv: Tensor, index: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Updates the logits cache.

        Returns (logits (B, H, N, Nk), v (B, H, Nk, d), key index (B, m) or None
        on a flush).
        """
        q, k, v = self.split_qkv(qkv)
        if self.logits is None or index is None:
            logits = self.matmul(q / self.scale, k.transpose(-2, -1))
            if self.rel_pos is not None:
                self.rel_h, self.rel_w = self.rel_pos.terms(q)
                self.rel_pos.add_to(logits, self.rel_h, self.rel_w)
            self.logits = logits
            return logits, v, None

        logits = self.logits
        b, heads, n, nk = logits.shape
        key_index = index
        if self.pool_size is not None:
            key_index = pool_token_index(index, self.attention_size, self.pool_size)
        q_rows = gather_tokens(qkv[..., : self.dim], index)
        q_rows = q_rows.view(b, -1, heads, self.dim // heads).transpose(1, 2)
        rows = self.matmul(q_rows / self.scale, k.transpose(-2, -1))
        k_cols = k.gather(2, expand_row_index(key_index, k.shape))
        cols = self.matmul(q / self.scale, k_cols.transpose(-2, -1))
        if self.rel_pos is not None:
            kh, kw = self.rel_pos.key_size
            rel_h_rows, rel_w_rows = self.rel_pos.terms_for_rows(q_rows, index)
            self.rel_h.scatter_(2, expand_row_index(index, self.rel_h.shape), rel_h_rows)
            self.rel_w.scatter_(2, expand_row_index(index, self.rel_w.shape), rel_w_rows)
            self.rel_pos.add_to(rows, rel_h_rows, rel_w_rows, counted=False)
            cols += self.rel_h.gather(3, expand_col_index(key_index // kw, cols.shape))
            cols += self.rel_w.gather(3, expand_col_index(key_index % kw, cols.shape))
            # Counted as the method defines it: terms and adds over the full matrix.
            self.count("einsum", b * heads * n * (kh + kw) * q.shape[-1])
            self.count("add", 2 * logits.numel())
        logits.scatter_(2, expand_row_index(index, logits.shape), rows)
        logits.scatter_(3, expand_col_index(key_index, logits.shape), cols)
        return logits, v, key_index

    def eventful_attention(self, qkv: Tensor, index: Tensor | None) -> Tensor:
        logits, v, _ = self.cached_logits(qkv, index)
        probs = logits.softmax(dim=-1)
        dtype = self.cast_dtype or probs.dtype
        return merge_heads(self.matmul(probs.to(dtype), v.to(dtype)).to(qkv.dtype))


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

    With gradients off on CPU in float32, the fused kernels of
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
        q_scaled_t = (q / self.scale).transpose(-1, -2).contiguous()
        self.q_scaled_t = q_scaled_t.detach().clone() if torch.is_grad_enabled() else q_scaled_t
        self.keys_t = k.detach().transpose(-1, -2).contiguous()
        logits = self._full_logits(q_scaled_t, k.transpose(-1, -2), counted=True)
        self.log_norm = torch.logsumexp(logits, dim=-1)
        if torch.is_grad_enabled():  # logsumexp's backward needs the logits
            probs = (logits - self.log_norm.unsqueeze(-1)).exp().to(dtype)
            self.log_norm = self.log_norm.detach()
        else:
            probs = exp_shifted_(logits, self.log_norm.unsqueeze(-1)).to(dtype)
        v = v.to(dtype)
        self.v_gate.flush(v)
        self.a_gate.flush(probs.transpose(-1, -2).contiguous(), copy=False)
        self.output = self.matmul(probs, v)
        nonfinite = torch.isfinite(self.output.detach()).flatten(1).all(dim=1).logical_not_()
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
        # One reduction: a NaN or infinity among the new values makes their
        # range non-finite (read with the softmax checks' sync if there is one).
        self._new_range = torch.aminmax(qkv.detach()) if qkv.numel() else None
        self._new_range_read = None
        if self.rel_pos is not None:
            rel_h_rows, rel_w_rows = self.rel_pos.terms_for_rows(q_new, index)
        q_rows = q_new / self.scale if torch.is_grad_enabled() else q_new.div_(self.scale)
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
        if self.rel_pos is None and kernels.fused_kernels_available(
            q_rows, self.q_scaled_t, self.log_norm
        ):
            a_new = self._fused_softmax_columns(q_rows, k_new, k_old, index, key_index)
        else:
            rel_rows = None if self.rel_pos is None else (rel_h_rows, rel_w_rows)
            a_new = self._softmax_columns(q_rows, k_new, k_old, index, key_index, rel_rows)
        # Counted as the method defines it: the updated rows and key columns of A.
        self.count("matmul", b * heads * (r * nk + m * n) * d)
        a_new = a_new.to(dtype)
        v_new = v_new.to(dtype)
        out = self.output.view(b * heads, n, d)
        if kernels.attention_update_supported(d) and kernels.fused_kernels_available(
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
            v_old = (v_new - v_delta).view(b * heads, m, d)
            out.baddbmm_(a_new.view(b * heads, m, n).transpose(1, 2), v_delta.view(b * heads, m, d))
            out.baddbmm_(a_delta.view(b * heads, m, n).transpose(1, 2), v_old)
        self.count("matmul", 2 * out.numel() * m)
        self.count("accumulator", v_new.numel() + 2 * out.numel())
        new_range = self._new_range_read
        if new_range is None and self._new_range is not None:
            new_range = [value.item() for value in self._new_range]
        self._new_range = None
        nonfinite = self.nonfinite_items
        if new_range is not None and not all(map(math.isfinite, new_range)):
            new = torch.isfinite(qkv.detach()).flatten(1).all(dim=1).logical_not_()
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
        log_norm = torch.logsumexp(logits, dim=-1)
        v = self.v_gate.p.index_select(0, rows)
        probs = exp_shifted_(logits, log_norm.unsqueeze(-1)).to(v.dtype)
        output = self.matmul(probs, v)
        self.log_norm.index_copy_(0, rows, log_norm)
        self.a_gate.p.index_copy_(0, rows, probs.transpose(-1, -2))
        self.output.index_copy_(0, rows, output.to(self.output.dtype))
        still = torch.isfinite(output.detach()).flatten(1).all(dim=1).logical_not_()
        self.nonfinite_items = None
        if bool(still.any()):
            self.nonfinite_items = torch.zeros_like(items).index_copy_(0, rows, still)

    def _softmax_columns(
        self,
        q_rows: Tensor,
        k_new: Tensor,
        k_old: Tensor,
        index: Tensor,
        key_index: Tensor,
        rel_rows: tuple[Tensor, Tensor] | None,
    ) -> Tensor:
        """New softmax columns (B, H, m, N) of the updated keys, normalisers
        updated, from PyTorch products: the logits of the updated query rows
        (all keys; the key state already holds the new keys) and of the
        updated key columns (all queries, key-major), before and after.

        q_rows (B, H, r, d) scaled; k_new, k_old (B, H, m, d); rel_rows: the
        updated rows' relative-position terms, if any.
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
        if rel_rows is not None:
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
        else:
            cols_new = torch.bmm(k_new, q_scaled_t, out=cols_new)
            cols_old = torch.bmm(k_old, q_scaled_t, out=cols_old)
        return self._update_softmax(
            rows.view(b, heads, r, nk),
            cols_old.view(b, heads, m, n),
            cols_new.view(b, heads, m, n),
            index,
            key_index,
        )

    def _fused_softmax_columns(
        self, q_rows: Tensor, k_new: Tensor, k_old: Tensor, index: Tensor, key_index: Tensor
    ) -> Tensor:
        """:meth:`_softmax_columns` (no relative position) in one fused CPU
        kernel that never stores a logit."""
        b, heads, d, n = self.q_scaled_t.shape
        nk, r, m = self.keys_t.shape[3], index.shape[1], key_index.shape[1]
        probs = self.workspaces.get("cols_new", (b * heads, m, n), q_rows)
        if kernels.incremental_softmax(
            q_rows.reshape(b * heads, r, d),
            self.keys_t.view(b * heads, d, nk),
            k_new.reshape(b * heads, m, d),
            k_old.reshape(b * heads, m, d),
            self.q_scaled_t.view(b * heads, d, n),
            self.log_norm.view(b * heads, n),
            index,
            probs,
            self.min_kept_mass,
            self.max_log_shift,
        ):
            return probs.view(b, heads, m, n)
        return self._exact_softmax_columns(key_index)

    def _update_softmax(
        self,
        rows: Tensor,
        cols_old: Tensor,
        cols_new: Tensor,
        index: Tensor,
        key_index: Tensor,
    ) -> Tensor:
        """Updates the row log-normalisers (B, H, N) in place from the changed
        logits only; returns the new softmax columns of the updated keys (B, H, m, N).

        rows (B, H, r, Nk): full new rows of the updated queries. cols_old,
        cols_new (B, H, m, N): old and new logits of the updated key columns.
        All three are overwritten. Every exponential is taken relative to the
        old normaliser of its row: an updated row's new mass is the sum of its
        recomputed row; every other row keeps ``1 - removed`` (its mass outside
        the old columns) and adds that of the new ones. If a row would keep
        less than ``min_kept_mass`` or its normaliser moves by more than
        ``max_log_shift`` (precision), the normalisers are recomputed from the
        full logits for that frame.
        """
        b, heads, _, n = self.q_scaled_t.shape
        log_norm = self.log_norm
        fused = kernels.fused_kernels_available(rows, cols_old, cols_new, log_norm)
        if fused and cols_new.is_contiguous():
            if kernels.update_softmax(
                rows, cols_old, cols_new, log_norm, index, self.min_kept_mass, self.max_log_shift
            ):
                return cols_new
            return self._exact_softmax_columns(key_index)
        row_index = index.unsqueeze(1).expand(b, heads, -1)
        row_mass = exp_shifted_(rows, log_norm.gather(2, row_index).unsqueeze(-1)).sum(dim=-1)
        removed = exp_shifted_(cols_old, log_norm.unsqueeze(-2)).sum(dim=-2)
        probs = exp_shifted_(cols_new, log_norm.unsqueeze(-2))
        kept = torch.rsub(removed, 1.0).scatter_(2, row_index, 1.0)
        total = probs.sum(dim=-2).add_(kept).scatter_(2, row_index, row_mass)
        log_total = total.log()
        # One sync for the checks (and the incremental frame's finiteness
        # check, see _incremental); NaN fails every comparison.
        checks = [kept.amin(), *torch.aminmax(log_total), *(self._new_range or ())]
        least_kept, low, high, *new_range = torch.stack(checks).tolist()
        self._new_range_read = new_range or None
        limit = self.max_log_shift
        if not (least_kept >= self.min_kept_mass and -limit < low and high < limit):
            return self._exact_softmax_columns(key_index)
        log_norm.add_(log_total)
        return probs.mul_(total.reciprocal_().unsqueeze(-2))

    def _exact_softmax_columns(self, key_index: Tensor) -> Tensor:
        """The fallback: recomputes the normalisers (B, H, N) from the full
        logits; returns the softmax columns of the keys in ``key_index`` (B, H, m, N)."""
        logits = self._full_logits(self.q_scaled_t, self.keys_t, counted=False)
        self.log_norm.copy_(torch.logsumexp(logits, dim=-1))
        cols = logits.gather(3, expand_col_index(key_index, logits.shape))
        return exp_shifted_(cols.transpose(-1, -2), self.log_norm.unsqueeze(-2)).contiguous()


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


BLOCK_VARIANTS: dict[str, type[Block]] = {
    "dense": Block,
    "tokenwise": TokenwiseEventfulBlock,
    "query_key": QueryKeyEventfulBlock,
    "full": EventfulBlock,
}


def build_block(variant: str, dim: int, heads: int, **kwargs) -> Block:
    """Builds a block by variant name (see ``BLOCK_VARIANTS``).

    Eventful-only options (``policy``, ``gate_before_ln``, ``stgt``) are
    ignored by the dense variant.
    """
    if variant not in BLOCK_VARIANTS:
        raise ValueError(
            f"unknown block variant {variant!r}; choose one of {sorted(BLOCK_VARIANTS)}"
        )
    if variant == "dense":
        for option in ("policy", "gate_before_ln", "stgt"):
            kwargs.pop(option, None)
    return BLOCK_VARIANTS[variant](dim, heads, **kwargs)
