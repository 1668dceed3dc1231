"""ViTDet: preprocessing, pyramid, detection head train/eval, r = N, counts, checkpoints."""

import math
import pickle

import pytest
import torch
from torchvision.ops import roi_align

from eventful_pl.checkpoints import CheckpointMismatchError
from eventful_pl.counting import count_ops
from eventful_pl.models.detection_head import LevelRoIAlign, UnroundedAnchorGenerator
from eventful_pl.models.gflops import count_vitdet
from eventful_pl.models.vitdet import (
    VITDET_PRESETS,
    VITDET_VARIANTS,
    ViTDetPreprocessing,
    create_vitdet,
)
from eventful_pl.models.vitdet_convert import (
    load_detectron2_vitdet,
    load_original_vitdet,
    load_vitdet_checkpoint,
)
from eventful_pl.policies import ThresholdPolicy, TopRPolicy


def tiny(**overrides):
    torch.manual_seed(0)
    return create_vitdet("vitdet_tiny", **overrides).eval()


def moving_frames(frames=3, batch=1, size=(96, 128), seed=0):
    """uint8 frames (T, B, 3, H, W): a bright square moving over noise."""
    gen = torch.Generator().manual_seed(seed)
    video = torch.randint(0, 60, (frames, batch, 3, *size), generator=gen, dtype=torch.uint8)
    for t in range(frames):
        video[t, :, :, 20 + 4 * t : 60 + 4 * t, 10 + 6 * t : 50 + 6 * t] = 250
    return video


def test_preprocessing_resizes_normalises_and_pads():
    prep = ViTDetPreprocessing(1024, 640, mean=(10.0, 20.0, 30.0), std=(2.0, 4.0, 5.0))
    assert prep.resized_size(480, 640) == (640, 853)
    assert prep.resized_size(400, 1200) == (341, 1024)  # long edge capped
    assert ViTDetPreprocessing(672, 420).resized_size(480, 640) == (420, 560)
    image = torch.full((3, 480, 640), 50, dtype=torch.uint8)
    out = prep([image, image.float()[:, :240] / 255.0])
    assert out.tensors.shape == (2, 3, 1024, 1024)
    assert out.image_sizes == [(640, 853), (384, 1024)]
    expected = torch.tensor([20.0, 7.5, 4.0]).view(3, 1, 1)
    torch.testing.assert_close(out.tensors[0, :, :640, :853], expected.expand(3, 640, 853))
    assert out.tensors[0, :, 640:].abs().max() == 0 and out.tensors[0, :, :, 853:].abs().max() == 0
    with pytest.raises(ValueError, match="image"):
        prep([torch.zeros(1, 10, 10)])


def test_pyramid_levels_and_shapes():
    model = tiny()
    assert model.pyramid.names == ["p2", "p3", "p4", "p5", "p6"]
    assert model.pyramid.strides == [4, 8, 16, 32, 64]
    features = model.features(model.preprocessing(moving_frames()[0]))
    assert {k: tuple(v.shape) for k, v in features.items()} == {
        "p2": (1, 32, 32, 32),
        "p3": (1, 32, 16, 16),
        "p4": (1, 32, 8, 8),
        "p5": (1, 32, 4, 4),
        "p6": (1, 32, 2, 2),
    }


def test_anchors_are_detectron2_anchors():
    anchors = UnroundedAnchorGenerator(((32,),), ((0.5, 1.0, 2.0),)).cell_anchors[0]
    # detectron2: w = sqrt(area / ratio), h = ratio * w, centred on 0.
    expected = []
    for ratio in (0.5, 1.0, 2.0):
        w = math.sqrt(32 * 32 / ratio)
        h = ratio * w
        expected.append([-w / 2, -h / 2, w / 2, h / 2])
    torch.testing.assert_close(anchors, torch.tensor(expected))


def test_level_roi_align_assigns_levels_and_is_aligned():
    gen = torch.Generator().manual_seed(0)
    features = {f"p{i}": torch.randn(1, 2, 256 >> i, 256 >> i, generator=gen) for i in (2, 3, 4, 5)}
    pool = LevelRoIAlign(["p2", "p3", "p4", "p5"], [4, 8, 16, 32], output_size=3)
    boxes = torch.tensor(
        [[0.0, 0.0, 20.0, 20.0], [10, 10, 122, 122], [0, 0, 224, 224], [0, 0, 900, 900]]
    )
    out = pool(features, [boxes], [(1024, 1024)])
    for i, (level, stride) in enumerate([("p2", 4), ("p3", 8), ("p4", 16), ("p5", 32)]):
        rois = torch.cat([torch.zeros(1, 1), boxes[i : i + 1]], dim=1)
        expected = roi_align(features[level], rois, 3, 1.0 / stride, 0, aligned=True)
        torch.testing.assert_close(out[i : i + 1], expected)


