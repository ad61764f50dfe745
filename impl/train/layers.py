"""The training models' own layers (topic 4.3): LayerNorm and GELU, which week 1's Llama-style model
has no use for, softmax, sigmoid, SiLU and SwiGLU's product, causal attention, and week 1's RMSNorm
and RoPE, each with its gradient on C++ kernels when built (one node each way). MLX runs every
array op alone on one core and its CPU exp is slow (26 ms for a million floats, numpy's 1.8), so a
small model's step was mostly element-wise work between the matmuls; each function here has its
pure-MLX twin, which MLX differentiates, and falls back to it off the CPU or off float32."""

from __future__ import annotations

import functools
import math

import mlx.core as mx

from impl import basics
from impl.attention import scaled_dot_product_attention_grouped
from impl.native import kernels
from impl.norm import RMSNorm
from impl.rope import RoPE


def layer_norm_mlx(x: mx.array, weight: mx.array, bias: mx.array, eps: float = 1e-5) -> mx.array:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last axis, statistics in fp32; the
    variance is the biased one (divided by n), as torch's LayerNorm has it: the layer_norm kernel's
    twin (topic 4.3)."""
    x32 = x.astype(mx.float32)
    mean = mx.mean(x32, axis=-1, keepdims=True)
    var = mx.mean(mx.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * mx.rsqrt(var + eps)).astype(x.dtype) * weight + bias


@functools.cache
def _layer_norm_fn(eps: float):
    """tiny_llm_kernels.layer_norm with layer_norm_backward as its vjp, at this eps."""

    @mx.custom_function
    def norm(x, weight, bias):
        return kernels.layer_norm(x, weight, bias, eps)

    @norm.vjp
    def norm_vjp(primals, cotangent, output):
        x, weight, _ = primals
        return tuple(kernels.layer_norm_backward(x, weight, cotangent, eps))

    return norm


def layer_norm(x: mx.array, weight: mx.array, bias: mx.array, eps: float = 1e-5) -> mx.array:
    """LayerNorm over the last axis (biased variance, as torch's): on the CPU with float32 arrays,
    tiny_llm_kernels.layer_norm and its backward, one node each way; else layer_norm_mlx, which MLX
    differentiates (topic 4.3)."""
    if (_kernel("layer_norm") is not None and all(a.dtype == mx.float32 for a in (x, weight, bias))
            and x.ndim >= 1 and weight.shape == bias.shape == (x.shape[-1],)):
        return _layer_norm_fn(float(eps))(x, weight, bias)
    return layer_norm_mlx(x, weight, bias, eps)


def gelu_mlx(x: mx.array) -> mx.array:
    """GPT-2's GELU, the tanh approximation: 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3)
    (torch's approximate="tanh", transformers' gelu_new), computed as x * sigmoid(2u), the same
    function (1 + tanh(u) = 2 sigmoid(2u)) on the sigmoid kernel: the gelu kernel's twin (topic 4.3)."""
    return x * sigmoid(math.sqrt(8.0 / math.pi) * (x + 0.044715 * x * x * x))


@mx.custom_function
def _gelu(x):
    return kernels.gelu(x)


@_gelu.vjp
def _gelu_vjp(x, cotangent, output):  # one argument: MLX hands it over as itself, not in a tuple
    return kernels.gelu_backward(x, cotangent)


def gelu(x: mx.array) -> mx.array:
    """GPT-2's GELU (tanh form): on the CPU with float32 x, tiny_llm_kernels.gelu (gelu_mlx's bits, one
    node) and gelu_backward as its vjp; else gelu_mlx, which MLX differentiates (topic 4.3)."""
    if _kernel("gelu") is not None and x.dtype == mx.float32:
        return _gelu(x)
    return gelu_mlx(x)


def sigmoid_mlx(x: mx.array) -> mx.array:
    """1 / (1 + exp(-x)) from e = exp(-|x|), which never overflows: 1 / (1 + e) for x >= 0 and
    e / (1 + e) below, in fp32, rounded to x's dtype: the twin of the sigmoid kernel (topic 4.3)."""
    x32 = x.astype(mx.float32)
    e = mx.exp(-mx.abs(x32))
    return (mx.where(x32 >= 0, 1.0, e) / (1.0 + e)).astype(x.dtype)


def check_activation(x: mx.array, name: str) -> None:
    """The kernels' one-line ValueError, on every path: x must be float32, float16 or bfloat16
    (softmax: with an axis to normalize over)."""
    if x.dtype not in (mx.float32, mx.float16, mx.bfloat16):
        raise ValueError(f"{name}: x must be float32, float16 or bfloat16")
    if name == "softmax" and x.ndim < 1:
        raise ValueError("softmax: x must have an axis to normalize over, got a scalar")


def _kernel(name: str):
    """tiny_llm_kernels' `name` when it is built and MLX computes on the CPU; else None."""
    kernel = getattr(kernels, name, None)
    return kernel if kernel is not None and mx.default_device() == mx.cpu else None


@mx.custom_function
def _softmax(x: mx.array) -> mx.array:
    kernel = _kernel("softmax")
    return kernel(x) if kernel is not None else basics.softmax(x, axis=-1)


@_softmax.vjp
def _softmax_vjp(x, cotangent, output):  # one argument: MLX hands it over as itself, not in a tuple
    y, dy = output.astype(mx.float32), cotangent.astype(mx.float32)
    return (y * (dy - mx.sum(dy * y, axis=-1, keepdims=True))).astype(x.dtype)


def softmax(x: mx.array) -> mx.array:
    """Softmax over the last axis in fp32, in x's dtype: the C++ kernel when built (its exp is a
    vectorized polynomial: MLX's CPU exp was about a quarter of a training step here), else week
    1's softmax. Its vjp: dx = y * (dy - sum(dy * y)) over the last axis (topic 4.3)."""
    check_activation(x, "softmax")
    return _softmax(x)


@mx.custom_function
def _sigmoid(x: mx.array) -> mx.array:
    kernel = _kernel("sigmoid")
    return kernel(x) if kernel is not None else sigmoid_mlx(x)


@_sigmoid.vjp
def _sigmoid_vjp(primals, cotangent, output):
    return cotangent * output * (1 - output)


def sigmoid(x: mx.array) -> mx.array:
    """1 / (1 + exp(-x)) in fp32, in x's dtype: the C++ kernel when built, else sigmoid_mlx. Its
    vjp: dx = dy * y * (1 - y) (topic 4.3)."""
    check_activation(x, "sigmoid")
    return _sigmoid(x)


def silu(x: mx.array) -> mx.array:
    """x * sigmoid(x): the SwiGLU MLP's activation (topic 4.3)."""
    return x * sigmoid(x)


@mx.custom_function
def _silu_mul(gate, up):
    return kernels.silu_mul(gate, up)


@_silu_mul.vjp
def _silu_mul_vjp(primals, cotangent, output):
    return tuple(kernels.silu_mul_backward(*primals, cotangent))


def silu_mul(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up, the SwiGLU MLP's product: one C++ node forward and one backward on the CPU
    with float32 inputs of one shape (dup = dy * gate * s, dgate = dy * up * (s + gate * s * (1 - s)),
    s = sigmoid(gate)); else silu(gate) * up, which MLX differentiates (topic 4.3)."""
    if (_kernel("silu_mul") is not None and gate.dtype == mx.float32 and up.dtype == mx.float32
            and gate.shape == up.shape):
        return _silu_mul(gate, up)
    return silu(gate) * up


@functools.cache
def _causal_attention_fn(scale: float):
    """The kernel pair as one differentiable function of (q, k, v) at this scale -> (out, lse)."""

    @mx.custom_function
    def attend(q, k, v):
        return tuple(kernels.causal_attention(q, k, v, scale))

    @attend.vjp
    def attend_vjp(primals, cotangents, outputs):  # lse feeds nothing differentiable: its cotangent is unused
        return tuple(kernels.causal_attention_backward(*primals, outputs[0], outputs[1], cotangents[0], scale))

    return attend


def causal_attention(q: mx.array, k: mx.array, v: mx.array, scale: float | None = None) -> mx.array:
    """Causal self-attention, q (N, H, L, D), k and v (N, H_kv, L, D) -> (N, H, L, D): query i sees
    keys 0..i. On the CPU with float32 inputs, tiny_llm_kernels.causal_attention and its backward
    (two graph nodes); else its twin, week 1's grouped attention with this module's softmax, which
    MLX differentiates (topic 4.3)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if (_kernel("causal_attention") is not None and q.ndim == 4 and k.shape[2] == q.shape[2]
            and all(t.dtype == mx.float32 for t in (q, k, v))):
        return _causal_attention_fn(float(scale))(q, k, v)[0]
    return scaled_dot_product_attention_grouped(q, k, v, scale=scale, mask="causal", softmax_fn=softmax)


def sdpa(q: mx.array, k: mx.array, v: mx.array, scale: float | None = None, mask=None) -> mx.array:
    """Week 1's attention function for a model being trained (LoRA's): causal_attention where the
    mask is causal over the whole sequence (no cache), else the grouped attention with this
    module's softmax (topic 4.7)."""
    if isinstance(mask, str) and mask == "causal" and k.shape[-2] == q.shape[-2]:
        return causal_attention(q, k, v, scale)
    return scaled_dot_product_attention_grouped(q, k, v, scale=scale, mask=mask, softmax_fn=softmax)


@functools.cache
def _rope_fn(traditional: bool):
    """tiny_llm_kernels.rope as a differentiable function of (x, cos, sin): a rotation, whose vjp is
    the rotation back, the same kernel with sin negated (dx1 = dy1 cos + dy2 sin, dx2 = -dy1 sin +
    dy2 cos: MLX's autodiff of the twin gives these very products and sums)."""

    @mx.custom_function
    def rotate(x, cos, sin):
        return kernels.rope(x, cos, sin, 0, traditional)

    @rotate.vjp
    def rotate_vjp(primals, cotangent, output):
        _, cos, sin = primals
        return kernels.rope(cotangent, cos, -sin, 0, traditional), mx.zeros_like(cos), mx.zeros_like(sin)

    return rotate


class TrainRoPE(RoPE):
    """RoPE for a model being trained: from position 0 (no cache), on tiny_llm_kernels.rope with its
    vjp when built and x is float32 on the CPU; else week 1's RoPE, which MLX differentiates
    (topic 4.3)."""

    def __call__(self, x: mx.array, offset: int | slice | list[int] | mx.array | None = None) -> mx.array:
        """x: (N, L, H, D) -> same shape, rotated by the positions `offset` names (0.. by default)."""
        if (_kernel("rope") is None or offset not in (None, 0) or self.dynamic or x.ndim != 4
                or x.dtype != mx.float32 or x.shape[3] != self.dims):
            return super().__call__(x, offset)
        self._check(x.shape[1] - 1, first=0)
        return _rope_fn(self.traditional)(x, self.cos, self.sin)


@functools.cache
def _rms_norm_fn(eps: float):
    """tiny_llm_kernels.rms_norm with tiny_llm_kernels.rms_norm_backward as its vjp, at this eps."""

    @mx.custom_function
    def norm(x, weight):
        return kernels.rms_norm(x, weight, eps)

    @norm.vjp
    def norm_vjp(primals, cotangent, output):
        return tuple(kernels.rms_norm_backward(*primals, cotangent, eps))

    return norm


class TrainRMSNorm(RMSNorm):
    """RMSNorm for a model being trained: on tiny_llm_kernels.rms_norm and its backward (two nodes,
    where MLX differentiates week 1's in about twenty) when built and x and the weight are float32
    on the CPU; else week 1's (topic 4.3)."""

    def __call__(self, x: mx.array) -> mx.array:
        """x: (..., dim) -> (..., dim) in x's dtype."""
        if (_kernel("rms_norm_backward") is None or x.dtype != mx.float32 or self.weight.dtype != mx.float32
                or x.ndim < 1 or x.shape[-1] != self.weight.shape[0]):
            return super().__call__(x)
        return _rms_norm_fn(float(self.eps))(x, self.weight)
