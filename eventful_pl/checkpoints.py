"""Loading foreign checkpoints: key renaming and errors that say what does not fit.

Each converter (``eventful_pl.models.*``) maps a checkpoint's own key names to
ours with an ordered list of regular-expression rules, then loads with
:func:`load_converted`, which refuses a file that does not fit with one
message listing the missing keys, unexpected keys and shape mismatches.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

#: ``(pattern, replacement)``; a replacement of None drops the key.
RenameRule = tuple[str, str | None]


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model it is loaded into."""


def rename_keys(
    state_dict: Mapping[str, Tensor], rules: Sequence[RenameRule]
) -> tuple[dict[str, Tensor], list[str]]:
    """Applies the first matching rule to each key.

    Returns (renamed state dict, keys no rule matched). Keys whose rule has a
    None replacement are dropped.
    """
    compiled = [(re.compile(pattern), repl) for pattern, repl in rules]
    renamed: dict[str, Tensor] = {}
    unmatched: list[str] = []
    for key, value in state_dict.items():
        for pattern, repl in compiled:
            if pattern.search(key):
                if repl is not None:
                    renamed[pattern.sub(repl, key)] = value
                break
        else:
            unmatched.append(key)
    return renamed, unmatched


def _format_keys(keys: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_converted(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    source: str,
    unmatched: Sequence[str] = (),
    allow_missing: Sequence[str] = (),
) -> None:
    """Loads an already-renamed state dict into ``model``, strictly.

    Raises :class:`CheckpointMismatchError` naming ``source`` (the file or
    format) and listing missing keys (except patterns in ``allow_missing``),
    unexpected keys (including the source keys in ``unmatched`` that no rule
    knew) and shape mismatches, all at once.
    """
    own = model.state_dict()
    allowed = [re.compile(p) for p in allow_missing]
    missing = [k for k in own if k not in state_dict and not any(p.search(k) for p in allowed)]
    unexpected = [k for k in state_dict if k not in own] + [f"{k} (source)" for k in unmatched]
    shapes = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = [f"checkpoint {source} does not fit {type(model).__name__}:"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_format_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_format_keys(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {_format_keys(shapes)}")
        raise CheckpointMismatchError("\n  ".join(parts))
    model.load_state_dict(dict(state_dict), strict=False)


def _to_tensors(obj: object) -> object:
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, Mapping):
        return {k: _to_tensors(v) for k, v in obj.items()}
    return obj


def read_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """Reads a ``.pth``/``.pt``/``.ckpt`` (torch) or ``.pkl`` (pickled numpy,
    as detectron2 publishes) file and returns its flat state dict.

    Unwraps the usual containers: ``{"model": ...}``, ``{"model_state": ...}``
    (TAdaConv), ``{"state_dict": ...}`` (Lightning). numpy arrays become tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".pkl":
            with path.open("rb") as f:
                data = pickle.load(f, encoding="latin1")
        else:
            data = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 (re-raised with the file name)
        raise ValueError(f"cannot read checkpoint {path}: {error}") from error
    data = _to_tensors(data)
    for key in ("model", "model_state", "state_dict"):
        if isinstance(data, Mapping) and key in data and isinstance(data[key], Mapping):
            data = data[key]
            break
    if not isinstance(data, Mapping) or not all(isinstance(v, Tensor) for v in data.values()):
        raise ValueError(f"checkpoint {path}: expected a mapping of tensors (a state dict)")
    return dict(data)
