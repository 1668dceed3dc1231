"""GPU speed of the paper's rows: dense (SDPA, bf16) vs eventful eager vs eventful static.

Rows (``--rows``):

- ``stack-a50``: a ViT-B block stack (12 blocks, D = 768) on the EPIC ViViT
  spatial grid (20 x 20 + class token, 401 tokens), B = 12 streams (the 12
  views of a video), full eventful blocks, top-r r = 50; ms per frame.
- ``stack-b512``: the ViTDet-B backbone stack at 1024 (64 x 64 tokens, 14 x 14
  windows with relative position in blocks 0,1,3,4,6,7,9,10, token-wise
  eventful; global blocks full eventful with relative position), B = 1,
  r = 512; ms per frame.
- ``vivit``: the whole ViViT-B EPIC-Kitchens model per video (12 views x 16
  tubelet steps: tubelet embedding, spatial model, temporal model,
  classifier), r = 50. The dense baseline batches all 192 spatial frames of a
  video in one call (its fastest form); the per-step dense loop is shown too.
- ``vitdet``: ViTDet-B at 1024 per frame, patch embedding + backbone +
  feature pyramid (``features``) and, as a second row, the detection head
  too, r = 512.
- ``train``: training throughput with bf16 autocast and fused AdamW: the ViViT
  temporal fine-tuning from cached spatial features (views per second) and
  ViTDet-B 1024 dense training (images per second).

Columns: ms per frame (or per video), speedup over the fastest dense run,
the operation-count ratio dense / eventful (``count_ops``), and the goal
(ViViT >= 2.5x, ViTDet >= 1.8x). Dense runs use PyTorch's fused
``scaled_dot_product_attention`` with bf16 weights (``dense-bf16``) and with
float32 weights under bf16 autocast (``dense-autocast``); eventful runs use
bf16 weights, eagerly (``eventful-eager``) and with incremental frames
replayed as CUDA graphs (``eventful-static``,
:class:`eventful_pl.static_frame.StaticFrameRunner`, with the Triton kernels
of :mod:`eventful_pl.triton_kernels`; ``static-no-triton`` without them), and
with the static frame compiled by ``torch.compile`` (inductor: chains of small
element-wise ops fused into generated Triton kernels) and then captured as one
CUDA graph (``eventful-inductor``, runner mode ``"compile_cuda_graph"``; mode
``"compile"`` under ``--smoke``) in the stack, ``vivit`` and ``vitdet`` rows.
Weights are random (speed does not depend on them); video frames drift slowly
with a fraction of strongly changed patches.

Inductor runs come last: every row's other runs are measured first, then the
``eventful-inductor`` run of each row (compiling a 12-block frame takes about
a minute or two), each in its own ``try``: a failed compile becomes a row
``{"row": ..., "run": "eventful-inductor", "error": ...}``. Their
``compile_s`` is the wall time of the first frames of a stream (flush, the
recorded static frame, the compile and capture). ``--no-inductor`` skips them;
``--inductor-budget S`` starts none later than S seconds after the start (the
rest are recorded as skipped). ``--json`` is rewritten after every row, so a
run cut short keeps what it measured.

Usage::

    python benchmarks/gpu_speed.py                       # every row
    python benchmarks/gpu_speed.py --rows stack-a50 vivit --json out.json
    python benchmarks/gpu_speed.py --no-inductor         # without the compiled frames
    python benchmarks/gpu_speed.py --smoke               # CPU, tiny models: the script only
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eventful_pl import kernels, triton_kernels
from eventful_pl.backbone import ViTBackbone
from eventful_pl.counting import count_ops
from eventful_pl.policies import TopRPolicy
from eventful_pl.static_frame import StaticFrameRunner

BF16 = torch.bfloat16
#: ``--smoke``: tiny models on the CPU, static frames without capture (checks
#: this script's logic without a GPU; its numbers mean nothing).
SMOKE = False
DEVICE = "cuda"
#: ``--profile N``: the N ops with the most device time of eager eventful frames.
PROFILE = 0
#: ``--no-inductor`` / ``--inductor-budget``: whether and until when (seconds
#: after START) the eventful-inductor runs start.
INDUCTOR = True
INDUCTOR_BUDGET: float | None = None
START = time.perf_counter()
#: Every row measured so far, and where ``--json`` writes them.
RESULTS: list[dict] = []
HEADER: dict = {}
JSON_PATH: Path | None = None
GOALS = {"stack-a50": 2.5, "vivit": 2.5, "stack-b512": 1.8, "vitdet": 1.8, "vitdet-head": 1.8}
ROWS = ("stack-a50", "stack-b512", "vivit", "vitdet", "train")


def cuda_ms(fn: Callable[[], object], reps: int, warmup: int = 1) -> tuple[float, float]:
    """Median and spread (max - min) in ms of ``fn`` over ``reps`` timed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        with Timer() as timer:
            fn()
        times.append(timer.ms)
    return statistics.median(times), max(times) - min(times)


