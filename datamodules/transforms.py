"""Video clip sampling and augmentation on uint8 frame tensors.

Clips are ``(T, C, H, W) uint8`` tensors (the layout the ViViT models take per
video). Training samples ``frames`` frames at ``stride`` from a random start and
applies a random resized crop (short side scaled to ``crop_size * s``,
``s ~ U(scale_range)``) and a horizontal flip; evaluation keeps every frame of the
clip and only scales the short side (the model cuts its own views).

Usage::

    from datamodules.transforms import ClipSampling, train_clip_indices, TrainClipTransform

    sampling = ClipSampling(frames=32, stride=2, crop_size=224)
    indices = train_clip_indices(0, 300, sampling.frames, sampling.stride)  # 32 frame numbers
    clip = TrainClipTransform(sampling)(frames)  # (T, C, H, W) -> (32, C, 224, 224) uint8

Randomness comes from ``torch``'s generator (pass ``generator`` for a private
one); DataLoader workers are seeded apart by PyTorch and Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class ClipSampling:
    """How clips are cut from a video (shared by the video datasets).

    Args:
        frames: Frames per training clip T.
        stride: Frame step within a training clip.
        crop_size: Side of the square training crop.
        scale_range: Training short side = ``crop_size * s``, ``s ~ U(scale_range)``
            (the default is the usual 256..320 jitter for a 224 crop).
        flip_prob: Probability of a horizontal flip in training. Set 0 where the
            label depends on left/right (e.g. the synthetic direction datasets).
        eval_short_side: Evaluation frames are resized so their short side is
            this (None: keep the decoded size).
    """

    frames: int = 32
    stride: int = 2
    crop_size: int = 224
    scale_range: tuple[float, float] = (256 / 224, 320 / 224)
    flip_prob: float = 0.5
    eval_short_side: int | None = 224

    def __post_init__(self) -> None:
        for name in ("frames", "stride", "crop_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        low, high = self.scale_range
        if not 1.0 <= low <= high:
            raise ValueError(f"scale_range must satisfy 1 <= low <= high, got {self.scale_range}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"flip_prob must lie in [0, 1], got {self.flip_prob}")
        if self.eval_short_side is not None and self.eval_short_side < 1:
            raise ValueError(f"eval_short_side must be >= 1 or None, got {self.eval_short_side}")


def _uniform(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator))


def train_clip_indices(
    first: int,
    stop: int,
    frames: int,
    stride: int,
    generator: torch.Generator | None = None,
) -> list[int]:
    """``frames`` frame numbers at ``stride`` from a random start in ``[first, stop)``.

    A segment shorter than the clip span starts at ``first`` and repeats its
    last frame (as the ViViT preprocessing does for short videos).
    """
    if stop <= first:
        raise ValueError(f"empty frame range [{first}, {stop})")
    span = (frames - 1) * stride + 1
    room = stop - first - span
    start = first + (int(torch.randint(room + 1, (), generator=generator)) if room > 0 else 0)
    return [min(start + k * stride, stop - 1) for k in range(frames)]


def short_side_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(H, W) scaled so the short side is ``short_side`` (aspect ratio kept)."""
    scale = short_side / min(height, width)
    return max(short_side, round(height * scale)), max(short_side, round(width * scale))


def resize(clip: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear (antialiased) resize of ``(T, C, H, W)`` uint8 frames to ``size``."""
    if tuple(clip.shape[-2:]) == tuple(size):
        return clip
    return F.interpolate(clip, size=size, mode="bilinear", align_corners=False, antialias=True)


def resize_short_side(clip: Tensor, short_side: int | None) -> Tensor:
    """``(T, C, H, W)`` -> ``(T, C, H', W')`` with ``min(H', W') = short_side``."""
    if short_side is None:
        return clip
    return resize(clip, short_side_size(clip.shape[-2], clip.shape[-1], short_side))


def random_resized_crop(
    clip: Tensor,
    crop_size: int,
    scale_range: tuple[float, float],
    generator: torch.Generator | None = None,
) -> Tensor:
    """A random ``crop_size`` square of the clip scaled to short side ``crop_size * s``.

    The crop is cut in source pixels first and then resized, so only the crop
    is interpolated. ``(T, C, H, W)`` -> ``(T, C, crop_size, crop_size)``, same dtype.
    """
    height, width = clip.shape[-2:]
    low, high = scale_range
    short = crop_size * (low + (high - low) * _uniform(generator))
    side = max(1, min(height, width, round(crop_size * min(height, width) / short)))
    top = int(torch.randint(height - side + 1, (), generator=generator))
    left = int(torch.randint(width - side + 1, (), generator=generator))
    return resize(clip[..., top : top + side, left : left + side], (crop_size, crop_size))


class TrainClipTransform:
    """Random resized crop and horizontal flip of a training clip.

    Args:
        sampling: Crop size, scale range and flip probability.

    Shapes: ``(T, C, H, W) uint8 -> (T, C, crop_size, crop_size) uint8``.
    """

    def __init__(self, sampling: ClipSampling) -> None:
        self.sampling = sampling

    def __call__(self, clip: Tensor, generator: torch.Generator | None = None) -> Tensor:
        s = self.sampling
        clip = random_resized_crop(clip, s.crop_size, s.scale_range, generator)
        if s.flip_prob > 0 and _uniform(generator) < s.flip_prob:
            clip = clip.flip(-1)
        return clip.contiguous()
