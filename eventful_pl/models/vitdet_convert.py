"""Checkpoints for :class:`~eventful_pl.models.vitdet.ViTDet`.

- detectron2 ViTDet-B (``.pkl`` pickled numpy as the model zoo publishes, or
  ``.pth``; COCO with 80 classes or VID with 30): ``backbone.net.*``,
  ``backbone.simfp_{2,3,4,5}.*``, ``proposal_generator.rpn_head.*``,
  ``roi_heads.box_head.*``, ``roi_heads.box_predictor.*``. The absolute position
  embedding's class-token slot is dropped, the box predictor's background class
  moves from last (detectron2) to first (torchvision) and gets zero box deltas,
  and the mask head of COCO Mask R-CNN files is ignored. The RPN head's
  ``conv.conv{k}`` (ViTDet's two convs) or plain ``conv`` (one) map to
  torchvision's ``conv.{k}.0``.
- The original eventful-transformer code's layout (``embedding.conv``,
  ``backbone.blocks.N.{input_layer_norm, qkv, relative_position.{y,x}_embedding,
  projection, mlp_layer_norm, mlp_1, mlp_2}``, ``pyramid.stages.*`` and the
  detectron2 head names).
- Ours (a :class:`ViTDet` state dict, or a Lightning checkpoint of a module
  holding one as ``model``).

The head a checkpoint defines (RPN convs, box-head convs and fcs, classes) is
read from its keys and shapes (:func:`checkpoint_head_options`): a model built
with another head gets an error naming the options to set, and
:func:`create_vitdet_from_checkpoint` builds a preset with the checkpoint's head.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from eventful_pl.checkpoints import (
    CheckpointMismatchError,
    RenameRule,
    load_converted,
    read_checkpoint,
    rename_keys,
)
from eventful_pl.models.vitdet import ViTDet, create_vitdet
from eventful_pl.weights import resolve_weights

# Feature pyramid: detectron2 ``simfp_{2,3,4,5}.{i}[.norm]`` -> our stage layer index.
_PYRAMID = {
    "2": {"0": "0", "1": "1", "3": "3", "4": "4", "4.norm": "5", "5": "6", "5.norm": "7"},
    "3": {"0": "0", "1": "1", "1.norm": "2", "2": "3", "2.norm": "4"},
    "4": {"0": "0", "0.norm": "1", "1": "2", "1.norm": "3"},
    "5": {"1": "1", "1.norm": "2", "2": "3", "2.norm": "4"},
}
_PYRAMID_RULES: list[RenameRule] = [
    (
        rf"^backbone\.simfp_{level}\.{re.escape(src)}\.(weight|bias)$",
        rf"pyramid.stages.{int(level) - 2}.{dst}.\1",
    )
    for level, layers in _PYRAMID.items()
    for src, dst in layers.items()
]

_BOX_HEAD = "head.roi_heads.box_head."
_HEAD_RULES: list[RenameRule] = [
    # detectron2's StandardRPNHead: ``conv.conv{k}`` with several convs
    # (ViTDet's conv_dims=[-1, -1]), plain ``conv`` with one.
    (r"^proposal_generator\.rpn_head\.conv\.conv(\d+)\.", r"head.rpn.head.conv.\1.0."),
    (r"^proposal_generator\.rpn_head\.conv\.(weight|bias)$", r"head.rpn.head.conv.0.0.\1"),
    (r"^proposal_generator\.rpn_head\.objectness_logits\.", "head.rpn.head.cls_logits."),
    (r"^proposal_generator\.rpn_head\.anchor_deltas\.", "head.rpn.head.bbox_pred."),
    *[
        (rf"^roi_heads\.box_head\.conv{i + 1}\.weight$", f"{_BOX_HEAD}convs.{3 * i}.weight")
        for i in range(8)
    ],
    *[
        (rf"^roi_heads\.box_head\.conv{i + 1}\.norm\.", f"{_BOX_HEAD}convs.{3 * i + 1}.")
        for i in range(8)
    ],
    *[(rf"^roi_heads\.box_head\.fc{i + 1}\.", f"{_BOX_HEAD}fcs.{2 * i}.") for i in range(4)],
    (r"^roi_heads\.box_predictor\.", "head.roi_heads.box_predictor."),
    (r"^roi_heads\.mask_head\.", None),  # COCO Mask R-CNN: no mask branch here
    (r"^pixel_(mean|std)$", None),  # our preprocessing holds these
]

_DETECTRON2_BLOCK = {
    r"norm1\.": "norm1.",
    r"attn\.qkv\.": "qkv.",
    r"attn\.rel_pos_h$": "rel_pos.height",
    r"attn\.rel_pos_w$": "rel_pos.width",
    r"attn\.proj\.": "proj.",
    r"norm2\.": "norm2.",
    r"mlp\.fc1\.": "fc1.",
    r"mlp\.fc2\.": "fc2.",
}

DETECTRON2_RULES: list[RenameRule] = [
    (r"^backbone\.net\.patch_embed\.proj\.", "embedding.proj."),
    (r"^backbone\.net\.pos_embed$", "backbone.position_encoding.encoding"),
    *[
        (rf"^backbone\.net\.blocks\.(\d+)\.{k}", rf"backbone.blocks.\1.{v}")
        for k, v in _DETECTRON2_BLOCK.items()
    ],
    *_PYRAMID_RULES,
    *_HEAD_RULES,
]

_ORIGINAL_BLOCK = {
    r"input_layer_norm\.": "norm1.",
    r"qkv\.": "qkv.",
    r"relative_position\.y_embedding$": "rel_pos.height",
    r"relative_position\.x_embedding$": "rel_pos.width",
    r"projection\.": "proj.",
    r"mlp_layer_norm\.": "norm2.",
    r"mlp_1\.": "fc1.",
    r"mlp_2\.": "fc2.",
}

ORIGINAL_RULES: list[RenameRule] = [
    (r"^embedding\.conv\.", "embedding.proj."),
    (r"^backbone\.position_encoding\.encoding$", "backbone.position_encoding.encoding"),
    *[
        (rf"^backbone\.blocks\.(\d+)\.{k}", rf"backbone.blocks.\1.{v}")
        for k, v in _ORIGINAL_BLOCK.items()
    ],
    (r"^pyramid\.stages\.", "pyramid.stages."),
    *_HEAD_RULES,
]

_PREDICTOR = "head.roi_heads.box_predictor."


def _background_first(state_dict: dict[str, Tensor]) -> None:
    """detectron2's predictor (background score last, no background deltas) ->
    torchvision's (background first, zero background deltas), in place."""
    for part in ("weight", "bias"):
        key = f"{_PREDICTOR}cls_score.{part}"
        if key in state_dict:
            scores = state_dict[key]
            state_dict[key] = torch.cat([scores[-1:], scores[:-1]])
        key = f"{_PREDICTOR}bbox_pred.{part}"
        if key in state_dict:
            deltas = state_dict[key]
            state_dict[key] = torch.cat([deltas.new_zeros((4, *deltas.shape[1:])), deltas])


