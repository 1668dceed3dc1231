"""Bad arguments raise a ValueError that names the option and tells the user
what to do: the accepted values, the constraint to meet, or the call to make."""

import re

import pytest
import torch

from eventful_pl.backbone import ViTBackbone
from eventful_pl.blocks import BLOCK_VARIANTS, build_block
from eventful_pl.compat import reference_block
from eventful_pl.policies import TopRPolicy

CHOOSE_A_VARIANT = f"choose one of {sorted(BLOCK_VARIANTS)}"


def raises(message: str):
    """``pytest.raises(ValueError)`` whose message must contain ``message`` verbatim."""
    return pytest.raises(ValueError, match=re.escape(message))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        pytest.param(
            lambda: build_block("sparse", 32, 4),
            f"unknown block variant 'sparse'; {CHOOSE_A_VARIANT}",
            id="variant",
        ),
        pytest.param(
            lambda: ViTBackbone(dim=32, depth=2, heads=4, block_variant="sparse"),
            f"unknown block variant 'sparse' in block_variant; {CHOOSE_A_VARIANT}",
            id="backbone-variant",
        ),
        pytest.param(
            lambda: ViTBackbone(dim=32, depth=2, heads=4, block_variant=["full"]),
            "block_variant lists 1 variants for depth=2; give one variant per block (2) "
            "or one name for all blocks",
            id="variant-list-length",
        ),
        pytest.param(
            lambda: build_block("dense", 32, 4, input_size=(6, 6), window_size=7),
            "window_size=(7, 7) is larger than the token grid input_size=(6, 6); "
            "use a window no larger than the grid",
            id="window-too-large",
        ),
        pytest.param(
            lambda: ViTBackbone(
                dim=32, depth=2, heads=4, input_size=4, window_size=5, window_block_indices=(0,)
            ),
            "window_size=(5, 5) is larger than the token grid input_size=(4, 4); "
            "use a window no larger than the grid",
            id="backbone-window-too-large",
        ),
        pytest.param(
            lambda: build_block("full", 32, 4, input_size=(6, 6), window_size=3),
            "the 'full' block variant supports global attention only; "
            "use 'tokenwise' for windowed blocks",
            id="full-windowed",
        ),
        pytest.param(
            lambda: build_block("dense", 32, 4, window_size=3),
            "input_size (the token grid) is required with window_size, "
            "relative_embedding_size or pool_size",
            id="grid-needed",
        ),
        pytest.param(
            lambda: build_block("dense", 32, 4, input_size=(6, 6), pool_size=4),
            "pool_size=(4, 4) must divide the attention size (6, 6); "
            "choose a pool size that divides each side",
            id="pool-size",
        ),
        pytest.param(
            lambda: build_block("dense", 32, 4, matmul_2_cast="float8"),
            "matmul_2_cast must be one of [None, 'float16', 'bfloat16'], got 'float8'",
            id="cast",
        ),
        pytest.param(
            lambda: build_block("dense", 32, 4, ats_fraction=1.5),
            "ats_fraction must lie in [0, 1], got 1.5",
            id="ats-range",
        ),
        pytest.param(
            lambda: build_block("full", 32, 4, ats_fraction=0.5),
            "ats_fraction is only supported by the dense block variant",
            id="ats-variant",
        ),
        pytest.param(
            lambda: build_block("dense", 30, 4),
            "heads=4 must divide dim=30; choose a head count that divides the embedding width",
            id="heads",
        ),
        pytest.param(
            lambda: ViTBackbone(dim=32, depth=2, heads=4, input_size=3, policy=TopRPolicy(10)),
            "r=10 exceeds the number of tokens N=9; use r <= 9",
            id="r-too-large",
        ),
        pytest.param(
            lambda: reference_block("FancyBlock", {"dim": 8, "heads": 2}, None),
            "unknown block_class 'FancyBlock'; expected one of "
            "['Block', 'EventfulBlock', 'EventfulMatmul1Block', 'EventfulTokenwiseBlock']",
            id="reference-block-class",
        ),
        pytest.param(
            lambda: reference_block(
                "EventfulBlock", {"dim": 8, "heads": 2}, ("TokenNormMagic", {"k": 1})
            ),
            "unknown policy 'TokenNormMagic'; expected TokenNormTopK, "
            "TokenNormThreshold or TokenNormTopFraction",
            id="reference-policy",
        ),
    ],
)
def test_bad_arguments_raise_value_error(make, message):
    with raises(message):
        make()


def test_backbone_set_policy_validates_r():
    backbone = ViTBackbone(dim=32, depth=1, heads=4, input_size=3, class_token=True)
    backbone.set_policy(TopRPolicy(10))  # N = 9 + 1
    with raises("r=11 exceeds the number of tokens N=10; use r <= 10"):
        backbone.set_policy(TopRPolicy(11))


def test_wrong_token_count_is_named():
    block = build_block("tokenwise", 32, 4, input_size=(4, 4), window_size=2, policy=TopRPolicy(2))
    with raises(
        "expected N=16 tokens for input_size=(4, 4) "
        "(no class token with windows, relative position or pooling), got N=17"
    ):
        block(torch.zeros(1, 17, 32))
    backbone = ViTBackbone(dim=32, depth=1, heads=4, input_size=3)
    with raises(
        "ViTBackbone expects patch tokens (B, 9, 32) for input_size=(3, 3), got (1, 10, 32)"
    ):
        backbone(torch.zeros(1, 10, 32))


def test_missing_policy_is_explained():
    block = build_block("tokenwise", 32, 4)
    with torch.no_grad():
        block(torch.zeros(1, 5, 32))
        with raises(
            "has no policy: pass policy= to the block or backbone, "
            "or call eventful_pl.set_policy(model, policy)"
        ):
            block(torch.ones(1, 5, 32))


def test_reference_block_reports_bad_state_dict():
    with raises("state_dict does not fit Block: missing keys ['norm1.weight', 'norm1.bias'"):
        reference_block(
            "Block", {"dim": 8, "heads": 2, "input_size": (2, 2), "mlp_ratio": 4}, None, {}
        )
