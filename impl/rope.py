"""Rotary position embedding (topic 1.2), in both layouts.

traditional=True rotates interleaved pairs (x0, x1), (x2, x3), ... (the RoFormer
paper, llama.cpp); traditional=False rotates the half-split pairs
(x_i, x_{i + D/2}) (Hugging Face Llama and Qwen2).
"""

from __future__ import annotations

import numbers

import mlx.core as mx


class RoPE:
    """Precomputed cos/sin tables for positions [0, seq_len), applied to (N, L, H, D) inputs."""

    def __init__(self, dims: int, seq_len: int, base: float = 10000.0, traditional: bool = False):
        assert dims % 2 == 0, "RoPE needs an even number of dims"
        self.dims, self.seq_len, self.traditional = dims, seq_len, traditional
        inv_freq = 1.0 / (base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims))  # (D/2,)
        angles = mx.arange(seq_len, dtype=mx.float32)[:, None] * inv_freq[None, :]  # (seq_len, D/2)
        self.cos, self.sin = mx.cos(angles), mx.sin(angles)

    def _tables(self, L: int, offset) -> tuple[mx.array, mx.array]:
        """cos, sin for the L positions given by offset: (L, D/2) or, per sequence, (N, L, D/2)."""
        if offset is None:
            offset = 0
        if isinstance(offset, mx.array) and offset.ndim == 0:
            offset = int(offset.item())
        if isinstance(offset, numbers.Integral):  # the common case: a slice of the tables, no gather
            offset = slice(int(offset), int(offset) + L)
        if isinstance(offset, slice):
            start, stop = offset.start or 0, offset.stop
            assert stop - start == L, f"offset {offset} covers {stop - start} positions, input has {L}"
            self._check(stop - 1, first=start)
            return self.cos[start:stop], self.sin[start:stop]
        starts = offset if isinstance(offset, mx.array) else mx.array(offset)  # one start per sequence
        values = starts.tolist()  # one read of the N starts
        self._check(max(values) + L - 1, first=min(values))
        pos = starts[:, None] + mx.arange(L)[None, :]  # (N, L)
        return self.cos[pos], self.sin[pos]

    def _check(self, last: int, first: int = 0) -> None:
        """Positions first..last must lie in the table [0, seq_len)."""
        if first < 0:
            raise ValueError(f"position {first} is before the RoPE table (positions start at 0)")
        if last >= self.seq_len:
            raise ValueError(f"position {last} is past the RoPE table of {self.seq_len}")

    def __call__(self, x: mx.array, offset: int | slice | list[int] | mx.array | None = None) -> mx.array:
        """x: (N, L, H, D) -> same shape, rotated by the positions `offset` names."""
        N, L, H, D = x.shape
        cos, sin = self._tables(L, offset)
        rows = cos.shape[0] if cos.ndim == 3 else 1  # per sequence, or one table for all
        cos = cos.reshape(rows, L, 1, D // 2)  # (1 or N, L, 1, D/2), broadcast over heads
        sin = sin.reshape(rows, L, 1, D // 2)
        if self.traditional:
            x = x.reshape(N, L, H, D // 2, 2)
            x1, x2 = x[..., 0], x[..., 1]
        else:
            x1, x2 = x[..., : D // 2], x[..., D // 2:]
        # (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos), each pair by its own angle
        y1 = x1 * cos - x2 * sin
        y2 = x1 * sin + x2 * cos
        y = mx.stack([y1, y2], axis=-1) if self.traditional else mx.concatenate([y1, y2], axis=-1)
        return y.reshape(N, L, H, D).astype(x.dtype)
