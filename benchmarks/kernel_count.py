"""Kernels per incremental static frame: eager static path vs inductor-compiled (CPU).

On a GPU an eventful incremental frame is bound by kernel launches, not
FLOPs: most of its ops are small (r tokens, per-head state updates). This
script counts, on the CPU and without a GPU, how many kernels one incremental
frame of a block stack launches on each path:

- ``dense``: the dense model (same architecture, ``block_variant="dense"``),
  one frame, for reference.
- ``eventful-eager``: the eventful model called directly (no
  :class:`eventful_pl.static_frame.StaticFrameRunner`): the eager path, with
  its host synchronisations.
- ``static-eager``: the runner in mode ``"eager"``: the blocks' static path
  (sync-free, fixed shapes), op by op as a CUDA graph would capture it.
- ``static-inductor``: the runner in mode ``"compile"``: the same static
  frame compiled by ``torch.compile`` (inductor): generated (fused) kernels
  plus extern kernel calls (``addmm``, ``bmm``, ``topk``, ...).

What is counted.

- Eager paths (``dense``, ``eventful-eager``, ``static-eager``): every op a
  ``TorchDispatchMode`` sees (after autograd and composite decompositions:
  ``aten::addmm``, ``aten::native_layer_norm``, ``aten::index_copy_``...),
  except the ops in ``NOT_KERNELS`` (printed with the table): view and
  metadata-only ops (``view``, ``expand``, ``as_strided``, ``t``,
  ``transpose``, ``permute``, ``select``, ``slice``, ...) and bare
  allocations (``empty``...), which launch nothing. On a GPU each counted op
  is about one kernel launch (``_local_scalar_dense``, a host read, is a
  device-to-host copy and a synchronisation: column ``syncs``).
- ``static-inductor``: the compiled frame under ``torch.profiler`` with
  ``torch._inductor.config.cpp.enable_kernel_profile`` (each generated C++
  kernel records an event): the outermost kernel events of the frame, i.e.
  the generated kernels (``cpp_fused_*``) and the aten ops the compiled code
  calls (extern kernels such as ``addmm``/``bmm``/``topk``, and eager ops of
  any graph break), not their internal sub-ops, views or allocations.
  ``distinct`` is the number of different generated kernels launched (the
  inductor code cache reuses one kernel for identical blocks), ``graphs`` the
  compiled regions per frame (more than one means a graph break). The JSON
  also has ``generated_at_compile``, what the compile added to
  ``torch._inductor.metrics.generated_kernel_count`` (kernels generated during
  codegen, not launches per frame).
- ``runner``: what :class:`StaticFrameRunner` adds per frame outside the
  frame itself (input copy into the static buffer, reading and copying the
  recovery flags, the output copy), given separately.

Per block = per frame / depth (the frame also holds a few non-block ops, e.g.
the class token's concatenation). Counts depend on shapes only (top-r
selects a fixed number of tokens), so they are the same on every
incremental frame; the script checks this on two frames of each path.

CPU vs GPU: the fused CPU kernels of :mod:`eventful_pl.kernels` are switched
off (the eager static path is then plain aten ops, like the GPU's
``static-no-triton`` run; on a GPU the Triton kernels of
:mod:`eventful_pl.triton_kernels` replace a few chains of them). Inductor's
C++ backend fuses a little differently from its Triton backend, so the
compiled count approximates the GPU's. Model weights are float32 and random
(counts do not depend on them).

Cases (``--case``): ``a50``: the ViT-B stack of ``gpu_speed.py``'s
``stack-a50`` row (12 blocks, D = 768, 20 x 20 grid + class token = 401
tokens, full eventful blocks, top-r r = 50); ``b512``: the ViTDet-B
backbone stack at 1024 (64 x 64 tokens, 14 x 14 windows in blocks
0,1,3,4,6,7,9,10 with token-wise eventful blocks, global full blocks,
relative position, r = 512); ``b256``: the same at 672 (42 x 42, r = 256).

Usage::

    python benchmarks/kernel_count.py                        # ViT-B a50, B = 1
    python benchmarks/kernel_count.py --depth 2 --json counts.json
    python benchmarks/kernel_count.py --case b512 --depth 3 --ops 15
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eventful_pl import kernels
from eventful_pl.backbone import ViTBackbone
from eventful_pl.policies import TopRPolicy
from eventful_pl.static_frame import StaticFrameRunner

#: View and metadata-only ops (in place forms too): no kernel.
VIEW_OPS = frozenset(
    {
        "view",
        "_unsafe_view",
        "_reshape_alias",
        "reshape",
        "expand",
        "as_strided",
        "t",
        "transpose",
        "permute",
        "unsqueeze",
        "squeeze",
        "select",
        "slice",
        "split",
        "split_with_sizes",
        "unbind",
        "chunk",
        "narrow",
        "diagonal",
        "unfold",
        "detach",
        "alias",
        "lift_fresh",
        "view_as_real",
        "view_as_complex",
        "set",
    }
)
#: Bare allocations: no kernel.
ALLOC_OPS = frozenset(
    {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "resize"}
)
NOT_KERNELS = VIEW_OPS | ALLOC_OPS
#: Ops that synchronise with the host inside (their output shape is data-dependent).
SYNC_OPS = frozenset({"nonzero", "masked_select", "repeat_interleave", "unique"})
FRAME_MARK = "eventful_static_frame"


def _vitdet_case(grid: int, r: int) -> dict[str, Any]:
    """A ViTDet-B stack on a ``grid`` x ``grid`` token grid: windowed
    token-wise blocks and global full blocks (3, 6, 9, 12), top-r."""
    kwargs = dict(
        input_size=grid,
        window_size=14,
        window_block_indices=(0, 1, 3, 4, 6, 7, 9, 10),
        relative_embedding_size=grid,
    )
    return dict(kwargs=kwargs, variant="full", window="tokenwise", r=r)


CASES: dict[str, dict[str, Any]] = {
    "a50": dict(kwargs=dict(input_size=20, class_token=True), variant="full", window=None, r=50),
    "b512": _vitdet_case(64, 512),
    "b256": _vitdet_case(42, 256),
}


def op_name(namespace: str, name: str) -> str | None:
    """``"aten::addmm"`` for a kernel op; None for a view, metadata op or allocation."""
    if name.rstrip("_") in NOT_KERNELS:
        return None
    return f"{namespace}::{name}"


class OpCounter(TorchDispatchMode):
    """Counts dispatched ops that launch a kernel, per section (``frame`` or ``runner``)."""

    def __init__(self) -> None:
        super().__init__()
        self.section = "runner"
        self.counts: dict[str, Counter] = {"frame": Counter(), "runner": Counter()}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = op_name(func.namespace, func.overloadpacket.__name__)
        if name is not None:
            self.counts[self.section][name] += 1
        return func(*args, **(kwargs or {}))

    @contextmanager
    def frame(self) -> Iterator[None]:
        previous, self.section = self.section, "frame"
        try:
            yield
        finally:
            self.section = previous


class HostReads(TorchFunctionMode):
    """Counts host reads of tensor values (``.item()``, ``.tolist()``, ``bool()``...)
    per section of ``ops``: one device-to-host copy and synchronisation each on
    a GPU. (On the CPU, ``.tolist()`` reaches no dispatched op.)"""

    READS = frozenset(
        {
            Tensor.item,
            Tensor.tolist,
            Tensor.__bool__,
            Tensor.__int__,
            Tensor.__float__,
            Tensor.__index__,
            Tensor.numpy,
        }
    )

    def __init__(self, ops: OpCounter) -> None:
        super().__init__()
        self.ops = ops
        self.counts: dict[str, int] = {"frame": 0, "runner": 0}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.counts[self.ops.section] += 1
        return func(*args, **(kwargs or {}))


def mark_frames(runner: StaticFrameRunner, mark: Callable[[], Any]) -> None:
    """Runs every static frame of ``runner`` (eager or compiled) inside ``mark()``."""
    inner = runner._static_forward

    def marked(x: Tensor, frame=None):
        with mark():
            return inner(x, frame)

    runner._static_forward = marked


def dispatch_counts(
    step: Callable[[], object], counter_hook: Callable[[OpCounter], None] | None = None
) -> dict[str, dict[str, Any]]:
    """Kernel ops and host reads of one ``step()`` per section (``frame``,
    ``runner``); ``counter_hook(counter)`` may mark the frame section."""
    counter = OpCounter()
    if counter_hook is not None:
        counter_hook(counter)
    reads = HostReads(counter)
    with reads, counter:
        step()
    return {
        section: _summary(ops, reads.counts[section]) for section, ops in counter.counts.items()
    }


def _is_generated(name: str) -> bool:
    return "cpp_fused" in name or name.startswith(("triton_", "cpp_"))


def profiled_counts(step: Callable[[], object]) -> tuple[dict[str, Counter], int]:
    """Kernels of one ``step()`` from the profiler: the outermost kernel events
    (generated kernels and non-view aten ops) per section, and the number of
    compiled regions entered inside frames."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    counts: dict[str, Counter] = {"frame": Counter(), "runner": Counter()}
    graphs = 0
    for event in prof.events():
        ancestors = []
        parent = event.cpu_parent
        while parent is not None:
            ancestors.append(parent.name)
            parent = parent.cpu_parent
        in_frame = FRAME_MARK in ancestors
        if in_frame and event.name.startswith("Torch-Compiled Region"):
            graphs += 1
        name = _kernel_name(event.name)
        if name is None or any(_kernel_name(a) is not None for a in ancestors):
            continue
        counts["frame" if in_frame else "runner"][name] += 1
    return counts, graphs


