"""Operation counts of whole models per video (ViViT), by kind, in GFlops (DESIGN section 5).

For a static policy (dense, top-r) the count of a ViViT video follows from
three measured pieces, because every view and every later step has the same
shapes: ``views x (first step + (steps - 1) x later step + temporal +
classifier)``. Data-dependent policies (thresholds) are counted by running the
given video. Both give the counts :func:`eventful_pl.counting.count_ops` sees
over a full forward (tested).

Example::

    report = count_vivit(model, r_values=[50, 100], thresholds=[0.5], video=video)
    print(json.dumps(report))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from eventful_pl.counting import OP_KINDS, OpCounter, count_ops
from eventful_pl.gates import TokenGate
from eventful_pl.models.vivit import FactorizedViViT
from eventful_pl.policies import ThresholdPolicy, TopRPolicy


def _report(name: str, r: int | None, threshold: float | None, counts: dict[str, int]) -> dict:
    return {
        "name": name,
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
def _static_video_counts(model: FactorizedViViT) -> dict[str, int]:
    """Per-video counts for a static policy, from one view's first and second steps."""
    grid = model.spatial.input_size
    tokens = torch.randn(2, 1, grid[0] * grid[1], model.dim)
    model.spatial.reset()
    with count_ops(model.spatial) as first:
        model.spatial(tokens[0])
    with count_ops(model.spatial) as later:
        model.spatial(tokens[1])
    model.spatial.reset()
    with count_ops(model) as temporal:
        model.temporal_forward(torch.randn(1, model.steps, model.dim))
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

    Returns ``{"unit": "GFlops", "per": "video", "settings": [{"name", "r",
    "threshold", "total", "by_kind"}, ...]}``.
    """
    if thresholds and video is None:
        raise ValueError("thresholds: a video is needed to count a threshold policy")
    gates = [m for m in model.spatial.modules() if isinstance(m, TokenGate)]
    saved = gates[0].policy if gates else None
    eventful = bool(gates)
    settings = []
    try:
        if include_dense:
            dense = model
            if eventful:  # the same configuration with dense spatial blocks
                dense = FactorizedViViT(
                    **{**model.config, "spatial_variant": "dense", "policy": None}
                )
            settings.append(_report("dense", None, None, _static_video_counts(dense)))
        if (r_values or thresholds) and not eventful:
            raise ValueError(
                "r_values/thresholds need an eventful spatial model (spatial_variant != 'dense')"
            )
        for r in r_values:
            model.set_policy(TopRPolicy(int(r)))
            settings.append(_report(f"r={r}", int(r), None, _static_video_counts(model)))
        for h in thresholds:
            model.set_policy(ThresholdPolicy(float(h)))
            settings.append(_report(f"threshold={h}", None, float(h), _video_counts(model, video)))
    finally:
        if eventful:
            model.set_policy(saved)
        model.reset()
    return {"unit": "GFlops", "per": "video", "settings": settings}
