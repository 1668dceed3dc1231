"""ViTDet as the published weights define it: real checkpoint layouts, the original
release's preprocessing, and its detector settings.

The key lists below are written from the published configs, not from our model:
detectron2's ``mask_rcnn_vitdet_b`` (``model_final_61ccd1.pkl``; ViT-B with
relative position and 14 x 14 windows, ``SimpleFeaturePyramid`` with LN norms,
``StandardRPNHead(conv_dims=[-1, -1])``, ``FastRCNNConvFCHead`` with 4 LN convs
and one fc of 1024, ``MaskRCNNConvUpsampleHead``), the original
eventful-transformer release's VID detector (``frcnn_vitdet_final.pth``, trained
with detectron2_vitdet_vid's ``frcnn_vitdet.py``: the same backbone and box head,
30 classes, no mask head) and that file after the release's own conversion
(``configs/convert/vitdet_b.txt``).
"""

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
import yaml
from torchvision.transforms import InterpolationMode

from eventful_pl.checkpoints import CheckpointMismatchError
from eventful_pl.models.vitdet import VITDET_PRESETS, ViTDet, ViTDetPreprocessing, create_vitdet
from eventful_pl.models.vitdet_convert import (
    checkpoint_head_options,
    create_vitdet_from_checkpoint,
    load_detectron2_vitdet,
    load_vitdet_checkpoint,
)
from tests.test_vitdet import detectron2_state_dict, moving_frames

ROOT = Path(__file__).resolve().parents[1]
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)

# --- published layouts ------------------------------------------------------------

DIM, MLP, HEAD_DIM, CHANNELS = 768, 3072, 64, 256
WINDOWED = (0, 1, 3, 4, 6, 7, 9, 10)


