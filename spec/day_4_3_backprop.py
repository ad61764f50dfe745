"""Topic 4.3: backpropagation, every gradient of two small models against torch autograd.

llm.c's discipline: the same weights and batch go through the implementation and through
transformers; the loss, the logits and the gradient of every weight are compared, and a failure
lists each tensor outside tolerance with its worst element.

- `impl.train.model.ClassicLM(TrainConfig)`: GPT-2's block (learned positions, LayerNorm, multi-head
  attention with biases, GELU (tanh) MLP, head tied to the token embedding), against
  transformers' GPT2LMHeadModel.
- `impl.train.model.ModernLM(TrainConfig)`: Llama's block (RMSNorm, half-split RoPE, grouped-query
  attention, SwiGLU MLP, untied head), against transformers' LlamaForCausalLM.
- `impl.train.model.loss_and_grad(model, inputs, targets)`: (loss, gradient tree), by mx.value_and_grad.
  Against `model(ids, labels=labels).loss.backward()`: labels are the ids with some -100, and the
  targets given here are the labels shifted by one with -100 for the last position, the same loss.
- `impl.train.layers.layer_norm`, `gelu`: against torch.nn.functional in fp64 (values and gradients);
  in float32 on the CPU both are C++ kernels with backward passes (tiny_llm_kernels.layer_norm and
  .gelu), held to their twins too (`layer_norm_mlx`, `gelu_mlx`).
- `impl.train.layers.softmax` (last axis), `sigmoid`, `silu`: the models' activations, on C++ kernels
  (tiny_llm_kernels.softmax / .sigmoid) whose exp is a vectorized polynomial; against torch in fp64
  (values, to a few ulps in fp32, and gradients), against their pure-MLX twins, and at the edges
  (masked -inf scores give exactly 0, saturated sigmoids exactly 0 and 1, NaN stays NaN).
- `impl.train.layers.causal_attention(q, k, v, scale)`: the models' attention, q (N, H, L, D), k and
  v (N, H_kv, L, D); in float32 on the CPU it is two C++ kernels (tiny_llm_kernels.causal_attention
  and its backward). Its output and the gradients of q, k and v against torch's SDPA (is_causal,
  the kv heads repeated) in fp64 and against the twin (week 1's grouped attention, differentiated
  by MLX), on the transposed views the models pass; one key alone gives out = v and zero q and k
  gradients exactly; the kernels' one-line errors.
- `impl.train.layers.gelu`: on kernels too (tiny_llm_kernels.gelu and its backward), its output the
  twin's (`gelu_mlx`, on the sigmoid kernel) bit for bit and its gradient torch's in fp64.
- `impl.train.layers.silu_mul(gate, up)`: the SwiGLU MLP's silu(gate) * up, forward and backward on
  kernels (tiny_llm_kernels.silu_mul and its backward): the output equals the twin's (silu(gate) *
  up) bit for bit, the gradients torch's in fp64.
- `impl.train.layers.TrainRMSNorm` and `TrainRoPE`: week 1's RMSNorm and RoPE for a model being
  trained, on C++ kernels with backward passes (tiny_llm_kernels.rms_norm_backward; RoPE's vjp is
  the same rope kernel turning back). RMSNorm's output and its x and weight gradients against torch
  in fp64 and against the twin (MLX differentiating week 1's); RoPE's output and gradient equal the
  twin's bit for bit (a rotation's vjp is the rotation back: the same products and sums).

Every weight is drawn at random (norms around 1, biases around 0, not their initial constants), so
that each one matters. Hypothesis draws the batch, the length, the heads and (Llama) the KV heads.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from mlx.utils import tree_flatten, tree_unflatten

from reference.train_models import flat_from_hf, grads, hf_model
from spec.draw import DTYPES, draw_rng
from spec.ladder import BY_DTYPE, FP32, GRAD_FP32, MODEL_FP32, Tol, assert_close

NAMES = {"model": ("TrainConfig", "ClassicLM", "ModernLM", "loss_and_grad"),
         "layers": ("layer_norm", "layer_norm_mlx", "gelu", "softmax", "sigmoid", "silu", "causal_attention", "TrainRMSNorm",
                    "TrainRoPE", "silu_mul", "gelu_mlx")}
ARCH = {"ClassicLM": "gpt2", "ModernLM": "llama"}
EMBEDDINGS = {"wte", "wpe", "embed"}


@pytest.mark.presence
def test_has_names(impl):
    missing = [f"train.{m}.{n}" for m, names in NAMES.items() for n in names
               if not hasattr(getattr(impl.train, m), n)]
    assert not missing, f"impl lacks {missing}"


@pytest.fixture
def train(impl):  # Hypothesis probes a test's first argument: hand tests the package
    return impl.train


# -- the classic block's own layers -----------------------------------------------------------


@given(data=st.data())
def test_layer_norm_and_gelu(train, data):
    rng = draw_rng(data)
    E = data.draw(st.integers(2, 48), label="dim")  # one element: x - mean is rounding noise / sqrt(eps)
    # Rows of standard deviation 0.5-3 about means of up to 3: a near-constant row's gradient is
    # ill-conditioned in fp32 whatever computes it (x - mean loses the digits that matter).
    z = rng.normal(0, 1, (2, 5, E))
    z = (z - z.mean(-1, keepdims=True)) / z.std(-1, keepdims=True)
    x = (z * rng.uniform(0.5, 3, (2, 5, 1)) + rng.uniform(-3, 3, (2, 5, 1))).astype(np.float32)
    w, b = rng.normal(1, 0.5, E).astype(np.float32), rng.normal(0, 0.5, E).astype(np.float32)
    # fp64: where a row's variance is small the gradient is a near-cancellation, and torch's fp32
    # LayerNorm is then further from the exact value than an fp32 two-pass one (measured: 0.3%).
    xt, wt, bt = (torch.from_numpy(a).double().requires_grad_(True) for a in (x, w, b))
    want = F.gelu(F.layer_norm(xt, (E,), wt, bt, 1e-5), approximate="tanh")
    up = rng.normal(size=want.shape).astype(np.float32)  # a random upstream gradient
    (want * torch.from_numpy(up).double()).sum().backward()

    def f(x, w, b):
        return (train.layers.gelu(train.layers.layer_norm(x, w, b, 1e-5)) * mx.array(up)).sum()

    got = train.layers.gelu(train.layers.layer_norm(mx.array(x), mx.array(w), mx.array(b), 1e-5))
    assert_close(got, want, FP32, f"gelu(layer_norm(x)) x (2, 5, {E}) vs torch fp64")
    for g, t, name in zip(mx.grad(f, argnums=(0, 1, 2))(mx.array(x), mx.array(w), mx.array(b)), (xt, wt, bt),
                          ("x", "weight", "bias"), strict=True):
        assert_close(g, t.grad, GRAD_FP32, f"d/d{name} of gelu(layer_norm(x)) vs torch autograd in fp64")


@given(data=st.data())
def test_layer_norm_kernel_vs_twin(train, data):
    shape = data.draw(st.sampled_from([(3, 5), (12, 64, 128), (130, 576)]), label="shape")  # 130 rows: 3 chunks
    rng = draw_rng(data)
    x = rng.normal(0, 1, shape) * rng.uniform(0.5, 3, (*shape[:-1], 1)) + rng.uniform(-3, 3, (*shape[:-1], 1))
    args = [mx.array(a.astype(np.float32)) for a in (x, rng.normal(1, 0.5, shape[-1]), rng.normal(0, 0.5, shape[-1]))]
    up = [mx.array(rng.normal(0, 1, shape).astype(np.float32))]
    (y,), grads = mx.vjp(train.layers.layer_norm, args, up)
    (ty,), twin = mx.vjp(train.layers.layer_norm_mlx, args, up)
    assert_close(y, ty, FP32, f"layer_norm {shape} vs its twin")
    for name, g, t in zip(("x", "weight", "bias"), grads, twin, strict=True):
        # weight and bias sum over every row: held, as 4.7's adapter gradients, to a fraction of
        # their largest element (measured: 1e-6 against the twin, 4e-7 against torch fp64)
        scale = float(np.abs(np.array(t)).max())
        assert_close(g, t, Tol(1e-5 * scale, 1e-4, "fp32 sums over the rows, another order"),
                     f"d/d{name} of layer_norm {shape} vs the twin")


def test_layer_norm_kernel_bad_input_is_a_one_line_error(impl):
    k, x, w = impl.native.kernels, mx.zeros((2, 4)), mx.ones((4,))
    with pytest.raises(ValueError, match=r"^layer_norm: x, weight and bias must be float32, x \(\.\.\., D\)$"):
        k.layer_norm(x.astype(mx.float16), w, w)
    with pytest.raises(ValueError, match=r"^layer_norm: bias must be \(D,\) with D = x.shape\[-1\] = 4$"):
        k.layer_norm(x, w, mx.ones((3,)))
    with pytest.raises(ValueError, match=r"^layer_norm_backward: dy must have x's shape \(2, 4\), got \(4, 2\)$"):
        k.layer_norm_backward(x, w, x.T)


# -- softmax, sigmoid and SiLU: the activations, on kernels ---------------------------------------

BUILD = "pip install --no-build-isolation ./kernels  (needs a C++ compiler, cmake, mlx, nanobind>=3,<4)"
T_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


TRAINING_KERNELS = ("softmax", "sigmoid", "layer_norm", "layer_norm_backward", "gelu", "gelu_backward", "silu_mul",
                    "silu_mul_backward", "causal_attention", "causal_attention_backward", "rms_norm_backward")


def assert_kernel_built(impl, name: str) -> None:
    """tiny_llm_kernels has `name`, or the one-line way to build it."""
    kernels = impl.native.kernels
    assert kernels is not None and hasattr(kernels, name), (
        f"tiny_llm_kernels has no {name} ({getattr(kernels, 'ext_error', 'old build')}): rebuild: {BUILD}")


@pytest.mark.parametrize("name", TRAINING_KERNELS)
@pytest.mark.presence
def test_training_kernel_is_built(impl, name):
    assert_kernel_built(impl, name)


def ulps(got: np.ndarray, want: np.ndarray) -> float:
    """The largest |got - want| in units of fp32's spacing at want (np.spacing of want in fp32)."""
    spacing = np.abs(np.spacing(want.astype(np.float32))).astype(np.float64)
    return float(np.max(np.abs(got.astype(np.float64) - want) / spacing))


