"""Joint image + box transforms for detection samples.

A transform maps ``(image, target)`` to ``(image, target)``: ``image`` uint8
(C, H, W), ``target`` a dict with ``boxes`` (n, 4) float32 xyxy pixels (other
keys pass through unchanged). The model does its own normalise/resize/pad, so
the data module only flips for training by default::

    transform = Compose([RandomHorizontalFlip(0.5), ResizeShortEdge(640, max_size=1024)])
    image, target = transform(image, {"boxes": boxes, "labels": labels})
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor
from torchvision.transforms.v2 import functional as F

Target = dict[str, Tensor]


class DetectionTransform(Protocol):
    """Callable ``(image (C, H, W), target) -> (image, target)``."""

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]: ...


def hflip(image: Tensor, target: Target) -> tuple[Tensor, Target]:
    """Mirrors the image left-right and its boxes: ``x -> W - x`` (xmin and xmax swap)."""
    width = image.shape[-1]
    boxes = target["boxes"]
    flipped = torch.stack(
        [width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1
    )
    return image.flip(-1), {**target, "boxes": flipped}


class RandomHorizontalFlip:
    """Flips with probability ``p`` (torch's global generator: seeded per DataLoader worker).

    Args:
        p: flip probability in [0, 1].
    """

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"flip probability must be in [0, 1], got {p}")
        self.p = p

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        if self.p > 0 and torch.rand(()) < self.p:
            return hflip(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


def resized_shape(
    height: int, width: int, short_edge: int, max_size: int | None = None
) -> tuple[int, int]:
    """(H', W') with the short edge at ``short_edge`` and the long edge at most ``max_size``."""
    scale = short_edge / min(height, width)
    if max_size is not None:
        scale = min(scale, max_size / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def scale_boxes(target: Target, x_scale: float, y_scale: float) -> Target:
    """``target`` with its xyxy ``boxes`` multiplied by ``x_scale`` / ``y_scale``."""
    scale = target["boxes"].new_tensor([x_scale, y_scale] * 2)
    return {**target, "boxes": target["boxes"] * scale}


class ResizeShortEdge:
    """Resizes (antialiased) so the short edge is ``short_edge`` (long edge <= ``max_size``).

    Boxes scale with the image.

    Args:
        short_edge: target length of the shorter side, in pixels.
        max_size: upper bound for the longer side (None: no bound).
    """

    def __init__(self, short_edge: int, max_size: int | None = None) -> None:
        if short_edge < 1 or (max_size is not None and max_size < 1):
            raise ValueError(f"resize sizes must be >= 1, got {short_edge}, {max_size}")
        self.short_edge = short_edge
        self.max_size = max_size

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        height, width = image.shape[-2:]
        new_h, new_w = resized_shape(height, width, self.short_edge, self.max_size)
        if (new_h, new_w) == (height, width):
            return image, target
        image = F.resize(image, [new_h, new_w], antialias=True)
        return image, scale_boxes(target, new_w / width, new_h / height)

    def __repr__(self) -> str:
        return f"ResizeShortEdge({self.short_edge}, max_size={self.max_size})"


class Compose:
    """Applies transforms in order.

    Args:
        transforms: the transforms.
    """

    def __init__(self, transforms: Sequence[DetectionTransform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        for transform in self.transforms:
            image, target = transform(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"Compose({self.transforms})"
