"""Token gates and buffers (docs/eventful-core.md).

All state has a leading batch dimension B: a batch is B independent streams.
State tensors are updated in place; the first call after ``reset_state`` is a
flush that forwards every token.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from eventful_pl import kernels, triton_kernels
from eventful_pl.counting import Counted
from eventful_pl.indexing import (
    expand_col_index,
    expand_row_index,
    flat_token_index,
    gather_rows,
    gather_tokens,
    scatter_rows_,
    scatter_tokens_,
)
from eventful_pl.policies import TokenPolicy, all_tokens
from eventful_pl.state import StreamState
from eventful_pl.workspace import Workspaces


def _require_policy(policy: TokenPolicy | None, gate: nn.Module) -> TokenPolicy:
    if policy is None:
        raise ValueError(
            f"{type(gate).__name__} has no policy: pass policy= to the block or "
            "backbone, or call eventful_pl.set_policy(model, policy)"
        )
    return policy


def _select(policy: TokenPolicy, norms: Tensor, inplace: bool = True) -> Tensor:
    """The policy's index for these error norms (B, N), where a NaN error (a
    non-finite token or reference) counts as infinite: the token is always
    updated, so a NaN reference never stays in the state. Ranking policies
    (a static k: top-r, top-fraction) already rank NaN first (``topk``); for
    the others (threshold) NaN becomes inf (in ``norms`` if ``inplace``)."""
    if policy.num_selected(norms.shape[-1]) is None:
        norms = norms.detach()
        if inplace:
            norms = norms.nan_to_num_(nan=math.inf, posinf=math.inf)
        else:
            norms = torch.nan_to_num(norms, nan=math.inf, posinf=math.inf)
    return policy.select(norms)


class TokenGate(Counted, StreamState, nn.Module):
    """Forwards only the tokens whose accumulated error is large.

    State: reference tokens ``p`` (B, N, D). Flush: forwards all of ``c``,
    returns index None. Incremental: ``e = c - p``, the policy picks (B, k) from
    the L2 norms of ``e``, returns ``(c[idx] (B, k, D), idx)`` and writes
    ``p[idx] = c[idx]``.
    A token whose error is NaN (a non-finite token or reference) counts as
    infinitely changed and is always updated, so a bad frame's values never
    stay in the reference.

    ``c`` is (B, N, D), or (B, N, G, C) with ``G * C = D`` (channels in
    groups, e.g. attention heads, possibly a strided view): the groups are
    read in place, never merged into a (B, N, D) copy.

    Args:
        policy: Token selection policy (may be set later).
    """

    def __init__(self, policy: TokenPolicy | None = None) -> None:
        super().__init__()
        self.policy = policy
        self.p: Tensor | None = None
        self._error: Tensor | None = None
        self.frames = 0  # incremental frames since the flush, while policy.refresh_every is set

    def reset_state(self) -> None:
        self.p = None
        self._error = None
        self.frames = 0

    def policy_index(self, norms: Tensor) -> Tensor:
        """The policy's index (B, k) for error norms (B, N); every token on each
        ``policy.refresh_every``-th incremental frame (a periodic refresh)."""
        policy = _require_policy(self.policy, self)
        every = policy.refresh_every
        if every:  # counted only when refreshing (a constant frame under torch.compile)
            self.frames += 1
            if self.frames % every == 0:
                return all_tokens(norms)
        return _select(policy, norms)

    def error_norms(self, c: Tensor) -> Tensor:
        """L2 norms (B, N) of ``c - p``: one fused pass when the fused CPU
        kernels apply, else computed in a reused workspace."""
        if kernels.fused_kernels_available(c, self.p):
            return kernels.error_norms(c.detach(), self.p)
        if self.static_frame and triton_kernels.available(c, self.p):
            return triton_kernels.error_norms(c.detach(), self.p)
        if torch.compiler.is_compiling():  # functional: inductor fuses it into one pass
            error = c.detach() - self.p.view(c.shape)
            return torch.linalg.vector_norm(error, dim=tuple(range(2, c.ndim)))
        if self._error is None or self._error.shape != self.p.shape or self._error.dtype != c.dtype:
            self._error = torch.empty_like(self.p)
        # Selection only: no gradient flows through the error norms.
        torch.sub(c.detach(), self.p.view(c.shape), out=self._error.view(c.shape))
        return self._error.norm(dim=-1)

    def flush(self, c: Tensor) -> Tensor:
        """Sets the reference to a (B, N, D) copy of ``c``; returns ``c`` as (B, N, D)."""
        tokens = c.flatten(2)
        self.p = tokens.detach().clone(memory_format=torch.contiguous_format)
        self.frames = 0
        return tokens

    def select(self, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Index (B, k) of the tokens to update, their flat index and values (B, k, D)."""
        index = self.policy_index(self.error_norms(c))
        flat = flat_token_index(index, c.shape[1])
        return index, flat, gather_tokens(c, index, flat).flatten(2)

    def forward(self, c: Tensor, norm: nn.Module | None = None) -> tuple[Tensor, Tensor | None]:
        """Gates ``c``, or ``norm(c)`` if a norm is given (for x (B, N, D)).

        With a LayerNorm and the fused CPU kernels, an incremental frame never
        forms ``norm(c)`` for all tokens: the error norms come from one fused
        pass and only the selected tokens are normalised.
        """
        if norm is not None:
            if (
                self.p is not None
                and isinstance(norm, nn.LayerNorm)
                and kernels.fused_kernels_available(c, self.p)
            ):
                return self._gate_layer_norm(c, norm)
            c = norm(c)
        if self.p is None:
            return self.flush(c), None
        self.count("gate", self.p.numel())
        index, flat, c_sel = self.select(c)
        scatter_tokens_(self.p, index, c_sel.detach(), flat)
        return c_sel, index

    def _gate_layer_norm(self, x: Tensor, norm: nn.LayerNorm) -> tuple[Tensor, Tensor]:
        """The incremental ``forward(x, norm)`` with the fused kernel."""
        self.count("gate", self.p.numel())
        index = self.policy_index(kernels.layer_norm_error_norms(x, norm, self.p))
        flat = flat_token_index(index, x.shape[1])
        c_sel = norm(gather_tokens(x, index, flat))
        scatter_tokens_(self.p, index, c_sel, flat)
        return c_sel, index


