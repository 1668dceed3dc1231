"""Block options: ATS, pooling per batch item, windows, relative position."""

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from eventful_pl.attention import pool_token_index, window_partition, window_unpartition
from eventful_pl.blocks import LN_EPS, Block, build_block
from eventful_pl.indexing import gather_tokens, scatter_tokens_
from eventful_pl.policies import TopRPolicy
from tests.helpers import (
    BLOCK_OPTIONS,
    DIM,
    EVENTFUL_VARIANTS,
    HEADS,
    VARIANTS,
    make_pair,
    num_tokens,
    video_stream,
)


def _relative_table(embedding, size: int, target: int, pool: int):
    """table[i, j] = embedding[i - j + size - 1], bicubic-resized to (target,
    target) when the stored size differs, then averaged over ``pool`` keys."""
    coords = torch.arange(size)
    table = embedding[coords[:, None] - coords[None, :] + size - 1]  # (size, size, C)
    if target != size:
        table = F.interpolate(
            table.permute(2, 0, 1)[None], (target, target), mode="bicubic", align_corners=False
        )[0].permute(1, 2, 0)
    return table.unflatten(1, (target // pool, pool)).mean(2)  # (target, keys, C)


def reference_block_forward(block: Block, x: torch.Tensor) -> torch.Tensor:
    """The dense block's math written out plainly (explicit softmax, no library
    helpers): pre-norm attention with windows padded by a zero token's qkv (the
    qkv bias), keys and values average-pooled over the grid, decomposed relative
    position added to the logits; then the exact-GELU MLP, both with residuals."""
    b, n, dim = x.shape
    heads, head_dim = block.heads, dim // block.heads
    qkv = F.linear(
        F.layer_norm(x, (dim,), block.norm1.weight, block.norm1.bias, LN_EPS),
        block.qkv.weight,
        block.qkv.bias,
    )
    size = block.input_size
    if block.window_size is not None:
        (gh, gw), (wh, ww) = block.input_size, block.window_size
        hp, wp = math.ceil(gh / wh) * wh, math.ceil(gw / ww) * ww
        grid = block.qkv.bias.expand(b, hp, wp, 3 * dim).clone()
        grid[:, :gh, :gw] = qkv.view(b, gh, gw, 3 * dim)
        qkv = grid.view(b, hp // wh, wh, wp // ww, ww, 3 * dim).permute(0, 1, 3, 2, 4, 5)
        qkv = qkv.reshape(-1, wh * ww, 3 * dim)
        size = (wh, ww)
    q, k, v = qkv.view(qkv.shape[0], -1, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    pool = block.pool_size or (1, 1)

    def pooled(t):
        grid = t.reshape(-1, *size, head_dim).permute(0, 3, 1, 2)
        grid = F.avg_pool2d(grid, pool).permute(0, 2, 3, 1)
        return grid.reshape(*t.shape[:2], -1, head_dim)

    if block.pool_size is not None:
        k, v = pooled(k), pooled(v)
    logits = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
    if block.rel_pos is not None:
        rel = block.rel_pos
        table_h = _relative_table(rel.height, rel.embedding_size[0], size[0], pool[0])
        table_w = _relative_table(rel.width, rel.embedding_size[1], size[1], pool[1])
        q_grid = q.reshape(*q.shape[:2], *size, head_dim)
        rel_h = torch.einsum("bhyxc,ykc->bhyxk", q_grid, table_h)
        rel_w = torch.einsum("bhyxc,xkc->bhyxk", q_grid, table_w)
        logits = logits + (rel_h[..., :, None] + rel_w[..., None, :]).reshape(logits.shape)
    out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(qkv.shape[0], -1, dim)
    if block.window_size is not None:
        out = out.view(b, hp // wh, wp // ww, wh, ww, dim).permute(0, 1, 3, 2, 4, 5)
        out = out.reshape(b, hp, wp, dim)[:, :gh, :gw].reshape(b, n, dim)
    x = x + F.linear(out, block.proj.weight, block.proj.bias)
    hidden = F.layer_norm(x, (dim,), block.norm2.weight, block.norm2.bias, LN_EPS)
    hidden = F.gelu(F.linear(hidden, block.fc1.weight, block.fc1.bias))
    return x + F.linear(hidden, block.fc2.weight, block.fc2.bias)


def _randomise(block: Block, seed: int = 0) -> Block:
    """Norm affines and relative-position tables away from their (near-)trivial
    initial values, so that a mistake in either shows in the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for norm in (block.norm1, block.norm2):
            norm.weight.copy_(1 + 0.3 * torch.randn(norm.weight.shape, generator=gen))
            norm.bias.copy_(0.3 * torch.randn(norm.bias.shape, generator=gen))
        if block.rel_pos is not None:
            for table in (block.rel_pos.height, block.rel_pos.width):
                table.copy_(0.5 * torch.randn(table.shape, generator=gen))
    return block


@pytest.mark.parametrize(
    ("kwargs", "class_token"),
    [pytest.param(kwargs, cls, id=name) for name, kwargs, cls in BLOCK_OPTIONS],
)
def test_dense_block_matches_a_plain_reimplementation(kwargs, class_token):
    """The dense block (the oracle of every r = N test) against the math written out."""
    torch.manual_seed(0)
    block = _randomise(build_block("dense", DIM, HEADS, **kwargs).eval())
    x = torch.randn(2, num_tokens(kwargs, class_token), DIM)
    with torch.no_grad():
        torch.testing.assert_close(
            block(x), reference_block_forward(block, x), rtol=1e-5, atol=1e-5
        )


def test_dense_block_matches_timm_vision_transformer_block():
    """Global attention without options is timm's ViT block with the same weights."""
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    torch.manual_seed(0)
    block = _randomise(build_block("dense", DIM, HEADS).eval())
    reference = timm_vit.Block(
        DIM,
        HEADS,
        mlp_ratio=4.0,
        qkv_bias=True,
        norm_layer=functools.partial(torch.nn.LayerNorm, eps=LN_EPS),
    ).eval()
    names = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
    state = {}
    for key, value in block.state_dict().items():
        module, _, param = key.partition(".")
        state[f"{names.get(module, module)}.{param}"] = value
    reference.load_state_dict(state)
    x = torch.randn(3, 17, DIM)
    with torch.no_grad():
        torch.testing.assert_close(block(x), reference(x), rtol=1e-5, atol=1e-5)


def test_ats_fraction_one_keeps_every_token():
    dense, ats = make_pair("dense", input_size=(4, 4))
    ats.ats_fraction = 1.0
    x = torch.randn(2, 17, DIM)
    with torch.no_grad():
        torch.testing.assert_close(ats(x), dense(x), rtol=1e-5, atol=1e-5)


def test_ats_keeps_the_class_token_and_a_fraction():
    block = build_block("dense", DIM, HEADS, ats_fraction=0.5).eval()
    x = torch.randn(3, 17, DIM)
    with torch.no_grad():
        out = block(x)
    assert out.shape == (3, 9, DIM)  # class token + int(0.5 * 16)


def test_pool_token_index_is_per_item():
    index = torch.tensor([[0, 1, 4, 5], [0, 2, 8, 9]])  # 4x4 grid, pool 2
    cells = pool_token_index(index, (4, 4), (2, 2))
    assert cells.shape == (2, 3)
    assert sorted(cells[0].tolist())[0] == 0  # item 0 hit only cell 0
    assert set(cells[1].tolist()) == {0, 1, 2}  # item 1 hit cells 0, 1 and 2
    assert len(set(cells[0].tolist())) == 3  # padded with other cells, no duplicates


def test_window_partition_round_trip_with_padding():
    x = torch.randn(2, 7 * 5, 8)
    pad = torch.arange(8.0)
    windows = window_partition(x, (7, 5), (3, 3), pad)
    assert windows.shape == (2 * 3 * 2, 9, 8)
    torch.testing.assert_close(windows[-1, -1], pad)  # bottom-right padding token
    torch.testing.assert_close(window_unpartition(windows, (7, 5), (3, 3)), x)


def test_gather_scatter_tokens():
    x = torch.randn(3, 6, 4)
    index = torch.tensor([[0, 5], [2, 1], [3, 3]])
    picked = gather_tokens(x, index)
    torch.testing.assert_close(picked[1, 0], x[1, 2])
    dst = torch.zeros(3, 6, 4)
    scatter_tokens_(dst, index[:2], picked[:2])
    torch.testing.assert_close(dst[0, 5], x[0, 5])
    assert dst[2].abs().sum() == 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_relative_position_interpolates(variant):
    """Stored tables of another size are interpolated; every variant (r = N)
    equals the written-out reference on every frame."""
    dense, block = make_pair(variant, input_size=(6, 6), relative_embedding_size=(9, 9))
    _randomise(dense)
    block.load_state_dict(dense.state_dict())
    if variant != "dense":
        block.policy = TopRPolicy(36)
    assert block.rel_pos.tables()[0].shape == (6, 6, DIM // HEADS)
    with torch.no_grad():
        for frame in video_stream(3, 2, 36, DIM):
            want = reference_block_forward(dense, frame)
            torch.testing.assert_close(block(frame), want, rtol=1e-4, atol=1e-4)


def test_drop_path_only_in_training():
    block = build_block("dense", DIM, HEADS, drop_path_rate=0.5)
    x = torch.randn(8, 5, DIM)
    block.eval()
    with torch.no_grad():
        a, b = block(x), block(x)
    torch.testing.assert_close(a, b)
    block.train()
    out = block(x)
    out.sum().backward()
    assert block.qkv.weight.grad is not None


def test_model_built_under_inference_mode_runs():
    """Parameters made under inference_mode have no version counter; caches cope."""
    with torch.inference_mode():
        block = build_block("dense", DIM, HEADS, input_size=(4, 4), relative_embedding_size=6)
        block.eval()
        x = torch.randn(1, 16, DIM)
        torch.testing.assert_close(block(x), block(x))


def test_position_caches_follow_weight_updates():
    block = build_block("dense", DIM, HEADS, input_size=(4, 4), relative_embedding_size=6).eval()
    x = torch.randn(1, 16, DIM)
    with torch.no_grad():
        before = block(x)
        block.rel_pos.height.mul_(3.0)
        after = block(x)
    assert not torch.allclose(before, after)


def _normaliser_cases():
    """Each trigger x path x position; the fast loop keeps two that cover all of them."""
    fast = {("kernels", "global", "kept"), ("torch", "relpos", "shift")}
    for fused, path in ((True, "kernels"), (False, "torch")):
        for relative, position in ((None, "global"), (6, "relpos")):
            for option, value, trigger in (
                ("min_kept_mass", 2.0, "kept"),
                ("max_log_shift", 0.0, "shift"),
            ):
                key = (path, position, trigger)
                yield pytest.param(
                    option,
                    value,
                    relative,
                    fused,
                    id="-".join(key),
                    marks=() if key in fast else pytest.mark.slow,
                )


@pytest.mark.parametrize(("option", "value", "relative", "fused"), list(_normaliser_cases()))
def test_full_block_normaliser_update_matches_exact_recompute(option, value, relative, fused):
    """The incremental softmax normaliser equals an exact recompute on every frame
    (the exact fallback taken every frame, through either of its triggers), on
    each path: the fused kernel from queries and keys (global), the fused update
    from stored logits (relative position) and PyTorch ops (kernels off)."""
    from eventful_pl import kernels
    from eventful_pl.policies import TopRPolicy

    options = dict(policy=TopRPolicy(6), input_size=(6, 6), relative_embedding_size=relative)
    _, incremental = make_pair("full", **options)
    _, exact = make_pair("full", **options)
    setattr(exact, option, value)
    kernels.set_fused_kernels(fused)
    try:
        with torch.no_grad():
            for frame in video_stream(8, 2, 36, DIM, change=3.0):
                torch.testing.assert_close(incremental(frame), exact(frame), rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(
                    incremental.log_norm, exact.log_norm, rtol=1e-5, atol=1e-5
                )
    finally:
        kernels.set_fused_kernels(True)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_exp_shifted_matches_torch_exp(grad):
    from eventful_pl.blocks import exp_shifted_

    x = torch.randn(2, 3, 5, 7) * 30
    shift = x.amax(dim=-1, keepdim=True) + torch.randn(2, 3, 5, 1)
    expected = (x - shift).exp()
    with torch.set_grad_enabled(grad):
        got = exp_shifted_(x.clone(), shift)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-30)


# The full block's incremental frames run under autograd (test_dense_equivalence's
# "grad" column) but cannot be backpropagated.
@pytest.mark.parametrize("variant", [v for v in EVENTFUL_VARIANTS if v != "full"])
def test_eventful_blocks_run_under_autograd(variant):
    """Inputs and weights that require grad: incremental frames run and backpropagate."""
    from eventful_pl.backbone import ViTBackbone
    from eventful_pl.policies import TopRPolicy

    torch.manual_seed(0)
    model = ViTBackbone(
        dim=32,
        depth=2,
        heads=4,
        input_size=4,
        class_token=True,
        block_variant=variant,
        policy=TopRPolicy(5),
    )
    for t in range(3):
        x = (torch.randn(2, 16, 32) * (1 + t)).requires_grad_()
        out = model(x)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert model.blocks[0].fc1.weight.grad is not None


@pytest.mark.parametrize("variant", EVENTFUL_VARIANTS)
@pytest.mark.parametrize(
    "options",
    [dict(relative_embedding_size=4), dict(pool_size=2), dict(matmul_2_cast="bfloat16")],
    ids=["relpos", "pooled", "bf16"],
)
def test_flush_frame_gradients_equal_the_dense_block(variant, options):
    """Training an eventful model on single frames (each a flush) is dense training."""
    dense, eventful = make_pair(variant, input_size=(6, 6), policy=TopRPolicy(5), **options)
    x = torch.randn(2, 36, DIM)
    grads = []
    for block in (dense, eventful):
        inputs = x.clone().requires_grad_(True)
        block(inputs).square().sum().backward()
        grads.append((inputs.grad, block.qkv.weight.grad, block.fc1.weight.grad))
    for got, want in zip(grads[1], grads[0]):
        if "matmul_2_cast" in options:  # bf16 A and V round differently: compare norms
            assert (got - want).norm() < 1e-2 * want.norm()
        else:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_owned_input_is_updated_in_place_and_callers_tensors_are_not(variant):
    """``owns_input=True`` adds the residuals into the input (no new tensor); the
    backbone hands its blocks its own tensor, so a caller's patch tokens stay intact."""
    from eventful_pl.backbone import ViTBackbone

    _, block = make_pair(variant, policy=TopRPolicy(5), input_size=(4, 4))
    _, twin = make_pair(variant, policy=TopRPolicy(5), input_size=(4, 4))
    twin.load_state_dict(block.state_dict())
    with torch.no_grad():
        for frame in video_stream(3, 2, 16, DIM):
            owned = frame.clone()
            out = block(owned, owns_input=True)
            assert out.data_ptr() == owned.data_ptr()
            torch.testing.assert_close(out, twin(frame), rtol=0, atol=0)

    backbone = ViTBackbone(
        dim=DIM, depth=2, heads=HEADS, input_size=4, block_variant=variant, policy=TopRPolicy(5)
    ).eval()
    with torch.no_grad():
        for frame in video_stream(3, 2, 16, DIM):
            kept = frame.clone()
            backbone(frame)
            assert torch.equal(frame, kept)