def _kernel_name(event: str) -> str | None:
    if "::" in event:
        namespace, _, name = event.partition("::")
        return op_name(namespace, name)
    if _is_generated(event):
        return "generated"
    return None


def token_stream(frames: int, batch: int, tokens: int, dim: int, seed: int = 0) -> list[Tensor]:
    """Video-like token frames (B, N, D), float32: drift, 10% strongly changed."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, dim, generator=gen)
    out = [x]
    for _ in range(frames - 1):
        x = x + 0.05 * torch.randn(x.shape, generator=gen)
        moved = torch.rand(batch, tokens, 1, generator=gen) < 0.1
        out.append(x := x + moved * torch.randn(x.shape, generator=gen))
    return out


def build(case: str, dim: int, depth: int, heads: int) -> tuple[nn.Module, nn.Module, int]:
    """(dense, eventful) float32 backbones with the same weights, and r."""
    spec = CASES[case]
    kwargs = dict(spec["kwargs"], dim=dim, depth=depth, heads=heads)
    if "window_block_indices" in kwargs:
        kwargs["window_block_indices"] = tuple(
            i for i in kwargs["window_block_indices"] if i < depth
        )
    torch.manual_seed(0)
    dense = ViTBackbone(**kwargs).eval()
    eventful = ViTBackbone(
        block_variant=spec["variant"], window_block_variant=spec["window"], **kwargs
    ).eval()
    eventful.load_state_dict(dense.state_dict())
    eventful.set_policy(TopRPolicy(spec["r"]))
    return dense, eventful, spec["r"]


def _summary(counts: Counter, host_reads: int = 0) -> dict[str, Any]:
    """Kernels, host synchronisations (host reads + ``SYNC_OPS``) and ops by count."""
    syncs = sum(n for op, n in counts.items() if op.partition("::")[2] in SYNC_OPS)
    return {
        "kernels": sum(counts.values()),
        "syncs": syncs + host_reads,
        "ops": dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))),
    }


def _same(name: str, first: dict, second: dict) -> dict:
    if first != second:
        raise RuntimeError(f"{name}: counts differ between two incremental frames")
    return first


def count(case: str, dim: int, depth: int, heads: int, batch: int) -> dict[str, Any]:
    """Counts per incremental frame on every path (see the module docstring)."""
    switches = kernels._enabled, kernels._attention
    kernels.set_fused_kernels(False)
    # Also off: the full block's fused attention kernels. Their availability
    # check reads the CPU capability, which torch.compile cannot trace (a graph
    # break per full block at head sizes 16-64, on any device) unless forced off.
    kernels.set_fused_attention_kernels(False)
    try:
        return _count(case, dim, depth, heads, batch)
    finally:
        kernels.set_fused_kernels(switches[0])
        kernels.set_fused_attention_kernels(switches[1])


def _count(case: str, dim: int, depth: int, heads: int, batch: int) -> dict[str, Any]:
    dense, eventful, r = build(case, dim, depth, heads)
    tokens = eventful.num_tokens - eventful.num_prefix_tokens
    frames = token_stream(6, batch, tokens, dim)
    out: dict[str, Any] = {}
    # no_grad, not inference_mode: under inference_mode composite ops (flatten,
    # reshape, item...) reach the dispatch mode undecomposed.
    with torch.no_grad():
        dense(frames[0])  # CPU linears pack their weights on the first call
        out["dense"] = dispatch_counts(lambda: dense(frames[1]))["runner"]
        eventful.reset()
        eventful(frames[0])
        eventful(frames[1])  # the first incremental frame also sets up cached tensors
        eager = [dispatch_counts(lambda f=f: eventful(f))["runner"] for f in frames[2:4]]
        out["eventful-eager"] = _same("eventful-eager", *eager)

        runner = StaticFrameRunner(eventful, mode="eager")
        runner.reset()
        runner(frames[0])
        runner(frames[1])
        static = [
            dispatch_counts(lambda f=f: runner(f), lambda c: mark_frames(runner, c.frame))
            for f in frames[2:4]
        ]
        runner._static_forward = StaticFrameRunner._static_forward.__get__(runner)
        out["static-eager"] = _same("static-eager", *(c["frame"] for c in static))
        out["static-eager"]["runner"] = static[0]["runner"]["kernels"]

        import torch._inductor.config as inductor_config
        from torch._inductor import metrics

        compiled = StaticFrameRunner(eventful, mode="compile")
        mark_frames(compiled, lambda: torch.profiler.record_function(FRAME_MARK))
        with inductor_config.patch({"cpp.enable_kernel_profile": True}):
            compiled.reset()
            compiled(frames[0])
            compiled(frames[1])  # the recorded static frame; the compile is set up
            before = metrics.generated_kernel_count
            start = time.perf_counter()
            compiled(frames[2])  # compiles
            compile_s = time.perf_counter() - start
            generated = metrics.generated_kernel_count - before
            profiled = [profiled_counts(lambda f=f: compiled(f)) for f in frames[3:5]]
        if compiled.stats != {"flush": 1, "eager": 0, "static": 4, "recovered": 0}:
            raise RuntimeError(f"compiled runner took other paths: {compiled.stats}")
        summaries = []
        for counts, graphs in profiled:
            frame = counts["frame"]
            summary = _summary(frame)
            summary.update(
                generated=frame["generated"],
                extern=summary["kernels"] - frame["generated"],
                graphs=graphs,
                runner=sum(counts["runner"].values()),
            )
            summaries.append(summary)
        out["static-inductor"] = _same("static-inductor", *summaries)
        out["static-inductor"].update(
            distinct=_distinct_generated(compiled, frames[5]),
            generated_at_compile=generated,
            compile_s=round(compile_s, 1),
        )
    config = dict(case=case, dim=dim, depth=depth, heads=heads, batch=batch, r=r)
    config["tokens"] = eventful.num_tokens
    return {"config": config, "paths": out}


def _distinct_generated(runner: StaticFrameRunner, frame: Tensor) -> int:
    """Different generated kernels launched by one compiled frame."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        runner(frame)
    return len({e.name for e in prof.events() if _is_generated(e.name)})