class STGTGate(TokenGate):
    """The STGT baseline gate: the reference is always the previous frame.

    Small changes never accumulate: ``p = c`` for every token on every frame.
    """

    def forward(self, c: Tensor, norm: nn.Module | None = None) -> tuple[Tensor, Tensor | None]:
        if norm is not None:  # the reference takes every token of norm(c)
            c = norm(c)
        if self.p is None:
            return self.flush(c), None
        self.count("gate", self.p.numel())
        index, _, c_sel = self.select(c)
        self.p.view(c.shape).copy_(c.detach())
        return c_sel, index


class TokenBuffer(Counted, StreamState, nn.Module):
    """Holds dense outputs ``b`` (B, N, D') and scatters in the updated rows.

    Flush: ``b = y``. Incremental: ``b[idx] = y_sel``; returns ``b`` (the state
    itself: do not modify the result in place).
    """

    def __init__(self) -> None:
        super().__init__()
        self.b: Tensor | None = None

    def reset_state(self) -> None:
        self.b = None

    def forward(self, y: Tensor, index: Tensor | None) -> Tensor:
        tracked = torch.is_grad_enabled() and (
            y.requires_grad or (self.b is not None and self.b.requires_grad)
        )
        if self.b is None or index is None:
            self.b = y if tracked else y.detach()
            return self.b
        if tracked:
            # Under autograd the state is replaced, never modified in place, so
            # earlier frames' graphs stay valid and gradients reach every frame.
            b, n, d = self.b.shape
            flat = flat_token_index(index, n)
            self.b = self.b.reshape(b * n, d).index_copy(0, flat, y.reshape(-1, d)).view(b, n, d)
            return self.b
        return scatter_tokens_(self.b, index, y)


