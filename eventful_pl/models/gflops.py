"""Operation counts of whole models, by kind, in GFlops (docs/counting.md).

ViViT is counted per video (all views, spatial + temporal + classifier),
ViTDet per frame (backbone only: first frame, later frames, and their average
over a video).

Every report's ``dense`` setting (``"role": "base"``) is the base model: the
same configuration with dense blocks (for ViTDet also without key/value
pooling: the paper's base model). A ViTDet whose own network differs from that
base but has no token gates (the ``spatial`` variant: dense blocks, pooled
keys/values) gets a setting of its own, named after its variant, with
``"role": "model"``; its cost depends neither on r nor on the content.

The dense count runs a twin of the model on the ``meta`` device (shapes only,
no arithmetic). For a static policy (dense, top-r) the count of a ViViT video
follows from three measured pieces, because every view and every later step
has the same shapes: ``views x (first step + (steps - 1) x later step +
temporal + classifier)``. Data-dependent policies (thresholds) are counted by
running the given video; so is top-r in a ViTDet whose eventful attention pools
keys and values (``spatiotemporal``): the recomputed key columns are the pooled
cells the updated tokens fall in, which depends on where the updates are. Both
give the counts :func:`eventful_pl.counting.count_ops` sees over a full forward
(tested).

Example::

    report = count_vivit(model, r_values=[50, 100], thresholds=[0.5], video=video)
    report = count_vitdet(detector, r_values=[256], video_length=100)
    print(json.dumps(report))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from eventful_pl.blocks import QueryKeyEventfulBlock
from eventful_pl.counting import OP_KINDS, OpCounter, count_ops
from eventful_pl.gates import TokenGate
from eventful_pl.models.vitdet import ViTDet
from eventful_pl.models.vivit import FactorizedViViT
from eventful_pl.policies import ThresholdPolicy, TopRPolicy


def _report(
    name: str,
    r: int | None,
    threshold: float | None,
    counts: dict[str, int],
    role: str | None = None,
) -> dict:
    return {
        "name": name,
        "role": role,
        "r": r,
        "threshold": threshold,
        "total": sum(counts.values()) / 1e9,
        "by_kind": {kind: counts.get(kind, 0) / 1e9 for kind in OP_KINDS},
    }


def _scaled(counter: OpCounter, factor: int) -> dict[str, int]:
    return {kind: n * factor for kind, n in counter.counts.items()}


def _add(*parts: dict[str, int]) -> dict[str, int]:
    return {kind: sum(p.get(kind, 0) for p in parts) for kind in OP_KINDS}


@torch.no_grad()
def static_video_counts(model: FactorizedViViT) -> dict[str, int]:
    """Per-video counts for a static policy, from one view's first and second steps."""
    grid = model.spatial.input_size
    device = model.classifier.weight.device
    tokens = torch.randn(2, 1, grid[0] * grid[1], model.dim, device=device)
    model.spatial.reset()
    with count_ops(model.spatial) as first:
        model.spatial(tokens[0])
    with count_ops(model.spatial) as later:
        model.spatial(tokens[1])
    model.spatial.reset()
    with count_ops(model) as temporal:
        model.temporal_forward(torch.randn(1, model.steps, model.dim, device=device))
    per_view = _add(_scaled(first, 1), _scaled(later, model.steps - 1), _scaled(temporal, 1))
    return {kind: n * model.num_views for kind, n in per_view.items()}


@torch.no_grad()
def _video_counts(model: FactorizedViViT, video: Tensor) -> dict[str, int]:
    """Per-video counts measured on ``video`` (1, T, C, H, W)."""
    if video.ndim != 5 or video.shape[0] != 1:
        raise ValueError(f"count video must have shape (1, T, C, H, W), got {tuple(video.shape)}")
    with count_ops(model) as counter:
        model(video)
    return dict(counter.counts)


