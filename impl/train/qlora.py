"""QLoRA (topic 4.7): LoRA on a base model whose weights stay quantized (week 2's).

Training needs the gradient of every projection with respect to its input, quantized ones
included, since the adapters of layer 0 learn from what flows back through layers 1..29. For
y = x W^T, dL/dx = dL/dy @ W: the same weight, multiplied from the other side. Week 2's kernel
computes only x W^T, so the quantized matmul gets a custom vjp here whose x-gradient is
`quantized_matmul_dx`: the C++ kernel tiny_llm_kernels.quantized_matmul_dx on the CPU when built
(it streams the packed weights once and dequantizes them a slice at a time), else the pure-MLX
twin `quantized_matmul_dx_mlx`, dy @ dequantize(W). The quantized weights themselves are frozen:
they get no gradient.
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
from impl.mlp import MLP
from impl.model import Model
from impl.native import kernels
from impl.quantize import (
    FLOATS,
    check_bits_and_group_size,
    check_scales_and_biases,
    dequantize,
    quantized_matmul,
)
from impl.quantized_weight import QuantizedWeight
from impl.train import layers


def check_quantized_matmul_dx(dy: mx.array, w_q: mx.array, scales: mx.array, biases: mx.array,
                              group_size: int, bits: int) -> None:
    """One-line ValueErrors, worded as the C++ kernel's: 4 or 8 bits, groups of 32, 64 or 128, w_q
    (N, K * bits / 32) uint32, dy (..., N) and scales/biases (N, K / group_size), float (topic 4.7)."""
    def fail(what: str):
        raise ValueError(f"quantized_matmul_dx: {what}")

    check_bits_and_group_size("quantized_matmul_dx", group_size, bits)
    if w_q.ndim != 2 or w_q.dtype != mx.uint32:
        fail(f"w_q must be a 2-D uint32 array (N, K * bits / 32), got {w_q.shape}")
    if dy.ndim < 1 or dy.dtype not in FLOATS:
        fail(f"dy must be float32, float16 or bfloat16 with shape (..., N), got {dy.shape}")
    N = w_q.shape[0]
    if dy.shape[-1] != N:
        fail(f"dy has N = {dy.shape[-1]} but w_q {w_q.shape} has {N} rows")
    check_scales_and_biases("quantized_matmul_dx", w_q, scales, biases, group_size, bits)


def quantized_matmul_dx_mlx(dy: mx.array, w_q: mx.array, scales: mx.array, biases: mx.array,
                            group_size: int = 64, bits: int = 4) -> mx.array:
    """dy (..., N) @ dequantize(w_q, scales, biases) (N, K) -> (..., K) in dy's dtype: the x-gradient
    of y = x W^T, the pure-MLX twin, accumulated in fp32 (topic 4.7)."""
    check_quantized_matmul_dx(dy, w_q, scales, biases, group_size, bits)
    w = dequantize(w_q, scales, biases, group_size, bits, mx.float32)  # (N, K)
    return (dy.astype(mx.float32) @ w).astype(dy.dtype)


_dx_kernel = getattr(kernels, "quantized_matmul_dx", None)  # None when tiny_llm_kernels is absent or older


def quantized_matmul_dx(dy: mx.array, w_q: mx.array, scales: mx.array, biases: mx.array,
                        group_size: int = 64, bits: int = 4) -> mx.array:
    """dy (..., N) @ dequantize(w_q, scales, biases) -> (..., K) in dy's dtype, fp32 accumulation: the
    C++ kernel on the CPU when built (it checks the same in C++), else the twin (topic 4.7)."""
    if _dx_kernel is not None and mx.default_device() == mx.cpu:
        return _dx_kernel(dy, w_q, scales, biases, group_size, bits)
    return quantized_matmul_dx_mlx(dy, w_q, scales, biases, group_size, bits)


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
    same triples to fp32, the dense twin of the quantized model. Attention, RMSNorm, RoPE and the
    SwiGLU product run on impl.train.layers' kernels (topic 4.7)."""
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
    # attention, RMSNorm, RoPE and SwiGLU on week 4's kernels, which have vjps (week 2's fused ones have none)
    model = Model(args, weights, sdpa=layers.sdpa, norm=layers.TrainRMSNorm, rope=layers.TrainRoPE)
    for layer in model.layers:
        if isinstance(layer.mlp, MLP):
            layer.mlp.act, layer.mlp.silu_mul = layers.silu, layers.silu_mul
    return model
