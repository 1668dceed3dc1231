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


class UntrustedCheckpointError(ValueError):
    """A checkpoint holds more than tensors, arrays and plain containers, so
    reading it would run code it names; it is refused unless trusted."""


#: Globals a detectron2-style ``.pkl`` may name: numpy arrays, dtypes and
#: scalars, and ordered dicts. Nothing here runs code beyond building them.
SAFE_PICKLE_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("collections", "OrderedDict"),
        ("_codecs", "encode"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        *(
            (module, name)
            for module in ("numpy.core.multiarray", "numpy._core.multiarray")
            for name in ("_reconstruct", "scalar")
        ),
        *((module, "_frombuffer") for module in ("numpy.core.numeric", "numpy._core.numeric")),
    }
)

TRUST_HINT = (
    "If you trust the file's origin, set trust_pretrained: true in the model's config "
    "(read_checkpoint(..., trusted=True) in Python)"
)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that builds only :data:`SAFE_PICKLE_GLOBALS`."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in SAFE_PICKLE_GLOBALS or (
            module.startswith("numpy.dtypes") and name.endswith("DType")
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unsupported global {module}.{name}")


def _to_tensors(obj: object) -> object:
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, Mapping):
        return {k: _to_tensors(v) for k, v in obj.items()}
    return obj


def _load_file(path: Path, trusted: bool) -> object:
    """The file's contents: torch files with ``weights_only`` unless trusted,
    pickles through :class:`_ArrayUnpickler` unless trusted."""
    try:
        if path.suffix == ".pkl":
            with path.open("rb") as f:
                if trusted:
                    return pickle.load(f, encoding="latin1")
                return _ArrayUnpickler(f, encoding="latin1").load()
        return torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as error:
        if trusted:
            raise ValueError(f"cannot read checkpoint {path}: {error}") from error
        detail = _unsafe_global(str(error))
        raise UntrustedCheckpointError(
            f"checkpoint {path} holds more than tensors, arrays and plain containers"
            f" ({detail}); it was not loaded, because reading it would run code named"
            f" in the file. {TRUST_HINT}"
        ) from error
    except Exception as error:  # noqa: BLE001 (re-raised with the file name)
        raise ValueError(f"cannot read checkpoint {path}: {error}") from error


def _unsafe_global(message: str) -> str:
    """The offending global of an unpickling error, else its last line."""
    match = re.search(r"unsupported global:?\s+(?:global\s+)?([\w.]+)", message, re.I)
    if match:
        return f"it names {match.group(1)}"
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return lines[-1][:200] if lines else "unreadable"


def read_checkpoint(path: str | os.PathLike, trusted: bool = False) -> dict[str, Tensor]:
    """Reads a ``.pth``/``.pt``/``.pyth``/``.ckpt`` (torch) or ``.pkl`` (pickled
    numpy, as detectron2 publishes) file and returns its flat state dict.

    Unwraps the usual containers: ``{"model": ...}``, ``{"model_state": ...}``
    (TAdaConv), ``{"state_dict": ...}`` (Lightning). numpy arrays become tensors.

    Args:
        path: The checkpoint file.
        trusted: Read the file with plain pickle, which runs whatever code the
            file names. By default torch files load with
            ``torch.load(weights_only=True)`` and ``.pkl`` files admit only numpy
            arrays, dtypes, scalars and containers; a file that needs more raises
            :class:`UntrustedCheckpointError` naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    data = _to_tensors(_load_file(path, trusted))
    for key in ("model", "model_state", "state_dict"):
        if isinstance(data, Mapping) and key in data and isinstance(data[key], Mapping):
            data = data[key]
            break
    if not isinstance(data, Mapping) or not all(isinstance(v, Tensor) for v in data.values()):
        raise ValueError(f"checkpoint {path}: expected a mapping of tensors (a state dict)")
    return dict(data)
