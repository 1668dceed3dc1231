"""A ViT backbone built from (eventful) blocks, for ViViT and ViTDet alike."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from eventful_pl.blocks import BLOCK_VARIANTS, LN_EPS, Block, BlockVariant, build_block, to_pair
from eventful_pl.counting import Counted
from eventful_pl.gates import set_policy
from eventful_pl.policies import TokenPolicy
from eventful_pl.position import PositionEncoding
from eventful_pl.state import reset_stream_state

#: Precisions a model can be built in (the ``dtype`` option).
COMPUTE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None, option: str = "dtype") -> torch.dtype:
    """The torch dtype of a ``dtype`` option: None (float32), a name of
    :data:`COMPUTE_DTYPES` or one of its torch dtypes."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype in COMPUTE_DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in COMPUTE_DTYPES:
        return COMPUTE_DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"{option}={dtype!r} is not supported; choose one of {list(COMPUTE_DTYPES)}")


class ViTBackbone(Counted, nn.Module):
    """Learned absolute position encoding, optional class token, a stack of blocks.

    Each block is windowed (``window_block_indices``) or global, and has its own
    variant (``"dense"``, ``"tokenwise"``, ``"query_key"``, ``"full"``).
    Global-attention-only options (pooling, half-precision ``A @ V``) apply to
    global blocks; windowed blocks store relative-position tables of the
    window size, global blocks of ``relative_embedding_size``.

    Args:
        dim: Token channels D.
        depth: Number of blocks.
        heads: Attention heads.
        input_size: Patch grid (h, w) of the inputs.
        mlp_ratio: MLP hidden size / D.
        position_encoding_size: Grid the position encoding is stored for
            (interpolated to ``input_size``); defaults to ``input_size``.
        class_token: Prepend a learned class token (token 0).
        qkv_bias: Bias in the qkv projections.
        block_variant: One variant for every global block, or one per block.
        window_block_variant: Variant of the windowed blocks (defaults to
            ``block_variant``); query-key and full variants need global attention.
        window_size: Window (wh, ww) of the windowed blocks.
        window_block_indices: Which blocks use windowed attention.
        relative_embedding_size: Stored relative-position size of global blocks
            (None: no relative position anywhere).
        pool_size: Key/value pooling of global blocks.
        matmul_2_cast: ``"float16"``/``"bfloat16"`` ``A @ V`` in global blocks.
        gate_before_ln: Gates before the LayerNorms (ablation).
        stgt: STGT gates instead of token gates (baseline).
        policy: Token selection policy for every gate.
        drop_path_rate: Stochastic depth, increasing linearly to this rate.
        final_norm: Apply a final LayerNorm.
        dtype: Precision of the weights and activations (``"float32"``,
            ``"bfloat16"``, ``"float16"``; inference): inputs are cast to it
            and outputs come in it. Matrix products accumulate in float32, and
            the full block keeps its softmax normalisers in float32.

    Shapes: patch tokens (B, h * w, D) -> (B, [1 +] h * w, D).
    """

    def __init__(
        self,
        dim: int = 768,
        depth: int = 12,
        heads: int = 12,
        input_size: int | tuple[int, int] = 14,
        mlp_ratio: float = 4.0,
        position_encoding_size: int | tuple[int, int] | None = None,
        class_token: bool = False,
        qkv_bias: bool = True,
        block_variant: BlockVariant | Sequence[BlockVariant] = "dense",
        window_block_variant: BlockVariant | None = None,
        window_size: int | tuple[int, int] | None = None,
        window_block_indices: Sequence[int] = (),
        relative_embedding_size: int | tuple[int, int] | None = None,
        pool_size: int | tuple[int, int] | None = None,
        matmul_2_cast: str | None = None,
        gate_before_ln: bool = False,
        stgt: bool = False,
        policy: TokenPolicy | None = None,
        drop_path_rate: float = 0.0,
        final_norm: bool = False,
        dtype: str | torch.dtype | None = None,
    ) -> None:
        super().__init__()
        compute_dtype = resolve_dtype(dtype)
        self.dim = dim
        self.input_size = to_pair(input_size)
        self.num_prefix_tokens = int(class_token)
        self.num_tokens = self.num_prefix_tokens + self.input_size[0] * self.input_size[1]
        window_block_indices = tuple(window_block_indices)
        if window_block_indices and window_size is None:
            raise ValueError("window_block_indices is set but window_size is None")
        if any(not 0 <= i < depth for i in window_block_indices):
            raise ValueError(
                f"window_block_indices {window_block_indices} out of range for depth={depth}"
            )
        if isinstance(block_variant, str):
            variants = [block_variant] * depth
        else:
            variants = list(block_variant)
            if len(variants) != depth:
                raise ValueError(
                    f"block_variant lists {len(variants)} variants for depth={depth}; "
                    f"give one variant per block ({depth}) or one name for all blocks"
                )
        if window_block_variant is not None:
            variants = [
                window_block_variant if i in window_block_indices else v
                for i, v in enumerate(variants)
            ]
        for v in variants:
            if v not in BLOCK_VARIANTS:
                raise ValueError(
                    f"unknown block variant {v!r} in block_variant; choose one of "
                    f"{sorted(BLOCK_VARIANTS)}"
                )
        if policy is not None:
            policy.validate(self.num_tokens)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim)) if class_token else None
        if self.class_token is not None:
            nn.init.trunc_normal_(self.class_token, std=0.02)
        self.position_encoding = PositionEncoding(
            dim,
            to_pair(position_encoding_size) or self.input_size,
            self.input_size,
            self.num_prefix_tokens,
        )
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        blocks = []
        for i, variant in enumerate(variants):
            windowed = i in window_block_indices
            kwargs = dict(
                input_size=self.input_size,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop_path_rate=rates[i],
                policy=policy,
                gate_before_ln=gate_before_ln,
                stgt=stgt,
            )
            if self.num_prefix_tokens and (
                windowed or relative_embedding_size is not None or pool_size is not None
            ):
                raise ValueError(
                    "class_token cannot be combined with windows, relative position or pooling"
                )
            if windowed:
                kwargs["window_size"] = window_size
                if relative_embedding_size is not None:
                    kwargs["relative_embedding_size"] = window_size
            else:
                kwargs["relative_embedding_size"] = relative_embedding_size
                kwargs["pool_size"] = pool_size
                kwargs["matmul_2_cast"] = matmul_2_cast
            blocks.append(build_block(variant, dim, heads, **kwargs))
        self.blocks = nn.ModuleList(blocks)
        if policy is not None:
            # Per-gate policies (calibrated thresholds) hand each gate its own.
            set_policy(self, policy)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS) if final_norm else None
        if compute_dtype != torch.float32:
            self.to(compute_dtype)

    @property
    def variants(self) -> list[str]:
        """The variant of each block."""
        return [block.variant for block in self.blocks]

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the blocks compute in: that of their weights (inputs are cast to it)."""
        for param in self.blocks.parameters():
            return param.dtype
        return torch.float32

    def reset(self) -> None:
        """Resets all stream state: the next frame is a flush."""
        reset_stream_state(self)

    def set_policy(self, policy: TokenPolicy | None) -> None:
        """Sets the token-selection policy of every gate (validated against N)."""
        if policy is not None:
            policy.validate(self.num_tokens)
        set_policy(self, policy)

    def forward(self, x: Tensor) -> Tensor:
        expected = self.input_size[0] * self.input_size[1]
        if x.ndim != 3 or x.shape[1] != expected or x.shape[2] != self.dim:
            raise ValueError(
                f"ViTBackbone expects patch tokens (B, {expected}, {self.dim}) for "
                f"input_size={self.input_size}, got {tuple(x.shape)}"
            )
        dtype = self.compute_dtype
        if x.dtype != dtype and x.is_floating_point():
            x = x.to(dtype)
        if self.class_token is not None:
            x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.position_encoding(x)  # a new tensor, which the blocks update in place
        block: Block
        for block in self.blocks:
            x = block(x, owns_input=True)
        if self.norm is not None:
            x = self.norm(x)
        return x
