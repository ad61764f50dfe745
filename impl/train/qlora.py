"""QLoRA (topic 4.7): LoRA on a base model whose weights stay quantized (week 2's).

Training needs the gradient of every projection with respect to its input, quantized ones
included, since the adapters of layer 0 learn from what flows back through layers 1..29. For
y = x W^T, dL/dx = dL/dy @ W: the same weight, multiplied from the other side. Week 2's kernel
computes only x W^T, so the quantized matmul gets a custom vjp here whose x-gradient is
`quantized_matmul_dx`, the pure-MLX twin dy @ dequantize(W) (a C++ kernel for it would be
the next step). The quantized weights themselves are frozen: they get no gradient.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import mlx.core as mx

from impl.gguf import (
    GGUF_GROUP_SIZE,
    args_from_metadata,
    gguf_weights,
    quantization_bits,
    read_gguf,
)
from impl.model import Model
from impl.quantize import dequantize, quantized_matmul
from impl.quantized_weight import QuantizedWeight


def quantized_matmul_dx(dy: mx.array, w_q: mx.array, scales: mx.array, biases: mx.array,
                        group_size: int = 64, bits: int = 4) -> mx.array:
    """dy (..., N) @ dequantize(w_q, scales, biases) (N, K) -> (..., K) in dy's dtype: the x-gradient
    of y = x W^T, the pure-MLX twin, accumulated in fp32 (topic 4.7)."""
    w = dequantize(w_q, scales, biases, group_size, bits, mx.float32)  # (N, K)
    return (dy.astype(mx.float32) @ w).astype(dy.dtype)


@cache
def _differentiable_qmm(group_size: int, bits: int):
    @mx.custom_function
    def qmm(x, w_q, scales, biases):
        return quantized_matmul(x, w_q, scales, biases, group_size, bits)

    @qmm.vjp
    def qmm_vjp(primals, cotangent, output):
        x, w_q, scales, biases = primals
        dx = quantized_matmul_dx(cotangent, w_q, scales, biases, group_size, bits)
        # The weights are frozen: zeros keep the vjp's contract, nothing reads them.
        return dx, mx.zeros_like(w_q), mx.zeros_like(scales), mx.zeros_like(biases)

    return qmm


def quantized_matmul_trainable(x: mx.array, w_q: mx.array, scales: mx.array, biases: mx.array,
                               group_size: int = 64, bits: int = 4) -> mx.array:
    """x (..., K) @ dequantize(w_q, scales, biases).T -> (..., N) on week 2's quantized matmul, with a
    vjp: dx = quantized_matmul_dx(dy, ...), so mx.grad reaches x through it (topic 4.7)."""
    return _differentiable_qmm(group_size, bits)(x, w_q, scales, biases)


class TrainableQuantizedWeight(QuantizedWeight):
    """A QuantizedWeight that gradients flow through (to the input, never to the weight) (topic 4.7)."""

    def matmul_t(self, x: mx.array) -> mx.array:
        """x (..., K) @ W.T -> (..., N), differentiable with respect to x (topic 4.7)."""
        return quantized_matmul_trainable(x, self.w_q, self.scales, self.biases, self.group_size, self.bits)


def load_base(path: str | Path, quantized: bool = True) -> Model:
    """A GGUF's model for (Q)LoRA: week 1's layers with q/k/v and gate/up kept apart (LoRA adapts each
    one), every quantized weight a TrainableQuantizedWeight; quantized=False dequantizes the very
    same triples to fp32, the dense twin of the quantized model (topic 4.7)."""
    tensors, meta = read_gguf(path, requantize=True)
    args = args_from_metadata(meta, tensors.keys())
    raw = gguf_weights(tensors, args)
    weights = {}
    for key, w in raw.items():
        base = key.removesuffix(".weight")
        if key.endswith((".scales", ".biases")):
            continue
        if key.endswith(".weight") and f"{base}.scales" in raw:
            scales, biases = raw[f"{base}.scales"], raw[f"{base}.biases"]
            bits = quantization_bits(w, scales, GGUF_GROUP_SIZE)
            q = TrainableQuantizedWeight(w, scales, biases, GGUF_GROUP_SIZE, bits)
            weights[key] = q if quantized else dequantize(w, scales, biases, GGUF_GROUP_SIZE, bits, mx.float32)
        else:
            weights[key] = w.astype(mx.float32)
    return Model(args, weights)
