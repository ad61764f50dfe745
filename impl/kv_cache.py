"""The KV cache (topic 2.1): keys and values of past positions, kept per layer so each
decode step runs the model on the new token only.

Every cache variant implements one protocol, so the model never changes when the
cache does: `update_and_fetch(keys, values)`, `offset`, `trim(n)`, `nbytes`, `state`.
"""

from __future__ import annotations

import mlx.core as mx


class KVCache:
    """A dense cache for one layer: (N, H_kv, S, D) keys and values, grown in steps.

    dtype: what the buffers store. None (the default) keeps the dtype the keys come in, so a
    cached step computes exactly what recomputing the prefix would. float16 under fp32
    activations (llama.cpp's default cache) halves the cache's memory and the bytes each decode
    step's attention reads; keys and values are rounded to fp16 as they are written.
    """

    step = 256  # grow the buffers this many positions at a time, not on every token

    def __init__(self, dtype: mx.Dtype | None = None):
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0  # positions filled so far; the next token's position
        self.dtype = dtype

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append (N, H_kv, L, D) keys/values; return all (N, H_kv, offset + L, D) so far."""
        N, H_kv, L, D = keys.shape
        self.reserve(N, H_kv, L, D, keys.dtype, values.shape[-1])
        self.keys[..., self.offset:self.offset + L, :] = keys
        self.values[..., self.offset:self.offset + L, :] = values
        self.offset += L
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def reserve(self, N: int, H_kv: int, L: int, D: int, dtype: mx.Dtype, D_v: int | None = None) -> None:
        """Make the buffers, keys (N, H_kv, capacity, D) and values (..., D_v, default D), hold at
        least offset + L positions; they store self.dtype, else `dtype` (the incoming keys')."""
        D_v = D if D_v is None else D_v
        if self.keys is not None:  # every decode step of every layer comes here: one read of each shape
            (n, h, capacity, d), d_v = self.keys.shape, self.values.shape[3]
            if (N, H_kv, D, D_v) != (n, h, d, d_v):  # another model's or batch's keys
                raise ValueError(f"KVCache: keys and values of (N, H_kv, D, D_v) = {(N, H_kv, D, D_v)},"
                                 f" but the cache holds {(n, h, d, d_v)}")
            if self.offset + L <= capacity:
                return
        dtype = dtype if self.dtype is None else self.dtype
        capacity = (self.offset + L + self.step - 1) // self.step * self.step
        new_k = mx.zeros((N, H_kv, capacity, D), dtype)
        new_v = mx.zeros((N, H_kv, capacity, D_v), dtype)
        if self.keys is not None:
            new_k[..., : self.offset, :] = self.keys[..., : self.offset, :]
            new_v[..., : self.offset, :] = self.values[..., : self.offset, :]
        self.keys, self.values = new_k, new_v

    def trim(self, n: int) -> int:
        """Forget the last n positions (rewind); returns how many were dropped."""
        n = min(self.offset, n)
        self.offset -= n
        return n

    @property
    def state(self) -> tuple[mx.array, mx.array] | tuple[()]:
        """The filled part: (keys, values), each (N, H_kv, offset, D)."""
        if self.keys is None:
            return ()
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @state.setter
    def state(self, kv: tuple[mx.array, mx.array]) -> None:
        self.keys, self.values = kv
        self.offset = self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes held by the filled positions (what grows linearly with the sequence)."""
        return sum(a.nbytes for a in self.state)


def make_cache(model, dtype: mx.Dtype | None = None) -> list[KVCache]:
    """One empty cache per layer of `model`, storing `dtype` (None: the activations' dtype)."""
    return [KVCache(dtype) for _ in model.layers]
