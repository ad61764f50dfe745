"""Topic 1.1: attention and multi-head attention.

The primitives every layer is built from, and attention on top of them:
- `impl.basics.softmax(x, axis)`: exp(x - max) / sum, in the input's dtype;
- `impl.basics.linear(x, w, bias)`: x @ w.T + bias, w stored (out, in) as in PyTorch;
- `impl.attention.scaled_dot_product_attention_simple(q, k, v, scale, mask)`:
  softmax(q @ k.T * scale + mask) @ v over the last two axes, any leading axes;
- `impl.attention.MultiHeadAttention(E, H, wq, wk, wv, wo)(query, key, value, mask)`.

Checked against PyTorch (torch.softmax, F.linear, F.scaled_dot_product_attention,
nn.MultiheadAttention) and MLX's own references (mx.softmax,
mx.fast.scaled_dot_product_attention, mlx.nn.MultiHeadAttention), on
Hypothesis-drawn shapes in float32, float16 and bfloat16. Low-precision inputs
are compared with a float32 reference computed from the same rounded values.

Rows masked out entirely (every score -inf) are topic 1.3's business; here a
mask always leaves each query at least one key. softmax itself follows
torch.softmax: an all -inf row is NaN.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from spec.draw import DTYPES, additive_mask, draw_dtype, draw_rng, uniform
from spec.ladder import BY_DTYPE, FP32, assert_close

NAMES = {
    "basics": ("softmax", "linear"),
    "attention": ("scaled_dot_product_attention_simple", "MultiHeadAttention"),
}


@pytest.mark.presence
def test_has_names(impl):
    missing = [f"{m}.{n}" for m, names in NAMES.items() for n in names if not hasattr(getattr(impl, m), n)]
    assert not missing, f"impl lacks {missing}"


# Hypothesis probes a test's first argument for attributes, which the `impl`
# fixture would take for a missing module: hand tests the modules instead.
@pytest.fixture
def basics(impl):
    return impl.basics


@pytest.fixture
def attention(impl):
    return impl.attention


# -- drawing inputs -------------------------------------------------------------


def fp32(x: mx.array | None) -> mx.array | None:
    return None if x is None else x.astype(mx.float32)


def check_dtype(got: mx.array, dtype: str, what: str) -> None:
    assert got.dtype == DTYPES[dtype], f"{what}: output dtype {got.dtype}, expected {dtype} (the input's)"


# -- softmax ---------------------------------------------------------------------


@given(data=st.data())
def test_softmax(basics, data):
    dtype, rng = draw_dtype(data), draw_rng(data)
    shape = tuple(data.draw(st.lists(st.integers(1, 6), min_size=1, max_size=4), label="shape"))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1), label="axis")
    # 1000: exp(1000) overflows even fp32, so only a max-subtracted softmax passes.
    scale = data.draw(st.sampled_from([1.0, 10.0, 1000.0]), label="logit scale")
    x, x32 = uniform(rng, shape, dtype, scale)
    got = basics.softmax(x, axis=axis)
    check_dtype(got, dtype, "softmax")
    tol = BY_DTYPE[dtype]
    assert_close(got, torch.softmax(x32, dim=axis), tol, f"softmax vs torch.softmax, axis={axis}")
    assert_close(got, mx.softmax(fp32(x), axis=axis), tol, f"softmax vs mx.softmax, axis={axis}")


def test_softmax_default_axis_is_last(basics):
    x = mx.array(np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32))
    assert_close(basics.softmax(x), torch.softmax(torch.from_numpy(np.array(x)), dim=-1), FP32, "softmax(x)")


def test_softmax_masked_entries(basics):
    inf = math.inf
    x = [[0.0, -inf, 1.0, -inf], [-inf, -inf, -inf, 2.0], [-inf, -inf, -inf, -inf]]
    got = basics.softmax(mx.array(x))
    # -inf entries get exactly 0; an all -inf row is NaN, as torch.softmax gives it.
    want = torch.softmax(torch.tensor(x), dim=-1)
    assert torch.isnan(want[2]).all(), "torch.softmax changed its all -inf row semantics"
    assert_close(got, want, FP32, "softmax with -inf entries")
    assert (np.array(got)[:2][np.isinf(np.array(x)[:2])] == 0).all(), f"masked entries not exactly 0: {got}"


# -- linear ----------------------------------------------------------------------


@given(data=st.data())
def test_linear(basics, data):
    dtype, rng = draw_dtype(data), draw_rng(data)
    batch = tuple(data.draw(st.lists(st.integers(1, 4), max_size=2), label="batch dims"))
    n_in, n_out = data.draw(st.integers(1, 48), label="in"), data.draw(st.integers(1, 48), label="out")
    with_bias = data.draw(st.booleans(), label="bias")
    x, x32 = uniform(rng, (*batch, n_in), dtype)
    w, w32 = uniform(rng, (n_out, n_in), dtype, 1 / math.sqrt(n_in))
    b, b32 = uniform(rng, (n_out,), dtype) if with_bias else (None, None)
    got = basics.linear(x, w, b)
    check_dtype(got, dtype, "linear")
    assert_close(got, F.linear(x32, w32, b32), BY_DTYPE[dtype], f"linear {x.shape} x {w.shape}, bias={with_bias}")


# -- scaled dot-product attention -------------------------------------------------


def fast_sdpa(q, k, v, scale, mask) -> mx.array:
    """mx.fast's attention in fp32 on (..., n, D): it wants (B, H, n, D) and an explicit scale."""
    def as_4d(x):
        return x.astype(mx.float32).reshape(-1, x.shape[-3] if x.ndim >= 3 else 1, *x.shape[-2:])

    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = mx.fast.scaled_dot_product_attention(
        as_4d(q), as_4d(k), as_4d(v), scale=scale, mask=None if mask is None else as_4d(mask))
    return out.reshape(q.shape)