def test_train_returns_losses_and_gradients():
    model = tiny()
    model.train()
    images = moving_frames(batch=2)[0]
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 50.0, 60.0]]), "labels": torch.tensor([2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
    ]
    losses = model(images, targets)
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.backbone.blocks[0].qkv.weight.grad.abs().sum() > 0
    assert model.embedding.proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="targets"):
        model(images)


def test_eval_returns_detections_in_input_coordinates():
    model = tiny()
    with torch.no_grad():
        for head_param in model.head.roi_heads.box_predictor.parameters():
            head_param.zero_()  # uniform class scores: every proposal scores 1 / (K + 1)
        detections = model(
            [moving_frames(size=(96, 128))[0, 0], moving_frames(size=(200, 50))[0, 0]]
        )
    assert len(detections) == 2
    for det, (h, w) in zip(detections, [(96, 128), (200, 50)]):
        assert set(det) == {"boxes", "scores", "labels"}
        assert len(det["boxes"]) > 0
        assert det["boxes"][:, 0::2].max() <= w + 1e-3 and det["boxes"][:, 1::2].max() <= h + 1e-3
        assert det["labels"].min() >= 0 and det["labels"].max() < 3
        torch.testing.assert_close(det["scores"], torch.full_like(det["scores"], 0.25))


@pytest.mark.parametrize("variant", sorted(set(VITDET_VARIANTS) - {"dense", "spatial"}))
@pytest.mark.parametrize("batch", [1, 2])
def test_r_equals_n_matches_dense(variant, batch):
    base = "spatial" if variant == "spatiotemporal" else "dense"
    dense = tiny(variant=base)
    eventful = tiny(variant=variant, policy=TopRPolicy(64))
    eventful.load_state_dict(dense.state_dict())
    eventful.reset()
    with torch.no_grad():
        for frame in moving_frames(frames=3, batch=batch):
            pixels = dense.preprocessing(frame).tensors
            torch.testing.assert_close(
                eventful.backbone_forward(pixels),
                dense.backbone_forward(pixels),
                rtol=1e-4,
                atol=1e-4,
            )
        eventful.reset()
        for frame in moving_frames(frames=2, batch=batch):
            images = dense.preprocessing(frame)
            got, want = eventful.features(images), dense.features(images)
            for level in want:
                torch.testing.assert_close(got[level], want[level], rtol=1e-4, atol=1e-4)
            # Detections: near-equal scores may swap places, so compare sorted scores.
            eventful.reset()
            for g, w in zip(eventful(frame), dense(frame)):
                assert len(g["scores"]) == len(w["scores"])
                torch.testing.assert_close(g["scores"].sort().values, w["scores"].sort().values)


def test_streams_reset_and_few_tokens_change_outputs_little():
    model = tiny(variant="eventful", policy=TopRPolicy(16))
    frames = moving_frames(frames=2)
    with torch.no_grad():
        model.reset()
        first = model.backbone_forward(model.preprocessing(frames[0]).tensors)
        model.backbone_forward(model.preprocessing(frames[1]).tensors)
        model.reset()  # a new stream: the first frame again gives the flush result
        again = model.backbone_forward(model.preprocessing(frames[0]).tensors)
    torch.testing.assert_close(again, first)


def _block_count(n, dim, heads, hidden, windows, window_tokens, rel_sizes):
    """Hand count of one dense block (docs/counting.md); rel_sizes (kh, kw) or None."""
    d = dim // heads
    counts = {
        "linear": n * dim * 3 * dim + n * dim * dim + n * dim * hidden + n * hidden * dim,
        "bias": n * 3 * dim + n * dim + n * hidden + n * dim,
        "matmul": 2 * windows * heads * window_tokens * window_tokens * d,
        "add": 2 * n * dim,
        "einsum": 0,
    }
    if rel_sizes is not None:
        counts["einsum"] = windows * heads * window_tokens * sum(rel_sizes) * d
        counts["add"] += 2 * windows * heads * window_tokens * window_tokens
    return counts


