"""Transformer blocks: the dense ViT block and its eventful variants (docs/eventful-core.md).

Variants, each adding to the previous one (``BLOCK_VARIANTS``, one module each):

- ``"dense"`` (:class:`Block`, ``dense.py``): pre-norm ViT block, optional
  windowed attention with padding, decomposed relative position, key/value
  pooling, half-precision attention-value product and adaptive token
  sampling (ATS); the counted primitives every variant uses.
- ``"tokenwise"`` (:class:`TokenwiseEventfulBlock`, ``tokenwise.py``): gate +
  buffer around ``qkv``, ``proj`` and the MLP; attention is recomputed from
  buffered qkv.
- ``"query_key"`` (:class:`QueryKeyEventfulBlock`, ``query_key.py``): also
  caches the logits ``q k^T`` and recomputes only updated rows and columns.
- ``"full"`` (:class:`EventfulBlock`, ``full.py``, the paper's method): also
  updates ``A @ V`` with deltas of the updated key columns; its softmax
  normaliser and output-update maths are pure functions in ``softmax.py``
  (the reference of the fused kernels).

Shapes: tokens (B, N, D); a batch is B independent streams.
"""

from __future__ import annotations

from eventful_pl.blocks.dense import (
    LN_EPS,
    MATMUL_2_CASTS,
    Block,
    BlockVariant,
    drop_path,
    is_plain_linear,
    to_pair,
)
from eventful_pl.blocks.full import EventfulBlock
from eventful_pl.blocks.query_key import QueryKeyEventfulBlock
from eventful_pl.blocks.softmax import LOG2E, exp_shifted_
from eventful_pl.blocks.tokenwise import TokenwiseEventfulBlock

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


__all__ = [
    "BLOCK_VARIANTS",
    "LN_EPS",
    "LOG2E",
    "MATMUL_2_CASTS",
    "Block",
    "BlockVariant",
    "EventfulBlock",
    "QueryKeyEventfulBlock",
    "TokenwiseEventfulBlock",
    "build_block",
    "drop_path",
    "exp_shifted_",
    "is_plain_linear",
    "to_pair",
]
