"""Affine group quantization, MLX's format: w = scale * q + bias per group of `group_size`
along the input dimension, q packed little-endian into uint32 words (topic 1.5; kernels in 2.2)."""

from __future__ import annotations

import mlx.core as mx

from impl.native import gpu_kernel, gpu_works, kernels


def dequantize(w_q: mx.array, scales: mx.array, biases: mx.array, group_size: int = 64,
               bits: int = 4, dtype: mx.Dtype = mx.float32) -> mx.array:
    """(N, K * bits / 32) uint32 + (N, K / group_size) scales/biases -> (N, K) `dtype`."""
    per_word = 32 // bits
    N = w_q.shape[0]
    shifts = mx.arange(0, 32, bits, dtype=mx.uint32)  # (per_word,)
    # Value i of a word sits at bits [i*bits, (i+1)*bits): the first value is the low bits.
    q = (w_q[..., None] >> shifts) & ((1 << bits) - 1)  # (N, K/per_word, per_word)
    q = q.reshape(N, -1, group_size).astype(mx.float32)  # (N, K/group_size, group_size)
    w = q * scales[..., None].astype(mx.float32) + biases[..., None].astype(mx.float32)
    return w.reshape(N, w_q.shape[1] * per_word).astype(dtype)


def quantized_matmul_mlx(x: mx.array, w_q: mx.array, scales: mx.array, biases: mx.array,
                         group_size: int = 64, bits: int = 4) -> mx.array:
    """x (..., K) @ dequantize(w_q, scales, biases).T -> (..., N) in x's dtype; the pure-MLX twin."""
    w = dequantize(w_q, scales, biases, group_size, bits, mx.float32)  # (N, K)
    return (x.astype(mx.float32) @ w.T).astype(x.dtype)  # (..., N), accumulated in fp32


def quantized_matmul(x: mx.array, w_q: mx.array, scales: mx.array, biases: mx.array,
                     group_size: int = 64, bits: int = 4) -> mx.array:
    """x (..., K) @ dequantize(w_q, scales, biases).T: the C++ kernel on the CPU, the Metal/CUDA one
    (topic 2.3) on a GPU, when built; else the twin."""
    if _kernel is not None and mx.default_device() == mx.cpu:
        return _kernel(x, w_q, scales, biases, group_size, bits)
    gpu = gpu_kernel("quantized_matmul")
    if gpu is not None and gpu_works("quantized_matmul", (x.dtype, scales.dtype, group_size, bits)):
        return gpu(x, w_q, scales, biases, group_size, bits)
    return quantized_matmul_mlx(x, w_q, scales, biases, group_size, bits)


_kernel = getattr(kernels, "quantized_matmul", None)  # None when tiny_llm_kernels is absent or lacks it