def test_dense_backbone_counts_match_hand_computation():
    model = tiny()
    n, dim, heads, hidden = 64, 64, 4, 256
    expected = {"linear": 0, "bias": 0, "matmul": 0, "add": n * dim, "einsum": 0}
    for i in range(4):
        if i in (0, 2):  # 4 x 4 windows on the 8 x 8 grid
            block = _block_count(n, dim, heads, hidden, 4, 16, (4, 4))
        else:
            block = _block_count(n, dim, heads, hidden, 1, 64, (8, 8))
        for kind, value in block.items():
            expected[kind] += value
    with count_ops(model.backbone) as counter, torch.no_grad():
        model.backbone_forward(model.preprocessing(moving_frames()[0]).tensors)
    assert {k: v for k, v in counter.counts.items() if v} == {
        k: v for k, v in expected.items() if v
    }


def test_published_vitdet_b_counts():
    """ViTDet-B backbone: 467.4 GFlops per frame at 1024 and 174.5 at 672 (the paper's)."""
    for name, expected in [("vitdet_b_vid", 467.4), ("vitdet_b_vid_672", 174.5)]:
        report = count_vitdet(create_vitdet(name).eval())
        assert report["settings"][0]["total"] == pytest.approx(expected, abs=0.05)


def test_count_vitdet_static_and_threshold():
    model = tiny(variant="eventful", policy=TopRPolicy(32))
    video = moving_frames(frames=4)[:, 0]
    report = count_vitdet(model, r_values=[16, 64], thresholds=[0.0, 1e9], video=video)
    assert report["unit"] == "GFlops" and report["per"] == "frame"
    dense, r16, r64, h0, hbig = report["settings"]
    assert [s["name"] for s in report["settings"]] == [
        "dense", "r16", "r64", "h0.0", "h1000000000.0"
    ]  # fmt: skip
    assert dense["first_frame"] == dense["later_frame"] == pytest.approx(dense["total"])
    assert r16["later_frame"] < r64["later_frame"] and r16["first_frame"] == r64["first_frame"]
    assert r16["total"] == pytest.approx((r16["first_frame"] + 3 * r16["later_frame"]) / 4)
    assert sum(r16["by_kind"].values()) == pytest.approx(r16["total"])
    # h = 0 updates every changed token, a huge h none: most and least work.
    assert hbig["later_frame"] < r16["later_frame"] < h0["later_frame"]
    assert model.backbone.blocks[1].qkv_gate.policy.r == 32  # the model's policy is restored
    # Measured against a counted forward of the same frames.
    model.set_policy(TopRPolicy(16))
    model.reset()
    totals = []
    with torch.no_grad():
        for frame in video:
            with count_ops(model.backbone) as counter:
                model.backbone_forward(model.preprocessing(frame[None]).tensors)
            totals.append(counter.total / 1e9)
    assert r16["first_frame"] == pytest.approx(totals[0])
    assert r16["later_frame"] == pytest.approx(totals[1])
    with pytest.raises(ValueError, match="video"):
        count_vitdet(model, thresholds=[1.0])


# --- checkpoints -------------------------------------------------------------