@given(data=st.data())
def test_softmax_and_sigmoid_against_fp64(train, data):
    dtype = data.draw(st.sampled_from(sorted(DTYPES)), label="dtype")
    shape = data.draw(st.sampled_from([(3, 5), (2, 4, 64), (1, 1000), (7, 1), (33, 17)]), label="shape")
    scale = data.draw(st.sampled_from([1.0, 10.0, 100.0]), label="scale (100: scores far apart)")
    rng = draw_rng(data)
    x = rng.normal(0, scale, shape).astype(np.float32)
    x[rng.random(shape) < 0.2] = -np.inf  # masked scores (softmax); sigmoid(-inf) = 0
    x[..., 0] = rng.normal(0, scale, shape[:-1])  # every softmax row sees at least one key
    xm = mx.array(x).astype(DTYPES[dtype])
    x64 = torch.from_numpy(np.array(xm.astype(mx.float32))).double()  # the rounded values, exactly
    for name, fn, ref in (("softmax", train.layers.softmax, torch.softmax(x64, -1)),
                          ("sigmoid", train.layers.sigmoid, torch.sigmoid(x64))):
        got = fn(xm)
        assert got.dtype == xm.dtype, f"{name}: output dtype {got.dtype}, expected {xm.dtype}"
        what = f"{name} {dtype} {shape} scale {scale}"
        assert_close(got, ref.to(T_DTYPES[dtype]), BY_DTYPE[dtype], f"{what} vs torch fp64")
        if dtype == "float32" and name == "sigmoid":
            # sigmoid's argument -|x| is exact, so this measures the kernel's exp: ~2 ulps, then
            # 1 + e and a division, each rounded: 4 ulps. MLX's own CPU exp is off by up to 65
            # (measured), which this would catch. (softmax's x - max is rounded before its exp,
            # which alone costs |x - max| / 2 ulps of fp32's relative spacing; FP32 above covers it.)
            got64, want = np.array(got).astype(np.float64), ref.numpy()
            big = want > 1e-30  # below, fp32's spacing is denormal: the absolute check above holds
            assert ulps(got64[big], want[big]) <= 4, f"{what}: {ulps(got64[big], want[big]):.1f} ulps from fp64"
        zero = np.isneginf(x) if name == "softmax" else (x < -104)  # sigmoid: exp(-104) < the least denormal
        assert (np.array(got.astype(mx.float32))[zero] == 0).all(), f"{what}: a masked input's output is not exactly 0"


