"""GPU checks; skipped where no CUDA device is present (CI)."""

import pytest
import torch

from eventful_pl.policies import TopRPolicy
from tests.helpers import DIM, make_backbones, video_stream

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("variant", ["tokenwise", "query_key", "full"])
def test_cuda_r_equals_n_matches_dense(variant):
    dense, eventful = make_backbones(variant, dim=DIM, depth=2, heads=4, input_size=6)
    dense, eventful = dense.cuda(), eventful.cuda()
    eventful.set_policy(TopRPolicy(36))
    with torch.no_grad():
        for frame in video_stream(4, 3, 36, DIM):
            frame = frame.cuda()
            torch.testing.assert_close(eventful(frame), dense(frame), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("cast", ["float16", "bfloat16"])
def test_cuda_half_precision_av(cast):
    dense, eventful = make_backbones(
        "full", dim=DIM, depth=2, heads=4, input_size=6, matmul_2_cast=cast
    )
    dense, eventful = dense.cuda(), eventful.cuda()
    eventful.set_policy(TopRPolicy(36))
    with torch.no_grad():
        for frame in video_stream(4, 2, 36, DIM):
            frame = frame.cuda()
            torch.testing.assert_close(eventful(frame), dense(frame), rtol=2e-2, atol=2e-2)


# Static frames (CUDA graphs) against the eager path: with the Triton kernels
# off both run the same PyTorch ops; with them on, to float32 rounding.
@pytest.fixture
def no_triton():
    from eventful_pl import triton_kernels

    triton_kernels.set_triton_kernels(False)
    yield
    triton_kernels.set_triton_kernels(True)


def _static_pair(variant, policy, window=False, **kwargs):
    import copy

    if window:
        kwargs.update(window_size=3, window_block_indices=(0,), relative_embedding_size=3)
    _, eager = make_backbones(
        variant,
        window_variant="tokenwise" if window else None,
        dim=DIM,
        depth=2,
        heads=4,
        **kwargs,
    )
    eager = eager.cuda()
    eager.set_policy(policy)
    return eager, copy.deepcopy(eager)


def _run_pair(eager, static_model, runner, frames, resets=(), tol=1e-5, per_frame=True):
    from eventful_pl.counting import count_ops

    for i, frame in enumerate(frames):
        frame = frame.cuda()
        if i in resets:
            eager.reset()
            runner.reset()
        with count_ops(eager) as expected:
            a = eager(frame)
        with count_ops(static_model) as got:
            b = runner(frame)
        torch.testing.assert_close(b, a, rtol=tol, atol=tol, equal_nan=True, msg=f"frame {i}")
        assert not per_frame or got.counts == expected.counts, f"frame {i}"


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("variant", ["tokenwise", "query_key", "full"])
def test_cuda_graph_frames_equal_eager(variant, batch, no_triton):
    from eventful_pl.static_frame import StaticFrameRunner

    eager, static_model = _static_pair(variant, TopRPolicy(10), input_size=6)
    runner = StaticFrameRunner(static_model, mode="cuda_graph")
    with torch.inference_mode():
        _run_pair(eager, static_model, runner, video_stream(7, batch, 36, DIM), resets=(4,))
    # Two streams: the second flush's state went into the captured buffers.
    assert runner.stats == {"flush": 2, "eager": 0, "static": 5, "recovered": 0}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_relpos_windows(dtype, no_triton):
    from eventful_pl.static_frame import StaticFrameRunner

    eager, static_model = _static_pair(
        "full", TopRPolicy(9), window=True, input_size=(7, 5), relative_embedding_size=3
    )
    eager, static_model = eager.to(dtype), static_model.to(dtype)
    runner = StaticFrameRunner(static_model, mode="cuda_graph")
    frames = [f.to(dtype) for f in video_stream(6, 2, 35, DIM)]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    with torch.no_grad():
        _run_pair(eager, static_model, runner, frames, resets=(3,), tol=tol)
    assert runner.stats["static"] == 4


def test_cuda_graph_r_equals_n_matches_dense():
    from eventful_pl.static_frame import StaticFrameRunner

    dense, eventful = make_backbones("full", dim=DIM, depth=2, heads=4, input_size=6)
    dense, eventful = dense.cuda(), eventful.cuda()
    eventful.set_policy(TopRPolicy(36))
    runner = StaticFrameRunner(eventful, mode="cuda_graph")
    with torch.no_grad():
        for frame in video_stream(5, 2, 36, DIM):
            frame = frame.cuda()
            torch.testing.assert_close(runner(frame), dense(frame), rtol=1e-3, atol=1e-3)
    assert runner.stats["static"] == 4


def test_cuda_graph_nonfinite_recovery(no_triton):
    from eventful_pl.static_frame import StaticFrameRunner

    eager, static_model = _static_pair("full", TopRPolicy(12), input_size=6)
    runner = StaticFrameRunner(static_model, mode="cuda_graph")
    frames = video_stream(7, 2, 36, DIM)
    frames[3] = frames[3].clone()
    frames[3][0, 5, 0] = float("nan")
    with torch.no_grad():
        _run_pair(eager, static_model, runner, frames, tol=1e-4, per_frame=False)
    assert runner.stats["recovered"] >= 1 and runner.stats["static"] >= 2


@pytest.mark.parametrize("variant", ["tokenwise", "full"])
def test_cuda_graph_with_triton_kernels_close_to_eager(variant):
    from eventful_pl import triton_kernels
    from eventful_pl.static_frame import StaticFrameRunner

    eager, static_model = _static_pair(
        variant, TopRPolicy(9), window=True, input_size=(7, 5), relative_embedding_size=3
    )
    runner = StaticFrameRunner(static_model, mode="cuda_graph")
    with torch.no_grad():
        assert triton_kernels.available(torch.zeros(1, device="cuda"))
        _run_pair(eager, static_model, runner, video_stream(6, 2, 35, DIM), resets=(3,), tol=1e-4)
    assert runner.stats["static"] == 4


@pytest.mark.parametrize("mode", ["cuda_graph", "compile_cuda_graph"])
def test_cuda_graph_with_triton_r_equals_n_matches_dense(mode):
    from eventful_pl.static_frame import StaticFrameRunner

    dense, eventful = make_backbones(
        "full", dim=DIM, depth=2, heads=4, input_size=6, relative_embedding_size=4
    )
    dense, eventful = dense.cuda(), eventful.cuda()
    eventful.set_policy(TopRPolicy(36))
    runner = StaticFrameRunner(eventful, mode=mode)
    with torch.no_grad():
        for frame in video_stream(5, 2, 36, DIM):
            frame = frame.cuda()
            torch.testing.assert_close(runner(frame), dense(frame), rtol=1e-3, atol=1e-3)
    assert runner.stats["static"] == 4


@pytest.mark.parametrize("variant", ["tokenwise", "query_key", "full"])
def test_compiled_cuda_graph_frames_close_to_eager(variant):
    """Inductor-compiled static frames captured as CUDA graphs: the compile
    run's state is restored, so every frame matches the eager path."""
    from eventful_pl.static_frame import StaticFrameRunner

    eager, static_model = _static_pair(
        variant, TopRPolicy(9), window=True, input_size=(7, 5), relative_embedding_size=3
    )
    runner = StaticFrameRunner(static_model, mode="compile_cuda_graph")
    with torch.no_grad():
        _run_pair(eager, static_model, runner, video_stream(7, 2, 35, DIM), resets=(4,), tol=1e-4)
    assert runner.stats == {"flush": 2, "eager": 0, "static": 5, "recovered": 0}
