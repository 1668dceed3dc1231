"""Position encodings: learned absolute (ViT) and decomposed relative (ViTDet)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eventful_pl.counting import Counted


def _param_key(*params: Tensor) -> tuple | None:
    """Identifies the current values of ``params`` (None: do not cache).

    Inference tensors (made under ``torch.inference_mode``) have no version
    counter, so results derived from them are not cached; neither are they
    under ``torch.compile`` (the compiled graph recomputes them).
    """
    if torch.compiler.is_compiling() or any(p.is_inference() for p in params):
        return None
    return tuple((p.data_ptr(), p._version, p.device, p.dtype) for p in params)


class PositionEncoding(Counted, nn.Module):
    """Learned absolute position encoding, interpolated to the input grid.

    Args:
        dim: Token channels D.
        stored_size: Grid (h, w) the parameter is stored for.
        input_size: Grid (h, w) of the inputs (bicubic interpolation if it
            differs from ``stored_size``).
        num_prefix_tokens: Leading tokens (class token) with their own slot.

    Shapes: x (B, num_prefix_tokens + h * w, D) -> same.
    """

    def __init__(
        self,
        dim: int,
        stored_size: tuple[int, int],
        input_size: tuple[int, int],
        num_prefix_tokens: int = 0,
    ) -> None:
        super().__init__()
        self.stored_size = tuple(stored_size)
        self.input_size = tuple(input_size)
        self.num_prefix_tokens = num_prefix_tokens
        tokens = num_prefix_tokens + self.stored_size[0] * self.stored_size[1]
        self.encoding = nn.Parameter(torch.zeros(1, tokens, dim))
        nn.init.trunc_normal_(self.encoding, std=0.02)
        self._cache: tuple[tuple, Tensor] | None = None

    def sized_encoding(self) -> Tensor:
        """The encoding for ``input_size``, shape (1, N, D); cached outside training."""
        key = _param_key(self.encoding)
        if key is not None and not self.training and self._cache and self._cache[0] == key:
            return self._cache[1]
        encoding = self.encoding
        if self.input_size != self.stored_size:
            prefix = encoding[:, : self.num_prefix_tokens]
            grid = encoding[:, self.num_prefix_tokens :].transpose(1, 2)
            grid = grid.reshape(1, -1, *self.stored_size)
            grid = F.interpolate(grid, self.input_size, mode="bicubic", align_corners=False)
            encoding = torch.cat([prefix, grid.flatten(2).transpose(1, 2)], dim=1)
        if not self.training and key is not None:
            encoding = encoding.detach()
            self._cache = (key, encoding)
        return encoding

    def forward(self, x: Tensor) -> Tensor:
        encoding = self.sized_encoding()
        if encoding.shape[1] != x.shape[1]:
            raise ValueError(
                f"position encoding: input has {x.shape[1]} tokens, expected "
                f"{encoding.shape[1]} ({self.num_prefix_tokens} prefix + grid {self.input_size})"
            )
        self.count("add", x.numel())
        return x + encoding


class RelativePosition(Counted, nn.Module):
    """Decomposed relative position (height and width) added to attention logits.

    Tables are stored for ``embedding_size`` and interpolated (bicubic) to the
    attention size when it differs; with key/value pooling they are
    average-pooled along the key axis.

    Args:
        attention_size: Query grid (h, w) of one attention (window or image).
        embedding_size: Grid the tables are stored for.
        head_dim: Channels per head.
        pool_size: Key pooling factor (ph, pw), or None.

    Parameters: ``height`` (2 * sh - 1, head_dim), ``width`` (2 * sw - 1, head_dim).
    """

    def __init__(
        self,
        attention_size: tuple[int, int],
        embedding_size: tuple[int, int],
        head_dim: int,
        pool_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.attention_size = tuple(attention_size)
        self.embedding_size = tuple(embedding_size)
        self.pool_size = pool_size
        self.height = nn.Parameter(torch.zeros(2 * self.embedding_size[0] - 1, head_dim))
        self.width = nn.Parameter(torch.zeros(2 * self.embedding_size[1] - 1, head_dim))
        nn.init.trunc_normal_(self.height, std=0.02)
        nn.init.trunc_normal_(self.width, std=0.02)
        self._cache: tuple[tuple, tuple[Tensor, Tensor]] | None = None

    @property
    def key_size(self) -> tuple[int, int]:
        """Key grid (kh, kw) after pooling."""
        if self.pool_size is None:
            return self.attention_size
        return (
            self.attention_size[0] // self.pool_size[0],
            self.attention_size[1] // self.pool_size[1],
        )

    def _table(self, embedding: Tensor, axis: int) -> Tensor:
        size = self.embedding_size[axis]
        coords = torch.arange(size, device=embedding.device)
        table = embedding[coords[:, None] - coords[None, :] + size - 1]
        # (size, size, C)
        target = self.attention_size[axis]
        if target != size:
            table = table.permute(2, 0, 1).unsqueeze(0)
            table = F.interpolate(table, (target, target), mode="bicubic", align_corners=False)
            table = table.squeeze(0).permute(1, 2, 0)
        if self.pool_size is not None:
            table = F.avg_pool1d(table.transpose(1, 2), self.pool_size[axis]).transpose(1, 2)
        return table
        # (query size, key size, C)

    def tables(self) -> tuple[Tensor, Tensor]:
        """(height table (ah, kh, C), width table (aw, kw, C)); cached outside training."""
        key = _param_key(self.height, self.width)
        if key is not None and not self.training and self._cache and self._cache[0] == key:
            return self._cache[1]
        tables = (self._table(self.height, 0), self._table(self.width, 1))
        if not self.training and key is not None:
            tables = (tables[0].detach(), tables[1].detach())
            self._cache = (key, tables)
        return tables

    def terms(self, q: Tensor) -> tuple[Tensor, Tensor]:
        """Per-query terms: q (B, H, ah * aw, C) -> (B, H, ah*aw, kh), (B, H, ah*aw, kw)."""
        table_h, table_w = self.tables()
        ah, aw = self.attention_size
        q_grid = q.reshape(*q.shape[:2], ah, aw, q.shape[-1])
        rel_h = torch.einsum("bhyxc,ykc->bhyxk", q_grid, table_h)
        rel_w = torch.einsum("bhyxc,xkc->bhyxk", q_grid, table_w)
        self.count("einsum", (rel_h.numel() + rel_w.numel()) * q.shape[-1])
        return rel_h.flatten(2, 3), rel_w.flatten(2, 3)

    def terms_for_rows(self, q_rows: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Terms for selected queries: q_rows (B, H, r, C), rows (B, r) -> (B, H, r, kh/kw)."""
        table_h, table_w = self.tables()
        width = self.attention_size[1]
        rel_h = torch.einsum("bhrc,brkc->bhrk", q_rows, table_h[rows // width])
        rel_w = torch.einsum("bhrc,brkc->bhrk", q_rows, table_w[rows % width])
        return rel_h, rel_w

    def add_to(self, logits: Tensor, rel_h: Tensor, rel_w: Tensor, counted: bool = True) -> Tensor:
        """logits (B, H, Nq, kh * kw) + terms (B, H, Nq, kh / kw), in place.

        Counts the two adds unless ``counted`` is False (the caller counts).
        """
        kh, kw = self.key_size
        grid = logits.view(*logits.shape[:3], kh, kw)
        grid.add_(rel_h.unsqueeze(-1)).add_(rel_w.unsqueeze(-2))
        if counted:
            self.count("add", 2 * logits.numel())
        return logits

    def forward(self, logits: Tensor, q: Tensor) -> Tensor:
        """Adds the terms of q (B, H, N, C) to logits (B, H, N, Nk) in place."""
        return self.add_to(logits, *self.terms(q))