class DeltaGate(Counted, StreamState, nn.Module):
    """A token gate that also returns the selected deltas ``e[idx]``.

    Tokens lie on dim -2 (``structure="row"``, shape (B, ..., N, C)) or on dim
    -1 (``structure="col"``, shape (B, ..., R, N)). The index (B, k) comes from
    the policy or is forced by the caller. Without a forced index the policy
    sees each token's error norm over channels, maximised over any middle dims
    (e.g. heads), so one index serves every head of a batch item.

    Args:
        structure: ``"row"`` or ``"col"``.
        policy: Token selection policy (unused when the index is forced).
    """

    def __init__(
        self, structure: Literal["row", "col"] = "row", policy: TokenPolicy | None = None
    ) -> None:
        super().__init__()
        if structure not in ("row", "col"):
            raise ValueError(f"DeltaGate: structure must be 'row' or 'col', got {structure!r}")
        self.structure = structure
        self.policy = policy
        self.p: Tensor | None = None
        self.workspaces = Workspaces()

    def reset_state(self) -> None:
        self.p = None

    def _expand(self, index: Tensor, shape: tuple[int, ...]) -> Tensor:
        if self.structure == "row":
            return expand_row_index(index, shape)
        return expand_col_index(index, shape)

    @property
    def token_dim(self) -> int:
        return -2 if self.structure == "row" else -1

    def flush(self, c: Tensor, copy: bool = True) -> None:
        """Sets the reference to ``c`` (a contiguous copy unless the caller hands
        it over), so that incremental updates move whole rows."""
        self.p = c.detach().clone(memory_format=torch.contiguous_format) if copy else c.detach()

    def forward(
        self, c: Tensor, forced_index: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Returns ``(c[idx], e[idx], idx)``; on a flush ``(c, None, None)``."""
        if self.p is None:
            self.flush(c)
            return c, None, None
        index = forced_index
        if index is None:
            channel_dim = -1 if self.structure == "row" else -2
            norms = (c - self.p).norm(dim=channel_dim)
            norms = norms.reshape(norms.shape[0], -1, norms.shape[-1]).amax(dim=1)
            index = _select(_require_policy(self.policy, self), norms, inplace=False)
        expanded = self._expand(index, tuple(c.shape))
        c_sel = c.gather(self.token_dim, expanded)
        return (*self.update_selected(c_sel, index, expanded), index)

    def update_selected(
        self,
        c_sel: Tensor,
        index: Tensor,
        expanded: Tensor | None = None,
        flat_rows: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Incremental update from already-selected tokens.

        ``c_sel`` holds the current values of the tokens in ``index`` (the
        caller computed only those); returns ``(c_sel, e_sel)`` and writes them
        into the reference. Avoids touching the unselected tokens at all.
        ``flat_rows``: ``flat_row_index(index, H, N)`` for a 4-D row gate, if
        the caller already has it.
        """
        if self.p is None:
            raise RuntimeError("DeltaGate.update_selected called before a flush")
        if self.structure == "row" and self.p.ndim == 4 and self.p.is_contiguous():
            scratch = self.workspaces.get("delta", tuple(c_sel.shape), c_sel)
            old = gather_rows(self.p, index, flat_rows, out=scratch)
            e_sel = c_sel - old if scratch is None else torch.sub(c_sel, old, out=old)
            self.commit_selected(c_sel, index, flat_rows)
            return c_sel, e_sel
        self.count("gate", self.p.numel())
        if expanded is None:
            expanded = self._expand(index, tuple(self.p.shape))
        e_sel = c_sel - self.p.gather(self.token_dim, expanded)
        self.p.scatter_(self.token_dim, expanded, c_sel)
        return c_sel, e_sel

    def commit_selected(
        self,
        c_sel: Tensor,
        index: Tensor,
        flat_rows: Tensor | None = None,
        written: bool = False,
    ) -> None:
        """The reference half of :meth:`update_selected` for a caller that read
        the old rows itself (row gates on contiguous (B, H, N, C) references):
        counts the gate and writes ``c_sel`` (B, H, k, C) into the reference,
        unless the caller already ``written`` it there (a fused kernel)."""
        if self.p is None:
            raise RuntimeError("DeltaGate.commit_selected called before a flush")
        self.count("gate", self.p.numel())
        if not written:
            scatter_rows_(self.p, index, c_sel, flat_rows)


def set_policy(model: nn.Module, policy: TokenPolicy | None) -> None:
    """Sets the token-selection policy of every token gate in ``model``.

    Use it to sweep test-time r (or thresholds) on one model. Each gate gets
    ``policy.for_gate(name)`` (its module name): one policy per gate for
    per-gate policies (:class:`eventful_pl.policies.CalibratedThresholdPolicy`),
    ``policy`` itself for the others.
    """
    for name, module in model.named_modules():
        if isinstance(module, TokenGate):
            module.policy = None if policy is None else policy.for_gate(name)
