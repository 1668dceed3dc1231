"""The query-key eventful block (:class:`QueryKeyEventfulBlock`, variant ``"query_key"``).

The token-wise block plus a cache of the attention logits: an incremental
frame recomputes only the rows of updated queries and the columns of updated
keys; the softmax and ``A @ V`` are recomputed densely.
"""

from __future__ import annotations

from torch import Tensor

from eventful_pl.attention import merge_heads, pool_token_index
from eventful_pl.blocks.dense import BlockVariant
from eventful_pl.blocks.tokenwise import TokenwiseEventfulBlock
from eventful_pl.indexing import expand_col_index, expand_row_index, gather_tokens
from eventful_pl.state import StreamState


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
            logits = self.matmul(q / self.sqrt_head_dim, k.transpose(-2, -1))
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
        rows = self.matmul(q_rows / self.sqrt_head_dim, k.transpose(-2, -1))
        k_cols = k.gather(2, expand_row_index(key_index, k.shape))
        cols = self.matmul(q / self.sqrt_head_dim, k_cols.transpose(-2, -1))
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
