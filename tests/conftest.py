"""Shared fixtures."""

import contextlib
import sys

import pytest
import torch

GRAD_MODES = {
    # Autograd on: plain F.linear, fresh temporaries.
    "grad": contextlib.nullcontext,
    # Gradients off: pre-packed oneDNN linears on CPU, reused workspaces.
    "no_grad": torch.no_grad,
    # Everything made under inference mode (inference-tensor weights).
    "inference": torch.inference_mode,
}


@pytest.fixture(params=list(GRAD_MODES))
def grad_mode(request):
    """Runs the test body under each autograd mode (fast paths differ per mode)."""
    with GRAD_MODES[request.param]():
        yield request.param


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def argv(monkeypatch):
    """LightningCLI reads its arguments from ``cli_main``, not pytest's command line."""
    monkeypatch.setattr(sys, "argv", ["cli.py"])
