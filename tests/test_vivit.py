"""Factorized ViViT: preprocessing, r = N equivalence, view independence, counts, checkpoints."""

import pytest
import torch

from eventful_pl.checkpoints import CheckpointMismatchError
from eventful_pl.counting import count_ops
from eventful_pl.models.vivit import VIVIT_PRESETS, ViViTPreprocessing, create_vivit
from eventful_pl.models.vivit_convert import (
    load_original_vivit,
    load_tadaconv_vivit,
    load_vivit_checkpoint,
)
from eventful_pl.policies import TopRPolicy


def tiny(**overrides):
    torch.manual_seed(0)
    return create_vivit("vivit_tiny", **overrides).eval()


def moving_video(batch=1, frames=10, size=(72, 80), seed=0):
    """uint8 video (B, T, 3, H, W): a bright square moving over noise."""
    gen = torch.Generator().manual_seed(seed)
    video = torch.randint(0, 60, (batch, frames, 3, *size), generator=gen, dtype=torch.uint8)
    for t in range(frames):
        video[:, t, :, 10 + 2 * t : 30 + 2 * t, 5 + 3 * t : 25 + 3 * t] = 250
    return video


def test_preprocessing_views_shapes_and_values():
    prep = ViViTPreprocessing(
        frames=4, size=32, temporal_stride=2, temporal_views=3, spatial_views=3, mean=0.5, std=0.25
    )
    video = torch.full((2, 20, 3, 32, 64), 255, dtype=torch.uint8)
    views = prep(video)
    assert views.shape == (2, 9, 4, 3, 32, 32)
    torch.testing.assert_close(views, torch.full_like(views, 2.0))  # (1 - 0.5) / 0.25
    assert prep.temporal_starts(20) == [0, 6, 12]


def test_preprocessing_crops_cover_the_long_edge_and_pad_short_videos():
    prep = ViViTPreprocessing(
        frames=4, size=8, temporal_stride=1, spatial_views=3, mean=0.0, std=1.0
    )
    video = torch.zeros(1, 2, 1, 8, 24)
    video[..., :8] = 1.0
    video[..., 16:] = 3.0
    video[:, 1] += 10.0
    views = prep(video)  # too short: the last frame repeats
    assert views.shape == (1, 3, 4, 1, 8, 8)
    left, middle, right = views[0, 0], views[0, 1], views[0, 2]
    assert torch.all(left[1:] == 11.0) and torch.all(middle[0] == 0.0)
    assert torch.all(right[0] == 3.0) and torch.all(right[3] == 13.0)


def test_forward_equals_split_halves():
    model = tiny()
    video = moving_video(batch=2)
    logits = model(video)
    assert logits.shape == (2, VIVIT_PRESETS["vivit_tiny"]["num_classes"])
    features = model.spatial_features(video)
    assert features.shape == (2, model.num_views, model.steps, model.dim)
    torch.testing.assert_close(model.classify_features(features), logits)