class Timer:
    """Milliseconds of the work enqueued inside ``with`` (CUDA events, or the host clock)."""

    def __enter__(self) -> Timer:
        if DEVICE == "cuda":
            self.start = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if DEVICE == "cuda":
            self.end.record()
            self.end.synchronize()
            self.ms = self.start.elapsed_time(self.end)
        else:
            self.ms = (time.perf_counter() - self.start) * 1000


def static_mode() -> str:
    return "eager" if SMOKE else "cuda_graph"


def inductor_mode() -> str:
    return "compile" if SMOKE else "compile_cuda_graph"


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


#: A row's eventful-inductor run, measured after every row's other runs.
InductorRun = Callable[[], dict]


def run_inductor(row: str, run: InductorRun) -> dict:
    """``run()``'s result row, or a row with the error (or the skip) instead."""
    if INDUCTOR_BUDGET is not None and time.perf_counter() - START > INDUCTOR_BUDGET:
        error = f"skipped: --inductor-budget {INDUCTOR_BUDGET:g} s spent"
        return {"row": row, "run": "eventful-inductor", "error": error}
    # The full block's CPU attention-kernel check reads the CPU capability,
    # which torch.compile cannot trace (a graph break per full block); those
    # kernels never run on CUDA tensors, so they are forced off here.
    attention = kernels._attention
    kernels.set_fused_attention_kernels(False)
    try:
        return run()
    except Exception as error:
        traceback.print_exc()
        return {"row": row, "run": "eventful-inductor", "error": repr(error)[:500]}
    finally:
        kernels.set_fused_attention_kernels(attention)
        torch._dynamo.reset()  # frees the compiled frames (and their graphs)


def first_frames_s(step: Callable[[], object]) -> float:
    """Seconds of ``step()`` (the first frames of a stream: flush, compile, capture)."""
    synchronize()
    start = time.perf_counter()
    step()
    synchronize()
    return round(time.perf_counter() - start, 1)


def compiled_stream_ms(
    step: Callable[[Tensor], object], reset: Callable[[], None], frames, rounds: int
) -> tuple[float, float, float]:
    """A freshly compiled runner's first 3 frames (flush, compile, capture) in
    seconds, then :func:`stream_ms` over ``frames``: (compile_s, ms, spread)."""

    def first_frames() -> None:
        reset()
        for frame in frames[:3]:
            step(frame)

    with torch.inference_mode():
        compile_s = first_frames_s(first_frames)
        ms, spread = stream_ms(step, reset, frames, rounds)
    return compile_s, ms, spread


def token_stream(frames: int, batch: int, tokens: int, dim: int, seed: int = 0) -> list[Tensor]:
    """Video-like token frames (B, N, D) on the GPU: drift, 10% strongly changed."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(batch, tokens, dim, device=DEVICE, generator=gen)
    out = [x.to(BF16)]
    for _ in range(frames - 1):
        x = x + 0.05 * torch.randn(x.shape, device=DEVICE, generator=gen)
        moved = torch.rand(batch, tokens, 1, device=DEVICE, generator=gen) < 0.1
        x = x + moved * torch.randn(x.shape, device=DEVICE, generator=gen)
        out.append(x.to(BF16))
    return out


def pixel_video(frames: int, batch: int, size: int, seed: int = 0) -> Tensor:
    """Normalised pixels (B, T, 3, S, S) that drift slowly, bf16 on the GPU."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    base = torch.randn(batch, 1, 3, size, size, device=DEVICE, generator=gen)
    drift = 0.02 * torch.randn(batch, frames, 3, size, size, device=DEVICE, generator=gen)
    return (base + drift.cumsum(dim=1)).to(BF16)