@given(data=st.data())
def test_activation_gradients_against_torch(train, data):
    shape = data.draw(st.sampled_from([(3, 5), (2, 4, 64), (5, 1)]), label="shape")
    rng = draw_rng(data)
    x = rng.normal(0, 4, shape).astype(np.float32)
    up = rng.normal(0, 1, shape).astype(np.float32)  # a random upstream gradient
    for name, fn, ref in (("softmax", train.layers.softmax, lambda t: torch.softmax(t, -1)),
                          ("sigmoid", train.layers.sigmoid, torch.sigmoid),
                          ("silu", train.layers.silu, F.silu)):
        xt = torch.from_numpy(x).double().requires_grad_(True)
        (ref(xt) * torch.from_numpy(up).double()).sum().backward()
        got = mx.grad(lambda a, fn=fn: (fn(a) * mx.array(up)).sum())(mx.array(x))
        assert_close(got, xt.grad, GRAD_FP32, f"d/dx of {name} {shape} vs torch autograd in fp64")


def test_activations_edges_and_twins(impl, train):
    x = mx.array([[-mx.inf, 0.0, 1.0, -mx.inf], [-mx.inf] * 4, [1e30, -1e30, 0.0, 3.0], [float("nan"), 0.0, 1.0, 2.0]])
    got, twin = np.array(train.layers.softmax(x)), np.array(impl.basics.softmax(x, axis=-1))
    assert got[0, 0] == got[0, 3] == 0 and abs(got[0, 1:3].sum() - 1) < 1e-6, f"masked row: {got[0]}"
    assert np.isnan(got[1]).all() and np.isnan(twin[1]).all(), f"a row of -inf gives NaN, as the twin: {got[1]}"
    assert (got[2] == [1, 0, 0, 0]).all(), f"far-apart scores: {got[2]}"
    assert np.isnan(got[3]).all(), f"a row holding NaN is NaN: {got[3]}"
    s = np.array(train.layers.sigmoid(mx.array([-200.0, -90.0, 0.0, 90.0, 200.0, float("nan"), -mx.inf, mx.inf])))
    assert (s[[0, 6]] == 0).all() and (s[[3, 4, 7]] == 1).all() and s[2] == 0.5 and np.isnan(s[5]), f"sigmoid: {s}"
    for name in ("softmax", "sigmoid"):  # the kernel's words on every path
        with pytest.raises(ValueError, match=f"^{name}: x must be float32, float16 or bfloat16$"):
            getattr(train.layers, name)(mx.array([1, 2, 3]))
    with pytest.raises(ValueError, match="^softmax: x must have an axis to normalize over"):
        train.layers.softmax(mx.array(1.0))
    # kernel against twin on ordinary values: the twins' exp is MLX's (up to 65 ulps), hence FP32
    rng = np.random.default_rng(0)
    y = mx.array(rng.normal(0, 5, (6, 300)).astype(np.float32))
    assert_close(train.layers.softmax(y), impl.basics.softmax(y, axis=-1), FP32, "softmax vs its twin")
    assert_close(train.layers.sigmoid(y), train.layers.sigmoid_mlx(y), FP32, "sigmoid vs its twin")