@pytest.mark.parametrize("variant", ["tokenwise", "query_key", "full"])
@pytest.mark.parametrize("batch", [1, 2])
def test_r_equals_n_matches_dense(variant, batch):
    dense = tiny()
    n = dense.spatial.num_tokens
    eventful = tiny(spatial_variant=variant, policy=TopRPolicy(n))
    eventful.load_state_dict(dense.state_dict())
    video = moving_video(batch=batch)
    torch.testing.assert_close(
        eventful.spatial_features(video), dense.spatial_features(video), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(eventful(video), dense(video), rtol=1e-5, atol=1e-5)


def test_views_are_independent_streams():
    model = tiny(spatial_variant="full", policy=TopRPolicy(5))
    a, b = moving_video(seed=1), moving_video(seed=2)
    both = model(torch.cat([a, b]))
    torch.testing.assert_close(both[1:], model(b), rtol=1e-5, atol=1e-5)
    views = model.preprocessing(a)[0]  # (V, T, C, h, w)
    together = model.spatial_forward(views)
    alone = model.spatial_forward(views[1:])
    torch.testing.assert_close(together[1:], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.spatial_forward(views), together)  # reset per call


def test_dense_counts_match_hand_computation():
    model = tiny()
    cfg = VIVIT_PRESETS["vivit_tiny"]
    d, classes = cfg["dim"], cfg["num_classes"]
    views = cfg["temporal_views"] * cfg["spatial_views"]
    steps = cfg["frames"] // 2

    def backbone(n, depth):
        per_block = 12 * n * d * d + 9 * n * d + 2 * n * n * d + 2 * n * d
        return {
            "linear": depth * 12 * n * d * d,
            "bias": depth * 9 * n * d,
            "matmul": depth * 2 * n * n * d,
            "add": depth * 2 * n * d + n * d,
            "total": depth * per_block + n * d,
        }

    spatial = backbone(1 + (cfg["image_size"] // 16) ** 2, cfg["spatial_depth"])
    temporal = backbone(1 + steps, cfg["temporal_depth"])
    with torch.no_grad(), count_ops(model) as counter:
        model(moving_video())
    counts = counter.as_flops_dict()
    for kind in ("linear", "bias", "matmul", "add"):
        expected = views * (steps * spatial[kind] + temporal[kind])
        expected += views * {"linear": d * classes, "bias": classes}.get(kind, 0)
        assert counts[f"{kind}_flops"] == expected, kind


def _tadaconv_state_dict(model, epic=False):
    """Our weights under TAdaConv's key names (the real layout, written out by hand)."""
    sd = model.state_dict()
    block = {
        "norm1": "norm",
        "qkv": "attn.to_qkv",
        "proj": "attn.proj",
        "norm2": "norm_ffn",
        "fc1": "ffn.net.0",
        "fc2": "ffn.net.3",
    }
    out = {
        "backbone.stem.conv1.weight": sd["embedding.conv.weight"],
        "backbone.stem.conv1.bias": sd["embedding.conv.bias"],
        "backbone.cls_token": sd["spatial.class_token"],
        "backbone.pos_embd": sd["spatial.position_encoding.encoding"],
        "backbone.cls_token_out": sd["temporal.class_token"],
        "backbone.temp_embd": sd["temporal.position_encoding.encoding"],
    }
    for half, prefix in (("spatial", "layers"), ("temporal", "layers_temporal")):
        norm = "norm" if half == "spatial" else "norm_out"
        for p in ("weight", "bias"):
            out[f"backbone.{norm}.{p}"] = sd[f"{half}.norm.{p}"]
        for key, value in sd.items():
            if key.startswith(f"{half}.blocks."):
                _, _, i, name, p = key.split(".")
                out[f"backbone.{prefix}.{i}.{block[name]}.{p}"] = value
    head = "head.linear1" if epic else "head.linear"
    out[f"{head}.weight"], out[f"{head}.bias"] = sd["classifier.weight"], sd["classifier.bias"]
    if epic:
        out["head.linear2.weight"] = torch.randn(300, model.dim)
        out["head.linear2.bias"] = torch.randn(300)
    return out


@pytest.mark.parametrize("epic", [False, True])
def test_tadaconv_checkpoint_round_trip(tmp_path, epic):
    source = tiny()
    path = tmp_path / "vivit.pyth"
    torch.save({"model_state": _tadaconv_state_dict(source, epic)}, path)
    target = create_vivit("vivit_tiny").eval()
    load_tadaconv_vivit(target, path)
    video = moving_video()
    torch.testing.assert_close(target(video), source(video))
    assert load_vivit_checkpoint(create_vivit("vivit_tiny"), path) == "tadaconv"


def test_tadaconv_mismatch_names_the_keys(tmp_path):
    sd = _tadaconv_state_dict(tiny())
    del sd["backbone.layers.1.attn.proj.weight"]
    sd["backbone.extra_thing"] = torch.zeros(3)
    path = tmp_path / "broken.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointMismatchError) as error:
        load_tadaconv_vivit(create_vivit("vivit_tiny"), path)
    message = str(error.value)
    assert "spatial.blocks.1.proj.weight" in message and "backbone.extra_thing" in message
    assert str(path) in message


def _original_state_dict(model):
    sd = model.state_dict()
    names = {
        "norm1": "input_layer_norm",
        "qkv": "qkv",
        "proj": "projection",
        "norm2": "mlp_layer_norm",
        "fc1": "mlp_1",
        "fc2": "mlp_2",
    }
    out = {
        "embedding.conv.weight": sd["embedding.conv.weight"],
        "embedding.conv.bias": sd["embedding.conv.bias"],
        "classifier.weight": sd["classifier.weight"],
        "classifier.bias": sd["classifier.bias"],
    }
    for half in ("spatial", "temporal"):
        out[f"{half}_model.class_token"] = sd[f"{half}.class_token"]
        out[f"{half}_model.backbone.position_encoding.encoding"] = sd[
            f"{half}.position_encoding.encoding"
        ]
        for p in ("weight", "bias"):
            out[f"{half}_model.layer_norm.{p}"] = sd[f"{half}.norm.{p}"]
        for key, value in sd.items():
            if key.startswith(f"{half}.blocks."):
                _, _, i, name, p = key.split(".")
                out[f"{half}_model.backbone.blocks.{i}.{names[name]}.{p}"] = value
    return out


def test_original_layout_round_trip_and_temporal_only(tmp_path):
    source = tiny()
    full = _original_state_dict(source)
    target = create_vivit("vivit_tiny").eval()
    load_original_vivit(target, full)
    video = moving_video()
    torch.testing.assert_close(target(video), source(video))
    # A fine-tuned temporal file: temporal model + classifier only.
    temporal = {k: v for k, v in full.items() if k.startswith(("temporal_model", "classifier"))}
    path = tmp_path / "temporal.pth"
    torch.save(temporal, path)
    partial = create_vivit("vivit_tiny").eval()
    partial.load_state_dict(
        {
            k: v
            for k, v in source.state_dict().items()
            if not k.startswith(("temporal.", "classifier."))
        },
        strict=False,
    )
    assert load_vivit_checkpoint(partial, path) == "eventful-transformer"
    torch.testing.assert_close(partial(video), source(video))


def test_unknown_preset_and_bad_tubelet():
    with pytest.raises(ValueError, match="unknown ViViT preset"):
        create_vivit("vivit_huge")
    with pytest.raises(ValueError, match="tubelet"):
        create_vivit("vivit_tiny", frames=7)


def test_count_vivit_matches_a_full_counted_forward():
    from eventful_pl.models.gflops import count_vivit

    model = tiny(spatial_variant="full", policy=TopRPolicy(5))
    video = moving_video()
    report = count_vivit(model, r_values=[3, 9], thresholds=[0.5], video=video)
    assert report["unit"] == "GFlops" and report["per"] == "video"
    names = [s["name"] for s in report["settings"]]
    assert names == ["dense", "r3", "r9", "h0.5"]
    dense = tiny()
    for setting, policy in zip(report["settings"], [None, TopRPolicy(3), TopRPolicy(9)]):
        reference = dense if policy is None else model
        if policy is not None:
            model.set_policy(policy)
        with torch.no_grad(), count_ops(reference) as counter:
            reference(video)
        assert setting["total"] == pytest.approx(counter.total / 1e9, rel=1e-12)
        for kind, value in setting["by_kind"].items():
            assert value == pytest.approx(counter.counts[kind] / 1e9, rel=1e-12, abs=0)
    totals = [s["total"] for s in report["settings"]]
    assert totals[1] < totals[2] < totals[0]
    assert model.spatial.blocks[0].qkv_gate.policy.r == 9  # restored to the last set
    with pytest.raises(ValueError, match="video"):
        count_vivit(model, thresholds=[1.0])


@pytest.mark.parametrize("name", sorted(VIVIT_PRESETS))
def test_every_preset_builds_with_its_geometry(name):
    cfg = VIVIT_PRESETS[name]
    model = create_vivit(name)
    assert model.classifier.out_features == cfg["num_classes"]
    assert model.steps == cfg["frames"] // 2
    grid = cfg["image_size"] // 16
    assert model.spatial.num_tokens == 1 + grid * grid
    assert model.num_views == cfg.get("temporal_views", 4) * cfg.get("spatial_views", 3)
    tokens = torch.zeros(1, grid * grid, model.dim)
    with torch.no_grad():
        assert model.spatial.position_encoding(torch.cat([tokens[:, :1], tokens], 1)).shape == (
            1,
            1 + grid * grid,
            model.dim,
        )


# --- Fidelity with the original eventful-transformer release ------------------------------
#
# A reference written from the original's ViViT preprocessing (WISION-Lab/eventful-transformer,
# models/vivit.py ViViTPreprocessing.forward, utils/image.py as_float32 / resize_to_fit /
# rescale) and its configs (configs/models/vivit_b_kinetics400.yml, vivit_b_epic_kitchens.yml,
# used by configs/evaluate/vivit_*/_base.yml). It follows the original's order of operations:
# pad short videos with the last frame, cut temporal views, scale uint8 to [0, 1], normalise
# with torchvision's Normalize, resize each frame on its own with torchvision's resize
# (bilinear, antialias=True) to round(scale * H) x round(scale * W), then cut spatial crops and
# list the views spatial-major.
#
# The forward pass is the same in the three stored versions of the original's models/vivit.py
# (acbee6b, 975d77c, fc53c2c). At 975d77c alone FactorizedViViT passed (temporal_stride,
# temporal_views, spatial_views) to a ViViTPreprocessing whose signature read (spatial_views,
# temporal_stride, temporal_views); acbee6b and fc53c2c agree, so the configs' values reach the
# preprocessing under their own names, as here.

#: The original's model configs (input_shape [32, 3, h, w], normalize_mean / normalize_std,
#: spatial_views, temporal_stride, temporal_views); EPIC-Kitchens inherits from Kinetics-400.
ORIGINAL_VIVIT_CONFIGS = {
    "vivit_b_kinetics400": dict(
        frames=32, crop=224, stride=2, temporal_views=4, spatial_views=3, mean=0.45, std=0.225
    ),
    "vivit_b_epic_kitchens": dict(
        frames=32, crop=320, stride=1, temporal_views=4, spatial_views=3, mean=0.45, std=0.225
    ),
}


def _original_vivit_views(video, frames, crop, stride, temporal_views, spatial_views, mean, std):
    """The original release's multi-view preprocessing: (B, T, C, H, W) -> (B, V, T, C, h, w)."""
    from torchvision.transforms import InterpolationMode, Normalize
    from torchvision.transforms.functional import resize

    span = frames * stride
    # 1. A video shorter than one view's span gets copies of its last frame appended.
    if video.shape[1] < span:
        last = video[:, -1:]
        video = torch.cat([video] + [last] * (span - video.shape[1]), dim=1)
    # 2. Temporal views: one view is centred (floor division); several start at int(k * spacing)
    #    with a float spacing (length - span) / (views - 1), first at frame 0, last at the end.
    length = video.shape[1]
    if temporal_views == 1:
        starts = [(length - span) // 2]
    else:
        spacing = (length - span) / (temporal_views - 1)
        starts = [int(k * spacing) for k in range(temporal_views)]
    views = [video[:, s : s + span : stride] for s in starts]
    # 3. uint8 -> float in [0, 1] (x / 255), then torchvision Normalize (x - mean) / std.
    normalize = Normalize(mean, std)
    views = [normalize(v.float() / 255.0 if v.dtype == torch.uint8 else v) for v in views]

    # 4. Each frame is resized on its own so the crop fits: scale = max(h / H, w / W), new size
    #    round(scale * H) x round(scale * W) (Python round), bilinear with antialiasing; a scale
    #    of exactly 1 leaves the frame as it is.
    def fit(frame):
        scale = max(crop / frame.shape[-2], crop / frame.shape[-1])
        if scale == 1.0:
            return frame
        size = [round(scale * frame.shape[-2]), round(scale * frame.shape[-1])]
        return resize(frame, size, interpolation=InterpolationMode.BILINEAR, antialias=True)

    views = [torch.stack([fit(v[:, t]) for t in range(v.shape[1])], dim=1) for v in views]
    # 5. Spatial crops from the resized size: one crop is centred (floor division); several sit at
    #    int(k * spacing) along both edges (the short edge's spacing is 0).
    height, width = views[0].shape[-2:]
    if spatial_views == 1:
        corners = [((height - crop) // 2, (width - crop) // 2)]
    else:
        dh = (height - crop) / (spatial_views - 1)
        dw = (width - crop) / (spatial_views - 1)
        corners = [(int(k * dh), int(k * dw)) for k in range(spatial_views)]
    # 6. Views listed with the crop in the outer loop and the temporal view in the inner one.
    crops = [v[..., i : i + crop, j : j + crop] for i, j in corners for v in views]
    return torch.stack(crops, dim=1)


def _preset_preprocessing(name, **overrides):
    """ViViTPreprocessing with a preset's parameters (FactorizedViViT defaults + the preset)."""
    import inspect

    from eventful_pl.models.vivit import FactorizedViViT

    defaults = {
        k: p.default
        for k, p in inspect.signature(FactorizedViViT).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    cfg = {**defaults, **VIVIT_PRESETS[name], **overrides}
    return ViViTPreprocessing(
        frames=cfg["frames"],
        size=cfg["image_size"],
        temporal_stride=cfg["temporal_stride"],
        temporal_views=cfg["temporal_views"],
        spatial_views=cfg["spatial_views"],
        mean=cfg["mean"],
        std=cfg["std"],
    )


@pytest.mark.parametrize("name", sorted(ORIGINAL_VIVIT_CONFIGS))
def test_preset_preprocessing_parameters_match_original_configs(name):
    original = ORIGINAL_VIVIT_CONFIGS[name]
    prep = _preset_preprocessing(name)
    assert prep.frames == original["frames"]
    assert prep.size == (original["crop"], original["crop"])
    assert prep.temporal_stride == original["stride"]
    assert prep.temporal_views == original["temporal_views"]
    assert prep.spatial_views == original["spatial_views"]
    torch.testing.assert_close(prep.mean.flatten(), torch.tensor([original["mean"]]))
    torch.testing.assert_close(prep.std.flatten(), torch.tensor([original["std"]]))


#: Frames per view in the comparisons (the presets' 32 scaled down for speed; the crop sizes,
#: strides, view counts and normalisation are the presets' own).
_FIDELITY_FRAMES = 4


def _assert_same_views(views, expected):
    """Equal to float tolerance 1e-5 (a cheap exact check first: the tensors are large)."""
    assert views.shape == expected.shape and views.dtype == expected.dtype
    if not torch.equal(views, expected):
        torch.testing.assert_close(views, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "name, batch, length, size",
    [
        # Kinetics-400 (stride 2, span 4 x 2 = 8 frames): starts 0, 12, 24, 37 and 0, 16, 33, 50
        # (float spacing truncated), a video shorter than one view (last frame repeated, every
        # view at frame 0), the original loader's 224-short-edge decode (scale 1: no resize) and
        # a portrait video (crops along the height).
        ("vivit_b_kinetics400", 2, 45, (256, 340)),
        ("vivit_b_kinetics400", 2, 58, (240, 320)),
        ("vivit_b_kinetics400", 1, 5, (256, 340)),
        ("vivit_b_kinetics400", 1, 50, (224, 298)),
        ("vivit_b_kinetics400", 1, 40, (320, 240)),
        # EPIC-Kitchens (stride 1, span 4): starts 0, 13, 27, 41; a clip shorter than one view;
        # the release's 456 x 256 videos (upscaled to 320 x 570).
        ("vivit_b_epic_kitchens", 2, 45, (256, 340)),
        ("vivit_b_epic_kitchens", 1, 3, (240, 320)),
        ("vivit_b_epic_kitchens", 1, 60, (256, 456)),
    ],
)
def test_preprocessing_matches_original_release(name, batch, length, size):
    gen = torch.Generator().manual_seed(length)
    video = torch.randint(0, 256, (batch, length, 3, *size), generator=gen, dtype=torch.uint8)
    original = {**ORIGINAL_VIVIT_CONFIGS[name], "frames": _FIDELITY_FRAMES}
    expected = _original_vivit_views(video, **original)
    views = _preset_preprocessing(name, frames=_FIDELITY_FRAMES)(video)
    crop = original["crop"]
    assert expected.shape == (batch, 12, _FIDELITY_FRAMES, 3, crop, crop)
    assert views.shape == expected.shape
    _assert_same_views(views, expected)


def test_preprocessing_matches_original_release_on_float_video():
    # Float input in [0, 1] skips the / 255 in both (the original's as_float32 keeps floats).
    gen = torch.Generator().manual_seed(1)
    video = torch.rand(1, 40, 3, 240, 320, generator=gen)
    original = {**ORIGINAL_VIVIT_CONFIGS["vivit_b_epic_kitchens"], "frames": _FIDELITY_FRAMES}
    expected = _original_vivit_views(video, **original)
    views = _preset_preprocessing("vivit_b_epic_kitchens", frames=_FIDELITY_FRAMES)(video)
    _assert_same_views(views, expected)
