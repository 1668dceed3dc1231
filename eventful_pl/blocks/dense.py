"""The dense ViT block (:class:`Block`, variant ``"dense"``) and its helpers.

Every eventful variant derives from :class:`Block`: it owns the layers (and so
the state-dict layout), the counted primitives (:meth:`Block.linear`,
:meth:`Block.add`, :meth:`Block.matmul`) and dense attention with windows,
padding, relative position, key/value pooling, half-precision ``A @ V`` and
adaptive token sampling.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module

from eventful_pl.attention import (
    merge_heads,
    pool_grid,
    split_heads,
    window_partition,
    window_unpartition,
)
from eventful_pl.counting import Counted
from eventful_pl.indexing import expand_row_index, gather_tokens
from eventful_pl.linear import linear
from eventful_pl.position import RelativePosition

LN_EPS = 1e-6
MATMUL_2_CASTS = {None: None, "float16": torch.float16, "bfloat16": torch.bfloat16}
BlockVariant = Literal["dense", "tokenwise", "query_key", "full"]


def to_pair(value: int | tuple[int, int] | list[int] | None) -> tuple[int, int] | None:
    """int -> (int, int); sequences -> tuple of ints; None stays None.

    Not timm's ``to_2tuple``, which maps None to ``(None, None)`` and keeps
    sequence items as they are (``(14.0, 14.0)`` from a config stays float):
    sizes here are optional and must be ints.
    """
    if value is None:
        return None
    if isinstance(value, int):
        return (value, value)
    return (int(value[0]), int(value[1]))


def drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth: timm's ``drop_path`` (drops whole samples of a
    residual branch in training, rescaling the kept ones by ``1 / (1 - rate)``).

    ``x`` itself when ``rate`` is 0 or not ``training``, without importing
    timm (which imports torchvision: seconds); timm is imported on the first
    call that drops.
    """
    if rate == 0.0 or not training:
        return x
    from timm.layers import drop_path as timm_drop_path

    return timm_drop_path(x, rate, training)


def _global_module_hooks() -> bool:
    """Whether any global module hook (``nn.modules.module.register_module_*_hook``) is set."""
    return bool(
        _module._global_forward_hooks
        or _module._global_forward_pre_hooks
        or _module._global_backward_hooks
        or _module._global_backward_pre_hooks
    )


def is_plain_linear(layer: nn.Module) -> bool:
    """Whether ``layer`` is exactly ``nn.Linear`` with no hook on it (nor any
    global module hook): then ``layer(x)`` is ``F.linear(x, weight, bias)``
    and :meth:`Block.linear` may read the weights directly. Subclasses
    (LoRA, quantised, parametrized layers) and hooked layers are called as
    modules instead."""
    return (
        type(layer) is nn.Linear
        and not (
            layer._forward_hooks
            or layer._forward_pre_hooks
            or layer._backward_hooks
            or layer._backward_pre_hooks
        )
        and not _global_module_hooks()
    )


_SCALE_DEPRECATION = (
    "Block.scale is deprecated: it is sqrt(head_dim), which the queries are divided by "
    "(timm's Attention.scale is the multiplier head_dim ** -0.5); use Block.sqrt_head_dim"
)


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

    Attributes:
        sqrt_head_dim: ``sqrt(D / heads)``; the queries are divided by it
            (``scale`` is its deprecated name).

    Linear layers (``qkv``, ``proj``, ``fc1``, ``fc2``) may be replaced by any
    module or hooked: see :meth:`linear`.

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
            raise ValueError(
                f"heads={heads} must divide dim={dim}; choose a head count that divides "
                "the embedding width"
            )
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
                    f"input_size={self.input_size}; use a window no larger than the grid "
                    "(or global attention: window_size=None)"
                )
            if any(w <= 0 for w in self.window_size):
                raise ValueError(f"window_size must be positive, got {self.window_size}")
        self.attention_size = self.window_size or self.input_size
        if self.pool_size is not None and any(
            a % p for a, p in zip(self.attention_size, self.pool_size)
        ):
            raise ValueError(
                f"pool_size={self.pool_size} must divide the attention size "
                f"{self.attention_size}; choose a pool size that divides each side"
            )
        if ats_fraction is not None:
            if not 0.0 <= ats_fraction <= 1.0:
                raise ValueError(f"ats_fraction must lie in [0, 1], got {ats_fraction!r}")
            if self.window_size is not None or self.pool_size is not None:
                raise ValueError("ats_fraction cannot be combined with window_size or pool_size")
        self.ats_fraction = ats_fraction
        # Queries are divided by this (timm's Attention.scale is the inverse).
        self.sqrt_head_dim = math.sqrt(dim // heads)

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

    @property
    def scale(self) -> float:
        """Deprecated: ``sqrt(head_dim)``, which the queries are divided by (not
        timm's ``Attention.scale``, the multiplier ``head_dim ** -0.5``). Use
        :attr:`sqrt_head_dim`."""
        warnings.warn(_SCALE_DEPRECATION, DeprecationWarning, stacklevel=2)
        return self.sqrt_head_dim

    @scale.setter
    def scale(self, value: float) -> None:
        warnings.warn(_SCALE_DEPRECATION, DeprecationWarning, stacklevel=2)
        self.sqrt_head_dim = value

    # Counted primitives.
    def linear(self, layer: nn.Module, x: Tensor, gelu: bool = False) -> Tensor:
        """``layer(x)`` (then exact GELU if ``gelu``), counting ``in-elements x
        out-features`` plus the bias (GELU is not counted, as in docs/counting.md).

        A plain ``nn.Linear`` (see :func:`is_plain_linear`) runs from its
        weights through :func:`eventful_pl.linear.linear` (pre-packed oneDNN
        weights, fused GELU). Any other layer, an ``nn.Linear`` subclass (LoRA,
        quantised, parametrized) or one with hooks, is called as a module, so
        its ``forward`` and hooks apply; its count uses the output's features
        and its ``bias`` attribute, if a tensor.
        """
        if is_plain_linear(layer):
            out = linear(x, layer.weight, layer.bias, gelu=gelu)
            self.count("linear", x.numel() * layer.out_features)
            if layer.bias is not None:
                self.count("bias", out.numel())
            return out
        out = layer(x)
        self.count("linear", x.numel() * out.shape[-1])
        if isinstance(getattr(layer, "bias", None), Tensor):
            self.count("bias", out.numel())
        return F.gelu(out) if gelu else out

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
            bias = getattr(self.qkv, "bias", None)  # a plain layer's qkv of a zero token
            if padded and isinstance(bias, Tensor):
                pad_value = bias
                self.count("bias", bias.numel())
            qkv = window_partition(qkv, self.input_size, self.window_size, pad_value)
        q, k, v = self.split_qkv(qkv)
        kept = None
        if self.ats_fraction is not None or self.cast_dtype is not None:
            logits = self.matmul(q / self.sqrt_head_dim, k.transpose(-2, -1))
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
