"""benchmarks/kernel_count.py: kernels per incremental static frame, eager vs inductor."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import kernel_count  # noqa: E402


def test_compiled_static_frame_launches_fewer_kernels():
    """One ViT block with head size 64 (the size at which the full block
    checks for its CPU attention kernels): the compiled frame is one graph,
    launches fewer kernels than the eager static frame, and neither static
    path reads the device on the host while the eager path does."""
    report = kernel_count.count("a50", dim=128, depth=1, heads=2, batch=1)
    paths = report["paths"]
    eager, static, compiled = (
        paths["eventful-eager"],
        paths["static-eager"],
        paths["static-inductor"],
    )
    assert compiled["graphs"] == 1
    assert compiled["generated"] >= 1 and compiled["extern"] >= 1
    assert compiled["ops"].get("aten::addmm", 0) >= 4  # qkv, projection, two MLP linears
    assert compiled["kernels"] * 2 < static["kernels"], (compiled["kernels"], static["kernels"])
    assert static["syncs"] == compiled["syncs"] == 0
    assert eager["syncs"] >= 1
    assert paths["dense"]["kernels"] < static["kernels"]
    assert report["config"]["tokens"] == 401