def detectron2_vitdet_b_shapes(classes: int = 80, mask_head: bool = True) -> dict:
    """Keys and shapes of a detectron2 ViTDet-B Mask/Faster R-CNN checkpoint."""
    d = DIM
    s = {
        "backbone.net.pos_embed": (1, 197, d),  # pretrain_img_size 224: 14 x 14 + class token
        "backbone.net.patch_embed.proj.weight": (d, 3, 16, 16),
        "backbone.net.patch_embed.proj.bias": (d,),
    }
    for i in range(12):
        b = f"backbone.net.blocks.{i}."
        rel = 2 * 14 - 1 if i in WINDOWED else 2 * 64 - 1  # window 14, global 1024 / 16
        s.update({
            b + "norm1.weight": (d,), b + "norm1.bias": (d,),
            b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
            b + "attn.rel_pos_h": (rel, HEAD_DIM), b + "attn.rel_pos_w": (rel, HEAD_DIM),
            b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
            b + "norm2.weight": (d,), b + "norm2.bias": (d,),
            b + "mlp.fc1.weight": (MLP, d), b + "mlp.fc1.bias": (MLP,),
            b + "mlp.fc2.weight": (d, MLP), b + "mlp.fc2.bias": (d,),
        })  # fmt: skip
    c = CHANNELS

    def conv_ln(prefix, cin, k):  # detectron2 Conv2d(bias=False, norm=LayerNorm)
        return {prefix + ".weight": (c, cin, k, k), prefix + ".norm.weight": (c,),
                prefix + ".norm.bias": (c,)}  # fmt: skip

    p = "backbone.simfp_"
    s.update({
        # scale 4: deconv, LN, GELU, deconv, then 1x1 and 3x3 convs with LN
        p + "2.0.weight": (d, d // 2, 2, 2), p + "2.0.bias": (d // 2,),
        p + "2.1.weight": (d // 2,), p + "2.1.bias": (d // 2,),
        p + "2.3.weight": (d // 2, d // 4, 2, 2), p + "2.3.bias": (d // 4,),
        **conv_ln(p + "2.4", d // 4, 1), **conv_ln(p + "2.5", c, 3),
        # scale 2: deconv
        p + "3.0.weight": (d, d // 2, 2, 2), p + "3.0.bias": (d // 2,),
        **conv_ln(p + "3.1", d // 2, 1), **conv_ln(p + "3.2", c, 3),
        # scale 1
        **conv_ln(p + "4.0", d, 1), **conv_ln(p + "4.1", c, 3),
        # scale 0.5: max-pool (no weights) at index 0
        **conv_ln(p + "5.1", d, 1), **conv_ln(p + "5.2", c, 3),
    })  # fmt: skip
    r = "proposal_generator.rpn_head."
    s.update({
        r + "conv.conv0.weight": (c, c, 3, 3), r + "conv.conv0.bias": (c,),
        r + "conv.conv1.weight": (c, c, 3, 3), r + "conv.conv1.bias": (c,),
        r + "objectness_logits.weight": (3, c, 1, 1), r + "objectness_logits.bias": (3,),
        r + "anchor_deltas.weight": (12, c, 1, 1), r + "anchor_deltas.bias": (12,),
    })  # fmt: skip
    for k in range(1, 5):
        s.update(conv_ln(f"roi_heads.box_head.conv{k}", c, 3))
    s.update({
        "roi_heads.box_head.fc1.weight": (1024, c * 7 * 7), "roi_heads.box_head.fc1.bias": (1024,),
        "roi_heads.box_predictor.cls_score.weight": (classes + 1, 1024),
        "roi_heads.box_predictor.cls_score.bias": (classes + 1,),
        "roi_heads.box_predictor.bbox_pred.weight": (4 * classes, 1024),
        "roi_heads.box_predictor.bbox_pred.bias": (4 * classes,),
    })  # fmt: skip
    if mask_head:
        for k in range(1, 5):
            s.update(conv_ln(f"roi_heads.mask_head.mask_fcn{k}", c, 3))
        s.update({
            "roi_heads.mask_head.deconv.weight": (c, c, 2, 2),
            "roi_heads.mask_head.deconv.bias": (c,),
            "roi_heads.mask_head.predictor.weight": (classes, c, 1, 1),
            "roi_heads.mask_head.predictor.bias": (classes,),
        })  # fmt: skip
    return s


#: The original release's configs/convert/vitdet_b.txt (pattern, replacement); keys
#: no pattern matches (the detectron2 head) are kept as they are.
ORIGINAL_CONVERSION = [
    (r"^backbone\.net\.patch_embed\.proj\.", "embedding.conv."),
    (r"^backbone\.net\.pos_embed$", "backbone.position_encoding.encoding"),
    (r"^backbone\.net\.blocks\.(\d*)\.norm1\.", r"backbone.blocks.\1.input_layer_norm."),
    (r"^backbone\.net\.blocks\.(\d*)\.attn\.qkv\.", r"backbone.blocks.\1.qkv."),
    (r"^backbone\.net\.blocks\.(\d*)\.attn\.rel_pos_h$",
     r"backbone.blocks.\1.relative_position.y_embedding"),
    (r"^backbone\.net\.blocks\.(\d*)\.attn\.rel_pos_w$",
     r"backbone.blocks.\1.relative_position.x_embedding"),
    (r"^backbone\.net\.blocks\.(\d*)\.attn\.proj\.", r"backbone.blocks.\1.projection."),
    (r"^backbone\.net\.blocks\.(\d*)\.norm2\.", r"backbone.blocks.\1.mlp_layer_norm."),
    (r"^backbone\.net\.blocks\.(\d*)\.mlp\.fc1\.", r"backbone.blocks.\1.mlp_1."),
    (r"^backbone\.net\.blocks\.(\d*)\.mlp\.fc2\.", r"backbone.blocks.\1.mlp_2."),
    (r"^backbone\.simfp_2\.([013])\.", r"pyramid.stages.0.\1."),
    (r"^backbone\.simfp_2\.4\.weight$", "pyramid.stages.0.4.weight"),
    (r"^backbone\.simfp_2\.4\.norm\.", "pyramid.stages.0.5."),
    (r"^backbone\.simfp_2\.5\.weight$", "pyramid.stages.0.6.weight"),
    (r"^backbone\.simfp_2\.5\.norm\.", "pyramid.stages.0.7."),
    (r"^backbone\.simfp_3\.0\.", "pyramid.stages.1.0."),
    (r"^backbone\.simfp_3\.1\.weight$", "pyramid.stages.1.1.weight"),
    (r"^backbone\.simfp_3\.1\.norm\.", "pyramid.stages.1.2."),
    (r"^backbone\.simfp_3\.2\.weight$", "pyramid.stages.1.3.weight"),
    (r"^backbone\.simfp_3\.2\.norm\.", "pyramid.stages.1.4."),
    (r"^backbone\.simfp_4\.0\.weight$", "pyramid.stages.2.0.weight"),
    (r"^backbone\.simfp_4\.0\.norm\.", "pyramid.stages.2.1."),
    (r"^backbone\.simfp_4\.1\.weight$", "pyramid.stages.2.2.weight"),
    (r"^backbone\.simfp_4\.1\.norm\.", "pyramid.stages.2.3."),
    (r"^backbone\.simfp_5\.1\.weight$", "pyramid.stages.3.1.weight"),
    (r"^backbone\.simfp_5\.1\.norm\.", "pyramid.stages.3.2."),
    (r"^backbone\.simfp_5\.2\.weight$", "pyramid.stages.3.3.weight"),
    (r"^backbone\.simfp_5\.2\.norm\.", "pyramid.stages.3.4."),
]  # fmt: skip


def original_conversion(state: dict) -> dict:
    """The original release's scripts/convert/vitdet.py: class slot dropped, keys remapped."""
    state = dict(state)
    state["backbone.net.pos_embed"] = state["backbone.net.pos_embed"][:, 1:]
    out = {}
    for key, value in state.items():
        for pattern, replacement in ORIGINAL_CONVERSION:
            new, n = re.subn(pattern, replacement, key)
            if n:
                key = new
                break
        out[key] = value
    return out


def constant_state(shapes: dict) -> dict:
    """One distinct constant per key (its index + 1), so each destination is traceable."""
    return {k: torch.full(shape, float(i + 1)) for i, (k, shape) in enumerate(shapes.items())}


def assert_loaded_from(model, state, pairs):
    own = model.state_dict()
    for theirs, ours in pairs:
        assert own[ours].shape == state[theirs].shape, ours
        assert torch.equal(own[ours], state[theirs]), f"{ours} is not {theirs}"


# Where the real keys land (spot checks of each part of the layout).
DETECTRON2_DESTINATIONS = [
    ("proposal_generator.rpn_head.conv.conv0.weight", "head.rpn.head.conv.0.0.weight"),
    ("proposal_generator.rpn_head.conv.conv1.bias", "head.rpn.head.conv.1.0.bias"),
    ("proposal_generator.rpn_head.objectness_logits.weight", "head.rpn.head.cls_logits.weight"),
    ("proposal_generator.rpn_head.anchor_deltas.bias", "head.rpn.head.bbox_pred.bias"),
    ("roi_heads.box_head.conv4.weight", "head.roi_heads.box_head.convs.9.weight"),
    ("roi_heads.box_head.conv4.norm.bias", "head.roi_heads.box_head.convs.10.bias"),
    ("roi_heads.box_head.fc1.weight", "head.roi_heads.box_head.fcs.0.weight"),
]
DETECTRON2_BACKBONE_DESTINATIONS = [
    ("backbone.net.blocks.11.attn.rel_pos_w", "backbone.blocks.11.rel_pos.width"),
    ("backbone.net.blocks.0.attn.rel_pos_h", "backbone.blocks.0.rel_pos.height"),
    ("backbone.simfp_2.5.norm.weight", "pyramid.stages.0.7.weight"),
    ("backbone.simfp_5.2.weight", "pyramid.stages.3.3.weight"),
]


@pytest.fixture(scope="module")
def vitdet_b_coco():
    return create_vitdet("vitdet_b_coco")


@pytest.fixture(scope="module")
def vitdet_b_vid():
    return create_vitdet("vitdet_b_vid")


def test_detectron2_mask_rcnn_vitdet_b_layout_loads_completely(vitdet_b_coco):
    state = constant_state(detectron2_vitdet_b_shapes(classes=80, mask_head=True))
    # Strict: any missing, unexpected (other than the dropped mask head) or
    # mis-shaped key raises CheckpointMismatchError.
    assert load_vitdet_checkpoint(vitdet_b_coco, state) == "detectron2"
    assert checkpoint_head_options(state) == {
        "rpn_conv_depth": 2,
        "box_conv_dims": (256, 256, 256, 256),
        "box_fc_dims": (1024,),
        "num_classes": 80,
    }
    assert_loaded_from(vitdet_b_coco, state, DETECTRON2_DESTINATIONS)
    assert_loaded_from(vitdet_b_coco, state, DETECTRON2_BACKBONE_DESTINATIONS)
    encoding = vitdet_b_coco.backbone.position_encoding.encoding
    assert encoding.shape == (1, 196, 768)
    assert torch.equal(encoding, state["backbone.net.pos_embed"][:, 1:])


def test_original_release_vid_checkpoints_load_completely(vitdet_b_vid):
    # frcnn_vitdet_final.pth as published (detectron2 layout, 30 classes) ...
    published = constant_state(detectron2_vitdet_b_shapes(classes=30, mask_head=False))
    load_detectron2_vitdet(vitdet_b_vid, published)
    assert checkpoint_head_options(published)["rpn_conv_depth"] == 2
    assert_loaded_from(vitdet_b_vid, published, DETECTRON2_DESTINATIONS)
    scores = vitdet_b_vid.head.roi_heads.box_predictor.cls_score.bias
    assert scores.shape == (31,)
    # ... and after the release's own conversion (configs/convert/vitdet_b.txt).
    converted = original_conversion(published)
    assert "proposal_generator.rpn_head.conv.conv1.weight" in converted
    assert "backbone.blocks.3.relative_position.y_embedding" in converted
    assert converted["backbone.position_encoding.encoding"].shape == (1, 196, 768)
    with torch.no_grad():
        for p in vitdet_b_vid.parameters():
            p.zero_()
    assert load_vitdet_checkpoint(vitdet_b_vid, converted) == "eventful-transformer"
    assert_loaded_from(vitdet_b_vid, converted, DETECTRON2_DESTINATIONS)
    assert_loaded_from(
        vitdet_b_vid,
        converted,
        [
            ("embedding.conv.weight", "embedding.proj.weight"),
            ("backbone.blocks.3.relative_position.y_embedding", "backbone.blocks.3.rel_pos.height"),
            ("backbone.blocks.7.mlp_2.bias", "backbone.blocks.7.fc2.bias"),
            ("pyramid.stages.0.7.bias", "pyramid.stages.0.7.bias"),
        ],
    )


def test_rpn_head_computes_what_detectron2s_two_conv_head_computes():
    """StandardRPNHead(conv_dims=[-1, -1]): conv0 + ReLU, conv1 + ReLU, then the
    objectness and anchor-delta 1 x 1 convs, from the checkpoint's weights."""
    torch.manual_seed(3)
    source = create_vitdet("vitdet_tiny").eval()
    with torch.no_grad():
        for p in source.head.rpn.parameters():
            p.normal_(std=0.2)
    state = detectron2_state_dict(source)
    assert "proposal_generator.rpn_head.conv.conv1.weight" in state
    model = create_vitdet("vitdet_tiny").eval()
    load_detectron2_vitdet(model, state)

    def w(name):
        return state[f"proposal_generator.rpn_head.{name}"]

    feature = torch.randn(2, 32, 9, 7)
    t = F.relu(F.conv2d(feature, w("conv.conv0.weight"), w("conv.conv0.bias"), padding=1))
    t = F.relu(F.conv2d(t, w("conv.conv1.weight"), w("conv.conv1.bias"), padding=1))
    with torch.no_grad():
        logits, deltas = model.head.rpn.head([feature])
        torch.testing.assert_close(
            logits[0], F.conv2d(t, w("objectness_logits.weight"), w("objectness_logits.bias"))
        )
        torch.testing.assert_close(
            deltas[0], F.conv2d(t, w("anchor_deltas.weight"), w("anchor_deltas.bias"))
        )


def test_head_options_are_detected_from_the_keys(tmp_path):
    torch.manual_seed(4)
    one_conv = create_vitdet("vitdet_tiny", rpn_conv_depth=1, box_fc_dims=(48,)).eval()
    state = detectron2_state_dict(one_conv)  # classic single "rpn_head.conv"
    assert "proposal_generator.rpn_head.conv.weight" in state
    assert checkpoint_head_options(state) == {
        "rpn_conv_depth": 1,
        "box_conv_dims": (32, 32),
        "box_fc_dims": (48,),
        "num_classes": 3,
    }
    own = {f"model.{k}": v for k, v in create_vitdet("vitdet_tiny").state_dict().items()}
    assert checkpoint_head_options(own)["rpn_conv_depth"] == 2
    # A model with another head: the error names the options to set.
    with pytest.raises(CheckpointMismatchError) as error:
        load_detectron2_vitdet(create_vitdet("vitdet_tiny"), state)
    message = str(error.value)
    assert "rpn_conv_depth=1" in message and "box_fc_dims=(48,)" in message
    assert "proposal_generator.rpn_head.conv.weight" not in message  # it was renamed
    # Building from the checkpoint gives its head, with the same detections.
    path = tmp_path / "one_conv.pth"
    torch.save({"model": state}, path)
    model, layout = create_vitdet_from_checkpoint("vitdet_tiny", path)
    assert layout == "detectron2"
    assert len(model.head.rpn.head.conv) == 1 and model.config["box_fc_dims"] == (48,)
    model.eval()
    frames = moving_frames()[0]
    with torch.no_grad():
        for got, want in zip(model(frames), one_conv(frames)):
            torch.testing.assert_close(got["boxes"], want["boxes"])
            torch.testing.assert_close(got["scores"], want["scores"])


# --- preprocessing -----------------------------------------------------------------


def original_preprocessing(frame, short_edge, max_size, size):
    """The original release: VIDResize (utils.image.rescale: torchvision resize,
    bilinear, antialias, on the uint8 frame), as_float32, Normalize(x * 255),
    pad_to_size with zeros at the bottom and right."""
    height, width = frame.shape[-2:]
    scale = min(short_edge / min(height, width), max_size / max(height, width))
    if scale != 1.0:
        frame = TF.resize(
            frame,
            [round(scale * height), round(scale * width)],
            interpolation=InterpolationMode.BILINEAR,
            antialias=True,
        )
    assert frame.dtype == torch.uint8
    x = TF.normalize((frame.float() / 255.0) * 255.0, MEAN, STD)
    out = torch.zeros(3, size, size)
    out[:, : x.shape[-2], : x.shape[-1]] = x
    return out, tuple(x.shape[-2:])


def video_frame(height=720, width=1280, seed=0):
    """A uint8 frame with edges and texture (where resampling filters differ)."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, 256, (3, height // 40, width // 40), generator=gen).float()
    frame = F.interpolate(coarse[None], (height, width), mode="nearest")[0]
    frame += torch.randint(-40, 41, (3, height, width), generator=gen)
    return frame.clamp(0, 255).to(torch.uint8)


@pytest.mark.parametrize(
    ("size", "short_edge", "resized"), [(672, 420, (378, 672)), (1024, 640, (576, 1024))]
)
def test_default_resize_is_the_original_releases(size, short_edge, resized):
    frame = video_frame()
    expected, expected_size = original_preprocessing(frame, short_edge, size, size)
    assert expected_size == resized
    prep = ViTDetPreprocessing(size, short_edge)
    out = prep([frame])
    assert out.image_sizes == [resized]
    torch.testing.assert_close(out.tensors[0], expected, rtol=0, atol=1e-5)
    assert prep.resize == "original"
    # The option keeps the former resize: float F.interpolate, no antialiasing.
    old = ViTDetPreprocessing(size, short_edge, resize="interpolate")([frame])
    interpolated = F.interpolate(frame[None].float(), resized, mode="bilinear", align_corners=False)
    want = (interpolated[0] - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    torch.testing.assert_close(old.tensors[0, :, : resized[0], : resized[1]], want)
    assert (old.tensors[0] - expected).abs().max() > 0.05  # the gap the default closes


def test_original_resize_rounds_the_target_size_like_the_release():
    # scale 0.5: 841 * 0.5 = 420.5 rounds to 420 (Python's round), not 421.
    prep = ViTDetPreprocessing(672, 420)
    assert prep.resized_size(840, 841) == (420, 420)
    frame = video_frame(840, 841, seed=1)
    expected, size = original_preprocessing(frame, 420, 672, 672)
    out = prep([frame])
    assert out.image_sizes == [size] == [(420, 420)]
    torch.testing.assert_close(out.tensors[0], expected, rtol=0, atol=1e-5)
    assert ViTDetPreprocessing(672, 420, resize="interpolate").resized_size(840, 841) == (420, 421)
    # A float 0..1 frame is resized in float (the original's rescale without rounding).
    as_float = prep([frame.float() / 255.0]).tensors[0]
    assert (as_float - expected).abs().max() < 0.5 / 57.0  # within half a grey level
    with pytest.raises(ValueError, match="resize"):
        ViTDetPreprocessing(672, 420, resize="nearest")


# --- presets and paper configs -----------------------------------------------------


def _vitdet_kwargs(config_path):
    init = yaml.safe_load(config_path.read_text())["model"]["init_args"]
    if "preset" in init:
        return {**VITDET_PRESETS[init["preset"]], **(init.get("model_kwargs") or {})}
    return {k: v for k, v in init.items() if k != "policy"}


PAPER_CONFIGS = sorted((ROOT / "configs" / "vitdet").glob("*.yaml")) + sorted(
    (ROOT / "configs" / "count").glob("vitdet_*.yaml")
)


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_paper_configs_use_the_original_preprocessing_and_detector(path):
    kwargs = _vitdet_kwargs(path)
    with torch.device("meta"):  # shapes only
        model = ViTDet(**kwargs)
    assert model.preprocessing.resize == "original"
    assert len(model.head.rpn.head.conv) == 2
    assert model.head.rpn._post_nms_top_n == {"training": 1000, "testing": 300}
    assert model.head.rpn._pre_nms_top_n == {"training": 2000, "testing": 1000}
    box_head = model.head.roi_heads.box_head
    assert [m.out_channels for m in box_head.convs if isinstance(m, torch.nn.Conv2d)] == [256] * 4
    assert [m.out_features for m in box_head.fcs if isinstance(m, torch.nn.Linear)] == [1024]


def test_presets_match_their_sources():
    for name in ("vitdet_b_vid", "vitdet_b_vid_672", "vitdet_b_coco"):
        preset = VITDET_PRESETS[name]
        assert preset["resize"] == "original" and preset["rpn_conv_depth"] == 2
        assert tuple(preset["box_conv_dims"]) == (256,) * 4 and tuple(preset["box_fc_dims"]) == (
            1024,
        )
    # The original's VID detector keeps 300 proposals at test; detectron2's COCO 1000.
    assert tuple(VITDET_PRESETS["vitdet_b_vid"]["rpn_post_nms_top_n"]) == (1000, 300)
    assert tuple(VITDET_PRESETS["vitdet_b_vid_672"]["rpn_post_nms_top_n"]) == (1000, 300)
    assert tuple(VITDET_PRESETS["vitdet_b_coco"]["rpn_post_nms_top_n"]) == (1000, 1000)
    tiny = create_vitdet("vitdet_tiny", rpn_post_nms_top_n=(50, 20), resize="interpolate")
    assert tiny.head.rpn._post_nms_top_n == {"training": 50, "testing": 20}
    assert tiny.preprocessing.resize == "interpolate"
    with pytest.raises(ValueError, match="rpn_conv_depth"):
        create_vitdet("vitdet_tiny", rpn_conv_depth=0)
