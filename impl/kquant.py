"""GGUF k-quants multiplied as the file stores them (topic 2.2): Q4_K and Q6_K blocks, no conversion.

impl.gguf_quants maps Q4_K onto MLX's affine triples (fp32 scales and biases: 0.75 bytes a value
where the file has 0.5625) and requantizes Q6_K to 8 bits (1.25 bytes where it has 0.82). At
batch-1 decode the weights' bytes are the cost, so the kernel here (tiny_llm_kernels.kquant_matmul)
reads the blocks themselves. The layouts are llama.cpp's (ggml-common.h), 256 values a block:
  Q4_K  144 bytes: d, dmin fp16; 12 bytes of 6-bit (sc, m) for 8 sub-blocks of 32; 128 bytes of
        nibbles (per 64 values: 32 low nibbles, then the 32 high ones).  w = (d sc) q - (dmin m)
  Q6_K  210 bytes: ql 128 (low 4 bits), qh 64 (high 2 bits), 16 int8 scales (sub-blocks of 16),
        d fp16.                                                        w = (d sc) (q - 32)
Every w is exact in fp32. Two modes (KQUANT_MODES):
  "fp32": x @ w.T with x as given; the kernel differs from the twin only in the order of fp32 sums.
  "int8": x first rounded per block of 256 values to int8 (d = max|x| / 127, q = round(x / d), ties
        to even), as llama.cpp does with its Q8_K activations: then the kernel's decode path sums
        q_w * q_x in exact integers (AVX-512 VNNI). An approximation of x: each value moves by at
        most d / 2, so |y_int8 - y_fp32| <= sum over blocks of d / 2 * sum |w| over the block.
The twin (`kquant_matmul_mlx`) decodes the blocks with MLX ops, rounds x the same way in "int8"
mode, and multiplies in fp32.
"""

from __future__ import annotations

import os

import mlx.core as mx

from impl.native import kernels

QK = 256  # values a block
BLOCK_BYTES = {"Q4_K": 144, "Q6_K": 210}
KQUANT_MODES = ("int8", "fp32", "affine")  # affine: impl.gguf_quants' triples (Q4_K exact, Q6_K requantized)
# How a GGUF's Q4_K and Q6_K tensors are kept and multiplied (TINY_LLM_KQUANT), when the kernel is built.
KQUANT_MODE = os.environ.get("TINY_LLM_KQUANT", "int8")


def _f16(b: mx.array) -> mx.array:
    """(n, 2) bytes -> (n, 1) float32 from little-endian float16."""
    return mx.view(b, mx.float16).astype(mx.float32)


def _q4_k(b: mx.array) -> mx.array:
    """(n, 144) Q4_K blocks -> (n, 256) float32."""
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])  # (n, 1)
    lo, mid, hi = b[:, 4:8], b[:, 8:12], b[:, 12:16]  # 6-bit (sc, m): see impl.gguf_quants._k_scales
    sc = mx.concatenate([lo & 63, (hi & 15) | ((lo >> 6) << 4)], axis=1).astype(mx.float32)  # (n, 8)
    m = mx.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=1).astype(mx.float32)
    qs = b[:, 16:144].reshape(n, 4, 1, 32)  # per 64 values: 32 bytes
    q = mx.concatenate([qs & 15, qs >> 4], axis=2).reshape(n, 8, 32).astype(mx.float32)  # sub-block 2c, 2c + 1
    return (q * (d * sc)[..., None] - (dmin * m)[..., None]).reshape(n, QK)


def _q6_k(b: mx.array) -> mx.array:
    """(n, 210) Q6_K blocks -> (n, 256) float32."""
    n = b.shape[0]
    ql = b[:, 0:128].reshape(n, 2, 2, 32)  # per half of 128 values: ql[0:32], ql[32:64]
    qh = b[:, 128:192].reshape(n, 2, 1, 32)
    low = mx.concatenate([ql & 15, ql >> 4], axis=2)  # (n, 2, 4, 32): value 32k + l of each half
    high = (qh >> mx.array([0, 2, 4, 6], dtype=mx.uint8).reshape(1, 1, 4, 1)) & 3  # bits 2k, 2k + 1 of qh[l]
    q = (low | (high << 4)).reshape(n, 16, 16).astype(mx.float32) - 32  # (n, sub-block, 16)
    scale = _f16(b[:, 208:210]) * mx.view(b[:, 192:208], mx.int8).astype(mx.float32)  # (n, 16)
    return (q * scale[..., None]).reshape(n, QK)


