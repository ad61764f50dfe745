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


class RotatingKVCache:
    """A rolling buffer for one layer (topic 3.9): it holds the first `keep` positions and the
    most recent ones, max_size positions at most, so its memory stays constant however long the
    sequence grows. With keep=0 and max_size = a layer's sliding window it is exactly what that
    layer attends to (Mistral, Gemma 3's local layers): each query sees itself and the
    max_size - 1 positions before it.

    Buffers are (N, H_kv, max_size, D). A one-token step overwrites the oldest recent slot in
    place and returns the buffer in slot order (one query that sees every held key does not care
    about their order). A step of L > 1 tokens returns the held positions in time order with the
    new ones after them (the mask needs them contiguous), then keeps the last of them.
    """

    def __init__(self, max_size: int, keep: int = 0, dtype: mx.Dtype | None = None):
        if not 0 <= keep < max_size - 1:
            raise ValueError(f"RotatingKVCache needs 0 <= keep < max_size - 1, got keep={keep}, max_size={max_size}")
        self.max_size, self.keep, self.dtype = max_size, keep, dtype
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.seen = 0  # positions written so far, evicted ones included
        self.oldest = keep  # the slot of the oldest recent position, once the buffer is full

    @property
    def offset(self) -> int:
        """The next token's position (as KVCache's: every position so far, evicted ones included)."""
        return self.seen

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append (N, H_kv, L, D) keys/values; return what the L queries attend to: the `keep` first
        positions, the max_size - keep - 1 most recent before these, and the L new ones."""
        if self.dtype is not None:
            keys, values = keys.astype(self.dtype), values.astype(self.dtype)
        if keys.shape[2] == 1 and self.keys is not None and self.keys.shape[2] == self.max_size:
            i = self.oldest  # the decode step: overwrite the oldest recent position
            self.keys[..., i:i + 1, :] = keys
            self.values[..., i:i + 1, :] = values
            self.oldest = self.keep + (i + 1 - self.keep) % (self.max_size - self.keep)
            self.seen += 1
            return self.keys, self.values
        k, v = self._ordered()
        if k is not None and k.shape[2] == self.max_size:  # evict the oldest recent one: the new take its place
            k = mx.concatenate([k[..., : self.keep, :], k[..., self.keep + 1:, :]], axis=2)
            v = mx.concatenate([v[..., : self.keep, :], v[..., self.keep + 1:, :]], axis=2)
        k = keys if k is None else mx.concatenate([k, keys], axis=2)  # (N, H_kv, S, D), in time order
        v = values if v is None else mx.concatenate([v, values], axis=2)
        self.seen += keys.shape[2]
        self.keys, self.values = self._last(k), self._last(v)
        self.oldest = self.keep
        return k, v

    def _last(self, x: mx.array) -> mx.array:
        """The `keep` first and the most recent of x (in time order), max_size in all."""
        if x.shape[2] <= self.max_size:
            return x
        return mx.concatenate([x[..., : self.keep, :], x[..., x.shape[2] - self.max_size + self.keep:, :]], axis=2)

    def _ordered(self) -> tuple[mx.array | None, mx.array | None]:
        """The held keys and values in time order (the ring unrolled)."""
        if self.keys is None or self.oldest == self.keep:
            return self.keys, self.values
        i, s = self.keep, self.oldest
        return tuple(mx.concatenate([x[..., :i, :], x[..., s:, :], x[..., i:s, :]], axis=2)
                     for x in (self.keys, self.values))

    def trim(self, n: int) -> int:
        """Forget the last n positions; only possible while nothing has been evicted (returns how
        many were dropped: 0 once the buffer has rolled, since what it dropped cannot come back)."""
        if self.seen > self.max_size or self.keys is None:
            return 0
        n = min(n, self.seen)
        self.seen -= n
        self.keys, self.values = self.keys[..., : self.seen, :], self.values[..., : self.seen, :]
        return n

    @property
    def state(self) -> tuple[mx.array, mx.array] | tuple[()]:
        """The held keys and values in time order, each (N, H_kv, <= max_size, D)."""
        return () if self.keys is None else self._ordered()

    @state.setter
    def state(self, kv: tuple[mx.array, mx.array]) -> None:
        self.keys, self.values = (self._last(x) for x in kv)
        self.seen, self.oldest = kv[0].shape[2], self.keep

    @property
    def nbytes(self) -> int:
        """Bytes held: at most max_size positions, whatever the sequence's length."""
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class SinkKVCache(RotatingKVCache):
    """StreamingLLM's cache (topic 3.9): `sinks` first positions (the "attention sinks" that
    softmax piles its unused weight on) and a rolling window of recent ones, max_size in all.

    Positions are those within the cache, as in the paper: keys are stored before RoPE and
    rotated by their place in the cache at every step, so the sinks sit at 0..sinks-1 and the
    window right after them, and a query is never further than max_size - 1 from any key. The
    model then never sees a position it was not trained on, however long generation runs
    (original positions would pass its context; shifting them would need every key re-rotated
    anyway). The attention layer sees `rotates_keys` and leaves the keys to the cache.
    """

    rotates_keys = True

    def __init__(self, rope, max_size: int, sinks: int = 4, dtype: mx.Dtype | None = None):
        super().__init__(max_size, keep=sinks, dtype=dtype)
        self.rope = rope  # the layer's RoPE: (N, L, H, D) inputs, per-sequence offsets

    @property
    def offset(self) -> int:
        """The next token's position within the cache: what its query is rotated by."""
        return min(self.seen, self.max_size - 1)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """As RotatingKVCache's, with keys given before RoPE and returned rotated by their place."""
        decode = keys.shape[2] == 1 and self.keys is not None and self.keys.shape[2] == self.max_size
        k, v = super().update_and_fetch(keys, values)
        S, R = k.shape[2], self.max_size - self.keep
        if decode:  # slot order: slot s < keep holds position s; the newest (at oldest - 1) is max_size - 1
            newest = self.keep + (self.oldest - 1 - self.keep) % R
            positions = list(range(self.keep)) + [self.max_size - 1 - (newest - s) % R for s in range(self.keep, S)]
        else:
            positions = list(range(S))
        return _rotate(self.rope, k, positions), v


def _rotate(rope, keys: mx.array, positions: list[int]) -> mx.array:
    """keys (N, H, S, D), key s rotated by RoPE at positions[s]: each key as a one-token sequence."""
    N, H, S, D = keys.shape
    x = keys.transpose(0, 2, 1, 3).reshape(N * S, 1, H, D)
    x = rope(x, mx.array(positions * N))
    return x.reshape(N, S, H, D).transpose(0, 2, 1, 3)


def make_window_cache(model, dtype: mx.Dtype | None = None) -> list:
    """One cache per layer (topic 3.9): a RotatingKVCache of the layer's window for a sliding-window
    layer (constant memory), a KVCache for a full-attention one."""
    return [KVCache(dtype) if layer.self_attn.window is None else RotatingKVCache(layer.self_attn.window, dtype=dtype)
            for layer in model.layers]


def make_sink_cache(model, window: int, sinks: int = 4, dtype: mx.Dtype | None = None) -> list:
    """StreamingLLM (topic 3.9): per layer, `sinks` first positions and the `window` most recent
    (sinks=0: a rolling window alone). Constant memory, past the model's context."""
    if sinks == 0:
        return [RotatingKVCache(window, dtype=dtype) for _ in model.layers]
    return [SinkKVCache(layer.self_attn.rope, sinks + window, sinks, dtype) for layer in model.layers]
