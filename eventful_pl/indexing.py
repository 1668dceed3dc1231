"""Per-batch-item token gathers and scatters without Python loops.

An index tensor has shape (B, k): for each batch item, k token positions.
"""

from __future__ import annotations

import torch
from torch import Tensor


def flat_token_index(index: Tensor, num_tokens: int) -> Tensor:
    """(B, k) per-item positions -> (B * k,) positions in the flattened (B * N)."""
    offsets = torch.arange(index.shape[0], device=index.device).mul_(num_tokens)
    return (index + offsets.unsqueeze(1)).reshape(-1)


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """Selects tokens per item: x (B, N, D), index (B, k) -> (B, k, D)."""
    b, n, d = x.shape
    flat = flat_token_index(index, n)
    return x.reshape(b * n, d).index_select(0, flat).view(b, index.shape[1], d)


def scatter_tokens_(dst: Tensor, index: Tensor, src: Tensor) -> Tensor:
    """In place ``dst[b, index[b]] = src[b]``: dst (B, N, D), src (B, k, D)."""
    b, n, d = dst.shape
    flat = flat_token_index(index, n)
    dst.view(b * n, d).index_copy_(0, flat, src.reshape(-1, d))
    return dst


def expand_row_index(index: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """(B, k) -> an index for dim -2 of a tensor of ``shape`` (B, ..., N, C)."""
    view = index.shape[:1] + (1,) * (len(shape) - 3) + index.shape[1:] + (1,)
    return index.view(view).expand(*shape[:-2], index.shape[1], shape[-1])


def expand_col_index(index: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """(B, k) -> an index for dim -1 of a tensor of ``shape`` (B, ..., R, N)."""
    view = index.shape[:1] + (1,) * (len(shape) - 2) + index.shape[1:]
    return index.view(view).expand(*shape[:-1], index.shape[1])