def count_vivit(
    model: FactorizedViViT,
    r_values: Sequence[int] = (),
    thresholds: Sequence[float] = (),
    video: Tensor | None = None,
    include_dense: bool = True,
) -> dict[str, Any]:
    """GFlops per video of ``model``: dense (all blocks recompute every token) and
    with its spatial gates set to each top-r and threshold.

    The model's own policy is restored afterwards. Thresholds need ``video``
    (1, T, C, H, W): their counts depend on the content.

    Returns ``{"unit": "GFlops", "per": "video", "settings": [{"name", "role",
    "r", "threshold", "total", "by_kind"}, ...]}`` (``role``: ``"base"`` for
    ``dense``, else None).
    """
    if thresholds and video is None:
        raise ValueError("thresholds: a video is needed to count a threshold policy")
    gates = [m for m in model.spatial.modules() if isinstance(m, TokenGate)]
    saved = gates[0].policy if gates else None
    eventful = bool(gates)
    settings = []
    try:
        if include_dense:
            # The same configuration with dense spatial blocks, shapes only.
            with torch.device("meta"):
                dense = FactorizedViViT(
                    **{**model.config, "spatial_variant": "dense", "policy": None}
                )
            settings.append(_report("dense", None, None, static_video_counts(dense), role="base"))
        if (r_values or thresholds) and not eventful:
            raise ValueError(
                "r_values/thresholds need an eventful spatial model (spatial_variant != 'dense')"
            )
        for r in r_values:
            model.set_policy(TopRPolicy(int(r)))
            settings.append(_report(f"r{int(r)}", int(r), None, static_video_counts(model)))
        for h in thresholds:
            model.set_policy(ThresholdPolicy(float(h)))
            settings.append(_report(f"h{float(h)!r}", None, float(h), _video_counts(model, video)))
    finally:
        if eventful:
            model.set_policy(saved)
        model.reset()
    return {"unit": "GFlops", "per": "video", "settings": settings}


@torch.no_grad()
def _static_frame_counts(model: ViTDet) -> tuple[dict[str, int], dict[str, int]]:
    """Backbone counts of a first (flush) and a later frame for a static policy."""
    backbone = model.backbone
    grid = backbone.input_size
    device = backbone.blocks[0].qkv.weight.device
    tokens = torch.randn(2, 1, grid[0] * grid[1], backbone.dim, device=device)
    backbone.reset()
    with count_ops(backbone) as first:
        backbone(tokens[0])
    with count_ops(backbone) as later:
        backbone(tokens[1])
    backbone.reset()
    return dict(first.counts), dict(later.counts)


@torch.no_grad()
def _video_frame_counts(model: ViTDet, video: Tensor) -> list[dict[str, int]]:
    """Backbone counts of each frame of ``video`` (T, 3, H, W), one stream."""
    if video.ndim != 4 or video.shape[1] != 3 or len(video) < 1:
        raise ValueError(f"count video must have shape (T, 3, H, W), got {tuple(video.shape)}")
    model.reset()
    frames = []
    for frame in video:  # frames of one stream, in order
        pixels = model.preprocessing(frame[None]).tensors
        with count_ops(model.backbone) as counter:
            model.backbone_forward(pixels)
        frames.append(dict(counter.counts))
    model.reset()
    return frames


def _frame_report(
    name: str,
    r: int | None,
    threshold: float | None,
    first: dict[str, int],
    later: dict[str, int],
    average: dict[str, float],
    role: str | None = None,
) -> dict:
    report = _report(name, r, threshold, average, role=role)
    report["first_frame"] = sum(first.values()) / 1e9
    report["later_frame"] = sum(later.values()) / 1e9
    return report


def _static_frame_report(
    name: str, r: int | None, model: ViTDet, video_length: int, role: str | None = None
) -> dict[str, Any]:
    first, later = _static_frame_counts(model)
    average = {
        kind: (first.get(kind, 0) + (video_length - 1) * later.get(kind, 0)) / video_length
        for kind in OP_KINDS
    }
    return _frame_report(name, r, None, first, later, average, role=role)


def _video_frame_report(
    name: str, r: int | None, threshold: float | None, model: ViTDet, video: Tensor
) -> dict[str, Any]:
    """Counts measured on ``video``: first frame, mean of the later ones, mean of all."""
    frames = _video_frame_counts(model, video)
    later = frames[1:] or frames
    later_mean = {k: sum(f.get(k, 0) for f in later) / len(later) for k in OP_KINDS}
    average = {k: sum(f.get(k, 0) for f in frames) / len(frames) for k in OP_KINDS}
    report = _frame_report(name, r, threshold, frames[0], later_mean, average)
    report["measured_on"] = "video"
    return report


