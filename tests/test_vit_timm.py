"""timm ViTs convert to eventful models whose dense forward equals timm's."""

import pytest
import timm
import torch

from eventful_pl.checkpoints import CheckpointMismatchError
from eventful_pl.models.vit import EventfulViT, from_timm, load_timm_vit
from eventful_pl.policies import TopRPolicy

# (timm name, create_model kwargs): class token, average pooling, no class
# token, a position embedding without class slot, and ViT-B itself at 224.
TIMM_MODELS = [
    ("vit_tiny_patch16_224", dict(img_size=64)),
    ("vit_small_patch16_224", dict(img_size=64, global_pool="avg")),
    ("vit_tiny_patch16_224", dict(img_size=64, class_token=False, global_pool="avg")),
    ("vit_tiny_patch16_224", dict(img_size=64, no_embed_class=True)),
    ("vit_base_patch16_224", dict()),
]


def timm_model(name, kwargs, seed=0):
    torch.manual_seed(seed)
    net = timm.create_model(name, pretrained=False, **kwargs).eval()
    with torch.no_grad():  # timm zero-initialises some tensors; make every one count
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return net


@pytest.mark.parametrize(("name", "kwargs"), TIMM_MODELS, ids=lambda v: str(v))
def test_dense_forward_equals_timm(name, kwargs):
    net = timm_model(name, kwargs)
    model = from_timm(net).eval()
    size = net.patch_embed.img_size
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        torch.testing.assert_close(model(images), net(images), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", ["tokenwise", "query_key", "full"])
@pytest.mark.parametrize("batch", [1, 3])
def test_r_equals_n_streams_equal_timm_on_every_frame(variant, batch):
    net = timm_model("vit_tiny_patch16_224", dict(img_size=64))
    model = from_timm(net, block_variant=variant, policy=TopRPolicy(17)).eval()
    model.reset()
    frames = torch.randn(3, batch, 3, 64, 64)
    with torch.no_grad():
        for frame in frames:
            torch.testing.assert_close(model(frame), net(frame), rtol=1e-4, atol=1e-4)


def test_small_r_costs_less_and_stays_close_on_a_static_video():
    net = timm_model("vit_tiny_patch16_224", dict(img_size=64))
    model = from_timm(net, block_variant="full", policy=TopRPolicy(4)).eval()
    frame = torch.randn(1, 3, 64, 64)
    model.reset()
    with torch.no_grad():
        model(frame)
        # An unchanged frame: nothing to update, the cached result is exact.
        torch.testing.assert_close(model(frame), net(frame), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(init_values=1e-5), "LayerScale"),
        (dict(qk_norm=True), "q/k normalisation"),
        (dict(reg_tokens=2), "register tokens"),
        (dict(global_pool="map"), "attention pooling"),
    ],
)
def test_unsupported_timm_features_are_refused_by_name(kwargs, message):
    net = timm.create_model("vit_tiny_patch16_224", img_size=32, **kwargs)
    with pytest.raises(ValueError, match=message):
        from_timm(net)


def test_timm_state_dict_file_loads_and_mismatch_is_named(tmp_path):
    net = timm_model("vit_tiny_patch16_224", dict(img_size=64))
    path = tmp_path / "vit_tiny.pth"
    torch.save(net.state_dict(), path)
    model = EventfulViT(image_size=64, dim=192, depth=12, heads=3).eval()
    load_timm_vit(model, path)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(images), net(images), rtol=1e-4, atol=1e-4)
    wrong = EventfulViT(image_size=64, dim=192, depth=11, heads=3)
    with pytest.raises(CheckpointMismatchError, match=r"vit_tiny\.pth.*\n.*blocks\.11"):
        load_timm_vit(wrong, path)