@given(data=st.data())
def test_silu_mul_against_torch_and_twin(train, data):
    shape = data.draw(st.sampled_from([(3, 5), (12, 64, 336), (40_000,)]), label="shape")  # 40_000: 3 pieces
    rng = draw_rng(data)
    gate, u, up = (rng.normal(0, s, shape).astype(np.float32) for s in (4.0, 1.0, 1.0))
    gate[rng.random(shape) < 0.01] = 200.0  # saturated: s = 1 exactly
    (y,), (dg, du) = mx.vjp(train.layers.silu_mul, [mx.array(gate), mx.array(u)], [mx.array(up)])
    twin = train.layers.silu(mx.array(gate)) * mx.array(u)
    np.testing.assert_array_equal(np.array(y), np.array(twin), f"silu_mul {shape}: the twin's bits")
    g64, u64 = (torch.from_numpy(a).double().requires_grad_(True) for a in (gate, u))
    (F.silu(g64) * u64).backward(torch.from_numpy(up).double())
    assert_close(dg, g64.grad, GRAD_FP32, f"silu_mul {shape}: d/dgate vs torch fp64")
    assert_close(du, u64.grad, GRAD_FP32, f"silu_mul {shape}: d/dup vs torch fp64")


@given(data=st.data())
def test_gelu_kernel_against_torch_and_twin(train, data):
    shape = data.draw(st.sampled_from([(3, 5), (12, 64, 512), (40_000,)]), label="shape")
    rng = draw_rng(data)
    x, up = rng.normal(0, 3, shape).astype(np.float32), rng.normal(0, 1, shape).astype(np.float32)
    x.flat[:3] = [200.0, -200.0, 0.0]  # saturated both ways, and 0
    (y,), (dx,) = mx.vjp(train.layers.gelu, [mx.array(x)], [mx.array(up)])
    np.testing.assert_array_equal(np.array(y), np.array(train.layers.gelu_mlx(mx.array(x))), f"gelu {shape}: the twin's bits")
    x64 = torch.from_numpy(x).double().requires_grad_(True)
    F.gelu(x64, approximate="tanh").backward(torch.from_numpy(up).double())
    assert_close(dx, x64.grad, GRAD_FP32, f"gelu {shape}: d/dx vs torch fp64")


