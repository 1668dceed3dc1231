"""Scratch tensors reused from frame to frame.

With a static policy (top-r) an eventful block's large temporaries have the
same shape on every frame. Allocating them afresh each frame costs fresh pages
from the allocator (on CPU, page faults on tens of MB per block); a
:class:`Workspaces` hands the same tensors back instead. Only used when
gradients are off (``out=`` ops do not record autograd history).
"""

from __future__ import annotations

import torch
from torch import Tensor


class Workspaces:
    """Named scratch tensors, reallocated only when shape, dtype or device change."""

    def __init__(self) -> None:
        self._tensors: dict[str, Tensor] = {}

    @staticmethod
    def enabled() -> bool:
        """Whether callers may write into workspaces (gradients are off)."""
        return not torch.is_grad_enabled()

    def get(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor | None:
        """An uninitialised tensor of ``shape`` (dtype and device of ``like``),
        or None when gradients are on or under ``torch.compile`` (then the
        caller allocates: a compiler plans its own buffers)."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return None
        shape = tuple(shape)
        tensor = self._tensors.get(name)
        if (
            tensor is None
            or tuple(tensor.shape) != shape
            or tensor.dtype != like.dtype
            or tensor.device != like.device
            or tensor.is_inference() != torch.is_inference_mode_enabled()
        ):
            tensor = torch.empty(shape, dtype=like.dtype, device=like.device)
            self._tensors[name] = tensor
        return tensor

    def clear(self) -> None:
        self._tensors.clear()
