"""Fused CPU kernels (eventful_pl.kernels) against the PyTorch ops they replace: the
library's own PyTorch path (eventful_pl.blocks.softmax for the full block's maths)."""

from __future__ import annotations

import shutil

import pytest
import torch

from eventful_pl import kernels
from eventful_pl.blocks import softmax
from eventful_pl.gates import TokenGate
from eventful_pl.policies import ThresholdPolicy, TopRPolicy
from tests.helpers import make_backbones, video_stream

pytestmark = pytest.mark.skipif(
    shutil.which("c++") is None, reason="no C++ compiler to build the fused kernels"
)


@pytest.fixture(autouse=True)
def kernels_on():
    """Every test starts with the kernels on and leaves them on."""
    kernels.set_fused_kernels(True)
    yield
    kernels.set_fused_kernels(True)


def test_extension_builds_and_applies() -> None:
    x = torch.zeros(2, 3)
    assert kernels.load_extension() is not None
    with torch.no_grad():
        assert kernels.fused_kernels_available(x)
        assert not kernels.fused_kernels_available(x.double())
        kernels.set_fused_kernels(False)
        assert not kernels.fused_kernels_available(x)
    kernels.set_fused_kernels(True)
    assert not kernels.fused_kernels_available(x)  # gradients on


@pytest.mark.parametrize("batch", [1, 3])
def test_error_norms_match_torch(batch: int) -> None:
    torch.manual_seed(0)
    p = torch.randn(batch, 37, 48)
    c = torch.randn(batch, 37, 48)
    expected = (c - p).norm(dim=-1)
    torch.testing.assert_close(kernels.error_norms(c, p), expected, rtol=1e-5, atol=1e-5)
    # Heads read in place: (B, H, N, d) state viewed as (B, N, H, d).
    heads = torch.randn(batch, 4, 37, 12)
    view = heads.transpose(1, 2)
    expected = (view.reshape(batch, 37, 48) - p).norm(dim=-1)
    torch.testing.assert_close(kernels.error_norms(view, p), expected, rtol=1e-5, atol=1e-5)
    # A view whose channels are not contiguous is copied first.
    strided = torch.randn(batch, 37, 96)[..., ::2]
    expected = (strided - p).norm(dim=-1)
    torch.testing.assert_close(kernels.error_norms(strided, p), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dim", [48, 50])  # 50: channels not a multiple of the vector width
def test_layer_norm_error_norms_match_torch(affine: bool, dim: int) -> None:
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(dim, eps=1e-6, elementwise_affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.normal_()
            norm.bias.normal_()
    x = 3 * torch.randn(3, 29, dim) + 1
    p = torch.randn(3, 29, dim)
    with torch.no_grad():
        expected = (norm(x) - p).norm(dim=-1)
        got = kernels.layer_norm_error_norms(x, norm, p)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("policy", [TopRPolicy(5), ThresholdPolicy(4.0)])
def test_normalized_gate_same_with_and_without_kernels(policy) -> None:
    """gate(x, norm=norm): same tokens, values and reference with the fused kernel."""
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(24, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    frames = [torch.randn(3, 16, 24)]
    for _ in range(4):
        frames.append(frames[-1] + 0.5 * torch.randn(3, 16, 24) * (torch.rand(3, 16, 1) < 0.4))
    fused, plain = TokenGate(policy), TokenGate(policy)
    with torch.no_grad():
        for x in frames:
            kernels.set_fused_kernels(True)
            out_fused, index_fused = fused(x, norm=norm)
            kernels.set_fused_kernels(False)
            out_plain, index_plain = plain(x, norm=norm)
            if index_plain is None:
                assert index_fused is None
            else:  # same tokens (top-r leaves their order open)
                index_fused, order_fused = index_fused.sort(dim=1)
                index_plain, order_plain = index_plain.sort(dim=1)
                assert torch.equal(index_fused, index_plain)
                out_fused = out_fused.gather(1, order_fused.unsqueeze(-1).expand_as(out_fused))
                out_plain = out_plain.gather(1, order_plain.unsqueeze(-1).expand_as(out_plain))
            torch.testing.assert_close(out_fused, out_plain, rtol=0, atol=0)
            torch.testing.assert_close(fused.p, plain.p, rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["tokenwise", "query_key", "full"])
@pytest.mark.parametrize("dim", [32, 64])  # head size 8 (no attention_update) and 16
def test_backbone_same_with_and_without_kernels(variant: str, dim: int) -> None:
    _, eventful = make_backbones(
        variant,
        dim=dim,
        depth=2,
        heads=4,
        input_size=(5, 5),
        class_token=True,
        policy=TopRPolicy(9),
    )
    stream = video_stream(frames=5, batch=3, tokens=25, dim=dim)
    outputs = {}
    with torch.no_grad():
        for enabled in (True, False):
            kernels.set_fused_kernels(enabled)
            eventful.reset()
            outputs[enabled] = [eventful(x) for x in stream]
    for fused, plain in zip(outputs[True], outputs[False], strict=True):
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)


def test_build_failure_falls_back_with_a_warning(monkeypatch, tmp_path) -> None:
    missing = tmp_path / "missing.cpp"
    monkeypatch.setattr(kernels, "SOURCE", missing)
    # A process that has not loaded the extension yet (restored afterwards).
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setattr(kernels, "_extension", None)
    with pytest.warns(RuntimeWarning, match="missing.cpp"):
        assert kernels.load_extension() is None
    with torch.no_grad():
        assert not kernels.fused_kernels_available(torch.zeros(2))


def frame_state(batch: int, heads: int, n: int, r: int, m: int, seed: int, d: int = 8):
    """One incremental frame of the full block's attention state: the queries
    q and keys k after the update (B, H, N, d), the replaced keys k_old
    (B, H, m, d), the old log-normalisers (B, H, N), the updated query rows
    index (B, r) and key index (B, m)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n, d, generator=gen)
    k = torch.randn(batch, heads, n, d, generator=gen)
    log_norm = torch.logsumexp(q @ k.transpose(-1, -2), dim=-1)
    index = torch.stack([torch.randperm(n, generator=gen)[:r] for _ in range(batch)])
    key_index = torch.stack([torch.randperm(n, generator=gen)[:m] for _ in range(batch)])
    k_old = k.gather(2, key_index[:, None, :, None].expand(-1, heads, -1, d))
    k_new = k_old + 0.5 * torch.randn(k_old.shape, generator=gen)
    q.scatter_(2, index[:, None, :, None].expand(-1, heads, -1, d), torch.randn(batch, heads, r, d))
    k.scatter_(2, key_index[:, None, :, None].expand(-1, heads, -1, d), k_new)
    return q, k, k_old, log_norm, index, key_index


def softmax_inputs(batch: int, heads: int = 3, n: int = 21, r: int = 4, m: int = 5, seed: int = 0):
    """Consistent logits of one incremental frame: (rows, cols_old, cols_new,
    log_norm, index); rows and columns come from real queries and keys."""
    q, k, k_old, log_norm, index, key_index = frame_state(batch, heads, n, r, m, seed)
    d = q.shape[-1]
    k_new = k.gather(2, key_index[:, None, :, None].expand(-1, heads, -1, d))
    rows = q.gather(2, index[:, None, :, None].expand(-1, heads, -1, d)) @ k.transpose(-1, -2)
    return rows, k_old @ q.transpose(-1, -2), k_new @ q.transpose(-1, -2), log_norm, index


def library_softmax_update(rows, cols_old, cols_new, log_norm, index):
    """The library's PyTorch path (``softmax.update_softmax``) in float64:
    (new log-normalisers, new softmax columns)."""
    rows, cols_old, cols_new, log_norm = (t.double() for t in (rows, cols_old, cols_new, log_norm))
    with torch.no_grad():
        cols, _ = softmax.update_softmax(rows, cols_old, cols_new, log_norm, index, 1e-3, 60.0)
    assert cols is not None
    return log_norm, cols


@pytest.mark.parametrize("batch", [1, 3])
def test_update_softmax_matches_the_method(batch: int) -> None:
    rows, cols_old, cols_new, log_norm, index = softmax_inputs(batch)
    expected_norm, expected_cols = library_softmax_update(rows, cols_old, cols_new, log_norm, index)
    norm = log_norm.clone()
    assert kernels.update_softmax(rows, cols_old, cols_new, norm, index, 1e-3, 60.0)
    torch.testing.assert_close(norm.double(), expected_norm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cols_new.double(), expected_cols, rtol=1e-5, atol=1e-7)


def torch_update_softmax(rows, cols_old, cols_new, log_norm, index, min_kept, max_shift) -> bool:
    """``softmax.update_softmax`` with the kernel's contract (True on success)."""
    with torch.no_grad():
        cols, _ = softmax.update_softmax(
            rows, cols_old, cols_new, log_norm, index, min_kept, max_shift
        )
    return cols is not None


@pytest.mark.parametrize(
    "update", [kernels.update_softmax, torch_update_softmax], ids=["kernel", "torch"]
)
@pytest.mark.parametrize("case", ["kept-mass", "log-shift", "nan"])
def test_update_softmax_asks_for_the_fallback(case: str, update) -> None:
    """Failed precision checks: the kernel and the library's PyTorch path both
    return False and leave the normalisers as they were."""
    rows, cols_old, cols_new, log_norm, index = softmax_inputs(2)
    min_kept, max_shift = 1e-3, 60.0
    if case == "kept-mass":
        min_kept = 2.0  # no row keeps more than all of its mass
    elif case == "log-shift":
        cols_new[1, 2, 0, 7] += 200.0  # that row's normaliser would move by ~200
    else:
        cols_old[0, 1, 3, 2] = float("nan")
    norm = log_norm.clone()
    assert not update(rows, cols_old, cols_new, norm, index, min_kept, max_shift)
    assert torch.equal(norm, log_norm)


def test_update_softmax_exponentials_over_the_float_range() -> None:
    """One key column over logits from -100 to 80 (relative to the normaliser):
    the kernel's exponentials agree with torch.exp to float precision, with
    no overflow or denormals."""
    n = 181
    log_norm = torch.zeros(1, 1, n)
    cols_new = torch.linspace(-100.0, 80.0, n).view(1, 1, 1, n)
    cols_old = torch.full((1, 1, 1, n), -200.0)  # removes nothing
    rows = torch.zeros(1, 1, 1, n)
    index = torch.tensor([[0]])
    norm = log_norm.clone()
    probs = cols_new.clone()
    # Allow any shift: every row's mass is 1 + exp(logit).
    assert kernels.update_softmax(rows, cols_old, probs, norm, index, 0.0, 1e9)
    logits = torch.linspace(-100.0, 80.0, n).double()
    expected = torch.log1p(logits.exp())
    expected[0] = torch.tensor(float(n)).log()  # row 0 was recomputed: n logits of 0
    torch.testing.assert_close(norm[0, 0].double(), expected, rtol=1e-6, atol=1e-6)
    # The new column: exp(logit - log(1 + exp(logit))) = sigmoid(logit).
    expected_probs = torch.sigmoid(logits)
    expected_probs[0] = torch.exp(logits[0] - expected[0])
    torch.testing.assert_close(probs[0, 0, 0].double(), expected_probs, rtol=2e-6, atol=1e-37)


@pytest.mark.parametrize("head_size", [16, 32, 48, 64])
@pytest.mark.parametrize("tokens", [6, 37])  # a partial block of rows / several blocks
@pytest.mark.parametrize("batch", [1, 2])
def test_attention_update_matches_the_delta_form(head_size: int, tokens: int, batch: int) -> None:
    """out += A_new dV + dA V_old, with the old columns and values read from
    the references at each item's own key index; the A reference takes the
    new columns."""
    torch.manual_seed(0)
    heads, keys, updated = 3, 11, 4
    g = batch * heads
    out = torch.randn(g, tokens, head_size)
    a_ref, v_ref = torch.rand(g, keys, tokens), torch.randn(g, keys, head_size)
    a_new, v_new = torch.rand(g, updated, tokens), torch.randn(g, updated, head_size)
    key_index = torch.stack([torch.randperm(keys)[:updated] for _ in range(batch)])
    rows = key_index.repeat_interleave(heads, dim=0)  # (G, m)
    a_old = a_ref.gather(1, rows[..., None].expand(-1, -1, tokens))
    v_old = v_ref.gather(1, rows[..., None].expand(-1, -1, head_size))
    expected = softmax.update_output(  # the library's PyTorch path, in float64
        out.double(),
        a_new.double(),
        (a_new - a_old).double(),
        v_new.double(),
        (v_new - v_old).double(),
    )
    expected_a_ref = a_ref.scatter(1, rows[..., None].expand(-1, -1, tokens), a_new)
    v_before = v_ref.clone()
    assert kernels.attention_update_supported(head_size)
    kernels.attention_update(out, a_new, v_new, a_ref, v_ref, key_index)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(a_ref, expected_a_ref)  # the new columns replaced the old ones
    assert torch.equal(v_ref, v_before)


def test_attention_update_rejects_unsupported_head_sizes() -> None:
    assert not kernels.attention_update_supported(8)
    assert not kernels.attention_update_supported(80)
    out = torch.zeros(1, 4, 8)
    a, v = torch.zeros(1, 2, 4), torch.zeros(1, 2, 8)
    with pytest.raises(RuntimeError, match="head size 8"):
        kernels.attention_update(out, a, v, a, v, torch.zeros(1, 2, dtype=torch.long))


def fused_softmax_call(q, k, k_old, log_norm, index, key_index, **checks):
    """incremental_softmax on a frame_state; returns (result, log_norm, probs)."""
    b, heads, n, d = q.shape
    g, r, m = b * heads, index.shape[1], key_index.shape[1]
    k_new = k.gather(2, key_index[:, None, :, None].expand(-1, heads, -1, d))
    q_rows = q.gather(2, index[:, None, :, None].expand(-1, heads, -1, d))
    norm = log_norm.clone()
    probs = torch.empty(g, m, n)
    ok = kernels.incremental_softmax(
        q_rows.reshape(g, r, d),
        k.transpose(-1, -2).contiguous().view(g, d, n),
        k_new.reshape(g, m, d),
        k_old.reshape(g, m, d),
        q.transpose(-1, -2).contiguous().view(g, d, n),
        norm.view(g, n),
        index,
        probs,
        checks.get("min_kept_mass", 1e-3),
        checks.get("max_log_shift", 60.0),
    )
    return ok, norm, probs.view(b, heads, m, n)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("n", [21, 70, 128])  # within one panel, a partial panel, whole panels
def test_incremental_softmax_matches_the_method(batch: int, n: int) -> None:
    """The kernel against the library's PyTorch path (``softmax.incremental_softmax``:
    the logits as float32 products, then the update)."""
    q, k, k_old, log_norm, index, key_index = frame_state(batch, 3, n, r=7, m=8, seed=1)
    g, d = batch * 3, q.shape[-1]
    k_new = k.gather(2, key_index[:, None, :, None].expand(-1, 3, -1, d))
    q_rows = q.gather(2, index[:, None, :, None].expand(-1, 3, -1, d))
    expected_norm = log_norm.clone()
    with torch.no_grad():
        expected_cols, _ = softmax.incremental_softmax(
            q_rows.reshape(g, 7, d),
            k.transpose(-1, -2).reshape(g, d, n),
            k_new.reshape(g, 8, d),
            k_old.reshape(g, 8, d),
            q.transpose(-1, -2).reshape(g, d, n),
            expected_norm.view(g, n),
            index,
            1e-3,
            60.0,
        )
    ok, norm, probs = fused_softmax_call(q, k, k_old, log_norm, index, key_index)
    assert ok and expected_cols is not None
    torch.testing.assert_close(norm, expected_norm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(probs, expected_cols.view_as(probs), rtol=1e-5, atol=1e-7)


def test_incremental_softmax_asks_for_the_fallback() -> None:
    q, k, k_old, log_norm, index, key_index = frame_state(2, 3, 70, r=7, m=8, seed=2)
    k_old[1, 2, 3, 0] = float("nan")
    ok, norm, _ = fused_softmax_call(q, k, k_old, log_norm, index, key_index)
    assert not ok
    assert torch.equal(norm, log_norm)
    ok, norm, _ = fused_softmax_call(*frame_state(2, 3, 70, r=7, m=8, seed=2), min_kept_mass=2.0)
    assert not ok
    assert torch.equal(norm, log_norm)
