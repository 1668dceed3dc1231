"""Per-batch-item token gathers and scatters without Python loops.

An index tensor has shape (B, k): for each batch item, k token positions.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor


@functools.lru_cache(maxsize=64)
def _cached_offsets(count: int, stride: int, device: torch.device) -> Tensor:
    with torch.inference_mode(False):
        return torch.arange(count, device=device).mul_(stride)


def _offsets(count: int, stride: int, device: torch.device) -> Tensor:
    """``arange(count) * stride`` (long), made once per shape and device.

    Built outside inference mode so that it may be used in and out of it; never
    modified in place. Under ``torch.compile`` a constant of the graph instead.
    """
    if torch.compiler.is_compiling():
        return torch.arange(count, device=device) * stride
    return _cached_offsets(count, stride, device)


def flat_token_index(index: Tensor, num_tokens: int) -> Tensor:
    """(B, k) per-item positions -> (B * k,) positions in the flattened (B * N)."""
    if index.shape[0] == 1:
        return index.reshape(-1)
    offsets = _offsets(index.shape[0], num_tokens, index.device)
    return (index + offsets.unsqueeze(1)).reshape(-1)


def gather_tokens(x: Tensor, index: Tensor, flat: Tensor | None = None) -> Tensor:
    """Selects tokens per item: x (B, N, ...), index (B, k) -> (B, k, ...), contiguous.

    ``x`` may be a strided view (e.g. (B, N, heads, d) transposed from
    (B, heads, N, d)): whole tokens are copied without a copy of ``x``.
    ``flat``: ``flat_token_index(index, N)`` if the caller already has it.
    """
    b, n = x.shape[:2]
    rest = x.shape[2:]
    if b == 1 or x.stride(0) == n * x.stride(1):
        if flat is None:
            flat = flat_token_index(index, n)
        return x.view(b * n, *rest).index_select(0, flat).view(b, index.shape[1], *rest)
    return x[_offsets(b, 1, x.device).unsqueeze(1), index]


def scatter_tokens_(dst: Tensor, index: Tensor, src: Tensor, flat: Tensor | None = None) -> Tensor:
    """In place ``dst[b, index[b]] = src[b]``: dst (B, N, D), src (B, k, D).

    ``flat``: ``flat_token_index(index, N)`` if the caller already has it.
    """
    b, n, d = dst.shape
    if flat is None:
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


def flat_row_index(index: Tensor, heads: int, rows: int) -> Tensor:
    """(B, m) rows per item -> (B * heads * m,) rows of a flattened (B, heads, rows, C)."""
    b = index.shape[0]
    base = _offsets(b * heads, rows, index.device).view(b, heads, 1)
    return (base + index.unsqueeze(1)).reshape(-1)


def gather_rows(
    x: Tensor, index: Tensor, flat: Tensor | None = None, out: Tensor | None = None
) -> Tensor:
    """Selects the same rows of every head: x (B, H, R, C), index (B, m) -> (B, H, m, C).

    Contiguous rows are copied whole (``index_select``), which is much faster
    than an element-wise ``gather``. ``flat``: ``flat_row_index(index, H, R)``
    if the caller already has it. ``out``: a contiguous (B, H, m, C) tensor to
    write into.
    """
    b, h, r, c = x.shape
    if not x.is_contiguous():
        expanded = expand_row_index(index, x.shape)
        if out is None:
            return x.gather(2, expanded)
        return torch.gather(x, 2, expanded, out=out.view(expanded.shape))
    if flat is None:
        flat = flat_row_index(index, h, r)
    rows = x.view(b * h * r, c)
    if out is None:
        return rows.index_select(0, flat).view(b, h, index.shape[1], c)
    torch.index_select(rows, 0, flat, out=out.view(-1, c))
    return out


def scatter_rows_(dst: Tensor, index: Tensor, src: Tensor, flat: Tensor | None = None) -> Tensor:
    """In place ``dst[b, h, index[b]] = src[b, h]``: dst (B, H, R, C) contiguous.

    ``flat``: ``flat_row_index(index, H, R)`` if the caller already has it.
    """
    b, h, r, c = dst.shape
    if flat is None:
        flat = flat_row_index(index, h, r)
    dst.view(b * h * r, c).index_copy_(0, flat, src.reshape(-1, c))
    return dst