def _drop_class_slot(state_dict: dict[str, Tensor], model: ViTDet) -> None:
    """Drops the class-token slot of a (1, 1 + h * w, D) position embedding."""
    key = "backbone.position_encoding.encoding"
    if key in state_dict:
        expected = model.backbone.position_encoding.encoding.shape[1]
        if state_dict[key].shape[1] == expected + 1:
            state_dict[key] = state_dict[key][:, 1:]


def _state_dict(
    source: str | os.PathLike | Mapping[str, Tensor], trusted: bool = False
) -> tuple[dict, str]:
    if isinstance(source, Mapping):
        return dict(source), "(state dict)"
    return read_checkpoint(resolve_weights(source), trusted), str(source)


#: ViTDet options that shape the detection head, as a checkpoint's keys define them.
HEAD_OPTIONS = ("rpn_conv_depth", "box_conv_dims", "box_fc_dims")

_RPN_CONV = [
    re.compile(r"^proposal_generator\.rpn_head\.conv\.conv(\d+)\.weight$"),  # several
    re.compile(r"^proposal_generator\.rpn_head\.conv\.()weight$"),  # one
    re.compile(r"^head\.rpn\.head\.conv\.(\d+)\.0\.weight$"),  # ours
]
_BOX_CONV = [
    re.compile(r"^roi_heads\.box_head\.conv(\d+)\.weight$"),
    re.compile(r"^head\.roi_heads\.box_head\.convs\.(\d+)\.weight$"),
]
_BOX_FC = [
    re.compile(r"^roi_heads\.box_head\.fc(\d+)\.weight$"),
    re.compile(r"^head\.roi_heads\.box_head\.fcs\.(\d+)\.weight$"),
]


def _indexed(state_dict: Mapping[str, Tensor], patterns: list[re.Pattern]) -> list[Tensor]:
    """Values of the keys matching ``patterns``, ordered by the captured index."""
    found: dict[int, Tensor] = {}
    for key, value in state_dict.items():
        for pattern in patterns:
            match = pattern.match(key)
            if match:
                found[int(match.group(1) or 0)] = value
                break
    return [found[i] for i in sorted(found)]


