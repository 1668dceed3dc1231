"""Checkpoints for :class:`~eventful_pl.models.vivit.FactorizedViViT`.

- TAdaConv "ViViT Fact. Enc." (Kinetics-400, EPIC-Kitchens): ``backbone.stem.conv1``,
  ``backbone.cls_token``, ``backbone.pos_embd``, ``backbone.layers.N.*``,
  ``backbone.norm``, ``backbone.cls_token_out``, ``backbone.temp_embd``,
  ``backbone.layers_temporal.N.*``, ``backbone.norm_out``, ``head.linear``
  (EPIC: ``head.linear1`` verbs, ``head.linear2`` nouns, dropped).
- The original eventful-transformer code's own layout (``embedding.conv``,
  ``spatial_model.backbone.blocks.N.{input_layer_norm, qkv, projection,
  mlp_layer_norm, mlp_1, mlp_2}``, ``spatial_model.layer_norm``,
  ``temporal_model.*``, ``classifier``), including its fine-tuned temporal
  weights (a file holding only ``temporal_model.*`` and ``classifier.*`` loads
  into the temporal half with ``temporal_only=True``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from torch import Tensor

from eventful_pl.checkpoints import RenameRule, load_converted, read_checkpoint, rename_keys
from eventful_pl.models.vivit import FactorizedViViT
from eventful_pl.weights import resolve_weights

_TADA_BLOCK = {
    r"norm\.": "norm1.",
    r"attn\.to_qkv\.": "qkv.",
    r"attn\.proj\.": "proj.",
    r"norm_ffn\.": "norm2.",
    r"ffn\.net\.0\.": "fc1.",
    r"ffn\.net\.3\.": "fc2.",
}

TADACONV_RULES: list[RenameRule] = [
    (r"^backbone\.stem\.conv1\.", "embedding.conv."),
    (r"^backbone\.cls_token$", "spatial.class_token"),
    (r"^backbone\.pos_embd$", "spatial.position_encoding.encoding"),
    *[
        (rf"^backbone\.layers\.(\d+)\.{k}", rf"spatial.blocks.\1.{v}")
        for k, v in _TADA_BLOCK.items()
    ],
    (r"^backbone\.norm\.", "spatial.norm."),
    (r"^backbone\.cls_token_out$", "temporal.class_token"),
    (r"^backbone\.temp_embd$", "temporal.position_encoding.encoding"),
    *[
        (rf"^backbone\.layers_temporal\.(\d+)\.{k}", rf"temporal.blocks.\1.{v}")
        for k, v in _TADA_BLOCK.items()
    ],
    (r"^backbone\.norm_out\.", "temporal.norm."),
    (r"^head\.linear1?\.", "classifier."),
    (r"^head\.linear2\.", None),  # EPIC-Kitchens noun head: not used
]

_ORIGINAL_BLOCK = {
    r"input_layer_norm\.": "norm1.",
    r"qkv\.": "qkv.",
    r"projection\.": "proj.",
    r"mlp_layer_norm\.": "norm2.",
    r"mlp_1\.": "fc1.",
    r"mlp_2\.": "fc2.",
}

ORIGINAL_RULES: list[RenameRule] = [
    (r"^embedding\.conv\.", "embedding.conv."),
    *[
        (rf"^(spatial|temporal)_model\.backbone\.blocks\.(\d+)\.{k}", rf"\1.blocks.\2.{v}")
        for k, v in _ORIGINAL_BLOCK.items()
    ],
    (r"^(spatial|temporal)_model\.class_token$", r"\1.class_token"),
    (
        r"^(spatial|temporal)_model\.backbone\.position_encoding\.encoding$",
        r"\1.position_encoding.encoding",
    ),
    (r"^(spatial|temporal)_model\.layer_norm\.", r"\1.norm."),
    (r"^classifier\.", "classifier."),
]


def _strip_prefix(state_dict: Mapping[str, Tensor], prefix: str = "module.") -> dict[str, Tensor]:
    return {k.removeprefix(prefix): v for k, v in state_dict.items()}


def _state_dict(
    source: str | os.PathLike | Mapping[str, Tensor], trusted: bool = False
) -> tuple[dict, str]:
    if isinstance(source, Mapping):
        return _strip_prefix(source), "(state dict)"
    return _strip_prefix(read_checkpoint(resolve_weights(source), trusted)), str(source)


def _load(model, source, rules, fmt: str, temporal_only: bool, trusted: bool = False) -> None:
    state_dict, name = _state_dict(source, trusted)
    renamed, unmatched = rename_keys(state_dict, rules)
    # Class tokens: (1, 1, D) in every layout; TAdaConv may store (1, D).
    for key in ("spatial.class_token", "temporal.class_token"):
        if key in renamed and renamed[key].ndim == 2:
            renamed[key] = renamed[key].unsqueeze(0)
    allow = [r"^(embedding|spatial)\."] if temporal_only else []
    load_converted(model, renamed, f"{name} ({fmt} layout)", unmatched, allow_missing=allow)


def load_tadaconv_vivit(
    model: FactorizedViViT,
    source: str | os.PathLike | Mapping[str, Tensor],
    trusted: bool = False,
) -> None:
    """Loads a TAdaConv ViViT Fact. Enc. checkpoint (file or state dict) into ``model``.

    ``trusted``: see :func:`~eventful_pl.checkpoints.read_checkpoint`.
    """
    _load(model, source, TADACONV_RULES, "TAdaConv", temporal_only=False, trusted=trusted)


def load_original_vivit(
    model: FactorizedViViT,
    source: str | os.PathLike | Mapping[str, Tensor],
    temporal_only: bool = False,
    trusted: bool = False,
) -> None:
    """Loads a checkpoint saved by the original eventful-transformer code.

    ``temporal_only``: the file holds only the fine-tuned temporal model and
    classifier; the spatial half is left as it is. ``trusted``: see
    :func:`~eventful_pl.checkpoints.read_checkpoint`.
    """
    _load(model, source, ORIGINAL_RULES, "eventful-transformer", temporal_only, trusted)


def load_vivit_checkpoint(
    model: FactorizedViViT,
    source: str | os.PathLike | Mapping[str, Tensor],
    trusted: bool = False,
) -> str:
    """Detects the layout (TAdaConv, original eventful-transformer, or ours) and
    loads it. Returns the layout name.

    ``trusted``: see :func:`~eventful_pl.checkpoints.read_checkpoint`.
    """
    state_dict, name = _state_dict(source, trusted)
    if any(k.startswith("backbone.") for k in state_dict):
        load_tadaconv_vivit(model, state_dict)
        return "tadaconv"
    if any(k.startswith(("spatial_model.", "temporal_model.")) for k in state_dict):
        spatial = any(k.startswith("spatial_model.") for k in state_dict)
        load_original_vivit(model, state_dict, temporal_only=not spatial)
        return "eventful-transformer"
    state_dict = {k.removeprefix("model."): v for k, v in state_dict.items()}
    load_converted(model, state_dict, f"{name} (eventful-pl layout)")
    return "eventful-pl"
