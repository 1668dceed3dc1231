"""Random-number-generator states in checkpoints, for an exact resume.

Lightning checkpoints hold the weights, optimizer and loops but not the
random generators, so a resumed run draws other dropout masks, other
DataLoader worker seeds and other shuffles than the run it continues.
:func:`capture_rng_states` records python's, numpy's, torch's CPU and every
CUDA device's generator as tensors and plain values (so the checkpoint still
loads with ``torch.load(weights_only=True)``); :func:`restore_rng_states`
puts them back. Samplers that draw from these generators (torch's
``RandomSampler``) or derive their order from a seed and the epoch
(``DistributedSampler``) then give the same order as well.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

#: Checkpoint key of the states.
CHECKPOINT_KEY = "eventful_pl_rng_states"


def capture_rng_states() -> dict[str, Any]:
    """The current states of python's, numpy's, torch's and CUDA's generators."""
    version, python_state, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "python": [version, torch.tensor(python_state, dtype=torch.int64), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Puts back states from :func:`capture_rng_states` (CUDA's only where the
    same number of devices is visible)."""
    version, python_state, gauss = states["python"]
    random.setstate((int(version), tuple(int(v) for v in python_state.tolist()), gauss))
    name, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
