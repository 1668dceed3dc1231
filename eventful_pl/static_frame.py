"""Static eventful frames: a whole incremental frame as one CUDA graph.

With a ranking policy (top-r, top-fraction) every tensor of an incremental
frame has the same shape on every frame, and the blocks' static path
(:func:`eventful_pl.state.set_static_frame`) never reads a device value on
the host. A frame of the model can then be captured once and replayed:
:class:`StaticFrameRunner` runs flush frames (the first frame of a stream,
after a reset) eagerly, copies the new stream state into the buffers the
captured graph reads and writes, and replays the graph on incremental frames.

Usage::

    runner = StaticFrameRunner(backbone, mode="cuda_graph")
    with torch.inference_mode():
        for video in videos:
            runner.reset()
            for frame in video:            # (B, N, D) CUDA tensors
                out = runner(frame)        # flush eagerly, then graph replays

Modes:

- ``"cuda_graph"``: CUDA tensors; the static frame's PyTorch ops (and the
  fused Triton kernels) captured with ``torch.cuda.graph``.
- ``"compile_cuda_graph"``: the static frame compiled by ``torch.compile``
  (inductor by default: chains of small element-wise ops fused into
  generated kernels), then captured as one CUDA graph. Compiling runs the
  frame once more; the stream state is restored after that run, so outputs
  and state match the other modes.
- ``"compile"``: the static frame through ``torch.compile`` without a graph
  capture (any device; options in ``compile_options``, default
  ``backend="inductor"``).
- ``"eager"``: the static path without capture; any device, e.g. to check it
  on CPU.

Under ``torch.compile`` the blocks take their functional forms (no ``out=``
writes into reused workspaces, no pre-packed oneDNN linears, no hand-written
Triton kernels): the compiler plans buffers and fuses kernels itself.

On CUDA the static path uses the fused Triton kernels of
:mod:`eventful_pl.triton_kernels` (softmax-normaliser update, gate error
norms) unless they are switched off; their float32 arithmetic can differ from
the eager path's in the last bits (and so flip a top-r choice at a near-tie).

Recovery. The eager full block checks, with a host synchronisation per frame,
whether its incremental softmax update kept precision and whether a non-finite
value reached its state, and recomputes at once. A static frame keeps those
checks as device flags per stream instead; the runner reads them before the
next frame (one small device-to-host copy) and recomputes the flagged streams
of the flagged blocks from their query, key and value state, as the eager path
does for a non-finite stream. So the flagged frame's own output may differ from
the eager path's (the eager path would have recomputed during it), the state
is exact again before the next frame, and while a stream's state stays
non-finite the runner takes the eager path (which recovers within the frame).
A threshold policy (a token count that varies per frame) always takes the
eager path.

Operation counts of a replayed frame are the counts recorded while the frame
was captured (counts depend on shapes only), added to the counters attached
at replay time, so ``count_ops`` reports the same numbers as the eager path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from eventful_pl.blocks.full import EventfulBlock
from eventful_pl.blocks.query_key import QueryKeyEventfulBlock
from eventful_pl.counting import Counted, OpCounter
from eventful_pl.gates import TokenGate
from eventful_pl.state import reset_stream_state, set_static_frame
from eventful_pl.workspace import Workspaces

StaticMode = Literal["cuda_graph", "compile_cuda_graph", "compile", "eager"]
STATIC_MODES: tuple[str, ...] = ("cuda_graph", "compile_cuda_graph", "compile", "eager")
_GRAPH_MODES = ("cuda_graph", "compile_cuda_graph")
#: Module attributes that are never stream state kept in static buffers.
_NOT_STATE = frozenset({"nonfinite_items", "static_flags", "_static_failed", "_new_range"})


class StaticFrameRunner:
    """Runs a stateful eventful model frame by frame, incremental frames static.

    Args:
        model: A module whose ``forward(x)`` is one frame of B streams (e.g. a
            :class:`eventful_pl.backbone.ViTBackbone`) with eventful blocks.
        mode: ``"cuda_graph"``, ``"compile_cuda_graph"``, ``"compile"`` or
            ``"eager"`` (see the module docstring).
        clone_output: Return a copy of the graph's output (else the static
            output tensor itself, overwritten by the next replay).
        compile_options: Keyword arguments of ``torch.compile`` (modes
            ``"compile"`` and ``"compile_cuda_graph"``; default
            ``backend="inductor"``).

    Shapes: ``runner(x)`` takes and returns what ``model(x)`` does.
    Run it under ``torch.no_grad()`` or ``torch.inference_mode()``.
    """

    def __init__(
        self,
        model: nn.Module,
        mode: StaticMode = "cuda_graph",
        clone_output: bool = True,
        compile_options: dict[str, Any] | None = None,
    ) -> None:
        if mode not in STATIC_MODES:
            raise ValueError(f"StaticFrameRunner: mode must be one of {STATIC_MODES}, got {mode!r}")
        modules = list(model.modules())
        self.model = model
        self.mode = mode
        self.clone_output = clone_output
        self._gates = [m for m in modules if isinstance(m, TokenGate)]
        if not self._gates:
            raise ValueError(
                "StaticFrameRunner: the model has no token gates (a dense model has no "
                "incremental frames); build it with an eventful block_variant"
            )
        for m in modules:
            if isinstance(m, QueryKeyEventfulBlock) and m.pool_size is not None:
                raise ValueError(
                    "StaticFrameRunner: key/value pooling (pool_size) gives a data-dependent "
                    "number of updated keys per frame; run pooled query_key/full blocks "
                    "eagerly (call the model directly)"
                )
        self._full_blocks = [m for m in modules if isinstance(m, EventfulBlock)]
        self._counted = [m for m in modules if isinstance(m, Counted)]
        self._compile_options = {"backend": "inductor", **(compile_options or {})}
        self._compiled: Callable[[Tensor], tuple[Tensor, Tensor | None]] | None = None
        self._key: tuple | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static_input: Tensor | None = None
        self._static_output: Tensor | None = None
        self._static_flags: Tensor | None = None
        self._state: list[tuple[nn.Module, str, Tensor]] = []
        self._keepalive: list[Tensor] = []
        self._frame_counts: list[tuple[Counted, dict[str, int]]] = []
        # The last static frame's flags on the host (a reused pinned buffer
        # for CUDA), whether they wait to be read, and their copy's event.
        self._flags: Tensor | None = None
        self._flags_pending = False
        self._flags_ready: torch.cuda.Event | None = None
        #: Frames run by each path since construction (``"flush"``,
        #: ``"eager"``, ``"static"``) and the number of recoveries.
        self.stats: dict[str, int] = {"flush": 0, "eager": 0, "static": 0, "recovered": 0}

    def reset(self) -> None:
        """Resets the model's stream state: the next frame is a flush."""
        reset_stream_state(self.model)
        self._flags_pending = False

    def __call__(self, x: Tensor) -> Tensor:
        if any(gate.p is None for gate in self._gates):
            self._flags_pending = False
            out = self.model(x)
            self.stats["flush"] += 1
            self._restore_state()
            return out
        if self._recover() or not self._static_policy():
            self.stats["eager"] += 1
            return self.model(x)
        self.stats["static"] += 1
        if self.mode == "eager":
            out, flags = self._static_forward(x)
            self._post_flags(flags)
            return out
        key = self._frame_key(x)
        if key != self._key:
            return self._capture(x, key)
        self._static_input.copy_(x)
        if self._graph is not None:
            self._graph.replay()
            out, flags = self._static_output, self._static_flags
        else:
            out, flags = self._uncounted(
                lambda x: self._static_forward(x, self._compiled), self._static_input
            )
        self._add_frame_counts()
        self._post_flags(flags)
        return out.clone() if self.clone_output else out

    # Frames.
    def _static_forward(
        self, x: Tensor, frame: Callable[[Tensor], tuple[Tensor, Tensor | None]] | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """One frame on the blocks' static path -> (output, flags (blocks, B) or None)."""
        set_static_frame(self.model, True)
        try:
            return (frame or self._frame)(x)
        finally:
            set_static_frame(self.model, False)

    def _frame(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        out = self.model(x)
        flags = None
        if self._full_blocks:
            flags = torch.stack([block.static_flags for block in self._full_blocks])
        return out, flags

    def _static_policy(self) -> bool:
        """Whether every gate's policy selects a fixed number of tokens (and
        has no periodic refresh, whose frames update every token)."""
        return all(
            gate.policy is not None
            and gate.policy.num_selected(gate.p.shape[1]) is not None
            and not getattr(gate.policy, "refresh_every", None)
            for gate in self._gates
        )

    def _frame_key(self, x: Tensor) -> tuple:
        ks = tuple(gate.policy.num_selected(gate.p.shape[1]) for gate in self._gates)
        return (tuple(x.shape), x.dtype, x.device, torch.is_inference_mode_enabled(), ks)

    def _capture(self, x: Tensor, key: tuple) -> Tensor:
        """Runs this frame on the static path (recording its counts), then
        captures (or compiles) the frame for the next ones."""
        self._graph = None
        self._compiled = None
        self._key = None
        if self.mode in _GRAPH_MODES:
            if x.device.type != "cuda":
                raise ValueError(
                    f"StaticFrameRunner: mode={self.mode!r} needs CUDA inputs, got a "
                    f"{x.device.type} tensor; use mode='eager' (or 'compile') off the GPU"
                )
            frame = None
            side = torch.cuda.Stream(x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):
                out, flags = self._recorded_frame(x)
                out = out.clone()
                if self.mode == "compile_cuda_graph":
                    frame = torch.compile(self._frame, **self._compile_options)
                    self._warm_up(frame, x)
            torch.cuda.current_stream(x.device).wait_stream(side)
            self._post_flags(flags)
            self._static_input = x.clone()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._static_output, self._static_flags = self._uncounted(
                    lambda x: self._static_forward(x, frame), self._static_input
                )
            self._graph = graph
        else:
            out, flags = self._recorded_frame(x)
            self._post_flags(flags)
            self._static_input = x.clone()
            self._compiled = torch.compile(self._frame, **self._compile_options)
        self._record_state()
        self._key = key
        return out

    def _warm_up(self, frame: Callable[[Tensor], tuple[Tensor, Tensor | None]], x: Tensor) -> None:
        """Runs a compiled ``frame`` once (compiling it outside the graph
        capture), then puts back the stream state it advanced."""
        self._record_state()
        saved = [value.clone() for _, _, value in self._state]
        self._uncounted(lambda x: self._static_forward(x, frame), x)
        for (module, name, value), before in zip(self._state, saved, strict=True):
            if getattr(module, name) is not value:
                raise RuntimeError(
                    f"StaticFrameRunner: the compiled frame replaced {type(module).__name__}"
                    f".{name} instead of updating it in place; use mode='cuda_graph'"
                )
            value.copy_(before)

    def _recorded_frame(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """A static frame whose counts are recorded per module and passed on."""
        attached = [module.counter for module in self._counted]
        for module in self._counted:
            module.counter = OpCounter()
        try:
            out, flags = self._static_forward(x)
        finally:
            recorders = [module.counter for module in self._counted]
            for module, counter in zip(self._counted, attached):
                module.counter = counter
        self._frame_counts = [
            (module, {k: n for k, n in recorder.counts.items() if n})
            for module, recorder in zip(self._counted, recorders)
            if recorder.total
        ]
        self._add_frame_counts()
        return out, flags

    def _uncounted(self, fn: Callable, x: Tensor) -> Any:
        attached = [module.counter for module in self._counted]
        for module in self._counted:
            module.counter = None
        try:
            return fn(x)
        finally:
            for module, counter in zip(self._counted, attached):
                module.counter = counter

    def _add_frame_counts(self) -> None:
        for module, counts in self._frame_counts:
            counter = module.counter
            if counter is not None:
                for kind, n in counts.items():
                    counter.add(kind, n)

    # Static state.
    def _record_state(self) -> None:
        """Remembers every tensor the captured frame reads or writes through
        the modules (stream state and workspaces), keeping them alive."""
        self._state = []
        self._keepalive = []
        for module in self.model.modules():
            for name, value in vars(module).items():
                if isinstance(value, Tensor) and name not in _NOT_STATE:
                    self._state.append((module, name, value))
                elif isinstance(value, Workspaces):
                    self._keepalive.extend(value._tensors.values())

    def _restore_state(self) -> None:
        """After a flush: copies the new state into the captured buffers and
        points the modules back at them (or drops the capture if a shape changed)."""
        if self._key is None or self.mode == "eager":
            return
        for module, name, static in self._state:
            current = getattr(module, name, None)
            if current is static:
                continue
            if current is None:
                setattr(module, name, static)
                continue
            if (
                not isinstance(current, Tensor)
                or current.shape != static.shape
                or current.dtype != static.dtype
                or current.device != static.device
            ):
                self._key = None  # recaptured on the next incremental frame
                self._graph = None
                self._compiled = None
                return
            static.copy_(current)
            setattr(module, name, static)

    # Recovery.
    def _post_flags(self, flags: Tensor | None) -> None:
        """Starts reading a static frame's flags (blocks, B) back to the host."""
        if flags is None:
            return
        cuda = flags.device.type == "cuda"
        if self._flags is None or self._flags.shape != flags.shape:
            self._flags = torch.empty(flags.shape, dtype=torch.bool, pin_memory=cuda)
            self._flags_ready = torch.cuda.Event() if cuda else None
        self._flags.copy_(flags, non_blocking=cuda)
        if self._flags_ready is not None:
            self._flags_ready.record()
        self._flags_pending = True

    def _recover(self) -> bool:
        """Recomputes the streams the last static frame flagged; returns
        whether this frame must take the eager path (a state stays non-finite)."""
        if self._flags_pending:
            self._flags_pending = False
            if self._flags_ready is not None:
                self._flags_ready.synchronize()
            flags = self._flags
            if bool(flags.any()):
                for block, items in zip(self._full_blocks, flags):
                    if bool(items.any()):
                        block._recompute_items(items.to(block.output.device))
                        self.stats["recovered"] += 1
        return any(block.nonfinite_items is not None for block in self._full_blocks)
