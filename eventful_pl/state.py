"""Stream state: modules that keep state between the frames of a video."""

from __future__ import annotations

from torch import nn


class StreamState:
    """Mixin for modules that keep per-stream state (B independent streams).

    Subclasses implement :meth:`reset_state`; the first call after a reset is a
    flush that computes everything.

    ``static_frame`` (set with :func:`set_static_frame`): incremental frames
    take their host-synchronisation-free path, whose tensor shapes are fixed
    for a static policy (top-r, top-fraction), so that a whole frame can be
    captured as a CUDA graph (:mod:`eventful_pl.static_frame`).
    """

    static_frame: bool = False

    def reset_state(self) -> None:
        raise NotImplementedError


def reset_stream_state(model: nn.Module) -> None:
    """Resets the state of every stateful submodule of ``model``.

    Call it at every video boundary (and per view in ViViT); the next frame is a
    flush.
    """
    for module in model.modules():
        if isinstance(module, StreamState):
            module.reset_state()


def set_static_frame(model: nn.Module, enabled: bool) -> None:
    """Turns the static (sync-free, fixed-shape) incremental path of every
    stateful submodule of ``model`` on or off."""
    for module in model.modules():
        if isinstance(module, StreamState):
            module.static_frame = bool(enabled)