def op_ratio(dense: Callable[[], object], eventful: Callable[[], object], models) -> float:
    dense_model, eventful_model = models
    with torch.inference_mode(), count_ops(dense_model) as d:
        dense()
    with torch.inference_mode(), count_ops(eventful_model) as e:
        eventful()
    return d.total / max(e.total, 1)


def result(row, name, ms, spread, unit, dense_ms=None, ratio=None, extra=None) -> dict:
    out = {"row": row, "run": name, "ms": round(ms, 3), "spread_ms": round(spread, 3)}
    out["unit"] = unit
    if dense_ms is not None:
        out["speedup"] = round(dense_ms / ms, 3)
    if ratio is not None:
        out["op_ratio"] = round(ratio, 3)
    if row in GOALS and name.startswith("eventful"):
        out["goal"] = GOALS[row]
    out.update(extra or {})
    return out


# Block stacks.
def stack_models(case: str) -> tuple[nn.Module, nn.Module, nn.Module, int, int]:
    """(dense bf16, dense float32, eventful bf16, B, r) with the same weights."""
    if case == "stack-a50":
        kwargs = dict(input_size=20, class_token=True)
        variant, window_variant, batch, r = "full", None, 12, 50
    else:
        kwargs = dict(
            input_size=64,
            window_size=14,
            window_block_indices=(0, 1, 3, 4, 6, 7, 9, 10),
            relative_embedding_size=64,
        )
        variant, window_variant, batch, r = "full", "tokenwise", 1, 512
    if SMOKE:
        kwargs.update(dim=64, heads=4, depth=12, input_size=kwargs["input_size"] // 4)
        if "window_size" in kwargs:
            kwargs.update(window_size=4, relative_embedding_size=16)
        batch, r = min(batch, 2), r // 16
    torch.manual_seed(0)
    dense = ViTBackbone(**kwargs).eval()
    eventful = ViTBackbone(
        block_variant=variant, window_block_variant=window_variant, **kwargs
    ).eval()
    eventful.load_state_dict(dense.state_dict())
    eventful.set_policy(TopRPolicy(r))
    dense32 = dense.to(DEVICE)
    dense16 = ViTBackbone(**kwargs).eval()
    dense16.load_state_dict(dense.state_dict())
    return dense16.to(DEVICE, BF16), dense32, eventful.to(DEVICE, BF16), batch, r


def stream_ms(step: Callable[[Tensor], object], reset: Callable[[], None], frames, rounds: int):
    """Median ms per incremental frame: flush, two untimed frames, then the rest timed."""
    times = []
    for _ in range(rounds):
        reset()
        for frame in frames[:3]:
            step(frame)
        with Timer() as timer:
            for frame in frames[3:]:
                step(frame)
        times.append(timer.ms / (len(frames) - 3))
    return statistics.median(times), max(times) - min(times)


def profile_frames(case: str, model: nn.Module, stream: list[Tensor]) -> None:
    """Prints the ops with the most device time over eager incremental frames."""
    from torch.profiler import ProfilerActivity, profile

    model.reset()
    for frame in stream[:3]:
        model(frame)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    with profile(activities=activities) as prof:
        for frame in stream[3:6]:
            model(frame)
    key = "self_cuda_time_total" if DEVICE == "cuda" else "self_cpu_time_total"
    print(f"--- {case}: eager eventful, 3 incremental frames, top {PROFILE} ops by device time")
    print(prof.key_averages().table(sort_by=key, row_limit=PROFILE, max_name_column_width=40))


def bench_stack(case: str, frames: int, rounds: int) -> tuple[list[dict], InductorRun]:
    dense16, dense32, eventful, batch, r = stack_models(case)
    n, dim = eventful.num_tokens - eventful.num_prefix_tokens, eventful.dim
    stream = token_stream(frames, batch, n, dim)
    rows = []
    with torch.inference_mode():
        d16, s16 = cuda_ms(lambda: dense16(stream[1]), reps=rounds * 5, warmup=3)

        def autocast_frame():
            with torch.autocast(DEVICE, BF16):
                return dense32(stream[1].float())

        d32, s32 = cuda_ms(autocast_frame, reps=rounds * 5, warmup=3)
        dense_ms = min(d16, d32)
        rows.append(result(case, "dense-bf16", d16, s16, "ms/frame", dense_ms))
        rows.append(result(case, "dense-autocast", d32, s32, "ms/frame", dense_ms))
        eager_ms, eager_spread = stream_ms(eventful, eventful.reset, stream, rounds)
        runner = StaticFrameRunner(eventful, mode=static_mode())
        static_ms, static_spread = stream_ms(runner, runner.reset, stream, rounds)
        triton_kernels.set_triton_kernels(False)  # the same static frames in PyTorch ops
        try:
            plain = StaticFrameRunner(eventful, mode=static_mode())
            plain_ms, plain_spread = stream_ms(plain, plain.reset, stream, rounds)
        finally:
            triton_kernels.set_triton_kernels(True)
        if PROFILE:
            profile_frames(case, eventful, stream)
        eventful.reset()
        eventful(stream[0])
        ratio = op_ratio(
            lambda: dense16(stream[1]), lambda: eventful(stream[1]), (dense16, eventful)
        )
    extra = {"batch": batch, "r": r}
    rows.append(
        result(case, "eventful-eager", eager_ms, eager_spread, "ms/frame", dense_ms, ratio, extra)
    )
    extra = {**extra, "recovered": runner.stats["recovered"], "static": runner.stats["static"]}
    rows.append(
        result(
            case, "eventful-static", static_ms, static_spread, "ms/frame", dense_ms, ratio, extra
        )
    )
    rows.append(
        result(case, "static-no-triton", plain_ms, plain_spread, "ms/frame", dense_ms, ratio, extra)
    )

    def inductor() -> dict:
        compiled = StaticFrameRunner(eventful, mode=inductor_mode())
        compile_s, ms, spread = compiled_stream_ms(compiled, compiled.reset, stream, rounds)
        info = {"batch": batch, "r": r, "compile_s": compile_s}
        info.update(recovered=compiled.stats["recovered"], static=compiled.stats["static"])
        return result(case, "eventful-inductor", ms, spread, "ms/frame", dense_ms, ratio, info)

    return rows, inductor


# ViViT per video.
def bench_vivit(rounds: int, r: int = 50) -> tuple[list[dict], InductorRun]:
    from eventful_pl.models.vivit import create_vivit

    torch.manual_seed(0)
    preset = "vivit_tiny" if SMOKE else "vivit_b_epic_kitchens"
    r = 4 if SMOKE else r
    dense = create_vivit(preset).eval()
    eventful = create_vivit(preset, spatial_variant="full", policy=TopRPolicy(r)).eval()
    eventful.load_state_dict(dense.state_dict())
    dense, eventful = dense.to(DEVICE, BF16), eventful.to(DEVICE, BF16)
    views_count = dense.num_views
    size = dense.config["image_size"]
    size = size[0] if isinstance(size, (tuple, list)) else size
    frames = dense.config["frames"]
    views = pixel_video(frames, views_count, size)  # (V, T, 3, S, S): one video's views
    runner = StaticFrameRunner(eventful.spatial, mode=static_mode())

    def dense_batched():
        tokens = dense.embedding(views)  # (V, T', P, D)
        v, t = tokens.shape[:2]
        feats = dense.spatial(tokens.flatten(0, 1))[:, 0].view(v, t, -1)
        return dense.temporal_forward(feats).mean(dim=0)

    def dense_steps():
        return dense.temporal_forward(dense.spatial_forward(views)).mean(dim=0)

    def eventful_video(step, reset):
        tokens = eventful.embedding(views)
        reset()
        feats = torch.stack([step(tokens[:, t])[:, 0] for t in range(tokens.shape[1])], dim=1)
        return eventful.temporal_forward(feats).mean(dim=0)

    rows = []
    with torch.inference_mode():
        db, sb = cuda_ms(dense_batched, reps=rounds, warmup=2)
        ds, ss = cuda_ms(dense_steps, reps=rounds, warmup=1)
        dense_ms = min(db, ds)
        ee, se = cuda_ms(
            lambda: eventful_video(eventful.spatial, eventful.spatial.reset), rounds, 1
        )
        es, ss2 = cuda_ms(lambda: eventful_video(runner, runner.reset), rounds, 1)
        triton_kernels.set_triton_kernels(False)
        try:
            plain = StaticFrameRunner(eventful.spatial, mode=static_mode())
            ep, sp = cuda_ms(lambda: eventful_video(plain, plain.reset), rounds, 1)
        finally:
            triton_kernels.set_triton_kernels(True)
        ratio = op_ratio(
            dense_batched,
            lambda: eventful_video(eventful.spatial, eventful.spatial.reset),
            (dense, eventful),
        )
    unit = "ms/video"
    extra = {"views": views_count, "steps": dense.steps, "r": r}
    rows.append(result("vivit", "dense-bf16-batched", db, sb, unit, dense_ms, extra=extra))
    rows.append(result("vivit", "dense-bf16-per-step", ds, ss, unit, dense_ms, extra=extra))
    rows.append(result("vivit", "eventful-eager", ee, se, unit, dense_ms, ratio, extra))
    extra = {**extra, "recovered": runner.stats["recovered"]}
    rows.append(result("vivit", "eventful-static", es, ss2, unit, dense_ms, ratio, extra))
    rows.append(result("vivit", "static-no-triton", ep, sp, unit, dense_ms, ratio, extra))

    def inductor() -> dict:
        compiled = StaticFrameRunner(eventful.spatial, mode=inductor_mode())
        with torch.inference_mode():
            compile_s = first_frames_s(lambda: eventful_video(compiled, compiled.reset))
            ms, spread = cuda_ms(lambda: eventful_video(compiled, compiled.reset), rounds, 0)
        info = {"views": views_count, "steps": dense.steps, "r": r, "compile_s": compile_s}
        info["recovered"] = compiled.stats["recovered"]
        return result("vivit", "eventful-inductor", ms, spread, unit, dense_ms, ratio, info)

    return rows, inductor


# ViTDet per frame.
def to_bf16_backbone(model: nn.Module) -> None:
    """ViTDet on the GPU: patch embedding and backbone in bf16, the feature
    pyramid and the head in float32 (``features`` casts the tokens)."""
    model.to(DEVICE)
    model.embedding.to(BF16)
    model.backbone.to(BF16)

    def features(images: ImageList) -> dict[str, Tensor]:
        pixels = images.tensors.to(BF16)
        tokens = model.backbone(model.embedding(pixels)).float()
        x = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *model.grid)
        return model.pyramid(x)

    model.features = features