def test_silu_mul_and_gelu_bad_input_is_a_one_line_error(impl):
    k, x = impl.native.kernels, mx.zeros((2, 4))
    with pytest.raises(ValueError, match="^silu_mul: gate, up and dy must be float32$"):
        k.silu_mul(x.astype(mx.float16), x)
    with pytest.raises(ValueError, match=r"^silu_mul_backward: gate, up and dy must have one shape, got \(2, 4\) and \(4, 2\)$"):
        k.silu_mul_backward(x, x, x.T)
    with pytest.raises(ValueError, match="^gelu: x and dy must be float32$"):
        k.gelu(x.astype(mx.bfloat16))
    with pytest.raises(ValueError, match=r"^gelu_backward: x and dy must have one shape, got \(2, 4\) and \(4, 2\)$"):
        k.gelu_backward(x, x.T)


# -- causal attention, on kernels -------------------------------------------------------------------


def attention_inputs(rng, N: int, H: int, H_kv: int, L: int, D: int):
    """q (N, H, L, D), k and v (N, H_kv, L, D) as the models pass them: transposed views of the
    projections' (N, L, heads, D); and an upstream gradient for the output."""
    q, k, v = (mx.array(rng.normal(0, 1, (N, L, h, D)).astype(np.float32)).transpose(0, 2, 1, 3)
               for h in (H, H_kv, H_kv))
    return q, k, v, mx.array(rng.normal(0, 1, (N, H, L, D)).astype(np.float32))


