"""bfloat16 inference (the ``dtype`` option): drift against float32 and r = N
equivalence stay within stated bounds, for every eventful variant, frame
after frame.

Bounds (relative to the largest |value| of the float32 reference output):
bfloat16 keeps 8 significant bits (a relative step of 2^-8 = 0.4 %), so
after the blocks' roundings the outputs may differ from float32 by a few
steps: :data:`DRIFT` = 2 %, and in root-mean-square :data:`RMS_DRIFT` = 0.4 %
(measured: about 1.1 % and 0.13 % for the 3-block models here).
An eventful bfloat16 model with r = N must follow the dense bfloat16 model
as closely (:data:`EQUIVALENCE`) on every frame: its incremental updates
(softmax normalisers kept in float32) must not let the error grow.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from eventful_pl import linear
from eventful_pl.backbone import ViTBackbone, resolve_dtype
from eventful_pl.models.vitdet import create_vitdet
from eventful_pl.models.vivit import create_vivit
from eventful_pl.policies import TopRPolicy
from tests.helpers import EVENTFUL_VARIANTS, video_stream

DRIFT = 0.02
RMS_DRIFT = 0.004
EQUIVALENCE = 0.02
NORMALISER = 0.015
FRAMES = 8

pytestmark = pytest.mark.usefixtures("one_thread")


def _relative_errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max |out - ref|, rms(out - ref)) divided by max |ref|."""
    diff = out.double() - ref.double()
    scale = ref.double().abs().max()
    return float(diff.abs().max() / scale), float(diff.pow(2).mean().sqrt() / scale)


def _options(variant: str) -> dict:
    if variant == "tokenwise":  # windows with relative position, one global block
        return dict(
            input_size=(6, 6),
            window_size=3,
            window_block_indices=(0, 2),
            relative_embedding_size=6,
        )
    return dict(input_size=(6, 6), class_token=True)


def _backbone(variant: str, dtype: str, state: dict | None, **options) -> ViTBackbone:
    torch.manual_seed(0)
    model = ViTBackbone(
        dim=64,
        depth=3,
        heads=4,
        block_variant=variant,
        policy=None if variant == "dense" else TopRPolicy(options.pop("r")),
        dtype=dtype,
        **options,
    ).eval()
    if state is not None:
        model.load_state_dict(state)
    return model


def test_dtype_option_builds_bf16_weights_and_casts_inputs():
    model = ViTBackbone(dim=32, depth=2, heads=4, input_size=4, dtype="bfloat16")
    assert model.compute_dtype == torch.bfloat16
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        out = model(torch.randn(2, 16, 32))
    assert out.dtype == torch.bfloat16
    assert resolve_dtype(None) == torch.float32
    assert resolve_dtype(torch.bfloat16) == torch.bfloat16
    assert resolve_dtype("torch.float16") == torch.float16


def test_unknown_dtype_names_the_option_and_the_choices():
    with pytest.raises(ValueError, match=r"dtype='int8'.*bfloat16"):
        ViTBackbone(dim=32, depth=1, heads=4, input_size=4, dtype="int8")
    with pytest.raises(ValueError, match=r"dtype='half'.*float32"):
        create_vivit("vivit_tiny", dtype="half")


@pytest.mark.parametrize("variant", EVENTFUL_VARIANTS)
def test_bf16_drift_and_r_equals_n_stay_bounded(variant):
    options = _options(variant)
    n = 36 + int(options.get("class_token", False))
    dense32 = _backbone("dense", "float32", None, **options)
    state = dense32.state_dict()
    dense16 = _backbone("dense", "bfloat16", state, **options)
    eventful16 = _backbone(variant, "bfloat16", state, r=n, **options)
    worst = {"drift": 0.0, "rms": 0.0, "equivalence": 0.0}
    with torch.no_grad():
        for x in video_stream(FRAMES, 2, 36, 64, seed=1):
            ref = dense32(x)
            out16 = dense16(x)
            assert out16.dtype == torch.bfloat16
            drift, rms = _relative_errors(out16, ref)
            equivalence, _ = _relative_errors(eventful16(x), out16.float())
            worst["drift"] = max(worst["drift"], drift)
            worst["rms"] = max(worst["rms"], rms)
            worst["equivalence"] = max(worst["equivalence"], equivalence)
    assert worst["drift"] <= DRIFT, worst
    assert worst["rms"] <= RMS_DRIFT, worst
    assert worst["equivalence"] <= EQUIVALENCE, worst
    if variant == "full":
        assert {block.log_norm.dtype for block in eventful16.blocks} == {torch.float32}