class _RunnerBackbone(nn.Module):
    """Puts a StaticFrameRunner where ViTDet calls its backbone."""

    def __init__(self, backbone: nn.Module, runner: StaticFrameRunner) -> None:
        super().__init__()
        self.inner = backbone
        self.runner = runner

    @property
    def compute_dtype(self) -> torch.dtype:
        return next(self.inner.parameters()).dtype

    def reset(self) -> None:
        self.runner.reset()

    def forward(self, x: Tensor) -> Tensor:
        return self.runner(x)


def bench_vitdet(frames: int, rounds: int, r: int = 512) -> tuple[list[dict], InductorRun]:
    from eventful_pl.models.vitdet import create_vitdet

    torch.manual_seed(0)
    preset, size = ("vitdet_tiny", 128) if SMOKE else ("vitdet_b_vid", 1024)
    r = 8 if SMOKE else r
    dense = create_vitdet(preset, variant="dense").eval()
    eventful = create_vitdet(preset, variant="eventful", policy=TopRPolicy(r)).eval()
    eventful.load_state_dict(dense.state_dict())
    static = create_vitdet(preset, variant="eventful", policy=TopRPolicy(r)).eval()
    static.load_state_dict(dense.state_dict())
    for model in (dense, eventful, static):
        to_bf16_backbone(model)
    video = pixel_video(frames, 1, size)[0].unsqueeze(1)  # (T, 1, 3, S, S)
    runner = StaticFrameRunner(static.backbone, mode=static_mode())
    static.backbone = _RunnerBackbone(static.backbone, runner)

    def features(model):
        def step(pixels):
            return model.features(ImageList(pixels, [(size, size)]))

        return step

    rows = []
    with torch.inference_mode():
        d, s = cuda_ms(lambda: features(dense)(video[1]), reps=rounds * 5, warmup=3)
        ee, se = stream_ms(features(eventful), eventful.reset, video, rounds)
        es, ss = stream_ms(features(static), static.reset, video, rounds)
        eventful.reset()
        features(eventful)(video[0])
        ratio = op_ratio(
            lambda: features(dense)(video[1]),
            lambda: features(eventful)(video[1]),
            (dense, eventful),
        )
    extra = {"r": r}
    rows.append(result("vitdet", "dense-bf16", d, s, "ms/frame", d))
    rows.append(result("vitdet", "eventful-eager", ee, se, "ms/frame", d, ratio, extra))
    rows.append(result("vitdet", "eventful-static", es, ss, "ms/frame", d, ratio, extra))
    try:
        images = [((video[t, 0].float() * 40 + 120).clamp(0, 255)) for t in range(frames)]

        def full(model):
            return lambda image: model([image])

        with torch.inference_mode():
            dh, sh = cuda_ms(lambda: full(dense)(images[1]), reps=rounds * 3, warmup=2)
            eh, seh = stream_ms(full(static), static.reset, images, rounds)
        rows.append(result("vitdet-head", "dense-bf16", dh, sh, "ms/frame", dh))
        rows.append(result("vitdet-head", "eventful-static", eh, seh, "ms/frame", dh, None, extra))
    except Exception as error:  # the head is optional in this benchmark
        rows.append({"row": "vitdet-head", "run": "skipped", "error": repr(error)[:300]})

    def inductor() -> dict:
        backbone = static.backbone.inner
        compiled = StaticFrameRunner(backbone, mode=inductor_mode())
        static.backbone = _RunnerBackbone(backbone, compiled)
        compile_s, ms, spread = compiled_stream_ms(features(static), static.reset, video, rounds)
        info = {"r": r, "compile_s": compile_s, "recovered": compiled.stats["recovered"]}
        return result("vitdet", "eventful-inductor", ms, spread, "ms/frame", d, ratio, info)

    return rows, inductor


