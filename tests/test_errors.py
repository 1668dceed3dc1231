"""Bad arguments raise a ValueError that names the option."""

import pytest
import torch

from eventful_pl.backbone import ViTBackbone
from eventful_pl.blocks import build_block
from eventful_pl.compat import reference_block
from eventful_pl.policies import TopRPolicy


@pytest.mark.parametrize(
    ("make", "option"),
    [
        (lambda: build_block("sparse", 32, 4), "block variant"),
        (lambda: ViTBackbone(dim=32, depth=2, heads=4, block_variant="sparse"), "block variant"),
        (
            lambda: ViTBackbone(dim=32, depth=2, heads=4, block_variant=["full"]),
            "block_variant",
        ),
        (lambda: build_block("dense", 32, 4, input_size=(6, 6), window_size=7), "window_size"),
        (
            lambda: ViTBackbone(
                dim=32, depth=2, heads=4, input_size=4, window_size=5, window_block_indices=(0,)
            ),
            "window_size",
        ),
        (lambda: build_block("full", 32, 4, input_size=(6, 6), window_size=3), "window_size"),
        (lambda: build_block("dense", 32, 4, window_size=3), "input_size"),
        (lambda: build_block("dense", 32, 4, input_size=(6, 6), pool_size=4), "pool_size"),
        (lambda: build_block("dense", 32, 4, matmul_2_cast="float8"), "matmul_2_cast"),
        (lambda: build_block("dense", 32, 4, ats_fraction=1.5), "ats_fraction"),
        (lambda: build_block("full", 32, 4, ats_fraction=0.5), "ats_fraction"),
        (lambda: build_block("dense", 30, 4), "heads"),
        (
            lambda: ViTBackbone(dim=32, depth=2, heads=4, input_size=3, policy=TopRPolicy(10)),
            "r=10",
        ),
        (lambda: reference_block("FancyBlock", {"dim": 8, "heads": 2}, None), "block_class"),
        (
            lambda: reference_block(
                "EventfulBlock", {"dim": 8, "heads": 2}, ("TokenNormMagic", {"k": 1})
            ),
            "TokenNormMagic",
        ),
    ],
)
def test_bad_arguments_raise_value_error(make, option):
    with pytest.raises(ValueError, match=option):
        make()


def test_backbone_set_policy_validates_r():
    backbone = ViTBackbone(dim=32, depth=1, heads=4, input_size=3, class_token=True)
    backbone.set_policy(TopRPolicy(10))  # N = 9 + 1
    with pytest.raises(ValueError, match="r=11"):
        backbone.set_policy(TopRPolicy(11))


def test_wrong_token_count_is_named():
    block = build_block("tokenwise", 32, 4, input_size=(4, 4), window_size=2, policy=TopRPolicy(2))
    with pytest.raises(ValueError, match="N=16"):
        block(torch.zeros(1, 17, 32))
    backbone = ViTBackbone(dim=32, depth=1, heads=4, input_size=3)
    with pytest.raises(ValueError, match="ViTBackbone expects"):
        backbone(torch.zeros(1, 10, 32))


def test_missing_policy_is_explained():
    block = build_block("tokenwise", 32, 4)
    with torch.no_grad():
        block(torch.zeros(1, 5, 32))
        with pytest.raises(ValueError, match="no policy"):
            block(torch.ones(1, 5, 32))


def test_reference_block_reports_bad_state_dict():
    with pytest.raises(ValueError, match="missing keys"):
        reference_block(
            "Block", {"dim": 8, "heads": 2, "input_size": (2, 2), "mlp_ratio": 4}, None, {}
        )
