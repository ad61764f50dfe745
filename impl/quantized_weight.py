"""A weight kept quantized (week 2): the MLX affine triple plus its layout, used by
`linear` and `Embedding` in place of a dense array, so the model never holds a
dequantized copy."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from impl.quantize import dequantize, quantized_matmul


@dataclass
class QuantizedWeight:
    """(N, K) weight as w_q (N, K*bits/32) uint32 + scales/biases (N, K/group_size)."""

    w_q: mx.array
    scales: mx.array
    biases: mx.array
    group_size: int
    bits: int

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K) of the dense weight."""
        return self.w_q.shape[0], self.w_q.shape[1] * 32 // self.bits

    def matmul_t(self, x: mx.array) -> mx.array:
        """x (..., K) @ W.T -> (..., N), on the quantized-matmul kernel when it is built."""
        return quantized_matmul(x, self.w_q, self.scales, self.biases, self.group_size, self.bits)

    def rows(self, ids: mx.array, dtype: mx.Dtype = mx.float32) -> mx.array:
        """Dense rows W[ids]: ids (...) -> (..., K), dequantizing only those rows (embedding lookup)."""
        flat = ids.reshape(-1)
        dense = dequantize(self.w_q[flat], self.scales[flat], self.biases[flat], self.group_size, self.bits, dtype)
        return dense.reshape(*ids.shape, dense.shape[-1])

    @staticmethod
    def stack(weights: list[QuantizedWeight]) -> QuantizedWeight:
        """One (N_1 + N_2 + ..., K) weight from weights of one K and layout: their rows, in order."""
        first = weights[0]
        assert all(first.can_stack(w) for w in weights), "stacked weights need one K and one layout"
        rows = lambda name: mx.concatenate([getattr(w, name) for w in weights])  # noqa: E731
        return QuantizedWeight(rows("w_q"), rows("scales"), rows("biases"), first.group_size, first.bits)

    def can_stack(self, other: QuantizedWeight) -> bool:
        """Whether `stack` takes the two: same K, group size, bit width and scale dtype."""
        return ((self.shape[1], self.group_size, self.bits, self.scales.dtype, self.biases.dtype)
                == (other.shape[1], other.group_size, other.bits, other.scales.dtype, other.biases.dtype))

    @property
    def nbytes(self) -> int:
        """Bytes held: packed values, scales and biases."""
        return self.w_q.nbytes + self.scales.nbytes + self.biases.nbytes
