"""Shared fixtures."""

import contextlib
import sys

import pytest
import torch

GRAD_MODES = {
    # Autograd on: plain F.linear, fresh temporaries, outputs with a graph.
    "grad": contextlib.nullcontext,
    # Gradients off: pre-packed oneDNN linears on CPU, reused workspaces.
    "no_grad": torch.no_grad,
    # Everything made under inference mode (inference-tensor weights).
    "inference": torch.inference_mode,
}


@pytest.fixture(params=list(GRAD_MODES))
def grad_mode(request):
    """Runs the test body under each autograd mode (fast paths differ per mode).

    The mode is entered here, before the test builds its model, and holds for
    the whole body (setup and call run in one thread). A body that uses this
    fixture must not enter a mode of its own (``with torch.no_grad():``): that
    would turn the ``grad`` case into a second ``no_grad`` one. Test with
    ``torch.is_grad_enabled()`` where a body needs to know.
    """
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
