"""A weight kept quantized (week 2): the MLX affine triple plus its layout, used by
`linear` and `Embedding` in place of a dense array, so the model never holds a
dequantized copy."""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx

import impl.quantize as _quantize
from impl.native import kernels
from impl.quantize import dequantize, quantized_matmul

_int8_pack = getattr(kernels, "quantized_matmul_int8_pack", None)  # None without the C++ kernels


@dataclass
class QuantizedWeight:
    """(N, K) weight as w_q (N, K*bits/32) uint32 + scales/biases (N, K/group_size)."""

    w_q: mx.array
    scales: mx.array
    biases: mx.array
    group_size: int
    bits: int
    # The matmuls' precision for this weight ("fp32", "bf16", "int8"); None: impl.quantize.MATMUL_PRECISION.
    precision: str | None = None
    # (w_q, scales, biases, packed): int8_packed()'s array and the arrays it was made from
    _int8: tuple | None = field(default=None, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K) of the dense weight."""
        return self.w_q.shape[0], self.w_q.shape[1] * 32 // self.bits

    def matmul_t(self, x: mx.array) -> mx.array:
        """x (..., K) @ W.T -> (..., N), on the quantized-matmul kernel when it is built."""
        return quantized_matmul(x, self.w_q, self.scales, self.biases, self.group_size, self.bits,
                                precision=self.precision, int8_packed=self.int8_packed())

    def int8_packed(self) -> mx.array | None:
        """This weight packed for the int8 kernels when matmuls run at precision "int8" on them
        (`precision`, else impl.quantize.MATMUL_PRECISION; else None): made at the first such matmul and kept while
        w_q, scales and biases are the arrays it was made from (a weight given new arrays is packed
        again). Without it the kernel packs the weight at every call; the bits are the same."""
        # The cheap test first: every matmul of a decode step asks (about 120 a token).
        if (self.precision or _quantize.MATMUL_PRECISION) != "int8" or _int8_pack is None or mx.default_device() != mx.cpu:
            return None
        kept = self._int8
        if kept is None or kept[0] is not self.w_q or kept[1] is not self.scales or kept[2] is not self.biases:
            packed = _int8_pack(self.w_q, self.scales, self.biases, self.group_size, self.bits)
            self._int8 = kept = (self.w_q, self.scales, self.biases, packed)
        return kept[3]

    def take(self, ids) -> QuantizedWeight:
        """The entries `ids` of the leading axis (rows of an (N, K) weight, experts of a stacked (X, N, K)
        one) as a QuantizedWeight of the same layout and precision: the triples indexed, nothing decoded."""
        return QuantizedWeight(self.w_q[ids], self.scales[ids], self.biases[ids], self.group_size, self.bits,
                               self.precision)

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
        return QuantizedWeight(rows("w_q"), rows("scales"), rows("biases"), first.group_size, first.bits, first.precision)

    def can_stack(self, other: QuantizedWeight) -> bool:
        """Whether `stack` takes the two: same K, group size, bit width, scale dtype and precision."""
        return ((self.shape[1], self.group_size, self.bits, self.scales.dtype, self.biases.dtype, self.precision)
                == (other.shape[1], other.group_size, other.bits, other.scales.dtype, other.biases.dtype, other.precision))

    @property
    def nbytes(self) -> int:
        """Bytes held: packed values, scales and biases."""
        return self.w_q.nbytes + self.scales.nbytes + self.biases.nbytes
