"""Topic 1.4: RMSNorm, SiLU and the SwiGLU MLP of Llama and Qwen2.

- `impl.norm.RMSNorm(dim, weight, eps)(x)`: x / sqrt(mean(x^2) + eps) * weight
  over the last axis, in x's dtype. For float16/bfloat16 inputs the mean of
  squares is accumulated in float32: checked against torch.nn.functional.rms_norm
  computed in float32 and rounded once to the input's dtype, and against
  mx.fast.rms_norm. Inputs up to 1000 in magnitude make the point: squaring them
  in float16 overflows (max 65504), which a naive float16 RMSNorm turns into an
  all-zero output (shown here, so the test is known to bite).
- `impl.basics.silu(x)`: x * sigmoid(x), against torch.nn.functional.silu and mlx.nn.silu.
- `impl.mlp.MLP(dim, hidden_dim, w_gate, w_up, w_down)(x)`: down(silu(gate(x)) * up(x)),
  against transformers' LlamaMLP holding the same random weights.

float32, float16 and bfloat16; low-precision inputs are compared with a float32
reference computed from the same rounded values.
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
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from spec.draw import DTYPES, draw_dtype, draw_rng
from spec.ladder import BY_DTYPE, FP16, FP32, assert_close

NAMES = {"norm": ("RMSNorm",), "basics": ("silu",), "mlp": ("MLP",)}
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@pytest.mark.presence
def test_has_names(impl):
    missing = [f"{m}.{n}" for m, names in NAMES.items() for n in names if not hasattr(getattr(impl, m), n)]
    assert not missing, f"impl lacks {missing}"


# Hypothesis probes a test's first argument for attributes, which the `impl`
# fixture would take for a missing module: hand tests the modules instead.
@pytest.fixture
def norm(impl):
    return impl.norm


@pytest.fixture
def basics(impl):
    return impl.basics


@pytest.fixture
def mlp(impl):
    return impl.mlp


# -- drawing inputs -------------------------------------------------------------


def draw_batch(data) -> tuple[int, ...]:
    return tuple(data.draw(st.lists(st.integers(1, 4), max_size=2), label="batch dims"))


def uniform(rng, shape, dtype: str, low: float = -1.0, high: float = 1.0) -> tuple[mx.array, torch.Tensor]:
    """U(low, high) in `dtype` for the implementation, and the same rounded values as fp32 torch."""
    x = mx.array(rng.uniform(low, high, shape).astype(np.float32)).astype(DTYPES[dtype])
    return x, torch.from_numpy(np.array(x.astype(mx.float32)))


def check_dtype(got, dtype, what):
    assert got.dtype == DTYPES[dtype], f"{what}: output dtype {got.dtype}, expected {dtype} (the input's)"


# -- RMSNorm -----------------------------------------------------------------------


def rms_norm_fp32_rounded_once(x32: torch.Tensor, w32: torch.Tensor, eps: float, dtype: str) -> torch.Tensor:
    return F.rms_norm(x32, (x32.shape[-1],), w32, eps).to(TORCH_DTYPES[dtype])


@given(data=st.data())
def test_rms_norm(norm, data):
    dtype, rng = draw_dtype(data), draw_rng(data)
    dim = data.draw(st.integers(1, 64), label="dim")
    # 1e-3: mean(x^2) ~ eps, so where eps goes matters; 1000: x^2 overflows float16.
    scale = data.draw(st.sampled_from([1e-3, 1.0, 30.0, 1000.0]), label="input scale")
    eps = data.draw(st.sampled_from([1e-5, 1e-6]), label="eps")
    x, x32 = uniform(rng, (*draw_batch(data), dim), dtype, -scale, scale)
    w, w32 = uniform(rng, (dim,), dtype, -2.0, 2.0)
    got = norm.RMSNorm(dim, w, eps=eps)(x)
    check_dtype(got, dtype, "RMSNorm")
    tol, what = BY_DTYPE[dtype], f"RMSNorm x {x.shape} of scale {scale}, eps={eps}"
    want = rms_norm_fp32_rounded_once(x32, w32, eps, dtype)
    assert_close(got, want, tol, f"{what} vs torch fp32, rounded once")
    fast = mx.fast.rms_norm(x.astype(mx.float32), w.astype(mx.float32), eps)
    assert_close(got, fast, tol, f"{what} vs mx.fast.rms_norm in fp32")


def test_rms_norm_default_eps_is_1e_5(norm):
    # x ~ 1e-3: mean(x^2) ~ 3e-7, so eps 1e-5 vs 1e-6 changes the output by ~40%.
    x, x32 = uniform(np.random.default_rng(0), (2, 8), "float32", -1e-3, 1e-3)
    w = mx.ones((8,))
    want = F.rms_norm(x32, (8,), torch.ones(8), 1e-5)
    assert_close(norm.RMSNorm(8, w)(x), want, FP32, "RMSNorm(dim, weight) with the default eps")


def test_rms_norm_zeros(norm):
    got = norm.RMSNorm(4, mx.ones((4,)), eps=1e-6)(mx.zeros((1, 4), mx.float16))
    assert np.array(got.astype(mx.float32)).tolist() == [[0.0] * 4], f"RMSNorm of zeros: {got}"


def naive_fp16_rms_norm(x: mx.array, w: mx.array, eps: float) -> mx.array:
    """RMSNorm computed in float16 throughout: the mistake the fp32 accumulation avoids."""
    return x * mx.rsqrt(mx.mean(x * x, axis=-1, keepdims=True) + eps) * w


def test_rms_norm_fp16_large_inputs_accumulate_in_fp32(norm):
    rng = np.random.default_rng(0)
    x = rng.uniform(300.0, 1000.0, (3, 64)) * rng.choice([-1.0, 1.0], (3, 64))  # x^2 > 65504, float16's max
    x = mx.array(x.astype(np.float32)).astype(mx.float16)
    x32 = torch.from_numpy(np.array(x.astype(mx.float32)))
    w, w32 = uniform(rng, (64,), "float16", 0.5, 1.5)
    eps = 1e-5
    want = rms_norm_fp32_rounded_once(x32, w32, eps, "float16")
    naive = naive_fp16_rms_norm(x, w, eps)
    # The premise: in float16 the squares are inf, 1/sqrt(inf) = 0, and every output is 0.
    assert (np.array(naive.astype(mx.float32)) == 0).all(), f"naive float16 RMSNorm did not overflow: {naive}"
    assert np.abs(want.float().numpy()).min() > 0.1, "reference should be far from 0"
    assert_close(norm.RMSNorm(64, w, eps=eps)(x), want, FP16, "RMSNorm of float16 inputs in [300, 1000]")


# -- SiLU ----------------------------------------------------------------------------


@given(data=st.data())
def test_silu(basics, data):
    dtype, rng = draw_dtype(data), draw_rng(data)
    shape = tuple(data.draw(st.lists(st.integers(1, 8), min_size=1, max_size=3), label="shape"))
    scale = data.draw(st.sampled_from([1.0, 10.0, 100.0]), label="input scale")
    x, x32 = uniform(rng, shape, dtype, -scale, scale)
    got = basics.silu(x)
    check_dtype(got, dtype, "silu")
    tol, what = BY_DTYPE[dtype], f"silu x {shape} of scale {scale}"
    assert_close(got, F.silu(x32), tol, f"{what} vs torch")
    assert_close(got, mlx.nn.silu(x.astype(mx.float32)), tol, f"{what} vs mlx.nn.silu")


# -- the SwiGLU MLP --------------------------------------------------------------------


@given(data=st.data())
def test_mlp(mlp, data):
    dtype, rng = draw_dtype(data), draw_rng(data)
    E, I = data.draw(st.integers(1, 48), label="dim"), data.draw(st.integers(1, 96), label="hidden_dim")
    x, x32 = uniform(rng, (*draw_batch(data), E), dtype, -3.0, 3.0)

    torch.manual_seed(0)
    # one head of 2 dims: the config's attention fields must validate, though the MLP never reads them
    config = LlamaConfig(hidden_size=E, intermediate_size=I, num_attention_heads=1, head_dim=2,
                         hidden_act="silu", mlp_bias=False)
    ref = LlamaMLP(config).eval()
    weights = {}
    with torch.no_grad():
        for name, fan_in in (("gate_proj", E), ("up_proj", E), ("down_proj", I)):
            p = getattr(ref, name).weight
            w, w32 = uniform(rng, tuple(p.shape), dtype, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
            p.copy_(w32)
            weights[name] = w
        want = ref(x32)

    got = mlp.MLP(E, I, weights["gate_proj"], weights["up_proj"], weights["down_proj"])(x)
    check_dtype(got, dtype, "MLP")
    assert_close(got, want, BY_DTYPE[dtype], f"MLP x {x.shape}, hidden_dim={I} vs transformers LlamaMLP")
