"""Eventful image/video-frame classifiers converted from timm Vision Transformers.

Any standard timm ViT (``vit_tiny/small/base/large_patch16_224`` and kin:
class token or average pooling, position embedding with or without a class
slot) becomes an :class:`EventfulViT` with the same weights, whose dense
forward equals timm's (tested)::

    import timm
    net = timm.create_model("vit_base_patch16_224")   # or your own weights
    model = from_timm(net, block_variant="full", policy=TopRPolicy(64)).eval()
    model.reset()
    for frame in video:                                # frame (B, 3, 224, 224), normalised
        logits = model(frame)                          # (B, classes)

Features timm ViTs can have but these blocks do not (LayerScale, q/k norms,
register tokens, a pre-norm, attention pooling, other activations or
LayerNorm eps) are refused with an error naming the option.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from eventful_pl.backbone import ViTBackbone
from eventful_pl.blocks import LN_EPS, BlockVariant
from eventful_pl.checkpoints import RenameRule, load_converted, read_checkpoint, rename_keys
from eventful_pl.policies import TokenPolicy
from eventful_pl.weights import resolve_weights


class PatchEmbedding(nn.Module):
    """Non-overlapping patches to tokens with a Conv2d (kernel = stride = patch).

    Shapes: (B, C, H, W) -> (B, (H / p) * (W / p), D).
    """

    def __init__(self, in_channels: int, dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class EventfulViT(nn.Module):
    """A ViT classifier (timm's ``VisionTransformer`` layout) with eventful blocks.

    Args:
        image_size: Input size (square).
        patch_size: Patch size p.
        in_channels: Image channels.
        num_classes: Classifier outputs (0: no head, features only).
        dim: Token channels D.
        depth: Blocks.
        heads: Attention heads.
        mlp_ratio: MLP hidden size / D.
        qkv_bias: Bias in the qkv projections.
        class_token: Prepend a class token.
        global_pool: ``"token"`` (class token after the final norm) or
            ``"avg"`` (mean of the patch tokens, then a LayerNorm).
        block_variant: ``"dense"``, ``"tokenwise"``, ``"query_key"`` or ``"full"``.
        policy: Token-selection policy of the gates.
        matmul_2_cast: ``"float16"``/``"bfloat16"`` ``A @ V``.

    Shapes: images (B, C, H, W), normalised -> logits (B, classes).
    """

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        in_channels: int = 3,
        num_classes: int = 1000,
        dim: int = 768,
        depth: int = 12,
        heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        class_token: bool = True,
        global_pool: str = "token",
        block_variant: BlockVariant = "dense",
        policy: TokenPolicy | None = None,
        matmul_2_cast: str | None = None,
    ) -> None:
        super().__init__()
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        if image_size % patch_size:
            raise ValueError(
                f"image_size={image_size} must be a multiple of patch_size={patch_size}"
            )
        self.config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.global_pool = global_pool
        self.embedding = PatchEmbedding(in_channels, dim, patch_size)
        self.backbone = ViTBackbone(
            dim=dim,
            depth=depth,
            heads=heads,
            input_size=image_size // patch_size,
            mlp_ratio=mlp_ratio,
            class_token=class_token,
            qkv_bias=qkv_bias,
            block_variant=block_variant,
            matmul_2_cast=matmul_2_cast,
            policy=policy,
            final_norm=global_pool == "token",
        )
        self.fc_norm = nn.LayerNorm(dim, eps=LN_EPS) if global_pool == "avg" else None
        self.head = nn.Linear(dim, num_classes) if num_classes else None

    def reset(self) -> None:
        """Starts new streams: the next frame is a flush."""
        self.backbone.reset()

    def set_policy(self, policy: TokenPolicy | None) -> None:
        """Sets the token-selection policy of every gate."""
        self.backbone.set_policy(policy)

    def forward_features(self, images: Tensor) -> Tensor:
        """Images (B, C, H, W) -> tokens (B, [1 +] h * w, D)."""
        return self.backbone(self.embedding(images))

    def forward(self, images: Tensor) -> Tensor:
        x = self.forward_features(images)
        if self.global_pool == "token":
            x = x[:, 0]
        else:
            x = self.fc_norm(x[:, self.backbone.num_prefix_tokens :].mean(dim=1))
        return x if self.head is None else self.head(x)


TIMM_RULES: list[RenameRule] = [
    (r"^patch_embed\.proj\.", "embedding.proj."),
    (r"^cls_token$", "backbone.class_token"),
    (r"^pos_embed$", "backbone.position_encoding.encoding"),
    (r"^blocks\.(\d+)\.norm1\.", r"backbone.blocks.\1.norm1."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"backbone.blocks.\1.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"backbone.blocks.\1.proj."),
    (r"^blocks\.(\d+)\.norm2\.", r"backbone.blocks.\1.norm2."),
    (r"^blocks\.(\d+)\.mlp\.fc1\.", r"backbone.blocks.\1.fc1."),
    (r"^blocks\.(\d+)\.mlp\.fc2\.", r"backbone.blocks.\1.fc2."),
    (r"^norm\.", "backbone.norm."),
    (r"^fc_norm\.", "fc_norm."),
    (r"^head\.", "head."),
]


def _timm_config(net: nn.Module) -> dict[str, Any]:
    """EventfulViT arguments of a timm ``VisionTransformer``; refuses what the blocks lack."""
    unsupported = []
    if getattr(net, "reg_token", None) is not None:
        unsupported.append("register tokens (reg_tokens)")
    if getattr(net, "attn_pool", None) is not None:
        unsupported.append("attention pooling (global_pool='map')")
    if not isinstance(getattr(net, "norm_pre", nn.Identity()), nn.Identity):
        unsupported.append("a pre-norm (pre_norm=True)")
    if net.global_pool not in ("token", "avg"):
        unsupported.append(f"global_pool={net.global_pool!r}")
    if getattr(net, "pos_embed", None) is None:
        unsupported.append("no position embedding (pos_embed_type='none')")
    block = net.blocks[0]
    if not isinstance(block.ls1, nn.Identity) or not isinstance(block.ls2, nn.Identity):
        unsupported.append("LayerScale (init_values)")
    if not isinstance(block.attn.q_norm, nn.Identity):
        unsupported.append("q/k normalisation (qk_norm)")
    if not isinstance(block.mlp.act, nn.GELU) or block.mlp.act.approximate != "none":
        unsupported.append(f"MLP activation {block.mlp.act!r} (exact nn.GELU only)")
    if getattr(block.mlp, "norm", None) is not None and not isinstance(block.mlp.norm, nn.Identity):
        unsupported.append("a norm inside the MLP (scale_mlp_norm)")
    if not isinstance(block.norm1, nn.LayerNorm) or block.norm1.eps != LN_EPS:
        unsupported.append(f"block norm {block.norm1!r} (LayerNorm eps {LN_EPS} only)")
    if unsupported:
        raise ValueError(
            f"cannot convert timm model {type(net).__name__}: unsupported " + "; ".join(unsupported)
        )
    image_size = net.patch_embed.img_size
    patch_size = net.patch_embed.patch_size
    if image_size[0] != image_size[1] or patch_size[0] != patch_size[1]:
        raise ValueError(f"timm model: only square images/patches, got {image_size}/{patch_size}")
    dim = net.embed_dim
    return dict(
        image_size=image_size[0],
        patch_size=patch_size[0],
        in_channels=net.patch_embed.proj.in_channels,
        num_classes=net.num_classes,
        dim=dim,
        depth=len(net.blocks),
        heads=block.attn.num_heads,
        mlp_ratio=block.mlp.fc1.out_features / dim,
        qkv_bias=block.attn.qkv.bias is not None,
        class_token=net.cls_token is not None,
        global_pool=net.global_pool,
    )


def convert_timm_state_dict(
    state_dict: Mapping[str, Tensor], class_token: bool = True
) -> tuple[dict[str, Tensor], list[str]]:
    """timm ViT keys -> EventfulViT keys; returns (state dict, unmatched keys).

    A position embedding without a class slot (timm's ``no_embed_class``) gets
    a zero slot for the class token, which is the same computation.
    """
    renamed, unmatched = rename_keys(state_dict, TIMM_RULES)
    key = "backbone.position_encoding.encoding"
    if class_token and key in renamed:
        grid = renamed[key].shape[1]
        if int(round(grid**0.5)) ** 2 == grid:  # no class slot stored
            renamed[key] = torch.cat(
                [renamed[key].new_zeros(1, 1, renamed[key].shape[2]), renamed[key]], 1
            )
    return renamed, unmatched


def load_timm_vit(
    model: EventfulViT,
    source: str | os.PathLike | Mapping[str, Tensor],
    trusted: bool = False,
) -> None:
    """Loads a timm ViT state dict (file, URL or mapping) into ``model``.

    ``trusted``: see :func:`~eventful_pl.checkpoints.read_checkpoint`.
    """
    name = "(state dict)"
    if not isinstance(source, Mapping):
        name, source = str(source), read_checkpoint(resolve_weights(source), trusted)
    renamed, unmatched = convert_timm_state_dict(
        source, class_token=model.backbone.class_token is not None
    )
    load_converted(model, renamed, f"{name} (timm layout)", unmatched)


def from_timm(
    net: nn.Module,
    block_variant: BlockVariant = "dense",
    policy: TokenPolicy | None = None,
    matmul_2_cast: str | None = None,
) -> EventfulViT:
    """An :class:`EventfulViT` with the architecture and weights of the timm ViT ``net``."""
    model = EventfulViT(
        **_timm_config(net),
        block_variant=block_variant,
        policy=policy,
        matmul_2_cast=matmul_2_cast,
    )
    load_timm_vit(model, net.state_dict())
    return model
