"""Primitives every layer is built from: softmax, linear, SiLU (topics 1.1, 1.4)."""

from __future__ import annotations

import mlx.core as mx


def softmax(x: mx.array, axis: int = -1) -> mx.array:
    """exp(x - max) / sum(exp(x - max)) along `axis`, computed in fp32."""
    dtype = x.dtype
    x = x.astype(mx.float32)
    # Subtracting the max keeps exp() from overflowing; it cancels in the ratio.
    # A row that is all -inf would give max = -inf and NaN; it stays NaN, as in torch.
    e = mx.exp(x - mx.max(x, axis=axis, keepdims=True))
    return (e / mx.sum(e, axis=axis, keepdims=True)).astype(dtype)


def linear(x: mx.array, w, bias: mx.array | None = None) -> mx.array:
    """x @ w.T + bias, with w stored (out_features, in_features) as in PyTorch.

    w may also be a QuantizedWeight (week 2), which multiplies without dequantizing.
    """
    if hasattr(w, "matmul_t"):  # QuantizedWeight
        y = w.matmul_t(x)
    else:
        y = x @ w.swapaxes(-1, -2)  # (..., in) @ (in, out) -> (..., out)
    return y + bias if bias is not None else y


def silu(x: mx.array) -> mx.array:
    """x * sigmoid(x)."""
    return x * mx.sigmoid(x)