def detectron2_state_dict(model, predictor=True):
    """Our weights written with detectron2's ViTDet key names and conventions."""
    ours = {k: v.clone() for k, v in model.state_dict().items()}
    out = {
        "backbone.net.patch_embed.proj.weight": ours["embedding.proj.weight"],
        "backbone.net.patch_embed.proj.bias": ours["embedding.proj.bias"],
        # detectron2 stores a class-token slot (ignored by ViTDet) in front.
        "backbone.net.pos_embed": torch.cat(
            [torch.randn(1, 1, model.backbone.dim), ours["backbone.position_encoding.encoding"]], 1
        ),
    }
    names = {
        "norm1": "norm1", "qkv": "attn.qkv", "proj": "attn.proj", "norm2": "norm2",
        "fc1": "mlp.fc1", "fc2": "mlp.fc2",
    }  # fmt: skip
    for i in range(len(model.backbone.blocks)):
        for ours_name, theirs in names.items():
            for part in ("weight", "bias"):
                out[f"backbone.net.blocks.{i}.{theirs}.{part}"] = ours[
                    f"backbone.blocks.{i}.{ours_name}.{part}"
                ]
        out[f"backbone.net.blocks.{i}.attn.rel_pos_h"] = ours[f"backbone.blocks.{i}.rel_pos.height"]
        out[f"backbone.net.blocks.{i}.attn.rel_pos_w"] = ours[f"backbone.blocks.{i}.rel_pos.width"]
    pyramid = {
        "simfp_2": {"0": 0, "1": 1, "3": 3, "4": 4, "4.norm": 5, "5": 6, "5.norm": 7},
        "simfp_3": {"0": 0, "1": 1, "1.norm": 2, "2": 3, "2.norm": 4},
        "simfp_4": {"0": 0, "0.norm": 1, "1": 2, "1.norm": 3},
        "simfp_5": {"1": 1, "1.norm": 2, "2": 3, "2.norm": 4},
    }
    for stage, (name, layers) in enumerate(pyramid.items()):
        for theirs, index in layers.items():
            for part in ("weight", "bias"):
                key = f"pyramid.stages.{stage}.{index}.{part}"
                if key in ours:
                    out[f"backbone.{name}.{theirs}.{part}"] = ours[key]
    # StandardRPNHead: conv.conv{k} with several convs (ViTDet's two), plain conv with one.
    depth = len(model.head.rpn.head.conv)
    rpn = {"objectness_logits": "cls_logits", "anchor_deltas": "bbox_pred"}
    rpn.update({f"conv.conv{k}" if depth > 1 else "conv": f"conv.{k}.0" for k in range(depth)})
    for theirs, ours_name in rpn.items():
        for part in ("weight", "bias"):
            out[f"proposal_generator.rpn_head.{theirs}.{part}"] = ours[
                f"head.rpn.head.{ours_name}.{part}"
            ]
    convs = len(model.head.roi_heads.box_head.convs) // 3
    for i in range(convs):
        out[f"roi_heads.box_head.conv{i + 1}.weight"] = ours[
            f"head.roi_heads.box_head.convs.{3 * i}.weight"
        ]
        for part in ("weight", "bias"):
            out[f"roi_heads.box_head.conv{i + 1}.norm.{part}"] = ours[
                f"head.roi_heads.box_head.convs.{3 * i + 1}.{part}"
            ]
    for part in ("weight", "bias"):
        out[f"roi_heads.box_head.fc1.{part}"] = ours[f"head.roi_heads.box_head.fcs.0.{part}"]
    if predictor:
        for part in ("weight", "bias"):
            scores = ours[f"head.roi_heads.box_predictor.cls_score.{part}"]
            out[f"roi_heads.box_predictor.cls_score.{part}"] = torch.cat([scores[1:], scores[:1]])
            deltas = ours[f"head.roi_heads.box_predictor.bbox_pred.{part}"]
            out[f"roi_heads.box_predictor.bbox_pred.{part}"] = deltas[4:]  # no background deltas
    return out


def assert_same_detections(a, b, images):
    with torch.no_grad():
        for got, want in zip(a(images), b(images)):
            for key in ("boxes", "scores", "labels"):
                torch.testing.assert_close(got[key], want[key])


@pytest.mark.parametrize(("fmt", "classes"), [("pkl", 3), ("pth", 3), ("pkl", 80)])
def test_detectron2_checkpoint_round_trip(tmp_path, fmt, classes):
    source = tiny(num_classes=classes)  # 80: a COCO model
    with torch.no_grad():
        for p in source.head.roi_heads.box_predictor.parameters():
            p.normal_(std=0.5)  # distinct class scores
    state = detectron2_state_dict(source)
    state["roi_heads.mask_head.mask_fcn1.weight"] = torch.randn(4, 4)  # COCO Mask R-CNN extra
    path = tmp_path / f"model_final.{fmt}"
    if fmt == "pkl":  # the model zoo's format: pickled numpy arrays
        with path.open("wb") as f:
            pickle.dump({"model": {k: v.numpy() for k, v in state.items()}, "__author__": "x"}, f)
    else:
        torch.save({"model": state, "iteration": 10}, path)
    target = tiny(num_classes=classes)
    torch.manual_seed(1)
    for p in target.parameters():
        torch.nn.init.normal_(p)
    assert load_vitdet_checkpoint(target, path) == "detectron2"
    torch.testing.assert_close(
        target.backbone.position_encoding.encoding, source.backbone.position_encoding.encoding
    )
    scores = target.head.roi_heads.box_predictor.cls_score.weight
    torch.testing.assert_close(scores[0], state["roi_heads.box_predictor.cls_score.weight"][-1])
    assert target.head.roi_heads.box_predictor.bbox_pred.weight[:4].abs().max() == 0
    assert_same_detections(target, source, moving_frames()[0])


def test_vitdet_b_detectron2_key_names_and_shapes_load():
    """The real ViTDet-B VID file layout (shapes as published) fits the preset."""
    model = create_vitdet("vitdet_b_vid")
    state = {k: torch.zeros(v.shape) for k, v in detectron2_state_dict(model).items()}
    assert state["backbone.net.pos_embed"].shape == (1, 197, 768)
    assert state["backbone.net.blocks.0.attn.rel_pos_h"].shape == (27, 64)  # 14 x 14 windows
    assert state["backbone.net.blocks.2.attn.rel_pos_h"].shape == (127, 64)  # global, 64 x 64
    assert state["backbone.simfp_2.0.weight"].shape == (768, 384, 2, 2)
    assert state["backbone.simfp_2.4.weight"].shape == (256, 192, 1, 1)
    assert state["proposal_generator.rpn_head.anchor_deltas.weight"].shape == (12, 256, 1, 1)
    assert state["roi_heads.box_head.fc1.weight"].shape == (1024, 256 * 7 * 7)
    assert state["roi_heads.box_predictor.cls_score.weight"].shape == (31, 1024)
    assert state["roi_heads.box_predictor.bbox_pred.weight"].shape == (120, 1024)
    load_detectron2_vitdet(model, state)
    assert model.backbone.blocks[5].qkv.weight.abs().max() == 0


