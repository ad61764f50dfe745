"""Affine group quantization, MLX's format: w = scale * q + bias per group of `group_size`
along the input dimension, q packed little-endian into uint32 words (topic 1.5; kernels in 2.2)."""

from __future__ import annotations

import math
import os

import mlx.core as mx

from impl.native import gpu_kernel, gpu_works, kernels


def dequantize(w_q: mx.array, scales: mx.array, biases: mx.array, group_size: int = 64,
               bits: int = 4, dtype: mx.Dtype = mx.float32) -> mx.array:
    """(..., N, K * bits / 32) uint32 + (..., N, K / group_size) scales/biases -> (..., N, K) `dtype`
    (leading axes: the stacked experts of a mixture of experts)."""
    per_word = 32 // bits
    lead = w_q.shape[:-1]  # (..., N)
    shifts = mx.arange(0, 32, bits, dtype=mx.uint32)  # (per_word,)
    # Value i of a word sits at bits [i*bits, (i+1)*bits): the first value is the low bits.
    q = (w_q[..., None] >> shifts) & ((1 << bits) - 1)  # (..., N, K/per_word, per_word)
    K = w_q.shape[-1] * per_word
    q = q.reshape(*lead, K // group_size, group_size).astype(mx.float32)  # (..., N, K/group_size, group_size)
    w = q * scales[..., None].astype(mx.float32) + biases[..., None].astype(mx.float32)
    return w.reshape(*lead, K).astype(dtype)


FLOATS = (mx.float32, mx.float16, mx.bfloat16)


def check_quantized_matmul(x: mx.array, w_q: mx.array, scales: mx.array, biases: mx.array,
                           group_size: int, bits: int) -> None:
    """One-line ValueErrors for what neither the twin nor the kernels compute: 4 or 8 bits, groups of
    32, 64 or 128, w_q (N, K * bits / 32) uint32, x (..., K) and scales/biases (N, K / group_size), float."""
    def fail(what: str):
        raise ValueError(f"quantized_matmul: {what}")

    check_bits_and_group_size("quantized_matmul", group_size, bits)
    if w_q.ndim != 2 or w_q.dtype != mx.uint32:
        fail(f"w_q must be a 2-D uint32 array (N, K * bits / 32), got {w_q.shape} {_name(w_q.dtype)}")
    if x.ndim < 1 or x.dtype not in FLOATS:
        fail(f"x must be float32, float16 or bfloat16 with shape (..., K), got {x.shape} {_name(x.dtype)}")
    K = w_q.shape[1] * 32 // bits
    if x.shape[-1] != K:
        fail(f"x has K = {x.shape[-1]} but w_q {w_q.shape} holds {K} {bits}-bit values per row")
    check_scales_and_biases("quantized_matmul", w_q, scales, biases, group_size, bits)


def check_bits_and_group_size(op: str, group_size: int, bits: int) -> None:
    """ValueError "<op>: ..." unless 4 or 8 bits in groups of 32, 64 or 128, what the kernels compute (topic 2.2)."""
    if bits not in (4, 8):
        raise ValueError(f"{op}: bits must be 4 or 8, got {bits}")
    if group_size not in (32, 64, 128):
        raise ValueError(f"{op}: group_size must be 32, 64 or 128, got {group_size}")


def check_scales_and_biases(op: str, w_q: mx.array, scales: mx.array, biases: mx.array,
                            group_size: int, bits: int) -> None:
    """ValueError "<op>: ..." unless w_q (..., N, K * bits / 32) holds K, a positive multiple of group_size,
    values per row and scales/biases are float (..., N, K / group_size) (topic 2.2)."""
    K = w_q.shape[-1] * 32 // bits
    groups = (*w_q.shape[:-1], K // group_size)  # (..., N, K / group_size)
    if K == 0 or K % group_size:
        raise ValueError(f"{op}: K = {K} must be a positive multiple of group_size = {group_size}")
    if scales.shape != groups or biases.shape != scales.shape:
        raise ValueError(f"{op}: scales and biases must be {groups}, got {scales.shape} and {biases.shape}")
    if scales.dtype not in FLOATS or biases.dtype not in FLOATS:
        raise ValueError(f"{op}: scales and biases must be float32, float16 or bfloat16")


def _name(dtype: mx.Dtype) -> str:
    return str(dtype).removeprefix("mlx.core.")


def quantized_matmul_mlx(x: mx.array, w_q: mx.array, scales: mx.array, biases: mx.array,
                         group_size: int = 64, bits: int = 4) -> mx.array:
    """x (..., K) @ dequantize(w_q, scales, biases).T -> (..., N) in x's dtype; the pure-MLX twin."""
    check_quantized_matmul(x, w_q, scales, biases, group_size, bits)
    w = dequantize(w_q, scales, biases, group_size, bits, mx.float32)  # (N, K)
    return (x.astype(mx.float32) @ w.T).astype(x.dtype)  # (..., N), accumulated in fp32


def quantized_matmul_bf16_mlx(x: mx.array, w_q: mx.array, scales: mx.array, biases: mx.array,
                              group_size: int = 64, bits: int = 4) -> mx.array:
    """x (..., K) @ dequantize(w_q, scales, biases).T with both operands rounded to bfloat16 and the
    products accumulated in float32 -> (..., N) in x's dtype: the twin of the kernel's
    precision="bf16". bf16 x bf16 products are exact in float32, so the kernel differs from this
    only in the order of the float32 additions."""
    check_quantized_matmul(x, w_q, scales, biases, group_size, bits)
    w = dequantize(w_q, scales, biases, group_size, bits, mx.float32)  # (N, K): multiply, add, in fp32
    w = w.astype(mx.bfloat16).astype(mx.float32)  # rounded to bf16, nearest even
    xb = x.astype(mx.bfloat16).astype(mx.float32)  # (..., K)
    return (xb @ w.T).astype(x.dtype)  # (..., N), accumulated in fp32


def quantize_x_int8(x: mx.array, group_size: int) -> tuple[mx.array, mx.array]:
    """x (..., K) -> (xq (..., G, group_size) float32 integers in [-127, 127], dx (..., G) float32),
    G = K / group_size: per group dx = max|x| / 127 and xq = round(x / dx), ties to even (llama.cpp's
    Q8 activations); xq = 0 where dx = 0. x = dx * xq + e with |e| <= dx / 2 per value. A group
    holding a NaN or an infinity gets dx = NaN and xq = 0: its row's outputs are NaN, as in fp32."""
    xg = x.astype(mx.float32).reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)  # (..., G, group_size)
    finite = mx.all(mx.isfinite(xg), axis=-1)  # (..., G)
    dx = mx.where(finite, mx.max(mx.abs(xg), axis=-1) / 127.0, mx.nan)  # (..., G), fp32 division
    d = dx[..., None]
    xq = mx.where(d > 0, mx.clip(mx.round(xg / mx.where(d > 0, d, 1)), -127, 127), 0)
    return xq, dx


def quantized_matmul_int8_mlx(x: mx.array, w_q: mx.array, scales: mx.array, biases: mx.array,
                              group_size: int = 64, bits: int = 4) -> mx.array:
    """x (..., K) @ dequantize(w_q, scales, biases).T with x rounded to int8 per row per group
    (quantize_x_int8) -> (..., N) in x's dtype: the twin of the kernel's precision="int8".

    Per group g: isum = sum_k q_k xq_k (W's unsigned quants times x's, an integer), then in fp32,
    rounded op by op, groups in order from y = 0:  y = y + (isum * (dw * dx) + bias * (dx * sum xq)).
    isum is computed by an fp32 matmul, yet exactly: every product and partial sum is an integer
    below 255 * 127 * 128 < 2^24, so any summation order gives it. The kernel does the same float
    operations in the same order on the same integers: its output equals this one bit for bit."""
    check_quantized_matmul(x, w_q, scales, biases, group_size, bits)
    lead, K, N = x.shape[:-1], x.shape[-1], w_q.shape[0]
    G = K // group_size
    M = math.prod(lead)
    xq, dx = quantize_x_int8(x.reshape(M, K), group_size)  # (M, G, gs), (M, G)
    xc = dx * xq.sum(-1)  # (M, G): dx * sum xq (the sum is an exact integer)
    shifts = mx.arange(0, 32, bits, dtype=mx.uint32)
    q = ((w_q[..., None] >> shifts) & ((1 << bits) - 1)).reshape(N, G, group_size).astype(mx.float32)
    isum = xq.transpose(1, 0, 2) @ q.transpose(1, 2, 0)  # (G, M, N), exact integers
    dw, bw = scales.astype(mx.float32), biases.astype(mx.float32)  # (N, G)
    y = mx.zeros((M, N), dtype=mx.float32)  # (M, N)
    for g in range(G):  # one group after the other: the kernel's order
        a = dw[:, g] * dx[:, g, None]  # (M, N): dw * dx
        y = y + (isum[g] * a + bw[:, g] * xc[:, g, None])
    return y.reshape(*lead, N).astype(x.dtype)


PRECISIONS = ("fp32", "bf16", "int8")
# "bf16" (TINY_LLM_MATMUL_PRECISION=bf16): AVX512-BF16 dot products, 2-3x the fp32 FLOPS from
# about 64 rows (kernels/check_qmm_bf16.py); fp32, the exact path, is the default.
# "int8" (TINY_LLM_MATMUL_PRECISION=int8): x rounded to int8 per row per group, integer dots
# (AVX512-VNNI); at every row count, so a row's bits never depend on its batch (no fallback).
MATMUL_PRECISION = os.environ.get("TINY_LLM_MATMUL_PRECISION", "fp32")
BF16_MIN_ROWS = 16  # below this many rows the fp32 kernel is as fast or faster: batch-1 decode stays fp32


def matmul_precision(x: mx.array, precision: str | None = None) -> str:
    """`precision` (None: MATMUL_PRECISION), except that bf16 falls back to fp32 below BF16_MIN_ROWS
    rows; int8 runs at every row count."""
    p = MATMUL_PRECISION if precision is None else precision
    if p not in PRECISIONS:
        raise ValueError(f"quantized_matmul: precision must be 'fp32', 'bf16' or 'int8', got '{p}'")
    if p == "int8":
        return p
    rows = x.size // x.shape[-1] if x.ndim and x.shape[-1] else 0
    return "bf16" if p == "bf16" and rows >= BF16_MIN_ROWS else "fp32"


def quantized_matmul(x: mx.array, w_q: mx.array, scales: mx.array, biases: mx.array,
                     group_size: int = 64, bits: int = 4, precision: str | None = None,
                     int8_packed: mx.array | None = None) -> mx.array:
    """x (..., K) @ dequantize(w_q, scales, biases).T: the C++ kernel on the CPU, the Metal/CUDA one
    (topic 2.3) on a GPU, when built; else the twin. precision: see matmul_precision. int8_packed:
    the weight packed once for the int8 kernel (QuantizedWeight.int8_packed), else it packs it."""
    p = matmul_precision(x, precision)
    if _kernel is not None and mx.default_device() == mx.cpu:
        packed = {"int8_packed": int8_packed} if int8_packed is not None else {}
        return _kernel(x, w_q, scales, biases, group_size, bits, precision=p, **packed)  # it checks the same in C++
    gpu = gpu_kernel("quantized_matmul")  # it checks the same too (tiny_llm_kernels.gpu.check_quantized)
    if gpu is not None and gpu_works("quantized_matmul", (x.dtype, scales.dtype, group_size, bits)):
        return gpu(x, w_q, scales, biases, group_size, bits)  # fp32: the GPU kernels have no bf16/int8 mode
    twin = {"bf16": quantized_matmul_bf16_mlx, "int8": quantized_matmul_int8_mlx}.get(p, quantized_matmul_mlx)
    return twin(x, w_q, scales, biases, group_size, bits)


_kernel = getattr(kernels, "quantized_matmul", None)  # None when tiny_llm_kernels is absent or lacks it