# Training throughput.
def bench_train(steps: int) -> list[dict]:
    from eventful_pl.models.vitdet import create_vitdet
    from eventful_pl.models.vivit import create_vivit

    rows = []
    torch.manual_seed(0)
    vivit = create_vivit("vivit_tiny" if SMOKE else "vivit_b_epic_kitchens")
    vivit = vivit.to(DEVICE).train()
    params = [p for p in vivit.temporal.parameters()] + list(vivit.classifier.parameters())
    optim = torch.optim.AdamW(params, lr=1e-4, fused=DEVICE == "cuda")
    batch = 64
    feats = torch.randn(batch, vivit.steps, vivit.dim, device=DEVICE)
    labels = torch.randint(0, vivit.num_classes, (batch,), device=DEVICE)

    def vivit_step():
        with torch.autocast(DEVICE, BF16):
            loss = nn.functional.cross_entropy(vivit.temporal_forward(feats).float(), labels)
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)

    ms, spread = cuda_ms(vivit_step, reps=steps, warmup=3)
    rows.append(
        result(
            "train",
            "vivit-temporal-bf16",
            ms,
            spread,
            "ms/step",
            extra={"batch_views": batch, "views_per_s": round(batch / ms * 1000, 1)},
        )
    )
    try:
        preset, height, width = ("vitdet_tiny", 96, 128) if SMOKE else ("vitdet_b_vid", 720, 1280)
        vitdet = create_vitdet(preset, variant="dense").to(DEVICE).train()
        optim = torch.optim.AdamW(vitdet.parameters(), lr=1e-4, fused=DEVICE == "cuda")
        images = [torch.rand(3, height, width, device=DEVICE) * 255 for _ in range(2)]
        targets = [
            {
                "boxes": torch.tensor([[10.0, 12.0, 40.0, 50.0]], device=DEVICE),
                "labels": torch.tensor([1], device=DEVICE),
            }
            for _ in images
        ]

        def vitdet_step():
            with torch.autocast(DEVICE, BF16):
                losses = vitdet(images, targets)
                loss = sum(losses.values())
            loss.backward()
            optim.step()
            optim.zero_grad(set_to_none=True)

        ms, spread = cuda_ms(vitdet_step, reps=max(steps // 2, 3), warmup=2)
        rows.append(
            result(
                "train",
                "vitdet-dense-bf16",
                ms,
                spread,
                "ms/step",
                extra={
                    "batch_images": len(images),
                    "images_per_s": round(len(images) / ms * 1000, 2),
                },
            )
        )
    except Exception as error:
        rows.append({"row": "train", "run": "vitdet-skipped", "error": repr(error)[:300]})
    return rows


def report(rows: list[dict]) -> None:
    """Prints new rows and rewrites ``--json`` with every row so far."""
    RESULTS.extend(rows)
    print_table(rows)
    if JSON_PATH is not None:
        JSON_PATH.write_text(json.dumps({**HEADER, "rows": grouped(RESULTS)}, indent=1))


def grouped(rows: list[dict]) -> list[dict]:
    """Rows in the order of their row's first appearance (inductor runs beside the others)."""
    order: dict[str, int] = {}
    for row in rows:
        order.setdefault(row["row"], len(order))
    return sorted(rows, key=lambda row: order[row["row"]])


def print_table(rows: list[dict]) -> None:
    print(
        f"{'row':<12} {'run':<22} {'ms':>9} {'spread':>7} {'unit':<9} {'speedup':>8} "
        f"{'ops':>6} {'goal':>5}"
    )
    for row in rows:
        if "ms" not in row:
            print(f"{row['row']:<12} {row['run']:<22} {row.get('error', '')}")
            continue
        speed = f"{row['speedup']:.2f}x" if "speedup" in row else ""
        ops = f"{row['op_ratio']:.2f}x" if "op_ratio" in row else ""
        goal = f"{row['goal']}x" if "goal" in row else ""
        note = f"  (compile {row['compile_s']} s)" if "compile_s" in row else ""
        print(
            f"{row['row']:<12} {row['run']:<22} {row['ms']:>9.2f} {row['spread_ms']:>7.2f} "
            f"{row['unit']:<9} {speed:>8} {ops:>6} {goal:>5}{note}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--frames", type=int, default=16, help="frames per timed stream")
    parser.add_argument("--rounds", type=int, default=5, help="timed repetitions (median)")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny models on the CPU (checks the script only)"
    )
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="top N ops (stacks)")
    parser.add_argument(
        "--no-inductor", action="store_true", help="skip the eventful-inductor runs"
    )
    parser.add_argument(
        "--inductor-budget",
        type=float,
        default=None,
        metavar="S",
        help="start no eventful-inductor run later than S seconds after the start",
    )
    args = parser.parse_args(argv)
    global SMOKE, DEVICE, PROFILE, INDUCTOR, INDUCTOR_BUDGET, START, JSON_PATH
    SMOKE, PROFILE = args.smoke, args.profile
    INDUCTOR, INDUCTOR_BUDGET = not args.no_inductor, args.inductor_budget
    START, JSON_PATH = time.perf_counter(), args.json
    RESULTS.clear()
    DEVICE = "cpu" if SMOKE else "cuda"
    if SMOKE:
        # One thread: inductor's OpenMP kernels next to oneDNN's thread pool on
        # a loaded CPU stall ~15 ms per op (a compiled tiny frame: 830 ms vs 1.3 ms).
        torch.set_num_threads(1)
    if not SMOKE and not torch.cuda.is_available():
        raise SystemExit("gpu_speed.py needs a CUDA GPU (or --smoke to check it on the CPU)")
    if args.frames < 5 or args.rounds < 1:
        parser.error("--frames must be >= 5 and --rounds >= 1")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    HEADER.clear()
    HEADER.update(
        gpu="none (smoke run)" if SMOKE else torch.cuda.get_device_name(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
    )
    print(json.dumps(HEADER))
    pending: list[tuple[str, InductorRun]] = []
    for name in args.rows:
        start = time.perf_counter()
        inductor = None
        try:
            if name.startswith("stack"):
                new, inductor = bench_stack(name, args.frames, args.rounds)
            elif name == "vivit":
                new, inductor = bench_vivit(args.rounds)
            elif name == "vitdet":
                new, inductor = bench_vitdet(args.frames, args.rounds)
            else:
                new = bench_train(args.rounds * 4)
        except Exception as error:
            new = [{"row": name, "run": "failed", "error": repr(error)[:500]}]
            traceback.print_exc()
        report(new)
        if inductor is not None and INDUCTOR:
            pending.append((name, inductor))
        print(f"  ({name}: {time.perf_counter() - start:.1f} s)", flush=True)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    while pending:  # last: compiles take long; everything else is measured by now
        name, inductor = pending.pop(0)
        start = time.perf_counter()
        report([run_inductor(name, inductor)])
        del inductor  # its models and frames
        print(f"  ({name} eventful-inductor: {time.perf_counter() - start:.1f} s)", flush=True)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    print("\nSummary")
    print_table(grouped(RESULTS))


if __name__ == "__main__":
    main()
