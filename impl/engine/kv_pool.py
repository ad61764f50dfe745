"""The paged KV cache's memory (topic 3.1): per layer, one pool of fixed-size blocks for keys
and one for values, (num_blocks, H_kv, block_size, D). A sequence's positions live in the
blocks its block table lists (impl/engine/block_manager.py keeps those ids; this holds the
arrays). The pool's size comes from a memory budget, as vLLM's --kv-cache-memory."""

from __future__ import annotations

import math

import mlx.core as mx

from impl.engine.attention_metadata import AttentionMetadata
from impl.engine.block_manager import BlockManager
from impl.engine.sequence import Sequence
from impl.errors import TinyLLMError


def bytes_per_block(args, block_size: int, dtype: mx.Dtype) -> int:
    """Keys and values of block_size positions in every layer."""
    return 2 * args.num_hidden_layers * args.num_key_value_heads * block_size * args.head_dim * dtype.size


def num_blocks_for_budget(args, block_size: int, dtype: mx.Dtype, kv_cache_memory: int) -> int:
    """How many blocks a budget of kv_cache_memory bytes holds; a one-line error if not even one."""
    per_block = bytes_per_block(args, block_size, dtype)
    if kv_cache_memory < per_block:
        raise TinyLLMError(f"the KV cache budget of {kv_cache_memory} bytes holds no block: one block of"
                           f" {block_size} positions takes {per_block} bytes over {args.num_hidden_layers} layers")
    return kv_cache_memory // per_block


class KVPool:
    """num_blocks blocks per layer, with the BlockManager that hands them out.

    The arrays hold the blocks handed out so far and grow (doubling, up to num_blocks) as
    higher block ids come into use: writing zeros over a whole budget up front took 2.4 s a GiB
    here, most of a chat's start-up, while the block manager's numbers are the budget's from the start.
    """

    min_blocks = 64  # the arrays' first size

    def __init__(self, args, num_blocks: int, block_size: int = 16, dtype: mx.Dtype = mx.float32,
                 enable_prefix_caching: bool = True, use_kernel: bool = True):
        """use_kernel: attend with the paged-attention kernel when it is built, else the twin."""
        self.num_layers, self.num_blocks = args.num_hidden_layers, num_blocks
        self.block_shape = (args.num_key_value_heads, block_size, args.head_dim)  # one block of one layer
        self.dtype, self.block_size, self.use_kernel = dtype, block_size, use_kernel
        self.keys: list[mx.array] = []
        self.values: list[mx.array] = []
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.grow(min(num_blocks, self.min_blocks))

    @property
    def capacity(self) -> int:
        """Blocks the arrays hold now."""
        return self.keys[0].shape[0] if self.keys else 0

    @property
    def nbytes(self) -> int:
        """Bytes of the whole budget's blocks (what the pool may grow to)."""
        return 2 * self.num_layers * self.num_blocks * math.prod(self.block_shape) * self.dtype.size

    def grow(self, num_blocks: int) -> None:
        """Make the arrays hold at least num_blocks blocks (at most the budget's), keeping their contents."""
        if num_blocks <= self.capacity:
            return
        size = min(self.num_blocks, max(num_blocks, 2 * self.capacity))
        more = (size - self.capacity, *self.block_shape)
        for arrays in (self.keys, self.values):
            if arrays:
                arrays[:] = [mx.concatenate([a, mx.zeros(more, self.dtype)]) for a in arrays]
            else:
                arrays[:] = [mx.zeros(more, self.dtype) for _ in range(self.num_layers)]
        mx.eval(self.keys, self.values)

    def layer_views(self, seqs: list[Sequence], meta: AttentionMetadata) -> list:
        """One PagedKVCache per layer for a step (what the model's layers receive)."""
        self.grow(self.block_manager.num_touched_blocks)
        return [PagedKVCache(self, i, meta) for i in range(self.num_layers)]


class PagedKVCache:
    """One layer of the pool for one step: the cache the model's attention layer sees. `attend`
    applies RoPE at each token's position, writes k and v to their slots and attends through
    the block tables; the pool's arrays are replaced by the updated ones."""

    def __init__(self, pool: KVPool, layer: int, meta: AttentionMetadata):
        self.pool, self.layer, self.meta = pool, layer, meta

    def attend(self, qkv: mx.array, rope, n_heads: int, n_kv_heads: int, scale: float | None = None,
               window: int | None = None) -> mx.array:
        """qkv (1, T, (H + 2 H_kv) D) packed -> (1, T, H D); window: a sliding window's length."""
        from impl.engine.paged_attention import paged_attention, paged_attention_mlx

        attend = paged_attention if self.pool.use_kernel else paged_attention_mlx
        i = self.layer
        out, self.pool.keys[i], self.pool.values[i] = attend(
            qkv, self.pool.keys[i], self.pool.values[i], rope, self.meta, n_heads, n_kv_heads, scale, window)
        return out