def content_dependent_top_r(model: ViTDet) -> bool:
    """Whether top-r counts of ``model`` depend on the frames: eventful attention
    with pooled keys/values recomputes the pooled cells the updated tokens fall in."""
    return any(
        isinstance(m, QueryKeyEventfulBlock) and getattr(m, "pool_size", None) is not None
        for m in model.backbone.modules()
    )


def count_vitdet(
    model: ViTDet,
    r_values: Sequence[int] = (),
    thresholds: Sequence[float] = (),
    video: Tensor | None = None,
    video_length: int | None = None,
    include_dense: bool = True,
) -> dict[str, Any]:
    """GFlops per frame of ``model``'s backbone: the base model (dense), the
    model itself where it has no gates but differs from the base (``spatial``),
    and with its gates set to each top-r and threshold.

    ``total`` (and ``by_kind``) is the average over a video of ``video_length``
    frames (default: the length of ``video``), first frame included;
    ``first_frame`` and ``later_frame`` are the totals of the first (flush) and
    of a later frame (for thresholds: the mean over the video's later frames).
    Thresholds need ``video`` (T, 3, H, W): their counts depend on the content.
    So do top-r counts of a model whose eventful attention pools keys/values
    (:func:`content_dependent_top_r`): with ``video`` they are measured on it
    like thresholds (``"measured_on": "video"``, averaged over the video's
    frames); without, on random tokens (``"measured_on": "random tokens"``:
    updates scattered over the whole frame, most pooled cells recomputed).
    The model's own policy is restored afterwards.

    Returns ``{"unit": "GFlops", "per": "frame", "settings": [{"name", "role",
    "r", "threshold", "total", "by_kind", "first_frame", "later_frame"}, ...]}``;
    ``role`` is ``"base"`` for ``dense`` (the base model: dense blocks, no
    pooling), ``"model"`` for the model's own gate-free cost (named after its
    variant), else None.
    """
    if thresholds and video is None:
        raise ValueError("thresholds: a video is needed to count a threshold policy")
    if video_length is None:
        video_length = len(video) if video is not None else 1
    if video_length < 1:
        raise ValueError(f"video_length must be at least 1, got {video_length}")
    gates = [m for m in model.backbone.modules() if isinstance(m, TokenGate)]
    saved = gates[0].policy if gates else None
    eventful = bool(gates)
    if (r_values or thresholds) and not eventful:
        raise ValueError("r_values/thresholds need an eventful model (variant != 'dense')")
    pooled_top_r = content_dependent_top_r(model)
    settings = []
    try:
        if include_dense:
            # The same configuration with a dense backbone, shapes only.
            with torch.device("meta"):
                dense = ViTDet(**{**model.config, "variant": "dense", "policy": None})
            settings.append(_static_frame_report("dense", None, dense, video_length, role="base"))
        if not eventful and model.variant != "dense":
            # The model's own network (e.g. pooled keys/values), shapes only.
            with torch.device("meta"):
                own = ViTDet(**model.config)
            settings.append(
                _static_frame_report(model.variant, None, own, video_length, role="model")
            )
        for r in r_values:
            model.set_policy(TopRPolicy(int(r)))
            if pooled_top_r and video is not None:
                settings.append(_video_frame_report(f"r{int(r)}", int(r), None, model, video))
                continue
            report = _static_frame_report(f"r{int(r)}", int(r), model, video_length)
            if pooled_top_r:
                report["measured_on"] = "random tokens"
            settings.append(report)
        for h in thresholds:
            model.set_policy(ThresholdPolicy(float(h)))
            settings.append(_video_frame_report(f"h{float(h)!r}", None, float(h), model, video))
    finally:
        if eventful:
            model.set_policy(saved)
        model.reset()
    return {"unit": "GFlops", "per": "frame", "settings": settings}