def torch_attention(q, k, v, up, scale: float):
    """torch's causal SDPA in fp64, kv heads repeated: the output and the gradients of q, k, v."""
    tq, tk, tv = (torch.from_numpy(np.array(t)).double().requires_grad_(True) for t in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(tq, tk.repeat_interleave(rep, 1), tv.repeat_interleave(rep, 1),
                                         is_causal=True, scale=scale)
    out.backward(torch.from_numpy(np.array(up)).double())
    return out.detach(), tq.grad, tk.grad, tv.grad


def attention_and_grads(fn, q, k, v, up):
    out, grads = mx.vjp(lambda q, k, v: fn(q, k, v), [q, k, v], [up])
    return out[0], *grads


@given(data=st.data())
def test_causal_attention_against_torch(train, data):
    N = data.draw(st.integers(1, 3), label="N")
    H_kv = data.draw(st.integers(1, 3), label="H_kv")
    H = H_kv * data.draw(st.integers(1, 3), label="query heads per kv head")
    L = data.draw(st.sampled_from([1, 2, 7, 33, 64]), label="L")
    D = data.draw(st.sampled_from([5, 16, 32, 64]), label="D")
    rng = draw_rng(data)
    q, k, v, up = attention_inputs(rng, N, H, H_kv, L, D)
    got = attention_and_grads(lambda q, k, v: train.layers.causal_attention(q, k, v, D ** -0.5), q, k, v, up)
    want = torch_attention(q, k, v, up, D ** -0.5)
    for name, g, w, tol in zip(("out", "dq", "dk", "dv"), got, want, (FP32, GRAD_FP32, GRAD_FP32, GRAD_FP32),
                               strict=True):
        assert g.shape == tuple(w.shape), f"{name}: shape {g.shape}, expected {tuple(w.shape)}"
        assert_close(g, w, tol, f"causal attention {name}, (N, H, H_kv, L, D) = {(N, H, H_kv, L, D)}, vs torch fp64")


def test_causal_attention_kernel_vs_twin_and_edges(impl, train):
    from impl.attention import scaled_dot_product_attention_grouped

    rng = np.random.default_rng(0)
    q, k, v, up = attention_inputs(rng, 3, 6, 2, 48, 32)
    def twin(q, k, v):
        return scaled_dot_product_attention_grouped(q, k, v, scale=32 ** -0.5, mask="causal",
                                                    softmax_fn=train.layers.softmax)

    got = attention_and_grads(lambda q, k, v: train.layers.causal_attention(q, k, v), q, k, v, up)
    want = attention_and_grads(twin, q, k, v, up)
    for name, g, w, tol in zip(("out", "dq", "dk", "dv"), got, want, (FP32, GRAD_FP32, GRAD_FP32, GRAD_FP32),
                               strict=True):
        assert_close(g, w, tol, f"causal attention {name}, kernel vs twin")
    # one key: the output is v, and no score can move it (dq = dk = 0), exactly
    q1, k1, v1, up1 = attention_inputs(rng, 2, 2, 1, 1, 16)
    out, dq, dk, dv = attention_and_grads(lambda q, k, v: train.layers.causal_attention(q, k, v), q1, k1, v1, up1)
    np.testing.assert_array_equal(np.array(out), np.repeat(np.array(v1), 2, axis=1), "one key: out = v")
    assert not np.array(dq).any() and not np.array(dk).any(), "one key: dq and dk must be exactly 0"
    np.testing.assert_array_equal(np.array(dv), np.array(up1).sum(axis=1, keepdims=True), "one key: dv = the sum of dout")
    # float16 takes the twin; the kernels' own words
    h = train.layers.causal_attention(*(t.astype(mx.float16) for t in (q, k, v)))
    assert h.dtype == mx.float16 and h.shape == q.shape, f"float16: {h.dtype} {h.shape}"
    assert_close(h, twin(q, k, v), Tol(1e-2, 1e-2, "float16 inputs: 10-bit mantissa"), "float16 via the twin")
    kernels = impl.native.kernels
    with pytest.raises(ValueError, match="^causal_attention: q, k and v must be float32$"):
        kernels.causal_attention(q.astype(mx.float16), k, v, 0.1)
    with pytest.raises(ValueError, match=r"^causal_attention: the query heads \(6\) must be a multiple of the kv heads \(4\)$"):
        kernels.causal_attention(q, mx.concatenate([k, k], axis=1), mx.concatenate([v, v], axis=1), 0.1)
    with pytest.raises(ValueError, match="^causal_attention_backward: lse must be float32"):
        kernels.causal_attention_backward(q, k, v, q, q, q, 0.1)


# -- RMSNorm and RoPE, on kernels -----------------------------------------------------------------


@given(data=st.data())
def test_train_rms_norm_against_torch_and_twin(impl, train, data):
    shape = data.draw(st.sampled_from([(3, 5), (1, 7), (12, 64, 128), (130, 576)]), label="shape")  # 130 rows: 3 chunks
    rng = draw_rng(data)
    x, w, up = (rng.normal(0, s, shp).astype(np.float32) for s, shp in ((2.0, shape), (1.0, shape[-1:]), (1.0, shape)))
    fn = lambda x, w: train.layers.TrainRMSNorm(shape[-1], w, 1e-5)(x)  # noqa: E731
    (y,), (dx, dw) = mx.vjp(fn, [mx.array(x), mx.array(w)], [mx.array(up)])
    (ty,), (tdx, tdw) = mx.vjp(lambda x, w: impl.norm.RMSNorm(shape[-1], w, 1e-5)(x), [mx.array(x), mx.array(w)],
                               [mx.array(up)])
    x64, w64 = (torch.from_numpy(a).double().requires_grad_(True) for a in (x, w))
    ref = F.rms_norm(x64, (shape[-1],), w64, 1e-5)
    ref.backward(torch.from_numpy(up).double())
    for name, got, twin, want, tol in (("y", y, ty, ref.detach(), FP32), ("dx", dx, tdx, x64.grad, GRAD_FP32)):
        assert_close(got, want, tol, f"RMSNorm {name} {shape} vs torch fp64")
        assert_close(got, twin, tol, f"RMSNorm {name} {shape} vs the twin")
    # dw sums a term per row; a weight whose terms cancel to a small total keeps the rounding of the
    # large ones. The bound, per unit of sum |terms| and in units of 2^-24: 4 sqrt(rows) for the sum
    # over rows (a random walk of roundings, with room), 2 sqrt(D) for each row's r (from its mean of
    # D squares, off by the same fraction in all of the row's terms), 8 for each term's own few
    # roundings. Measured over 30 seeds of these shapes: at most 0.21 of it against torch.
    rows = x.size // shape[-1]
    x2 = x.astype(np.float64).reshape(rows, -1)
    r = 1 / np.sqrt((x2 ** 2).mean(axis=-1, keepdims=True) + 1e-5)
    terms = np.abs(up.astype(np.float64).reshape(rows, -1) * x2 * r).sum(axis=0)
    bound = (4 * math.sqrt(rows) + 2 * math.sqrt(shape[-1]) + 8) * 2.0 ** -24 * terms
    for what, other, k in (("torch fp64", w64.grad.numpy(), 1), ("the twin", np.array(tdw), 2)):
        err = np.abs(np.array(dw).astype(np.float64) - other)
        assert (err <= k * bound).all(), (f"RMSNorm dw {shape} vs {what}: {np.abs(err / (k * bound)).max():.2f} of the"
                                          f" bound at worst (element {int(np.argmax(err / bound))})")


def test_train_rope_is_the_twin_bit_for_bit(impl, train):
    rng = np.random.default_rng(0)
    x = mx.array(rng.normal(0, 1, (3, 20, 4, 32)).astype(np.float32))
    up = mx.array(rng.normal(0, 1, (3, 20, 4, 32)).astype(np.float32))
    for traditional in (False, True):
        mine, twin = (cls(32, 64, 10000.0, traditional) for cls in (train.layers.TrainRoPE, impl.rope.RoPE))
        (y,), (dx,) = mx.vjp(lambda x, r=mine: r(x), [x], [up])
        (ty,), (tdx,) = mx.vjp(lambda x, r=twin: r(x), [x], [up])
        np.testing.assert_array_equal(np.array(y), np.array(ty), f"RoPE (traditional={traditional}) vs the twin")
        np.testing.assert_array_equal(np.array(dx), np.array(tdx), f"RoPE's gradient (traditional={traditional})")


def test_rms_norm_backward_bad_input_is_a_one_line_error(impl):
    k, x = impl.native.kernels, mx.zeros((2, 4))
    with pytest.raises(ValueError, match="^rms_norm_backward: x, weight and dy must be float32"):
        k.rms_norm_backward(x.astype(mx.float16), mx.ones((4,)), x)
    with pytest.raises(ValueError, match=r"^rms_norm_backward: weight must be \(D,\) with D = x.shape\[-1\] = 4$"):
        k.rms_norm_backward(x, mx.ones((3,)), x)
    with pytest.raises(ValueError, match=r"^rms_norm_backward: dy must have x's shape \(2, 4\), got \(4, 2\)$"):
        k.rms_norm_backward(x, mx.ones((4,)), x.T)


# -- every gradient of a model --------------------------------------------------------------------


def random_weights(model, rng) -> dict[str, np.ndarray]:
    """Every weight drawn at random, set in the model; returns them by name."""
    out = {}
    for name, p in tree_flatten(model.trainable_parameters()):
        leaf = name.rsplit(".", 1)[-1]
        if p.ndim == 2:  # embeddings N(0, 1); projections (out, in) N(0, 1 / in): outputs of unit variance
            a = rng.normal(0, 1.0 if leaf in EMBEDDINGS else 1 / math.sqrt(p.shape[1]), p.shape)
        elif leaf.startswith("b") or leaf.endswith("_b"):  # biases
            a = rng.normal(0, 0.3, p.shape)
        else:  # norm weights
            a = rng.normal(1, 0.3, p.shape)
        out[name] = a.astype(np.float32)
    model.update(tree_unflatten([(n, mx.array(a)) for n, a in out.items()]))
    return out


def check_every_tensor(got: dict[str, np.ndarray], want: dict[str, np.ndarray], tol: Tol, what: str,
                       show: bool = True) -> None:
    """Compare each tensor; fail listing every one outside tol, the worst first; print the table (show)."""
    assert got.keys() == want.keys(), f"{what}: names differ: {sorted(got.keys() ^ want.keys())}"
    failures, rows = [], []
    for name in want:
        rows.append((float(np.abs(got[name] - want[name]).max()), name))
        try:
            assert_close(got[name], want[name], tol, f"{what} {name} {want[name].shape}")
        except AssertionError as e:
            failures.append((rows[-1][0], str(e)))
    if show:
        print(f"{what}: max |diff| per tensor: " + ", ".join(f"{n} {d:.2g}" for d, n in sorted(rows, reverse=True)))
    assert not failures, f"{len(failures)} of {len(want)} tensors differ:\n" + "\n".join(
        m for _, m in sorted(failures, reverse=True))


def config_fields(c) -> dict:
    return dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                num_layers=c.num_layers, num_heads=c.num_heads, num_kv_heads=c.num_kv_heads,
                block_size=c.block_size, norm_eps=c.norm_eps, rope_theta=c.rope_theta)


