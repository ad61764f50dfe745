"""GGUF block formats decoded with numpy, and mapped onto MLX's affine triples where exact (topic 1.5).

Every format here is affine per group: w = scale * q + bias, q an unsigned integer. The block
layouts are llama.cpp's (ggml-common.h, ggml-quants.c):
  Q4_0  32 values: d f16, 16 bytes of nibbles (values 0-15 low, 16-31 high); w = d (q - 8)
  Q4_1  32 values: d, m f16, nibbles as Q4_0;                                  w = d q + m
  Q5_0  32 values: d f16, qh u32 (the 5th bits), nibbles as Q4_0;              w = d (q - 16)
  Q5_1  32 values: d, m f16, qh, nibbles;                                      w = d q + m
  Q8_0  32 values: d f16, 32 int8;                                             w = d q
  Q4_K  256 values, 8 sub-blocks of 32: d, dmin f16, 12 bytes of 6-bit (sc, m) pairs, 128
        bytes of nibbles (per 64 values: 32 low nibbles, then the 32 high ones); w = d sc q - dmin m
  Q5_K  as Q4_K plus 32 bytes qh: bit 2c+h of qh[l] is the 5th bit of value 64c + 32h + l
  Q6_K  256 values, 16 sub-blocks of 16: 128 bytes ql (low 4 bits), 64 bytes qh (high 2
        bits), 16 int8 scales, d f16;                                          w = d sc (q - 32)
MLX's triples (impl.quantize) take 4 or 8 bits in groups of 32, 64 or 128 (the kernel's
layouts): every 32-value format maps exactly (5-bit q held as 8-bit), and so do Q4_K/Q5_K,
whose sub-blocks are 32 values. Q6_K's 16-value sub-blocks would need groups of 16, which the
kernel lacks, so Q6_K is requantized (`to_affine_8bit`): each group of 32 of llama.cpp's values
goes onto the 8-bit grid from its min to its max. Not exact: a value moves by at most half a
grid step, (max - min) / 510, plus fp32 rounding. A group spans at most 64 steps of its coarser
sub-block (q - 32 is in [-32, 31]; a negative scale flips it), so the grid step is at most 64/255
of that step and a value moves by at most 32/255 of it (about an eighth), a quarter of Q6_K's own
rounding error. It keeps the tensor at 1.25 bytes a value instead of dense fp32's 4.
With the k-quant kernel built, a quantized model keeps 2-D Q4_K and Q6_K tensors in their own
blocks instead (impl.kquant, 0.5625 and 0.82 bytes a value); these triples are then the "affine"
mode (TINY_LLM_KQUANT=affine) and what stacked experts of those types use.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
# type -> bits of the MLX triple it maps to exactly (group size 32); absent: dense only
AFFINE_BITS = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 8, "Q5_1": 8, "Q8_0": 8, "Q4_K": 4, "Q5_K": 8}
REQUANTIZED = {"Q6_K"}  # no exact triple: requantized to the nearest 8-bit one (to_affine_8bit)
GROUP = 32
FLOATS = {"F32": np.float32, "F16": np.float16}


def _f16(b: np.ndarray) -> np.ndarray:
    """(n, 2) bytes -> (n, 1) float32 from little-endian float16."""
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, c, 32) bytes -> (n, c * 64): each 32-byte chunk gives 32 low nibbles then 32 high ones."""
    return np.stack([qs & 0x0F, qs >> 4], axis=-2).reshape(qs.shape[0], -1)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """(n, 4) bytes of a u32 -> (n, 32): bit j (little-endian) is value j's 5th bit, as 0 or 16."""
    return np.unpackbits(qh, axis=-1, bitorder="little") << 4


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes -> (sc, m), (n, 8) each, 6 bits: sub-blocks 0-3 in the low 6 bits of
    bytes 0-3 (sc) and 4-7 (m); 4-7 in the nibbles of bytes 8-11 plus the top 2 bits of 0-7."""
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([lo & 0x3F, (hi & 0x0F) | ((lo >> 6) << 4)], axis=1)
    m = np.concatenate([mid & 0x3F, (hi >> 4) | ((mid >> 6) << 4)], axis=1)
    return sc.astype(np.float32), m.astype(np.float32)


def _q4_0(b):
    d = _f16(b[:, 0:2])
    return _nibbles(b[:, 2:18].reshape(-1, 1, 16)).reshape(-1, 32), d, -8 * d


def _q4_1(b):
    return _nibbles(b[:, 4:20].reshape(-1, 1, 16)).reshape(-1, 32), _f16(b[:, 0:2]), _f16(b[:, 2:4])


def _q5_0(b):
    d = _f16(b[:, 0:2])
    return _nibbles(b[:, 6:22].reshape(-1, 1, 16)) | _fifth_bits(b[:, 2:6]), d, -16 * d


def _q5_1(b):
    q = _nibbles(b[:, 8:24].reshape(-1, 1, 16)) | _fifth_bits(b[:, 4:8])
    return q, _f16(b[:, 0:2]), _f16(b[:, 2:4])


def _q8_0(b):
    d = _f16(b[:, 0:2])
    return (b[:, 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8), d, -128 * d


def _q4_k(b):
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, m = _k_scales(b[:, 4:16])
    return _nibbles(b[:, 16:144].reshape(-1, 4, 32)), d * sc, -(dmin * m)  # scales, biases (n, 8)


def _q5_k(b):
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, m = _k_scales(b[:, 4:16])
    qh = b[:, 16:48]  # (n, 32): bit 2c+h of byte l -> value 64c + 32h + l
    high = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1  # (n, 8, 32)
    return _nibbles(b[:, 48:176].reshape(-1, 4, 32)) | (high.reshape(-1, QK_K) << 4), d * sc, -(dmin * m)


def _q6_k(b):
    """q - 32 (signed) with scale d * sc per 16 values and no bias: the reference's arithmetic."""
    n = b.shape[0]
    ql = b[:, 0:128].reshape(n, 2, 64)  # per 128-value half: bytes l and l+32 hold 4 values each
    qh = b[:, 128:192].reshape(n, 2, 1, 32)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=-1)  # (n, 2, 128): values 0-63 low nibbles, 64-127 high
    high = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]) & 3  # (n, 2, 4, 32): value 32k + l
    q = (low | (high.reshape(n, 2, 128) << 4)).reshape(n, QK_K).astype(np.int8) - np.int8(32)
    scale = _f16(b[:, 208:210]) * b[:, 192:208].view(np.int8).astype(np.float32)  # (n, 16)
    return q, scale, np.zeros_like(scale)


