"""Tensor plumbing for attention: heads, windows with padding, key/value pooling."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def split_heads(qkv: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """Fused qkv (B, N, 3D) -> q, k, v, each (B, heads, N, D / heads).

    The fused layout is q then k then v, heads contiguous inside each.
    """
    b, n, c = qkv.shape
    q, k, v = qkv.view(b, n, 3, heads, c // (3 * heads)).permute(2, 0, 3, 1, 4)
    return q, k, v


def merge_heads(x: Tensor) -> Tensor:
    """(B, heads, N, d) -> (B, N, heads * d)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def pool_grid(x: Tensor, grid: tuple[int, int], pool: tuple[int, int]) -> Tensor:
    """Average-pools tokens over their 2-D grid: (B, H, gh * gw, d) -> (B, H, Nk, d)."""
    b, h, n, d = x.shape
    x = x.reshape(b * h, grid[0], grid[1], d).permute(0, 3, 1, 2)
    x = F.avg_pool2d(x, pool)
    return x.permute(0, 2, 3, 1).reshape(b, h, -1, d)


def pool_token_index(index: Tensor, grid: tuple[int, int], pool: tuple[int, int]) -> Tensor:
    """Token index (B, r) -> the pooled cells those tokens fall in, (B, m).

    Each item gets its own cells. m is the largest per-item count; an item
    with fewer cells is filled up with other cells of its own (updating an
    extra key is harmless), so no item ever sees another item's cells.
    """
    width = grid[1]
    cells_w = width // pool[1]
    cells = (index // width // pool[0]) * cells_w + (index % width) // pool[1]
    num_cells = (grid[0] // pool[0]) * cells_w
    hit = cells.new_zeros(index.shape[0], num_cells, dtype=torch.float32)
    hit.scatter_(1, cells, 1.0)
    m = int(hit.sum(dim=1).max())
    if m == num_cells:
        return _arange_like(hit)
    return hit.topk(m, dim=1, sorted=False).indices


def _arange_like(hit: Tensor) -> Tensor:
    b, n = hit.shape
    return torch.arange(n, device=hit.device).expand(b, n)


def window_partition(
    x: Tensor, grid: tuple[int, int], window: tuple[int, int], pad_value: Tensor | None
) -> Tensor:
    """Splits tokens into non-overlapping windows, padding bottom/right.

    x (B, gh * gw, C) -> (B * windows, wh * ww, C). Padding tokens equal
    ``pad_value`` (C,) (zeros if None).
    """
    b, _, c = x.shape
    gh, gw = grid
    wh, ww = window
    ph, pw = -gh % wh, -gw % ww
    x = x.view(b, gh, gw, c)
    if ph or pw:
        padded = x.new_zeros(b, gh + ph, gw + pw, c)
        if pad_value is not None:
            padded.copy_(pad_value.expand_as(padded))
        padded[:, :gh, :gw] = x
        x = padded
    hp, wp = gh + ph, gw + pw
    x = x.view(b, hp // wh, wh, wp // ww, ww, c).transpose(2, 3)
    return x.reshape(-1, wh * ww, c)


def window_unpartition(x: Tensor, grid: tuple[int, int], window: tuple[int, int]) -> Tensor:
    """Inverse of :func:`window_partition`: (B * windows, wh * ww, C) -> (B, gh * gw, C)."""
    gh, gw = grid
    wh, ww = window
    hp, wp = gh + (-gh % wh), gw + (-gw % ww)
    c = x.shape[-1]
    x = x.view(-1, hp // wh, wp // ww, wh, ww, c).transpose(2, 3).reshape(-1, hp, wp, c)
    if hp != gh or wp != gw:
        x = x[:, :gh, :gw]
    return x.reshape(x.shape[0], gh * gw, c)
