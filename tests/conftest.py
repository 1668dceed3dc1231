"""Shared fixtures."""

import contextlib

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
