"""The classic (GPT-2) block's own layers, which week 1's Llama-style model has no use for:
LayerNorm and GELU (topic 4.3)."""

from __future__ import annotations

import math

import mlx.core as mx


def layer_norm(x: mx.array, weight: mx.array, bias: mx.array, eps: float = 1e-5) -> mx.array:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last axis, statistics in fp32; the
    variance is the biased one (divided by n), as torch's LayerNorm has it (topic 4.3)."""
    x32 = x.astype(mx.float32)
    mean = mx.mean(x32, axis=-1, keepdims=True)
    var = mx.mean(mx.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * mx.rsqrt(var + eps)).astype(x.dtype) * weight + bias


def gelu(x: mx.array) -> mx.array:
    """GPT-2's GELU, the tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    (torch's approximate="tanh", transformers' gelu_new) (topic 4.3)."""
    return 0.5 * x * (1.0 + mx.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))