def batch(rng, N: int, L: int, V: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids (N, L); labels: the ids with about a quarter -100 (at least one counted after the shift);
    targets (N, L): the labels shifted by one, -100 at the last position: the same loss."""
    ids = rng.integers(0, V, (N, L))
    labels = np.where(rng.random((N, L)) < 0.25, -100, ids)
    labels[0, 1] = ids[0, 1]
    targets = np.concatenate([labels[:, 1:], np.full((N, 1), -100)], axis=1)
    return ids, labels, targets


def check_gradients(train, kind: str, N: int, L: int, H: int, H_kv: int | None, seed: int) -> None:
    rng = np.random.default_rng(seed)
    c = train.model.TrainConfig(vocab_size=61, hidden_size=8 * H, intermediate_size=40, num_layers=2, num_heads=H,
                                num_kv_heads=H_kv, block_size=16, rope_theta=500.0)
    model = getattr(train.model, kind)(c, seed=seed)
    weights = random_weights(model, rng)
    arch, what = ARCH[kind], f"{kind} N={N} L={L} heads {H}/{H_kv or H}"
    ref = hf_model(arch, weights, **config_fields(c))
    ids, labels, targets = batch(rng, N, L, c.vocab_size)
    out = ref(torch.from_numpy(ids), labels=torch.from_numpy(labels))
    out.loss.backward()

    assert_close(model(mx.array(ids)), out.logits, MODEL_FP32, f"{what}: logits vs transformers")
    loss, g = train.model.loss_and_grad(model, mx.array(ids), mx.array(targets))
    assert_close(loss, out.loss, FP32, f"{what}: loss vs transformers' (labels=...)")
    got = {n: np.array(a) for n, a in tree_flatten(g)}
    check_every_tensor(got, grads(arch, ref), GRAD_FP32, f"{what}: gradient of")
    # loss_and_grad leaves the model's weights as they were
    check_every_tensor({n: np.array(a) for n, a in tree_flatten(model.trainable_parameters())},
                       flat_from_hf(arch, ref), Tol(0.0, 0.0, "untouched"), f"{what}: weight after loss_and_grad", show=False)


@given(data=st.data())
def test_classic_gradients(train, data):
    N, L = data.draw(st.integers(1, 3), label="batch"), data.draw(st.integers(2, 16), label="length")
    H = data.draw(st.sampled_from([1, 2, 4]), label="heads")
    check_gradients(train, "ClassicLM", N, L, H, None, data.draw(st.integers(0, 2**16), label="seed"))


@given(data=st.data())
def test_modern_gradients(train, data):
    N, L = data.draw(st.integers(1, 3), label="batch"), data.draw(st.integers(2, 16), label="length")
    H = data.draw(st.sampled_from([2, 4]), label="heads")
    H_kv = data.draw(st.sampled_from([h for h in (1, 2, 4) if H % h == 0]), label="kv heads")
    check_gradients(train, "ModernLM", N, L, H, H_kv, data.draw(st.integers(0, 2**16), label="seed"))


@pytest.mark.presence  # it checks the spec's comparison, not the implementation: no start on the topic
def test_a_wrong_gradient_is_caught():
    """The check bites: a gradient off by one part in a thousand in one weight fails it."""
    rng = np.random.default_rng(0)
    got = {"a": rng.normal(size=(4, 4)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)}
    want = {k: v.copy() for k, v in got.items()}
    got["b"][2] *= 1.001
    with pytest.raises(AssertionError, match="1 of 2 tensors differ"):
        check_every_tensor(got, want, GRAD_FP32, "a planted error:")