_DECODERS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
             "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}


def decode_blocks(data: np.ndarray, qtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw bytes (rows, row bytes) of `qtype` -> (q (rows, K), scales, biases (rows, K / g)),
    w = scales * q + biases in groups of g = K / scales.shape[1] values."""
    rows = data.shape[0]
    q, scales, biases = _DECODERS[qtype](np.ascontiguousarray(data).reshape(-1, BLOCK_BYTES[qtype]))
    return q.reshape(rows, -1), scales.reshape(rows, -1), biases.reshape(rows, -1)


def dequantize(data: np.ndarray, qtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Raw bytes -> float32 of `shape`, computed as llama.cpp does (w = scale * q + bias in fp32)."""
    if qtype in FLOATS:
        return np.ascontiguousarray(data).view(FLOATS[qtype]).astype(np.float32).reshape(shape)
    if qtype == "BF16":  # the top half of a float32
        return (np.ascontiguousarray(data).view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    q, scales, biases = decode_blocks(data, qtype)
    rows, g = q.shape[0], q.shape[1] // scales.shape[1]
    q = q.reshape(rows, -1, g).astype(np.float32)  # (rows, groups, g)
    return (q * scales[..., None] + biases[..., None]).reshape(shape)


def to_affine(data: np.ndarray, qtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int] | None:
    """Raw bytes (N, row bytes) -> MLX's affine triple (w_q (N, K * bits / 32) uint32, scales,
    biases (N, K / 32) float32) and bits; None for a type that has no exact triple (Q6_K, floats).
    scale * q + bias in fp32 equals `dequantize` bit for bit: d * sc and dmin * m are exact in
    fp32 (11-bit d times a 6-bit sc), so is their product with a 4-5 bit q."""
    bits = AFFINE_BITS.get(qtype)
    if bits is None:
        return None
    q, scales, biases = decode_blocks(data, qtype)  # q (N, K) uint8
    if bits == 4:  # two values a byte, the first in the low nibble
        q = q[:, 0::2] | (q[:, 1::2] << 4)
    w_q = np.ascontiguousarray(q).view(np.uint32)  # little-endian: value i of a word at bits [i*bits, ...)
    return w_q, scales.astype(np.float32), biases.astype(np.float32), bits


def to_affine_8bit(data: np.ndarray, qtype: str, rows_at_once: int = 4096
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Raw bytes (N, row bytes) -> the nearest 8-bit affine triple, groups of 32, for a type with
    no exact one (Q6_K): per group, bias = min and scale = (max - min) / 255 of llama.cpp's
    values, q = round((w - bias) / scale). Not exact; see the module's note for the bound."""
    data = data.reshape(-1, data.shape[-1])  # stacked experts (X, N, row bytes) -> rows
    n, k = data.shape[0], data.shape[1] // BLOCK_BYTES[qtype] * (QK_K if qtype.endswith("_K") else 32)
    w_q = np.empty((n, k // 4), np.uint32)
    scales, biases = np.empty((n, k // GROUP), np.float32), np.empty((n, k // GROUP), np.float32)
    for r in range(0, n, rows_at_once):  # in slices: the output head alone is 233M values
        w = dequantize(data[r:r + rows_at_once], qtype, (-1, k // GROUP, GROUP))  # (rows, groups, 32)
        lo, hi = w.min(axis=-1), w.max(axis=-1)  # (rows, groups)
        scale = (hi - lo) / np.float32(255)
        safe = np.where(scale > 0, scale, np.float32(1))  # a constant group: q = 0, w = bias
        q = np.clip(np.rint((w - lo[..., None]) / safe[..., None]), 0, 255).astype(np.uint8)
        w_q[r:r + rows_at_once] = q.reshape(q.shape[0], -1).view(np.uint32)
        scales[r:r + rows_at_once], biases[r:r + rows_at_once] = scale, lo
    return w_q, scales, biases, 8
