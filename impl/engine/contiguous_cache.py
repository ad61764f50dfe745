"""A contiguous KV cache per sequence (topic 2.6): continuous batching before paging.

Each running sequence keeps week 2.1's dense KVCache per layer. A step's tokens are packed
(1, T) across sequences; each layer splits its q, k, v back per sequence, appends to that
sequence's cache and attends over it, so sequences of different lengths share one model call
with no padding. Its memory is counted in tokens (`capacity`), with the same verbs as the
paged BlockManager (3.1), so the scheduler and its preemption work on either.
"""

from __future__ import annotations

import mlx.core as mx

from impl.attention import scaled_dot_product_attention_grouped, sliding_window_mask
from impl.engine.attention_metadata import AttentionMetadata
from impl.engine.sequence import Sequence
from impl.errors import TinyLLMError
from impl.kv_cache import KVCache


class ContiguousKVCache:
    """Per-sequence dense caches, `capacity` tokens in all."""

    block_size = 1  # counted in tokens
    enable_prefix_caching = False

    def __init__(self, num_layers: int, capacity: int, dtype: mx.Dtype | None = None):
        self.num_layers, self.capacity, self.dtype = num_layers, capacity, dtype
        self.caches: dict[str, list[KVCache]] = {}  # request id -> one KVCache per layer
        self.reserved: dict[str, int] = {}  # request id -> tokens it holds room for

    @classmethod
    def for_budget(cls, args, budget: int, dtype: mx.Dtype | None = None) -> ContiguousKVCache:
        """As many tokens as `budget` bytes hold (keys and values of every layer, in fp32 unless dtype says)."""
        per_token = 2 * args.num_hidden_layers * args.num_key_value_heads * args.head_dim * (dtype or mx.float32).size
        if budget < per_token:
            raise TinyLLMError(f"the KV cache budget of {budget} bytes holds no token ({per_token} bytes each)")
        return cls(args.num_hidden_layers, budget // per_token, dtype)

    @property
    def num_free_blocks(self) -> int:
        return self.capacity - sum(self.reserved.values())

    def get_computed_blocks(self, seq: Sequence) -> list[int]:
        return []  # no prefix cache here

    def can_allocate(self, seq: Sequence, num_new_tokens: int, hits=()) -> bool:
        need = seq.num_computed_tokens + num_new_tokens - self.reserved.get(seq.request_id, 0)
        return need <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int, hits=()) -> None:
        if seq.request_id not in self.caches:
            self.caches[seq.request_id] = [KVCache(self.dtype) for _ in range(self.num_layers)]
        self.reserved[seq.request_id] = max(self.reserved.get(seq.request_id, 0),
                                            seq.num_computed_tokens + num_new_tokens)

    def deallocate(self, seq: Sequence) -> None:
        self.caches.pop(seq.request_id, None)
        self.reserved.pop(seq.request_id, None)
        seq.num_computed_tokens = 0

    def record_lookup(self, num_queried: int, num_hit: int) -> None:
        pass

    def cache_full_blocks(self, seq: Sequence) -> None:
        pass

    def layer_views(self, seqs: list[Sequence], meta: AttentionMetadata) -> list:
        """One cache view per layer for a step over `seqs` (what the model's layers receive)."""
        per_seq = [self.caches[s.request_id] for s in seqs]
        return [ContiguousLayerCache([c[i] for c in per_seq], meta) for i in range(self.num_layers)]


class ContiguousLayerCache:
    """One layer's caches of the step's sequences: RoPE, the cache append and attention per sequence."""

    def __init__(self, caches: list[KVCache], meta: AttentionMetadata):
        self.caches, self.meta = caches, meta

    def attend(self, qkv: mx.array, rope, n_heads: int, n_kv_heads: int, scale: float | None = None,
               window: int | None = None) -> mx.array:
        """qkv (1, T, (H + 2 H_kv) D) packed -> (1, T, H D), each sequence attending to its own cache;
        window: a sliding window's length (each query sees itself and window - 1 before it)."""
        width = qkv.shape[2]
        H, H_kv = n_heads, n_kv_heads
        D = width // (H + 2 * H_kv)
        outs, row = [], 0
        for cache, n in zip(self.caches, self.meta.query_lens, strict=True):
            heads = qkv[:, row:row + n].reshape(1, n, H + 2 * H_kv, D)  # this sequence's chunk
            row += n
            q, k, v = heads[:, :, :H], heads[:, :, H:H + H_kv], heads[:, :, H + H_kv:]  # (1, n, heads, D)
            q, k = rope(q, cache.offset), rope(k, cache.offset)
            q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))  # (1, heads, n, D)
            k, v = cache.update_and_fetch(k, v)  # (1, H_kv, offset + n, D)
            if k.dtype != q.dtype:
                k, v = k.astype(q.dtype), v.astype(q.dtype)
            mask = "causal" if window is None else sliding_window_mask(n, k.shape[2], window, q.dtype)
            out = scaled_dot_product_attention_grouped(q, k, v, scale=scale, mask=mask)  # (1, H, n, D)
            outs.append(out.transpose(0, 2, 1, 3).reshape(1, n, H * D))
        return mx.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]