def test_bf16_softmax_normalisers_stay_float32_exact():
    """The full block's incremental normaliser updates, in float32 from
    bfloat16 logits, stay within :data:`NORMALISER` (in log) of the exact
    normalisers of its own query and key state frame after frame (kept in
    bfloat16 they drift to about 0.03)."""
    model = _backbone("full", "bfloat16", None, r=12, **_options("full"))
    with torch.no_grad():
        for x in video_stream(12, 2, 36, 64, seed=2):
            model(x)
            for block in model.blocks:
                assert block.log_norm.dtype == torch.float32
                logits = block.q_scaled_t.double().transpose(-2, -1) @ block.keys_t.double()
                error = (block.log_norm.double() - torch.logsumexp(logits, -1)).abs().max()
                assert error <= NORMALISER


def test_bf16_eventful_follows_float32_eventful_at_r_below_n():
    """With r < N the two precisions may pick different tokens at near-ties;
    the outputs still agree in root-mean-square within a few bfloat16 steps."""
    options = _options("full")
    eventful32 = _backbone("full", "float32", None, r=12, **options)
    eventful16 = _backbone("full", "bfloat16", eventful32.state_dict(), r=12, **options)
    with torch.no_grad():
        for x in video_stream(FRAMES, 2, 36, 64, seed=2):
            _, rms = _relative_errors(eventful16(x), eventful32(x))
            assert rms <= 2 * RMS_DRIFT


def test_vivit_bf16_logits_follow_float32():
    model32 = create_vivit("vivit_tiny", spatial_variant="full", policy=TopRPolicy(17)).eval()
    model16 = create_vivit(
        "vivit_tiny", spatial_variant="full", policy=TopRPolicy(17), dtype="bfloat16"
    ).eval()
    model16.load_state_dict(model32.state_dict())
    assert model16.spatial.compute_dtype == torch.bfloat16
    video = torch.randint(0, 256, (1, 8, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        ref, out = model32(video), model16(video)
        features = model16.spatial_features(video)
    assert out.dtype == torch.float32 and features.dtype == torch.bfloat16
    drift, _ = _relative_errors(out, ref)
    assert drift <= 2 * DRIFT


def test_vitdet_bf16_backbone_follows_float32_and_detects():
    model32 = create_vitdet("vitdet_tiny", variant="eventful", policy=TopRPolicy(64)).eval()
    model16 = create_vitdet(
        "vitdet_tiny", variant="eventful", policy=TopRPolicy(64), dtype="bfloat16"
    ).eval()
    model16.load_state_dict(model32.state_dict())
    pixels = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        ref = model32.backbone_forward(pixels)
        out = model16.backbone_forward(pixels)
        detections = model16([torch.rand(3, 96, 128)])
    assert out.dtype == torch.bfloat16
    drift, rms = _relative_errors(out, ref)
    assert drift <= DRIFT and rms <= RMS_DRIFT, (drift, rms)
    assert detections[0]["boxes"].dtype == torch.float32


def test_bf16_linear_matches_f_linear():
    """The pre-packed path takes bfloat16 only where oneDNN runs it natively;
    either way the result is F.linear's to bfloat16 rounding."""
    torch.manual_seed(0)
    x = torch.randn(7, 64).bfloat16()
    weight, bias = torch.randn(96, 64).bfloat16(), torch.randn(96).bfloat16()
    with torch.no_grad():
        expected = F.linear(x.float(), weight.float(), bias.float())
        out = linear.linear(x, weight, bias)
        out_gelu = linear.linear(x, weight, bias, gelu=True)
        assert linear.prepacked_linear_available(x, weight) == linear.bf16_prepacked_supported()
    assert out.dtype == torch.bfloat16
    scale = expected.abs().max()
    assert (out.float() - expected).abs().max() <= 0.01 * scale
    assert (out_gelu.float() - F.gelu(expected)).abs().max() <= 0.01 * scale