_DECODERS = {"Q4_K": _q4_k, "Q6_K": _q6_k}


def dequantize_kquant(data: mx.array, qtype: str, dtype: mx.Dtype = mx.float32) -> mx.array:
    """(..., N, K / 256 * block bytes) uint8 of `qtype` -> (..., N, K) `dtype`: llama.cpp's values, exact."""
    lead = data.shape[:-1]
    w = _DECODERS[qtype](data.reshape(-1, BLOCK_BYTES[qtype]))  # (blocks, 256)
    return w.reshape(*lead, -1).astype(dtype)


def quantize_x_int8(x: mx.array) -> mx.array:
    """x (..., K) -> float32 x rounded as "int8" mode rounds it: per block of 256, d = max|x| / 127,
    d * round(x / d) (ties to even; 0 where d = 0)."""
    xb = x.astype(mx.float32).reshape(*x.shape[:-1], -1, QK)  # (..., K / 256, 256)
    d = mx.max(mx.abs(xb), axis=-1, keepdims=True) / 127
    q = mx.where(d > 0, mx.round(xb / mx.where(d > 0, d, 1)), 0)
    return (q * d).reshape(x.shape)


def check_kquant_matmul(x: mx.array, parts, types) -> None:
    """One-line ValueErrors for what neither the twin nor the kernel computes, in the kernel's words."""
    def fail(what: str):
        raise ValueError(f"kquant_matmul: {what}")

    if not parts or len(parts) != len(types):
        fail(f"parts and types must be non-empty lists of one length, got {len(parts)} and {len(types)}")
    if x.ndim < 1 or x.dtype not in (mx.float32, mx.float16, mx.bfloat16):
        fail(f"x must be float32, float16 or bfloat16 with shape (..., K), got {tuple(x.shape)}")
    K = x.shape[-1]
    if K == 0 or K % QK:
        fail(f"x has K = {K}, which must be a positive multiple of 256 (a k-quant block)")
    for i, (p, t) in enumerate(zip(parts, types, strict=True)):
        if t not in BLOCK_BYTES:
            fail(f"types must be 'Q4_K' or 'Q6_K', got '{t}'")
        row_bytes = K // QK * BLOCK_BYTES[t]
        if p.ndim != 2 or p.dtype != mx.uint8 or p.shape[1] != row_bytes:
            fail(f"part {i} ({t}) must be a (N, {row_bytes}) uint8 array for K = {K}, got {tuple(p.shape)}")


def kquant_matmul_mlx(x: mx.array, parts, types, x_int8: bool = False) -> mx.array:
    """x (..., K) @ W.T -> (..., N) in x's dtype, W the rows of `parts` (each (N_i, row bytes) uint8 of
    types[i]) decoded to fp32; x rounded by quantize_x_int8 first if x_int8. The pure-MLX twin."""
    check_kquant_matmul(x, parts, types)
    w = mx.concatenate([dequantize_kquant(p, t) for p, t in zip(parts, types, strict=True)])  # (N, K)
    xf = quantize_x_int8(x) if x_int8 else x.astype(mx.float32)
    return (xf @ w.T).astype(x.dtype)  # (..., N), accumulated in fp32


def kquant_matmul(x: mx.array, parts, types, x_int8: bool = False) -> mx.array:
    """x (..., K) @ W.T: the C++ kernel on the CPU when built, else the twin."""
    if _kernel is not None and mx.default_device() == mx.cpu:
        return _kernel(x, list(parts), list(types), x_int8=x_int8)  # it checks the same in C++
    return kquant_matmul_mlx(x, parts, types, x_int8)


_kernel = getattr(kernels, "kquant_matmul", None)  # None when tiny_llm_kernels is absent or lacks it
