"""Stream state: modules that keep state between the frames of a video."""

from __future__ import annotations

from torch import nn


class StreamState:
    """Mixin for modules that keep per-stream state (B independent streams).

    Subclasses implement :meth:`reset_state`; the first call after a reset is a
    flush that computes everything.
    """

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