def print_table(report: dict[str, Any], top: int = 0) -> None:
    c, paths = report["config"], report["paths"]
    print(
        f"case {c['case']}: D = {c['dim']}, depth {c['depth']}, heads {c['heads']}, "
        f"B = {c['batch']}, {c['tokens']} tokens, top-r r = {c['r']}, float32 CPU, "
        "fused CPU kernels off"
    )
    print(f"{'path':<17} {'kernels/frame':>13} {'per block':>9} {'syncs':>5}  notes")
    for name, p in paths.items():
        notes = ""
        if name == "static-eager":
            notes = f"+ {p['runner']} runner ops/frame"
        elif name == "static-inductor":
            notes = (
                f"{p['generated']} generated ({p['distinct']} distinct) + {p['extern']} extern; "
                f"{p['graphs']} graph(s); + {p['runner']} runner ops/frame; "
                f"compile {p['compile_s']} s"
            )
        print(
            f"{name:<17} {p['kernels']:>13} {p['kernels'] / c['depth']:>9.1f} "
            f"{p['syncs']:>5}  {notes}"
        )
    ratio = paths["static-eager"]["kernels"] / max(paths["static-inductor"]["kernels"], 1)
    print(f"static-eager / static-inductor: {ratio:.2f}x fewer kernels compiled")
    print("not counted (views, metadata, allocations):", ", ".join(sorted(NOT_KERNELS)))
    for name in ("static-eager", "static-inductor") if top else ():
        ops = list(paths[name]["ops"].items())[:top]
        print(f"{name} top ops: " + ", ".join(f"{op} {n}" for op, n in ops))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=sorted(CASES), default="a50")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--batch", type=int, default=1, help="streams B")
    parser.add_argument("--ops", type=int, default=0, metavar="N", help="print the top N ops")
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    report = count(args.case, args.dim, args.depth, args.heads, args.batch)
    report["torch"] = torch.__version__
    print_table(report, args.ops)
    print(f"({time.perf_counter() - start:.0f} s)")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
