"""A description of the machine a benchmark runs on, for its report.

Every benchmark prints it before its numbers, so that a table says which CPU
(model, cores, instruction sets actually used), which library versions and
which of eventful_pl's fast paths produced it, and how fast the machine
streams memory (the bound of an eventful frame that reads every weight for a
few rows).

Usage::

    python benchmarks/sysinfo.py             # the description, plain text
    python benchmarks/sysinfo.py --markdown  # as a markdown list
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eventful_pl import kernels, linear

#: CPU flags that matter to the kernels PyTorch and oneDNN pick on x86.
ISA_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
)


def _cpuinfo() -> list[dict[str, str]]:
    """/proc/cpuinfo as one dict per logical CPU (empty off Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    cpus = []
    for block in text.strip().split("\n\n"):
        entry = {}
        for line in block.splitlines():
            key, _, value = line.partition(":")
            entry[key.strip()] = value.strip()
        cpus.append(entry)
    return cpus


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; else ``platform.processor()``)."""
    cpus = _cpuinfo()
    if not cpus:
        return platform.processor() or platform.machine() or "unknown CPU"
    cpu = cpus[0]
    name = cpu.get("model name") or platform.machine()
    ids = [f"{key} {cpu[key]}" for key in ("cpu family", "model", "stepping") if key in cpu]
    return f"{name} ({', '.join(ids)})" if ids else name


def cpu_counts() -> tuple[int, int | None]:
    """(logical CPUs usable by this process, physical cores on the machine or None)."""
    try:
        logical = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        logical = os.cpu_count() or 1
    cores = {(c.get("physical id"), c.get("core id")) for c in _cpuinfo() if "core id" in c}
    return logical, (len(cores) or None)


def cpu_flags() -> list[str]:
    """The flags of :data:`ISA_FLAGS` this CPU reports."""
    cpus = _cpuinfo()
    flags = set(cpus[0].get("flags", "").split()) if cpus else set()
    return [flag for flag in ISA_FLAGS if flag in flags]


def onednn_version() -> str:
    """oneDNN's version as PyTorch was built with it (``torch.__config__.show()``)."""
    match = re.search(r"(?:MKL-DNN|oneDNN)\s+v?([\w.]+)", torch.__config__.show())
    return match.group(1) if match else "none"


def bf16_native() -> bool:
    """Whether oneDNN runs bfloat16 GEMMs natively on this CPU (AVX512-BF16 or AMX)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


def fused_kernel_state() -> str:
    """The fused CPU kernels: ``"on (<build name>)"``, ``"off (...)"``."""
    if not kernels._enabled:
        return f"off (switched off; {kernels.ENV_SWITCH}=0 or set_fused_kernels(False))"
    with torch.no_grad():
        available = kernels.fused_kernels_available(torch.zeros(1))
    if not available:
        return "off (the extension did not build; see the warning above)"
    attention = "on" if kernels.fused_attention_preferred() else "off (AVX-512 builds only)"
    return f"on ({kernels.extension_name()}); attention kernels {attention}"


def memory_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """Memory copy rate in GB/s (bytes read + written per second, median of
    ``repeats``) of a ``megabytes`` float32 tensor, with the current thread count."""
    numel = megabytes * 2**20 // 4
    src = torch.ones(numel)
    dst = torch.empty(numel)
    dst.copy_(src)  # page in
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * numel * 4 / statistics.median(times) / 1e9


def memory_read_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """Memory read rate in GB/s (median of ``repeats`` sums over a ``megabytes``
    float32 tensor, current thread count): the rate at which a frame can stream
    weights it reads once."""
    src = torch.ones(megabytes * 2**20 // 4)
    src.sum()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        src.sum()
        times.append(time.perf_counter() - start)
    return src.numel() * 4 / statistics.median(times) / 1e9


def describe(device: str | torch.device = "cpu", bandwidth: bool = True) -> dict[str, str]:
    """The machine and software a benchmark runs on, as ``{field: value}``."""
    logical, physical = cpu_counts()
    info = {
        "cpu": cpu_model(),
        "cpus": f"{logical} logical CPUs usable"
        + (f", {physical} physical cores on the machine" if physical else ""),
        "threads": str(torch.get_num_threads()),
        "isa": f"PyTorch CPU capability {torch.backends.cpu.get_cpu_capability()}; "
        f"CPU flags {' '.join(cpu_flags()) or 'none of ' + ' '.join(ISA_FLAGS)}",
        "bf16": "native (oneDNN bf16 GEMM)" if bf16_native() else "emulated (no AVX512-BF16/AMX)",
        "torch": torch.__version__,
        "onednn": onednn_version(),
        "python": platform.python_version(),
        "fused kernels": fused_kernel_state(),
        "pre-packed linear": "on" if linear._enabled else "off",
    }
    if bandwidth:
        info["memory"] = (
            f"copy {memory_bandwidth():.1f} GB/s (read + write), "
            f"read {memory_read_bandwidth():.1f} GB/s (256 MiB float32)"
        )
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        info["gpu"] = torch.cuda.get_device_name(index)
        info["cuda"] = str(torch.version.cuda)
    return info


def format_info(info: dict[str, str], markdown: bool = False) -> str:
    """``info`` as ``field: value`` lines (or a markdown list)."""
    prefix = "- " if markdown else ""
    return "\n".join(f"{prefix}{key}: {value}" for key, value in info.items())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", action="store_true", help="a markdown list")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(format_info(describe(args.device), args.markdown))


if __name__ == "__main__":
    main()
