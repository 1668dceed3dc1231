"""Fused CPU kernels for eventful inference, compiled on first use.

An eventful frame spends much of its non-GEMM time in memory-bound passes
over tokens and attention state: ``LayerNorm(x)`` written out in full only to
feed a gate, ``c - p`` written out and read back for its norms, logits
stored and read back for their exponentials, gathered copies of reference
rows and their deltas. The kernels in ``csrc/fused_cpu.cpp`` do each of these
in one pass that reads every input once:

- :func:`error_norms`: ``||c - p||`` per token, ``c`` possibly a strided
  view with channels in groups (attention heads read in place);
- :func:`layer_norm_error_norms`: ``||LayerNorm(x) - p||`` per token without
  materialising ``LayerNorm(x)``; the gate then normalises only the tokens
  it selects;
- :func:`update_softmax`: the full block's incremental softmax normaliser
  update from given logits (used with relative position);
- :func:`incremental_softmax`: the same from the updated queries and keys,
  computing the logits tile by tile in registers, never storing one;
- :func:`attention_update`: the full block's output update ``A_new dV +
  dA V_old``, reading the old columns and values straight from the delta
  gates' references and writing the new columns back in the same pass.

They are used when gradients are off and the tensors are float32 on CPU
(see :func:`fused_kernels_available`; the last three, the full block's
attention kernels, only in AVX-512 builds unless forced: see
:func:`fused_attention_preferred`); everything else, and every machine
where the extension cannot be built (no C++ compiler), uses the equivalent
PyTorch ops (with one warning that says why the build failed): for the full
block's softmax and output updates the pure functions of
:mod:`eventful_pl.blocks.softmax`, which the kernels are tested against.

Builds: once per source, never per checkout. The extension's name and build
folder (:func:`extension_name`, :func:`build_directory`, under
``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``) carry a
hash of the source file's contents, the compile flags, the torch and Python
versions and the CPU capability, and the source is compiled from a copy in
that folder: checkouts and virtual environments with the same source share
one build and never rebuild each other's. The LightningModules build it in
their ``setup()`` (:func:`prepare_fused_kernels`: local rank 0 builds while
the other processes wait), with a one-line message when a build is actually
needed (about 30 s); outside Lightning it is built, with the same message,
the first time a kernel is needed. An existing build is imported directly.
``EVENTFUL_PL_FUSED_KERNELS=0`` or :func:`set_fused_kernels` switch the
kernels off.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.machinery
import importlib.util
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

SOURCE = Path(__file__).resolve().parent / "csrc" / "fused_cpu.cpp"
ENV_SWITCH = "EVENTFUL_PL_FUSED_KERNELS"
ATTENTION_ENV_SWITCH = "EVENTFUL_PL_FUSED_ATTENTION"
# Instruction-set flags per PyTorch CPU capability (the build is named after
# it, so a shared extension cache never hands one CPU another's build).
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mfma", "-mavx2"],
    "AVX2": ["-mavx2", "-mfma"],
}
# OpenMP: at::parallel_for runs on PyTorch's own thread pool (torch's bundled
# libgomp.so.1 satisfies the link by soname).
_CFLAGS = ["-O3", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]
_enabled = os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")
# None: the attention kernels follow the CPU (AVX-512 builds only); True/False: forced.
_attention = {"1": True, "on": True, "true": True, "0": False, "off": False, "false": False}.get(
    os.environ.get(ATTENTION_ENV_SWITCH, "auto").strip().lower()
)


def set_fused_kernels(enabled: bool) -> None:
    """Turns the fused CPU kernels on or off (on by default unless
    ``EVENTFUL_PL_FUSED_KERNELS=0``)."""
    global _enabled
    _enabled = bool(enabled)


def set_fused_attention_kernels(enabled: bool | None) -> None:
    """Forces the full block's fused attention kernels (:func:`incremental_softmax`,
    :func:`update_softmax`, :func:`attention_update`) on (True) or off (False),
    or lets the CPU decide (None, the default; see :func:`fused_attention_available`).
    Also ``EVENTFUL_PL_FUSED_ATTENTION=1``/``0``/``auto``."""
    global _attention
    _attention = None if enabled is None else bool(enabled)


def fused_attention_preferred() -> bool:
    """Whether the fused attention kernels are used where they apply: forced by
    :func:`set_fused_attention_kernels`, else only in AVX-512 builds.

    Their 16-lane vector code (tiles of 6 x 64 logits in registers, a
    vectorised exp) is written for AVX-512's 32 vector registers; built for
    AVX2 it runs several times slower than PyTorch's ops (AMD EPYC Zen 3, one
    thread, ViT-B block at r = 50 of 401 tokens: incremental_softmax 98 ms vs
    5.5 ms, attention_update 45 ms vs 1.7 ms; update_softmax at r = 256 of
    1764: about 3.5x slower)."""
    if _attention is not None:
        return _attention
    return _capability() == "AVX512"


def _capability() -> str:
    capability = torch.backends.cpu.get_cpu_capability()
    return capability if capability in _ISA_FLAGS else "DEFAULT"


def compile_flags(capability: str | None = None) -> tuple[list[str], list[str]]:
    """The compiler and linker flags of the build for a CPU capability
    (default: this machine's)."""
    capability = capability or _capability()
    return [*_CFLAGS, *_ISA_FLAGS.get(capability, [])], list(_LDFLAGS)


def extension_name(source: str | Path | bytes | None = None, capability: str | None = None) -> str:
    """The extension's name (also its build folder's): the CPU capability and
    a hash of the source's contents (a path, or the bytes themselves; default
    :data:`SOURCE`), the compile flags, the torch version and the Python ABI.

    The same source gives the same name wherever it is checked out; any change
    to the source, flags, torch or Python gives another.
    """
    capability = capability or _capability()
    if source is None:
        source = SOURCE
    text = source if isinstance(source, bytes) else Path(source).read_bytes()
    cflags, ldflags = compile_flags(capability)
    python = (sys.implementation.cache_tag, getattr(sys, "abiflags", ""), sys.platform)
    digest = hashlib.sha256(text)
    for part in (cflags, ldflags, torch.__version__, python, capability):
        digest.update(b"\0" + repr(part).encode())
    return f"eventful_pl_fused_cpu_{capability.lower()}_{digest.hexdigest()[:16]}"


def build_directory(name: str | None = None) -> Path:
    """The build folder of extension ``name`` (default: :func:`extension_name`):
    ``$TORCH_EXTENSIONS_DIR/<name>``, by default under ``~/.cache/torch_extensions``."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        root = _cpp_extension().get_default_build_root()
    return Path(root) / (name or extension_name())


_extension: ModuleType | None = None
_tried = False


class _NotBuilt(Exception):
    """No build on disk, and this process does not build (see prepare_fused_kernels)."""


def load_extension(build: bool = True) -> ModuleType | None:
    """The extension, loaded once per process: imported from its build folder
    if built, else built first (once per source, see :func:`extension_name`).
    None if that fails, with one warning that says why. ``build=False``: only
    load an existing build (None, quietly, if there is none)."""
    global _extension, _tried
    if _tried:
        return _extension
    _tried = True
    try:
        _extension = _load(build)
    except _NotBuilt:
        _extension = None
    except Exception as err:  # no compiler, no headers, read-only cache, ...
        _extension = None
        warnings.warn(
            f"eventful_pl: could not build the fused CPU kernels from {SOURCE} "
            f"({type(err).__name__}: {_error_summary(err)}); using PyTorch ops instead "
            f"(set {ENV_SWITCH}=0 to silence this)",
            RuntimeWarning,
            stacklevel=2,
        )
    return _extension


def _load(build: bool) -> ModuleType:
    """Imports the build of this source, building it first if there is none."""
    text = SOURCE.read_bytes()
    capability = _capability()
    name = extension_name(text, capability)
    directory = build_directory(name)
    library = directory / f"{name}{importlib.machinery.EXTENSION_SUFFIXES[-1]}"
    if library.is_file():
        try:
            return _import_library(name, library)
        except (ImportError, OSError):  # an unfinished build: built again below
            pass
    if not build:
        raise _NotBuilt(name)
    _announce(f"eventful_pl: building the fused CPU kernels (once, ~30 s) in {directory} ...")
    started = time.perf_counter()
    directory.mkdir(parents=True, exist_ok=True)
    # Compiled from a copy in the build folder: the same command line for
    # every checkout, so the build system never sees a change.
    source = directory / SOURCE.name
    if not source.is_file() or source.read_bytes() != text:
        partial = directory / f".{SOURCE.name}.{os.getpid()}"
        partial.write_bytes(text)
        os.replace(partial, source)
    cflags, ldflags = compile_flags(capability)
    with _quiet_cpp_extension():
        extension = _cpp_extension().load(
            name=name,
            sources=[str(source)],
            extra_cflags=cflags,
            extra_ldflags=ldflags,
            build_directory=str(directory),
            verbose=False,
        )
    _announce(f"eventful_pl: fused CPU kernels built in {time.perf_counter() - started:.0f} s")
    return extension


@contextlib.contextmanager
def _quiet_cpp_extension() -> Iterator[None]:
    """Silences torch's "no CUDA runtime" notices (the kernels are CPU-only)."""
    cpp_logger = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_logger.level
    cpp_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        cpp_logger.setLevel(level)


def _cpp_extension() -> ModuleType:
    """``torch.utils.cpp_extension``, imported without its import-time CUDA notice."""
    with _quiet_cpp_extension():
        return importlib.import_module("torch.utils.cpp_extension")


def _import_library(name: str, library: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, library)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {library}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _announce(message: str) -> None:
    """One line on rank 0 (Lightning's ``rank_zero_info``; a logging warning
    without Lightning)."""
    try:
        from lightning.pytorch.utilities import rank_zero_info
    except ImportError:  # pragma: no cover - Lightning is a dependency
        logging.getLogger(__name__).warning(message)
    else:
        rank_zero_info(message)


def prepare_fused_kernels(trainer: Any = None) -> bool:
    """Builds (if needed) and loads the fused CPU kernels now, not in the first
    frame that needs them; the LightningModules call it from ``setup()``.

    With a Lightning ``trainer`` of several processes, local rank 0 builds
    while the others wait at a barrier, then they load its build (if it
    failed, only rank 0 warns). Does nothing when the kernels are switched off
    or the trainer's device is not the CPU (the kernels are CPU-only; a CPU
    frame later still loads them on first use). Returns whether the kernels
    are available.
    """
    if not _enabled:
        return False
    if trainer is None:
        return load_extension() is not None
    strategy = trainer.strategy
    if strategy.root_device.type != "cpu":
        return False
    local_rank = trainer.local_rank
    if local_rank == 0:
        load_extension()
    if trainer.world_size > 1:
        strategy.barrier("eventful_pl.prepare_fused_kernels")
    if local_rank != 0:
        load_extension(build=False)
    return _extension is not None


def _error_summary(err: Exception) -> str:
    """The compiler's error lines of a failed build (else the message's end)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line.lower()]
    return " | ".join((errors or lines)[-3:])[-600:]


def fused_kernels_available(*tensors: Tensor) -> bool:
    """Whether the fused kernels apply to these tensors: enabled, gradients
    off, all float32 on CPU, the extension builds, and not under
    ``torch.compile`` (the compiler fuses the PyTorch forms itself)."""
    if not _enabled or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return False
    return load_extension() is not None


def fused_attention_available(*tensors: Tensor) -> bool:
    """Whether the full block uses its fused attention kernels for these tensors:
    :func:`fused_kernels_available` and :func:`fused_attention_preferred`
    (checked in that order: the capability query is not traceable by
    ``torch.compile``)."""
    return fused_kernels_available(*tensors) and fused_attention_preferred()


def error_norms(c: Tensor, p: Tensor) -> Tensor:
    """``||c - p||`` per token: c (B, N, D) or (B, N, G, C) (any strides,
    channels contiguous), p contiguous with B * N * D elements -> (B, N)."""
    if c.ndim == 3:
        c = c.unsqueeze(2)
    if c.stride(-1) != 1:
        c = c.contiguous()
    return load_extension().error_norms(c, p)


def layer_norm_error_norms(x: Tensor, norm: nn.LayerNorm, p: Tensor) -> Tensor:
    """``||norm(x) - p||`` per token without materialising ``norm(x)``:
    x, p (B, N, D) -> (B, N)."""
    weight, bias = norm.weight, norm.bias
    if weight is None:  # elementwise_affine=False
        weight = torch.ones(x.shape[-1], dtype=x.dtype)
    if bias is None:
        bias = torch.zeros(x.shape[-1], dtype=x.dtype)
    return load_extension().layer_norm_error_norms(x.contiguous(), weight, bias, norm.eps, p)


def update_softmax(
    rows: Tensor,
    cols_old: Tensor,
    cols_new: Tensor,
    log_norm: Tensor,
    index: Tensor,
    min_kept_mass: float,
    max_log_shift: float,
) -> bool:
    """The full eventful block's incremental softmax update in two fused passes
    (:func:`eventful_pl.blocks.softmax.update_softmax`, its PyTorch path,
    documents the method).

    rows (B, H, r, Nk), cols_old and cols_new (B, H, m, N), log_norm (B, H, N),
    index (B, r). On success updates ``log_norm`` in place, overwrites
    ``cols_new`` with the new softmax columns and returns True; returns False
    (``log_norm`` untouched) when the precision checks call for the exact
    fallback.
    """
    b, heads, n = log_norm.shape
    return load_extension().update_softmax(
        rows.reshape(b * heads, rows.shape[-2], rows.shape[-1]),
        cols_old.reshape(b * heads, cols_old.shape[-2], n),
        cols_new.view(b * heads, cols_new.shape[-2], n),
        log_norm.view(b * heads, n),
        index.contiguous(),
        min_kept_mass,
        max_log_shift,
    )


def incremental_softmax(
    q_rows: Tensor,
    keys_t: Tensor,
    k_new: Tensor,
    k_old: Tensor,
    q_t: Tensor,
    log_norm: Tensor,
    index: Tensor,
    probs: Tensor,
    min_kept_mass: float,
    max_log_shift: float,
) -> bool:
    """The full block's incremental logits and softmax update in one kernel
    that never stores a logit (G = B * H groups; no relative position).

    q_rows (G, r, d), keys_t (G, d, Nk), k_new and k_old (G, m, d), q_t
    (G, d, N), log_norm (G, N), index (B, r), probs (G, m, N) (written).
    Same result and fallback contract as :func:`update_softmax` given the
    logits ``q_rows @ keys_t``, ``k_old @ q_t`` and ``k_new @ q_t``
    (PyTorch path: :func:`eventful_pl.blocks.softmax.incremental_softmax`).
    """
    return load_extension().incremental_softmax(
        q_rows,
        keys_t,
        k_new,
        k_old,
        q_t,
        log_norm,
        index.contiguous(),
        probs,
        min_kept_mass,
        max_log_shift,
    )


def attention_update(
    out: Tensor,
    a_new: Tensor,
    v_new: Tensor,
    a_ref: Tensor,
    v_ref: Tensor,
    key_index: Tensor,
) -> Tensor:
    """The full block's output update in one pass over ``out``, reading the old
    columns and values straight from the delta gates' references:
    ``out += a_new^T v_new - a_ref[keys]^T v_ref[keys]`` (= ``A_new dV + dA V_old``),
    then ``a_ref[keys] = a_new`` in the same pass (``v_ref`` is only read).
    PyTorch path (delta form): :func:`eventful_pl.blocks.softmax.update_output`.

    out (G, N, d), a_new (G, m, N), v_new (G, m, d), a_ref (G, Nk, N), v_ref
    (G, Nk, d), all contiguous, G = B * H; key_index (B, m), no key twice.
    d a multiple of 16, at most 64.
    """
    load_extension().attention_update(out, a_new, v_new, a_ref, v_ref, key_index.contiguous())
    return out


def attention_update_supported(head_size: int) -> bool:
    """Whether :func:`attention_update` handles this head size."""
    return head_size % 16 == 0 and head_size <= 64
