"""Shared builders for the tests: small blocks, backbones and video-like streams."""

from __future__ import annotations

import torch

from eventful_pl.backbone import ViTBackbone
from eventful_pl.blocks import BLOCK_VARIANTS, Block, build_block

#: Every block variant (``dense`` first) and the eventful ones, from the
#: library's registry: a new variant is tested without editing the tests.
VARIANTS = list(BLOCK_VARIANTS)
EVENTFUL_VARIANTS = [v for v in BLOCK_VARIANTS if v != "dense"]

# Block option sets exercised by the equivalence tests: (id, kwargs, class token).
BLOCK_OPTIONS = [
    ("global", dict(input_size=(6, 6)), False),
    ("global-classtoken", dict(input_size=(6, 6)), True),
    ("relpos", dict(input_size=(6, 6), relative_embedding_size=(4, 4)), False),
    ("relpos-pooled", dict(input_size=(6, 6), relative_embedding_size=(6, 6), pool_size=2), False),
    ("pooled", dict(input_size=(6, 6), pool_size=(3, 2)), False),
    (
        "window-padded-relpos",
        dict(input_size=(7, 5), window_size=3, relative_embedding_size=3),
        False,
    ),
    ("window-exact", dict(input_size=(6, 6), window_size=3), False),
]

DIM, HEADS = 32, 4


def num_tokens(kwargs: dict, class_token: bool) -> int:
    h, w = kwargs["input_size"]
    return h * w + int(class_token)


def make_pair(variant: str, seed: int = 0, **kwargs) -> tuple[Block, Block]:
    """A dense block and an eventful one with the same random weights."""
    torch.manual_seed(seed)
    dense = build_block("dense", DIM, HEADS, **kwargs).eval()
    eventful = build_block(variant, DIM, HEADS, **kwargs).eval()
    eventful.load_state_dict(dense.state_dict())
    return dense, eventful


def make_backbones(
    variant: str, window_variant: str | None = None, seed: int = 0, **kwargs
) -> tuple[ViTBackbone, ViTBackbone]:
    """A dense backbone and an eventful one with the same random weights."""
    torch.manual_seed(seed)
    dense = ViTBackbone(**kwargs).eval()
    eventful = ViTBackbone(
        block_variant=variant, window_block_variant=window_variant, **kwargs
    ).eval()
    eventful.load_state_dict(dense.state_dict())
    return dense, eventful


def video_stream(
    frames: int, batch: int, tokens: int, dim: int, seed: int = 0, change: float = 0.5
) -> list[torch.Tensor]:
    """Video-like token frames (B, N, D): drift on every token, large changes on a few."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, dim, generator=gen)
    out = [x]
    for _ in range(frames - 1):
        x = x + 0.05 * torch.randn(batch, tokens, dim, generator=gen)
        moved = torch.rand(batch, tokens, 1, generator=gen) < 0.2
        x = x + change * moved * torch.randn(batch, tokens, dim, generator=gen)
        out.append(x)
    return out


def run_script(script: str, *args: str, timeout: int = 500) -> None:
    """Runs a Python script file in a fresh interpreter from the repository root;
    fails the test with the end of its stderr if it exits non-zero."""
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run(
        [sys.executable, script, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=Path(__file__).parents[1],
    )
    assert done.returncode == 0, done.stderr[-3000:]


#: Clip data-module options of the tests: small batches and crops, loading in
#: the test process, no random flips, two probe workers.
SMALL_CLIPS = dict(batch_size=4, num_workers=0, crop_size=32, flip_prob=0.0, probe_workers=2)


def quiet_trainer_options(root) -> dict:
    """Trainer options of the Lightning tests: one CPU process, no checkpoints,
    progress bar, model summary or sanity check, files under ``root``."""
    return {
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "accelerator": "cpu",
        "devices": 1,
        "default_root_dir": str(root),
    }


def print_config(config: str, subcommand: str = "fit") -> dict:
    """``cli.py <subcommand> --config config --print_config`` parsed back from YAML;
    fails the test unless the command exits 0. (LightningCLI reads ``sys.argv``:
    use the ``argv`` fixture.)"""
    import contextlib
    import io

    import pytest
    import yaml

    from cli import cli_main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        cli_main([subcommand, "--config", str(config), "--print_config"])
    assert done.value.code == 0, config
    return yaml.safe_load(out.getvalue())
