"""A weight kept in GGUF k-quant blocks as the file stores them (Q4_K, Q6_K; week 2), used by
`linear`, `Embedding` and the fused layer in place of a QuantizedWeight (impl.kquant)."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from impl.kquant import BLOCK_BYTES, QK, dequantize_kquant, kquant_matmul


@dataclass
class KQuantWeight:
    """(N, K) weight as runs of rows of one block type each: parts[i] (N_i, K / 256 * block bytes) uint8
    of types[i]. One part for a tensor read from a file; several where stacked q/k/v mix Q4_K and Q6_K.
    x_int8: multiply with x rounded per block of 256 to int8 (impl.kquant), else with x as given."""

    parts: tuple[mx.array, ...]
    types: tuple[str, ...]
    x_int8: bool = True

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K) of the dense weight."""
        p, t = self.parts[0], self.types[0]
        return sum(q.shape[0] for q in self.parts), p.shape[1] // BLOCK_BYTES[t] * QK

    def matmul_t(self, x: mx.array) -> mx.array:
        """x (..., K) @ W.T -> (..., N), on the k-quant kernel when it is built."""
        return kquant_matmul(x, self.parts, self.types, self.x_int8)

    def rows(self, ids: mx.array, dtype: mx.Dtype = mx.float32) -> mx.array:
        """Dense rows W[ids]: ids (...) -> (..., K), decoding only those rows (embedding lookup)."""
        flat = ids.reshape(-1)
        if len(self.parts) == 1:
            dense = dequantize_kquant(self.parts[0][flat], self.types[0], dtype)
        else:  # stacked projections are never looked up by row: decode all, simply
            dense = mx.concatenate([dequantize_kquant(p, t, dtype) for p, t in zip(self.parts, self.types, strict=True)])[flat]
        return dense.reshape(*ids.shape, dense.shape[-1])

    def take(self, ids) -> KQuantWeight:
        """Rows `ids` as a KQuantWeight of the same type and x mode: the blocks indexed, nothing decoded.
        One part only (a stacked q/k/v's runs are not taken apart): a ValueError otherwise."""
        if len(self.parts) != 1:
            raise ValueError("rows of a KQuantWeight with several parts (stacked projections) are not taken")
        return KQuantWeight((self.parts[0][ids],), self.types, self.x_int8)

    def map_rows(self, fn) -> KQuantWeight:
        """The weight with fn applied to its (one part's) rows, e.g. impl.gguf.unpermute_rows: rows move whole."""
        assert len(self.parts) == 1, "map_rows takes a weight of one part"
        return KQuantWeight((fn(self.parts[0]),), self.types, self.x_int8)

    @staticmethod
    def stack(weights: list[KQuantWeight]) -> KQuantWeight:
        """One (N_1 + N_2 + ..., K) weight from weights of one K: their rows in order, runs of one type merged."""
        first = weights[0]
        assert all(first.can_stack(w) for w in weights), "stacked weights need one K and one x mode"
        runs: list[tuple[str, list[mx.array]]] = []
        for w in weights:
            for p, t in zip(w.parts, w.types, strict=True):
                if runs and runs[-1][0] == t:
                    runs[-1][1].append(p)
                else:
                    runs.append((t, [p]))
        parts = tuple(ps[0] if len(ps) == 1 else mx.concatenate(ps) for _, ps in runs)
        return KQuantWeight(parts, tuple(t for t, _ in runs), first.x_int8)

    def can_stack(self, other) -> bool:
        """Whether `stack` takes the two: both k-quant weights of one K and one x mode."""
        return isinstance(other, KQuantWeight) and self.shape[1] == other.shape[1] and self.x_int8 == other.x_int8

    @property
    def nbytes(self) -> int:
        """Bytes held: the blocks, as in the file."""
        return sum(p.nbytes for p in self.parts)