def test_coco_checkpoint_into_vid_model_names_the_mismatch(tmp_path):
    coco = detectron2_state_dict(create_vitdet("vitdet_tiny", num_classes=80))
    del coco["roi_heads.box_head.fc1.bias"]
    coco["backbone.net.extra_thing"] = torch.zeros(1)
    path = tmp_path / "coco.pth"
    torch.save({"model": coco}, path)
    with pytest.raises(CheckpointMismatchError) as error:
        load_detectron2_vitdet(tiny(), path)
    message = str(error.value)
    assert "coco.pth" in message and "detectron2" in message
    assert "head.roi_heads.box_head.fcs.0.bias" in message  # missing
    assert "backbone.net.extra_thing" in message  # unexpected
    assert "cls_score.weight: checkpoint (81, 64) vs model (4, 64)" in message


def test_original_layout_round_trip(tmp_path):
    source = tiny()
    d2 = detectron2_state_dict(source)
    ours = source.state_dict()
    original = {k: v for k, v in d2.items() if k.startswith(("proposal_generator.", "roi_heads."))}
    original["embedding.conv.weight"] = ours["embedding.proj.weight"]
    original["embedding.conv.bias"] = ours["embedding.proj.bias"]
    original["backbone.position_encoding.encoding"] = ours["backbone.position_encoding.encoding"]
    names = {
        "norm1": "input_layer_norm", "qkv": "qkv", "proj": "projection",
        "norm2": "mlp_layer_norm", "fc1": "mlp_1", "fc2": "mlp_2",
    }  # fmt: skip
    for key, value in ours.items():
        parts = key.split(".")
        if key.startswith("backbone.blocks.") and parts[3] in names:
            original[".".join(parts[:3] + [names[parts[3]]] + parts[4:])] = value
        elif key.startswith("backbone.blocks.") and parts[3] == "rel_pos":
            axis = {"height": "y_embedding", "width": "x_embedding"}[parts[4]]
            original[".".join(parts[:3] + ["relative_position", axis])] = value
        elif key.startswith("pyramid."):
            original[key] = value
    path = tmp_path / "vitdet_original.pth"
    torch.save(original, path)
    target = create_vitdet("vitdet_tiny").eval()
    assert load_vitdet_checkpoint(target, path) == "eventful-transformer"
    assert_same_detections(target, source, moving_frames()[0])
    load_original_vitdet(create_vitdet("vitdet_tiny"), original)


def test_own_layout_and_lightning_prefix_round_trip(tmp_path):
    source = tiny()
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in source.state_dict().items()}}, path)
    target = create_vitdet("vitdet_tiny").eval()
    assert load_vitdet_checkpoint(target, path) == "eventful-pl"
    assert_same_detections(target, source, moving_frames()[0])


def test_bad_options_name_the_option():
    with pytest.raises(ValueError, match="variant"):
        create_vitdet("vitdet_tiny", variant="sparse")
    with pytest.raises(ValueError, match="image_size"):
        create_vitdet("vitdet_tiny", image_size=100)
    with pytest.raises(ValueError, match="preset"):
        create_vitdet("vitdet_huge")
    with pytest.raises(ValueError, match="r="):
        create_vitdet("vitdet_tiny", variant="eventful", policy=TopRPolicy(65))


@pytest.mark.parametrize("name", sorted(VITDET_PRESETS))
def test_every_preset_builds_with_its_geometry(name):
    preset = VITDET_PRESETS[name]
    model = create_vitdet(name, variant="eventful", policy=ThresholdPolicy(0.5))
    grid = preset["image_size"] // 16
    assert model.grid == (grid, grid)
    assert model.head.roi_heads.box_predictor.cls_score.out_features == preset["num_classes"] + 1
    windows = preset.get("window_block_indices", (0, 1, 3, 4, 6, 7, 9, 10))
    assert [v for v in model.backbone.variants] == [
        "tokenwise" if i in windows else "full" for i in range(len(model.backbone.blocks))
    ]
