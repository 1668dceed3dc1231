"""r = N (every token updated) must reproduce the dense model on every frame."""

import pytest
import torch

from eventful_pl.policies import ThresholdPolicy, TopRPolicy
from tests.helpers import (
    BLOCK_OPTIONS,
    DIM,
    EVENTFUL_VARIANTS,
    make_backbones,
    make_pair,
    num_tokens,
    video_stream,
)

# Every test runs in each autograd mode (the fixture enters it; bodies must not
# enter their own): under "grad" the eventful blocks' incremental frames run
# with autograd recording (forward only here; the full block's incremental
# frames cannot be backpropagated).
pytestmark = pytest.mark.usefixtures("grad_mode")


def test_the_body_runs_in_the_mode_of_its_id(grad_mode):
    """The grad_mode column means what it says."""
    assert torch.is_grad_enabled() == (grad_mode == "grad")
    assert torch.is_inference_mode_enabled() == (grad_mode == "inference")
    _, eventful = make_pair("full", policy=TopRPolicy(36), input_size=(6, 6))
    for frame in video_stream(2, 1, 36, DIM):
        assert eventful(frame).requires_grad == (grad_mode == "grad")


# The fast loop (-m "not slow") keeps one option set of each kind per variant
# (class token, relative position with pooling, padded windows) on a batch of
# 3 with the gate after the norm; the whole grid runs in the full suite.
FAST_BLOCK_OPTIONS = {"global-classtoken", "relpos-pooled", "window-padded-relpos"}


def _cases():
    for variant in EVENTFUL_VARIANTS:
        for name, kwargs, class_token in BLOCK_OPTIONS:
            if "window_size" in kwargs and variant != "tokenwise":
                continue
            for gate_before_ln in (False, True):
                for batch in (1, 3):
                    fast = name in FAST_BLOCK_OPTIONS and not gate_before_ln and batch == 3
                    yield pytest.param(
                        variant,
                        kwargs,
                        class_token,
                        gate_before_ln,
                        batch,
                        id=f"{variant}-{name}-{'before' if gate_before_ln else 'after'}_ln-{batch}",
                        marks=() if fast else pytest.mark.slow,
                    )


@pytest.mark.parametrize(
    ("variant", "kwargs", "class_token", "gate_before_ln", "batch"), list(_cases())
)
def test_block_r_equals_n_matches_dense(variant, kwargs, class_token, gate_before_ln, batch):
    n = num_tokens(kwargs, class_token)
    dense, eventful = make_pair(
        variant, policy=TopRPolicy(n), gate_before_ln=gate_before_ln, **kwargs
    )
    for t, frame in enumerate(video_stream(5, batch, n, DIM)):
        torch.testing.assert_close(
            eventful(frame), dense(frame), rtol=1e-4, atol=1e-4, msg=f"frame {t}"
        )


@pytest.mark.parametrize("variant", EVENTFUL_VARIANTS)
def test_stgt_r_equals_n_matches_dense(variant):
    dense, eventful = make_pair(variant, policy=TopRPolicy(36), stgt=True, input_size=(6, 6))
    for frame in video_stream(4, 2, 36, DIM):
        torch.testing.assert_close(eventful(frame), dense(frame), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", EVENTFUL_VARIANTS)
def test_threshold_zero_matches_dense(variant):
    """h = 0 on an input where every token changes updates every token."""
    dense, eventful = make_pair(variant, policy=ThresholdPolicy(0.0), input_size=(6, 6))
    for frame in video_stream(4, 3, 36, DIM):
        torch.testing.assert_close(eventful(frame), dense(frame), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cast", [pytest.param("float16", marks=pytest.mark.slow), "bfloat16"])
@pytest.mark.parametrize("variant", EVENTFUL_VARIANTS)
def test_half_precision_av_r_equals_n(variant, cast):
    """With A @ V in half precision, r = N matches the dense block with the same cast."""
    dense, eventful = make_pair(
        variant, policy=TopRPolicy(37), input_size=(6, 6), matmul_2_cast=cast
    )
    _, full_precision = make_pair("dense", input_size=(6, 6))
    tol = 2e-2 if cast == "bfloat16" else 3e-3
    for frame in video_stream(4, 2, 37, DIM):
        ref = dense(frame)
        torch.testing.assert_close(eventful(frame), ref, rtol=tol, atol=tol)
        torch.testing.assert_close(full_precision(frame), ref, rtol=tol, atol=tol)


BACKBONE_OPTIONS = [
    ("vivit-like", dict(input_size=(5, 5), class_token=True, position_encoding_size=(4, 4))),
    (
        "vitdet-like",
        dict(
            input_size=(7, 7),
            window_size=3,
            window_block_indices=(0, 2),
            relative_embedding_size=(5, 5),
            window_block_variant="tokenwise",
        ),
    ),
    (
        "spatial-pooled",
        dict(
            input_size=(6, 6),
            window_size=3,
            window_block_indices=(0,),
            relative_embedding_size=(6, 6),
            pool_size=2,
            window_block_variant="tokenwise",
        ),
    ),
]


def _backbone_cases():
    """The fast loop keeps the full variant on a batch of 3 for each backbone."""
    for name, options in BACKBONE_OPTIONS:
        for variant in EVENTFUL_VARIANTS:
            for batch in (1, 3):
                fast = variant == "full" and batch == 3
                yield pytest.param(
                    name,
                    options,
                    variant,
                    batch,
                    id=f"{name}-{variant}-{batch}",
                    marks=() if fast else pytest.mark.slow,
                )


@pytest.mark.parametrize(("name", "options", "variant", "batch"), list(_backbone_cases()))
def test_backbone_r_equals_n_matches_dense(name, options, variant, batch):
    options = dict(options)
    window_variant = options.pop("window_block_variant", None)
    dense, eventful = make_backbones(variant, window_variant, dim=DIM, depth=3, heads=4, **options)
    eventful.set_policy(TopRPolicy(eventful.num_tokens))
    h, w = options["input_size"]
    for t, frame in enumerate(video_stream(4, batch, h * w, DIM)):
        torch.testing.assert_close(
            eventful(frame), dense(frame), rtol=1e-4, atol=1e-4, msg=f"frame {t}"
        )
