"""Migration door from the original eventful-transformer code.

:func:`reference_block` builds one of our blocks from the original class name,
keyword arguments, policy spec and state-dict layout, and wraps it so that a
stream is driven frame by frame with per-call operation counts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from eventful_pl.blocks import Block, build_block
from eventful_pl.counting import OpCounter, attach_counter
from eventful_pl.policies import (
    ThresholdPolicy,
    TokenPolicy,
    TopFractionPolicy,
    TopRPolicy,
)
from eventful_pl.state import reset_stream_state

ORIGINAL_BLOCK_CLASSES: dict[str, str] = {
    "Block": "dense",
    "EventfulTokenwiseBlock": "tokenwise",
    "EventfulMatmul1Block": "query_key",
    "EventfulBlock": "full",
}

# Original parameter-name prefixes -> ours.
ORIGINAL_BLOCK_KEYS: dict[str, str] = {
    "input_layer_norm.": "norm1.",
    "qkv.": "qkv.",
    "projection.": "proj.",
    "mlp_layer_norm.": "norm2.",
    "mlp_1.": "fc1.",
    "mlp_2.": "fc2.",
    "relative_position.y_embedding": "rel_pos.height",
    "relative_position.x_embedding": "rel_pos.width",
}

_ORIGINAL_KWARGS = {
    "dim",
    "heads",
    "input_size",
    "mlp_ratio",
    "ats_fraction",
    "drop_path_rate",
    "relative_embedding_size",
    "matmul_2_cast",
    "pool_size",
    "window_size",
    "gate_before_ln",
    "stgt",
}


def policy_from_spec(spec: tuple[str, Mapping[str, Any]] | None) -> TokenPolicy | None:
    """``("TokenNormTopK", {"k": r})`` and kin -> our policy object."""
    if spec is None:
        return None
    name, kwargs = spec
    kwargs = dict(kwargs)
    if kwargs.pop("order", 2) != 2:
        raise ValueError(f"policy {name}: only the L2 norm (order=2) is supported")
    kwargs.pop("save_status", None)
    if name == "TokenNormTopK":
        return TopRPolicy(int(kwargs["k"]))
    if name == "TokenNormThreshold":
        return ThresholdPolicy(float(kwargs.get("threshold", 0.0)))
    if name == "TokenNormTopFraction":
        return TopFractionPolicy(float(kwargs["fraction"]))
    raise ValueError(
        f"unknown policy {name!r}; expected TokenNormTopK, TokenNormThreshold or "
        "TokenNormTopFraction"
    )


def convert_block_state_dict(
    state_dict: Mapping[str, Tensor], prefix: str = ""
) -> dict[str, Tensor]:
    """Renames one original block's parameters (under ``prefix``) to ours."""
    out = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        for old, new in ORIGINAL_BLOCK_KEYS.items():
            if name.startswith(old):
                name = new + name[len(old) :]
                break
        out[name] = value
    return out


def block_kwargs_from_original(block_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The original block keyword arguments -> ours (same meaning)."""
    unknown = set(block_kwargs) - _ORIGINAL_KWARGS
    if unknown:
        raise ValueError(f"unknown original block arguments: {sorted(unknown)}")
    kwargs = dict(block_kwargs)
    # The original uses the window size as the stored relative-position size
    # in windowed blocks.
    if kwargs.get("window_size") is not None and kwargs.get("relative_embedding_size") is not None:
        kwargs["relative_embedding_size"] = kwargs["window_size"]
    return kwargs


class ReferenceBlock(nn.Module):
    """One block driven as a stream: ``reset()``, ``forward(frame)``, ``last_counts()``.

    Shapes: frame (B, N, D) -> (B, N, D).
    """

    def __init__(self, block: Block) -> None:
        super().__init__()
        self.block = block
        self.counter = OpCounter()
        attach_counter(block, self.counter)

    def reset(self) -> None:
        """Starts a new stream: the next call is a flush."""
        reset_stream_state(self.block)

    def forward(self, x: Tensor) -> Tensor:
        self.counter.reset()
        return self.block(x)

    def last_counts(self) -> dict[str, int]:
        """Operations counted on the last call, keyed like the golden files."""
        return self.counter.as_flops_dict()


def reference_block(
    block_class: str,
    block_kwargs: Mapping[str, Any],
    policy: tuple[str, Mapping[str, Any]] | None,
    state_dict: Mapping[str, Tensor] | None = None,
) -> ReferenceBlock:
    """Builds our block from the original code's names.

    Args:
        block_class: ``Block``, ``EventfulTokenwiseBlock``,
            ``EventfulMatmul1Block`` or ``EventfulBlock``.
        block_kwargs: The original constructor arguments.
        policy: ``("TokenNormTopK", {"k": r})``, ``("TokenNormThreshold",
            {"threshold": h})``, ``("TokenNormTopFraction", {"fraction": f})``
            or None.
        state_dict: Weights in the original layout (``input_layer_norm.*``,
            ``qkv.*``, ``projection.*``, ...).
    """
    if block_class not in ORIGINAL_BLOCK_CLASSES:
        raise ValueError(
            f"unknown block_class {block_class!r}; expected one of {sorted(ORIGINAL_BLOCK_CLASSES)}"
        )
    kwargs = block_kwargs_from_original(block_kwargs)
    variant = ORIGINAL_BLOCK_CLASSES[block_class]
    dim, heads = kwargs.pop("dim"), kwargs.pop("heads")
    block = build_block(variant, dim, heads, policy=policy_from_spec(policy), **kwargs)
    if state_dict is not None:
        converted = convert_block_state_dict(state_dict)
        result = block.load_state_dict(converted, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"state_dict does not fit {block_class}: missing keys "
                f"{result.missing_keys}, unexpected keys {result.unexpected_keys}"
            )
    block.eval()
    return ReferenceBlock(block)
