"""Triton kernels against float64 references: compiled on CUDA; off the GPU
in Triton's interpreter, in a fresh process (Triton reads TRITON_INTERPRET
when it is imported)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from eventful_pl import triton_kernels  # noqa: E402
from eventful_pl.blocks.softmax import update_softmax_flagged  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
kernel_test = pytest.mark.skipif(
    DEVICE == "cpu" and not INTERPRETED,
    reason="off the GPU: runs under TRITON_INTERPRET=1 in test_kernels_in_the_interpreter",
)


@pytest.mark.skipif(DEVICE == "cuda" or INTERPRETED, reason="the kernels run directly")
@pytest.mark.parametrize(
    "tests, least",
    [
        pytest.param("not static_frames", 10, id="kernels"),
        pytest.param("static_frames", 2, id="static-frames", marks=pytest.mark.slow),
    ],
)
def test_kernels_in_the_interpreter(tests, least):
    """This file's kernel tests in a fresh interpreter process with
    TRITON_INTERPRET=1 (whole static frames through the interpreter are slow)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-k", tests],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).parents[1],
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    passed = re.search(r"(\d+) passed", done.stdout)
    assert passed and int(passed.group(1)) >= least, done.stdout[-2000:]


def _softmax_case(b, h, n, r, seed, dtype=torch.float32, scale=1.0):
    """Consistent logits: normalisers of real logits, the updated keys' old
    columns taken from them, new columns and rows perturbed."""
    gen = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(b, h, n, n, generator=gen, dtype=torch.float64)
    log_norm = torch.logsumexp(logits, dim=-1)
    index = torch.stack([torch.randperm(n, generator=gen)[:r] for _ in range(b)])
    cols_old = logits.gather(3, index[:, None, None, :].expand(b, h, n, r)).transpose(-1, -2)
    cols_new = cols_old + 0.5 * torch.randn(cols_old.shape, generator=gen, dtype=torch.float64)
    rows = logits.gather(2, index[:, None, :, None].expand(b, h, r, n))
    rows = rows + 0.5 * torch.randn(rows.shape, generator=gen, dtype=torch.float64)
    tensors = [rows, cols_old.contiguous(), cols_new.contiguous(), log_norm]
    return [t.to(dtype) for t in tensors], index


@kernel_test
@pytest.mark.parametrize("shape", [(1, 2, 37, 5), (2, 3, 70, 16), (2, 1, 130, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_update_softmax_matches_float64(shape, dtype):
    (rows, cols_old, cols_new, log_norm), index = _softmax_case(
        *shape, seed=sum(shape), dtype=dtype
    )
    ref_args = [t.double() for t in (rows, cols_old, cols_new)]
    ref_norm = log_norm.double()
    ref, ref_failed = update_softmax_flagged(*ref_args, ref_norm, index, 1e-3, 60.0)
    dev = [t.to(DEVICE, copy=True) for t in (rows, cols_old, cols_new, log_norm)]
    cols_new_dev, norm_dev = dev[2], dev[3]
    cols_new_dev.fill_(float("nan"))  # poisoned: every element must be written
    cols_new_dev.copy_(cols_new.to(DEVICE))
    got, failed = triton_kernels.update_softmax(
        dev[0], dev[1], cols_new_dev, norm_dev, index.to(DEVICE), 1e-3, 60.0
    )
    assert got.data_ptr() == cols_new_dev.data_ptr()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double().cpu(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(norm_dev.double().cpu(), ref_norm, rtol=tol, atol=tol)
    assert failed.cpu().bool().tolist() == ref_failed.tolist()


@kernel_test
def test_update_softmax_flags_failed_streams():
    (rows, cols_old, cols_new, log_norm), index = _softmax_case(2, 2, 40, 4, seed=1)
    cols_new[1, 0, 2, 7] = float("nan")  # stream 1 only
    dev = [t.to(DEVICE, copy=True) for t in (rows, cols_old, cols_new, log_norm)]
    _, failed = triton_kernels.update_softmax(*dev, index.to(DEVICE), 1e-3, 60.0)
    assert failed.cpu().tolist() == [0, 1]
    dev = [t.to(DEVICE, copy=True) for t in (rows, cols_old, cols_new, log_norm)]
    _, failed = triton_kernels.update_softmax(*dev, index.to(DEVICE), 2.0, 60.0)
    assert failed.cpu().tolist() == [1, 1]  # no row keeps a mass of 2


@kernel_test
@pytest.mark.parametrize("grouped", [False, True])
def test_error_norms_match_float64(grouped):
    gen = torch.Generator().manual_seed(5)
    b, n, heads, d = 2, 33, 12, 64
    p = torch.randn(b, n, heads * d, generator=gen)
    if grouped:  # heads of a (B, H, N, d) tensor read in place
        c = torch.randn(b, heads, n, d, generator=gen).transpose(1, 2)
    else:
        c = torch.randn(b, n, heads * d, generator=gen)
    ref = (c.double().reshape(b, n, -1) - p.double()).norm(dim=-1)
    got = triton_kernels.error_norms(c.to(DEVICE), p.to(DEVICE))
    torch.testing.assert_close(got.double().cpu(), ref, rtol=1e-5, atol=1e-5)


@kernel_test
def test_available_follows_switch_device_and_grad(monkeypatch):
    x = torch.zeros(2, device=DEVICE)
    with torch.no_grad():
        assert triton_kernels.available(x)
        triton_kernels.set_triton_kernels(False)
        try:
            assert not triton_kernels.available(x)
        finally:
            triton_kernels.set_triton_kernels(True)
    assert not triton_kernels.available(x.requires_grad_())
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with torch.no_grad():
            assert not triton_kernels.available(torch.zeros(2))
    assert os.environ.get("EVENTFUL_PL_TRITON", "1") != "0"


@kernel_test
@pytest.mark.parametrize("variant", ["tokenwise", "full"])
def test_static_frames_with_kernels(variant):
    """Static frames through the kernels: r = N equals the dense model, and
    top-r stays close to the eager path (which does not use them)."""
    import copy

    from eventful_pl import kernels
    from eventful_pl.policies import TopRPolicy
    from eventful_pl.static_frame import StaticFrameRunner
    from tests.helpers import DIM, make_backbones, video_stream

    kernels.set_fused_kernels(False)
    try:
        dense, eager = make_backbones(
            variant, dim=DIM, depth=1, heads=4, input_size=6, relative_embedding_size=4
        )
        dense, eager = dense.to(DEVICE), eager.to(DEVICE)
        full = copy.deepcopy(eager)
        full.set_policy(TopRPolicy(36))
        eager.set_policy(TopRPolicy(12))
        static_model = copy.deepcopy(eager)
        runners = (
            StaticFrameRunner(full, mode="eager"),
            StaticFrameRunner(static_model, mode="eager"),
        )
        with torch.no_grad():
            for frame in video_stream(3, 2, 36, DIM):
                frame = frame.to(DEVICE)
                assert triton_kernels.available(frame)
                torch.testing.assert_close(runners[0](frame), dense(frame), rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(runners[1](frame), eager(frame), rtol=1e-4, atol=1e-4)
    finally:
        kernels.set_fused_kernels(True)
    assert runners[1].stats["static"] == 2