def checkpoint_head_options(state_dict: Mapping[str, Tensor]) -> dict[str, Any]:
    """The :class:`ViTDet` options a checkpoint's head keys define.

    Reads any of the three layouts (detectron2, original eventful-transformer,
    ours, with or without a Lightning ``model.`` prefix): ``rpn_conv_depth``
    (how many ``rpn_head.conv.conv{k}`` convs; 1 for a plain ``rpn_head.conv``),
    ``box_conv_dims`` (output channels of ``box_head.conv{k}``), ``box_fc_dims``
    (output features of ``box_head.fc{k}``) and ``num_classes`` (rows of
    ``cls_score`` minus background). Options whose keys are absent are left out.
    """
    state_dict = {k.removeprefix("model."): v for k, v in state_dict.items()}
    options: dict[str, Any] = {}
    rpn = _indexed(state_dict, _RPN_CONV)
    if rpn:
        options["rpn_conv_depth"] = len(rpn)
    convs = [v for v in _indexed(state_dict, _BOX_CONV) if v.ndim == 4]
    if convs:
        options["box_conv_dims"] = tuple(int(v.shape[0]) for v in convs)
    fcs = _indexed(state_dict, _BOX_FC)
    if fcs:
        options["box_fc_dims"] = tuple(int(v.shape[0]) for v in fcs)
    for key, value in state_dict.items():
        if key.endswith("box_predictor.cls_score.weight"):
            options["num_classes"] = int(value.shape[0]) - 1
            break
    return options


def _head_hint(model: ViTDet, state_dict: Mapping[str, Tensor]) -> str | None:
    """Names the head options where the checkpoint and the model differ, if any."""
    found = checkpoint_head_options(state_dict)
    own = {k: model.config[k] for k in HEAD_OPTIONS}
    own = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in own.items()}
    differ = [k for k in HEAD_OPTIONS if k in found and found[k] != own[k]]
    if not differ:
        return None
    theirs = ", ".join(f"{k}={found[k]!r}" for k in differ)
    ours = ", ".join(f"{k}={own[k]!r}" for k in differ)
    return (
        f"the checkpoint's head has {theirs} but the model {ours}: build the model with "
        f"{theirs} (ViTDet/create_vitdet options, model_kwargs of ViTDetModule), or use "
        "create_vitdet_from_checkpoint()"
    )


def _load_checked(
    model: ViTDet,
    renamed: dict[str, Tensor],
    source: str,
    unmatched: list[str],
    original: Mapping[str, Tensor],
) -> None:
    try:
        load_converted(model, renamed, source, unmatched)
    except CheckpointMismatchError as error:
        hint = _head_hint(model, original)
        if hint is None:
            raise
        raise CheckpointMismatchError(f"{error}\n  {hint}") from None


def _load(model: ViTDet, source, rules: list[RenameRule], fmt: str, trusted: bool = False) -> None:
    state_dict, name = _state_dict(source, trusted)
    renamed, unmatched = rename_keys(state_dict, rules)
    _drop_class_slot(renamed, model)
    _background_first(renamed)
    _load_checked(model, renamed, f"{name} ({fmt} layout)", unmatched, state_dict)


Source = str | os.PathLike | Mapping[str, Tensor]


def load_detectron2_vitdet(model: ViTDet, source: Source, trusted: bool = False) -> None:
    """Loads a detectron2 ViTDet checkpoint (``.pkl``/``.pth`` file or state dict).

    ``trusted``: see :func:`~eventful_pl.checkpoints.read_checkpoint`.
    """
    _load(model, source, DETECTRON2_RULES, "detectron2", trusted)


def load_original_vitdet(model: ViTDet, source: Source, trusted: bool = False) -> None:
    """Loads a ViTDet checkpoint saved by the original eventful-transformer code."""
    _load(model, source, ORIGINAL_RULES, "eventful-transformer", trusted)


def load_vitdet_checkpoint(model: ViTDet, source: Source, trusted: bool = False) -> str:
    """Detects the layout (detectron2, original eventful-transformer, or ours) and
    loads it. Returns the layout name. ``trusted``: see
    :func:`~eventful_pl.checkpoints.read_checkpoint`."""
    state_dict, name = _state_dict(source, trusted)
    if any(k.startswith("backbone.net.") for k in state_dict):
        load_detectron2_vitdet(model, state_dict)
        return "detectron2"
    if any(k.startswith(("embedding.conv.", "proposal_generator.")) for k in state_dict):
        load_original_vitdet(model, state_dict)
        return "eventful-transformer"
    state_dict = {k.removeprefix("model."): v for k, v in state_dict.items()}
    _load_checked(model, state_dict, f"{name} (eventful-pl layout)", [], state_dict)
    return "eventful-pl"


def create_vitdet_from_checkpoint(
    name: str, source: Source, trusted: bool = False, **overrides: Any
) -> tuple[ViTDet, str]:
    """Builds the preset ``name`` with the head the checkpoint defines (see
    :func:`checkpoint_head_options`: RPN convs, box-head convs and fcs, classes),
    then loads the checkpoint. ``overrides`` win over both. Returns
    (model, layout name)."""
    state_dict, _ = _state_dict(source, trusted)
    model = create_vitdet(name, **{**checkpoint_head_options(state_dict), **overrides})
    return model, load_vitdet_checkpoint(model, state_dict)
