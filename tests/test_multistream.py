"""Many streams in one forward (``block_speed.py --streams``): B independent
streams batched through whole backbones give each stream's own outputs and
operation counts, in float32 and bfloat16; and the benchmark's harness
(rounds, interleaving, table) on a tiny model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

from eventful_pl import kernels
from eventful_pl.counting import count_ops
from eventful_pl.policies import TopRPolicy
from tests.helpers import make_backbones, video_stream

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import block_speed  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

STREAMS = 4
FRAMES = 5
# The two kinds of the benchmark's cases, small: global "full" blocks with a
# class token (a), windowed "tokenwise" blocks with relative position and a
# global "full" block (b).
CASES = {
    "a": dict(input_size=(5, 5), class_token=True),
    "b": dict(
        input_size=(6, 6),
        window_size=3,
        window_block_indices=(0, 2),
        relative_embedding_size=6,
    ),
}


def _eventful(case: str, dtype: torch.dtype):
    options = CASES[case]
    _, eventful = make_backbones(
        "full",
        window_variant="tokenwise" if "window_size" in options else None,
        dim=32,
        depth=3,
        heads=4,
        **options,
    )
    eventful.set_policy(TopRPolicy(6))
    return eventful.to(dtype)


def test_fused_attention_kernels_follow_the_cpu_unless_forced():
    auto = kernels.fused_attention_preferred()
    assert auto == (torch.backends.cpu.get_cpu_capability() == "AVX512")
    try:
        kernels.set_fused_attention_kernels(True)
        assert kernels.fused_attention_preferred()
        kernels.set_fused_attention_kernels(False)
        assert not kernels.fused_attention_preferred()
        with torch.no_grad():
            assert not kernels.fused_attention_available(torch.zeros(2))
    finally:
        kernels.set_fused_attention_kernels(None)
    assert kernels.fused_attention_preferred() == auto


@pytest.mark.parametrize(
    ("dtype", "kernel_mode"),
    [(torch.float32, "auto"), (torch.float32, "forced"), (torch.bfloat16, "auto")],
    ids=["fp32", "fp32-attention-kernels", "bf16"],
)
@pytest.mark.parametrize("case", list(CASES))
def test_batched_streams_equal_each_stream_alone(case, dtype, kernel_mode):
    """Outputs (to float32 rounding; bfloat16 to a step) and op counts of B
    streams in one batch are those of each stream run alone (float32 also with
    the fused attention kernels forced on)."""
    kernels.set_fused_attention_kernels(None if kernel_mode == "auto" else True)
    try:
        _check_batched_streams(case, dtype)
    finally:
        kernels.set_fused_attention_kernels(None)


def _check_batched_streams(case: str, dtype: torch.dtype) -> None:
    batched, alone = _eventful(case, dtype), _eventful(case, dtype)
    h, w = CASES[case]["input_size"]
    streams = [
        video_stream(FRAMES, 1, h * w, 32, seed=10 + s, change=0.5 + s) for s in range(STREAMS)
    ]
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0, atol=0.05)
    with torch.no_grad():
        outs, batched_ops = [], []
        for t in range(FRAMES):
            with count_ops(batched) as counter:
                outs.append(batched(torch.cat([s[t] for s in streams])))
            batched_ops.append(counter.total)
        alone_ops = [0] * FRAMES
        for s, stream in enumerate(streams):
            alone.reset()
            for t, frame in enumerate(stream):
                with count_ops(alone) as counter:
                    out = alone(frame)
                alone_ops[t] += counter.total
                torch.testing.assert_close(outs[t][s : s + 1], out, **tolerance)
    assert batched_ops == alone_ops


def _args(**overrides) -> argparse.Namespace:
    args = block_speed.parse_args(["--rounds", "2", "--frames", "2", "--warmup", "1"])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def test_benchmark_round_measures_streams_and_counts_ops():
    """run_round on a tiny model: one value per round, the op ratio of
    the eventful model, B streams of distinct frames."""
    dense, eventful = make_backbones("full", dim=32, depth=2, heads=4, input_size=(6, 6))
    eventful.set_policy(TopRPolicy(6))
    case = block_speed.Case("tiny", "tiny", (6, 6), False, 6, False, 0.5)
    args = _args()
    stream = block_speed.FrameStream((6, 6), 3, 0.1, 0, torch.float32, torch.device("cpu"), 32)
    frame = stream.frame(1)
    assert frame.shape == (3, 36, 32)
    assert not torch.equal(frame[0], frame[1])
    torch.testing.assert_close(stream.frame(1), frame, rtol=0, atol=0)
    row = block_speed.Row(case, "float32", 3)
    with torch.inference_mode():
        for k in range(args.rounds):
            block_speed.run_round(
                row, dense, eventful, stream, args, torch.device("cpu"), k == args.rounds - 1
            )
    assert len(row.dense_ms.values) == len(row.speedup.values) == 2
    assert row.dense_ops > row.eventful_ops > 0
    assert row.op_ratio == pytest.approx(row.dense_ops / row.eventful_ops)
    table = block_speed.format_table([row], args, 10.0)
    assert "| tiny | float32 | 3 | 36 | 6 |" in table
    assert "rounds=2" in table


def test_time_interleaved_alternates_the_order():
    calls = []
    inputs = ((i,) for i in range(4))
    block_speed.time_interleaved(
        (lambda i: calls.append(("a", i)), lambda i: calls.append(("b", i))),
        inputs,
        torch.device("cpu"),
    )
    assert calls == [("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 2), ("b", 3), ("a", 3)]


def test_spread_formats_median_and_range():
    spread = block_speed.Spread([3.0, 1.0, 2.0])
    assert spread.format(1, " ms") == "2.0 ms (1.0-3.0)"
    assert block_speed.Spread([2.0]).format(2, "x") == "2.00x"


@pytest.mark.parametrize(
    ("preset", "kind", "r"), [("vivit_tiny", "vivit", 4), ("vitdet_tiny", "vitdet", 16)]
)
def test_model_speed_rows_on_tiny_presets(preset, kind, r):
    """model_speed.py's build and timing steps on the tiny presets: shared
    weights, one value per round, eventful counts below dense."""
    import model_speed

    args = model_speed.parse_args(
        ["--rounds", "2", "--views", "2", "--frames", "8", "--detector-frames", "2"]
    )
    spec = model_speed.ModelSpec("tiny", preset, kind, (r,))
    dense, eventful = model_speed.build_pair(spec, torch.float32, args, torch.device("cpu"))
    for a, b in zip(dense.state_dict().values(), eventful.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    if kind == "vivit":
        video = model_speed.synthetic_video(16, 64, 85, 0)[None]
    else:
        video = model_speed.synthetic_video(5, 80, 128, 0)
    assert video.dtype == torch.uint8
    rows = [model_speed.Row(spec, "float32", r, "tiny")]
    run = model_speed.run_vivit if kind == "vivit" else model_speed.run_vitdet
    with torch.inference_mode():
        run(rows, dense, eventful, video, args, torch.device("cpu"))
    row = rows[0]
    assert len(row.eventful_ms.values) == 2
    assert row.dense_ops > row.eventful_ops > 0
    assert "| tiny | tiny | float32 |" in model_speed.format_table(rows, args)


def test_model_speed_r_option_is_checked():
    import model_speed

    assert model_speed.parse_r(["vitdet_672=128,256"]) == {"vitdet_672": (128, 256)}
    with pytest.raises(SystemExit):
        model_speed.parse_args(["--r", "vitdet_999=1"])
    with pytest.raises(SystemExit):
        model_speed.parse_args(["--frames", "7"])
