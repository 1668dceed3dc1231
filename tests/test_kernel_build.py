"""The fused kernels build once per source, never per checkout: the build is
named after a hash of what goes into it, happens in the LightningModules'
setup() with one message, and a failed build falls back to PyTorch ops with
one warning."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eventful_pl import kernels

REPO = Path(__file__).parents[1]
needs_compiler = pytest.mark.skipif(
    shutil.which("c++") is None, reason="no C++ compiler to build the fused kernels"
)


def test_extension_name_follows_the_source_not_its_path(tmp_path, monkeypatch):
    text = kernels.SOURCE.read_bytes()
    a, b, changed = tmp_path / "a" / "fused_cpu.cpp", tmp_path / "b.cpp", tmp_path / "c.cpp"
    a.parent.mkdir()
    a.write_bytes(text)
    b.write_bytes(text)
    changed.write_bytes(text + b"\n// another version\n")
    name = kernels.extension_name()
    assert name.isidentifier() and name.startswith("eventful_pl_fused_cpu_")
    assert kernels.extension_name(a) == kernels.extension_name(b) == name
    assert kernels.extension_name(text) == name
    assert kernels.extension_name(changed) != name
    # Another CPU capability (other flags) or torch version: another build.
    assert kernels.extension_name(a, "AVX512") != kernels.extension_name(a, "AVX2")
    assert "avx512" in kernels.extension_name(a, "AVX512")
    monkeypatch.setattr(torch, "__version__", "0.0.0+other")
    assert kernels.extension_name(a) != name


def test_build_directory_is_named_after_the_build(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert kernels.build_directory() == tmp_path / kernels.extension_name()
    assert kernels.build_directory("x") == tmp_path / "x"
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    assert kernels.build_directory().name == kernels.extension_name()


@needs_compiler
def test_the_build_is_loaded_from_its_own_folder():
    """The session's one real build (cached): compiled from a copy of the
    source in its hashed folder, so another checkout's command line is the same."""
    module = kernels.load_extension()
    assert module is not None
    folder = kernels.build_directory()
    assert Path(module.__file__).parent == folder
    assert (folder / kernels.SOURCE.name).read_bytes() == kernels.SOURCE.read_bytes()
    assert kernels.prepare_fused_kernels()


SCRIPT = r"""
import sys
import warnings

import torch
from lightning import Trainer

from eventful_pl import kernels
from eventful_pl.backbone import ViTBackbone
from eventful_pl.lightning.vitdet_module import ViTDetModule
from eventful_pl.lightning.vivit_module import ViViTFineTuning
from eventful_pl.policies import TopRPolicy

warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    detector = ViTDetModule(preset="vitdet_tiny", model_kwargs={"num_classes": 30}, r=8)
    detector.trainer = trainer
    detector.setup("validate")  # builds here: a message, then (if it fails) one warning
    print("after setup: available", kernels.load_extension() is not None, flush=True)
    video = ViViTFineTuning(
        preset="vivit_tiny",
        model_kwargs={"image_size": 32, "tubelet": [2, 8, 8], "temporal_views": 1},
        r=8,
    )
    video.trainer = trainer
    video.setup("validate")  # nothing more to build
    torch.manual_seed(0)
    model = ViTBackbone(dim=32, depth=3, heads=2, input_size=6, block_variant="full").eval()
    model.set_policy(TopRPolicy(10))
    frames = [torch.randn(2, 36, 32) for _ in range(4)]
    outputs = {}
    for enabled in (True, False):
        kernels.set_fused_kernels(enabled)
        model.reset()
        with torch.no_grad():
            outputs[enabled] = torch.stack([model(f) for f in frames])
build_warnings = [str(w.message) for w in caught if "fused CPU kernels" in str(w.message)]
print("build warnings", len(build_warnings), build_warnings)
print("max difference", (outputs[True] - outputs[False]).abs().max().item())
"""


def run_script(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    environment = {**os.environ, **env}
    environment.pop(kernels.ENV_SWITCH, None)
    environment["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # one log, in order
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=environment,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    return done


@pytest.mark.slow
def test_failed_build_falls_back_with_one_warning(tmp_path):
    """No compiler (CXX names none) and no build yet: the module's setup()
    announces the build once, it fails with one warning, and a whole
    ViTBackbone stream runs on PyTorch ops, equal to the kernels-off outputs."""
    cache = tmp_path / "extensions"
    done = run_script(
        tmp_path, CXX=str(tmp_path / "no-such-compiler"), TORCH_EXTENSIONS_DIR=str(cache)
    )
    log = done.stdout
    assert log.count("building the fused CPU kernels") == 1, log[-3000:]
    # The message comes from setup(), before its result is known.
    assert log.index("building the fused CPU kernels") < log.index("after setup")
    assert "after setup: available False" in done.stdout
    assert "build warnings 1 " in done.stdout, log[-3000:]
    assert "no-such-compiler" in done.stdout
    assert "No CUDA runtime" not in log  # torch's import-time notice is kept quiet
    assert "max difference 0.0" in done.stdout


@needs_compiler
@pytest.mark.slow
def test_setup_loads_an_existing_build_without_a_message(tmp_path):
    """With the build on disk (this session's), setup() loads it quietly and
    the stream with the kernels matches the PyTorch ops."""
    assert kernels.load_extension() is not None  # the session's one real build
    done = run_script(tmp_path, TORCH_EXTENSIONS_DIR=str(kernels.build_directory().parent))
    log = done.stdout
    assert "building the fused CPU kernels" not in log
    assert "No CUDA runtime" not in log  # torch's import-time notice is kept quiet
    assert "after setup: available True" in done.stdout
    assert "build warnings 0 " in done.stdout, log[-3000:]
    difference = float(done.stdout.rsplit("max difference", 1)[1])
    assert difference < 1e-4
