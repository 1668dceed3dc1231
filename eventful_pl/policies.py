"""Token selection policies: which tokens a gate updates on an incremental frame.

A policy maps the per-token error norms of a batch, shape (B, N), to an index of
shape (B, k): k token positions for each of the B independent streams.

Batches and the threshold policy: each item needs a different number of
tokens, but the index is one (B, k) tensor (static per call, no Python loop).
:class:`ThresholdPolicy` therefore sets k to the largest per-item count and
gives every item its k largest-error tokens: each item updates at least all of
its own over-threshold tokens, plus (if another item needed more) its next
largest errors. Updating more tokens than needed only makes a gate more exact,
and operation counts report the k tokens actually computed. With B = 1 the
selection is exactly the over-threshold set.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor


class TokenPolicy(ABC):
    """Chooses tokens to update from their error norms."""

    @abstractmethod
    def select(self, norms: Tensor) -> Tensor:
        """Error norms (B, N) -> token index (B, k), dtype long."""

    def num_selected(self, num_tokens: int) -> int | None:
        """The static k for ``num_tokens`` tokens, or None if it varies."""
        return None

    def validate(self, num_tokens: int) -> None:  # noqa: B027 (optional hook)
        """Raises ValueError if the policy cannot run on ``num_tokens`` tokens."""

    def __call__(self, norms: Tensor) -> Tensor:
        return self.select(norms)


def _all_tokens(norms: Tensor) -> Tensor:
    b, n = norms.shape
    return torch.arange(n, device=norms.device).expand(b, n)


class TopRPolicy(TokenPolicy):
    """Selects the ``r`` tokens with the largest error norm (static shape).

    Args:
        r: Tokens updated per frame and batch item, ``1 <= r <= N``.
    """

    def __init__(self, r: int) -> None:
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"top-r policy: r must be a positive integer, got r={r!r}")
        self.r = r

    def validate(self, num_tokens: int) -> None:
        if self.r > num_tokens:
            raise ValueError(
                f"top-r policy: r={self.r} exceeds the number of tokens N={num_tokens}; "
                f"use r <= {num_tokens} (r = N updates every token)"
            )

    def num_selected(self, num_tokens: int) -> int:
        return self.r

    def select(self, norms: Tensor) -> Tensor:
        n = norms.shape[-1]
        self.validate(n)
        if self.r == n:
            return _all_tokens(norms)
        return norms.topk(self.r, dim=-1, sorted=False).indices

    def __repr__(self) -> str:
        return f"TopRPolicy(r={self.r})"


class TopFractionPolicy(TokenPolicy):
    """Top-r with ``r = floor(fraction * N)``.

    Args:
        fraction: Fraction of tokens updated per frame, in [0, 1].
    """

    def __init__(self, fraction: float) -> None:
        if not 0.0 <= float(fraction) <= 1.0:
            raise ValueError(
                f"top-fraction policy: fraction must lie in [0, 1], got fraction={fraction!r}"
            )
        self.fraction = float(fraction)

    def num_selected(self, num_tokens: int) -> int:
        return math.floor(self.fraction * num_tokens)

    def select(self, norms: Tensor) -> Tensor:
        n = norms.shape[-1]
        k = self.num_selected(n)
        if k == n:
            return _all_tokens(norms)
        return norms.topk(k, dim=-1, sorted=False).indices

    def __repr__(self) -> str:
        return f"TopFractionPolicy(fraction={self.fraction})"


class ThresholdPolicy(TokenPolicy):
    """Selects every token whose error norm exceeds ``threshold``.

    In a batch, k is the largest per-item count and each item takes its k
    largest errors (so at least all its own over-threshold tokens); see the
    module docstring.

    Args:
        threshold: Norm threshold h >= 0.
    """

    def __init__(self, threshold: float) -> None:
        if not float(threshold) >= 0.0:
            raise ValueError(
                f"threshold policy: threshold must be >= 0, got threshold={threshold!r}"
            )
        self.threshold = float(threshold)

    def select(self, norms: Tensor) -> Tensor:
        n = norms.shape[-1]
        k = int(norms.gt(self.threshold).sum(dim=-1).max())
        if k == n:
            return _all_tokens(norms)
        return norms.topk(k, dim=-1, sorted=False).indices

    def __repr__(self) -> str:
        return f"ThresholdPolicy(threshold={self.threshold})"


POLICIES: dict[str, type[TokenPolicy]] = {
    "top_r": TopRPolicy,
    "threshold": ThresholdPolicy,
    "top_fraction": TopFractionPolicy,
}


def build_policy(name: str, value: float) -> TokenPolicy:
    """Builds a policy by name: ``build_policy("top_r", 50)``."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}")
    if name == "top_r":
        return TopRPolicy(int(value))
    return POLICIES[name](value)