@given(data=st.data())
def test_sdpa_simple(attention, data):
    dtype, rng = draw_dtype(data), draw_rng(data)
    batch = tuple(data.draw(st.lists(st.integers(1, 3), max_size=2), label="batch dims"))
    L, S = data.draw(st.integers(1, 8), label="L"), data.draw(st.integers(1, 8), label="S")
    D = data.draw(st.sampled_from([1, 4, 8, 16, 32]), label="D")
    scale = data.draw(st.none() | st.floats(0.05, 1.0), label="scale")
    mask_shape = data.draw(st.sampled_from([None, "L S", "full"]), label="mask shape")
    (q, q32), (k, k32), (v, v32) = (uniform(rng, (*batch, n, D), dtype) for n in (L, S, S))
    mask, mask32 = (None, None)
    if mask_shape is not None:
        mask, mask32 = additive_mask(rng, (L, S) if mask_shape == "L S" else (*batch, L, S), dtype)
    got = attention.scaled_dot_product_attention_simple(q, k, v, scale=scale, mask=mask)
    check_dtype(got, dtype, "sdpa")
    tol, what = BY_DTYPE[dtype], f"q {q.shape}, k {k.shape}, scale={scale}, mask {mask_shape}"
    # F.sdpa's default scale is 1/sqrt(D) too.
    want = F.scaled_dot_product_attention(q32, k32, v32, attn_mask=mask32, scale=scale)
    assert_close(got, want, tol, f"sdpa vs torch, {what}")
    assert_close(got, fast_sdpa(q, k, v, scale, mask), tol, f"sdpa vs mx.fast, {what}")


# -- multi-head attention ------------------------------------------------------------


def torch_mha(E, H, wq, wk, wv, wo) -> torch.nn.MultiheadAttention:
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(E, H, bias=False, batch_first=True).eval()
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([wq, wk, wv]))
        mha.out_proj.weight.copy_(wo)
    return mha


def mlx_mha(E, H, wq, wk, wv, wo) -> mlx.nn.MultiHeadAttention:
    mha = mlx.nn.MultiHeadAttention(E, H, bias=False)
    for proj, w in (("query_proj", wq), ("key_proj", wk), ("value_proj", wv), ("out_proj", wo)):
        getattr(mha, proj).weight = fp32(w)
    return mha


@given(data=st.data())
def test_multi_head_attention(attention, data):
    dtype, rng = draw_dtype(data), draw_rng(data)
    N, H = data.draw(st.integers(1, 3), label="N"), data.draw(st.integers(1, 4), label="H")
    D = data.draw(st.sampled_from([2, 4, 8]), label="head_dim")
    L = data.draw(st.integers(1, 6), label="L")
    cross = data.draw(st.booleans(), label="cross-attention")
    S = data.draw(st.integers(1, 6), label="S") if cross else L
    with_mask = data.draw(st.booleans(), label="mask")
    E = H * D
    ws = [uniform(rng, (E, E), dtype, 1 / math.sqrt(E)) for _ in range(4)]
    query, query32 = uniform(rng, (N, L, E), dtype)
    key, key32 = uniform(rng, (N, S, E), dtype) if cross else (query, query32)
    value, value32 = uniform(rng, (N, S, E), dtype) if cross else (query, query32)
    mask, mask32 = additive_mask(rng, (L, S), dtype) if with_mask else (None, None)

    got = attention.MultiHeadAttention(E, H, *(w for w, _ in ws))(query, key, value, mask=mask)
    check_dtype(got, dtype, "MultiHeadAttention")
    tol, what = BY_DTYPE[dtype], f"N={N} L={L} S={S} E={E} H={H} mask={with_mask}"
    with torch.no_grad():
        ref = torch_mha(E, H, *(w for _, w in ws))
        want, _ = ref(query32, key32, value32, attn_mask=mask32, need_weights=False)
    assert_close(got, want, tol, f"MultiHeadAttention vs torch.nn.MultiheadAttention, {what}")
    ref = mlx_mha(E, H, *(w for w, _ in ws))
    want = ref(*(fp32(t) for t in (query, key, value)), mask=fp32(mask))
    assert_close(got, want, tol, f"MultiHeadAttention vs mlx.nn.MultiHeadAttention, {what}")
