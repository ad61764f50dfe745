"""Paged attention: attention that reads keys and values through block tables.

`paged_attention_mlx` (topic 3.1) is the readable twin: RoPE at each token's position, the
new keys and values written to their slots, then per sequence a gather of its blocks into a
contiguous copy and causal attention over it. `paged_attention` (topic 3.2) is the C++ kernel
(kernels/src/paged_attention*.cpp): the same in one node, reading keys and values from the
blocks in place, no gather. Both take qkv packed across sequences, (1, T, (H + 2 H_kv) D), and
a pool per layer, (num_blocks, H_kv, block_size, D).

A query at position p of sequence b sees that sequence's keys at positions 0..p: causal within
its chunk, everything cached before the chunk visible; with a sliding window of W (Gemma 3's
local layers), the keys p - W + 1 .. p only.
"""

from __future__ import annotations

import mlx.core as mx

from impl.attention import scaled_dot_product_attention_grouped, sliding_window_mask
from impl.engine.attention_metadata import AttentionMetadata
from impl.native import kernels

FLOATS = (mx.float32, mx.float16, mx.bfloat16)


def check_paged_attention(qkv: mx.array, k_pool: mx.array, v_pool: mx.array, meta: AttentionMetadata,
                          n_heads: int, n_kv_heads: int, window: int | None = None) -> None:
    """One-line ValueErrors for what neither the twin nor the kernel computes."""
    if qkv.ndim != 3 or qkv.shape[0] != 1 or qkv.dtype not in FLOATS:
        raise ValueError(f"paged_attention: qkv must be (1, T, (H + 2 H_kv) D) float32, float16 or bfloat16,"
                         f" got {qkv.shape} {qkv.dtype}")
    if n_heads <= 0 or n_kv_heads <= 0 or n_heads % n_kv_heads:
        raise ValueError(f"paged_attention: n_heads must be a positive multiple of n_kv_heads, got {n_heads}"
                         f" and {n_kv_heads}")
    width = qkv.shape[2]
    if width % (n_heads + 2 * n_kv_heads):
        raise ValueError(f"paged_attention: qkv's last axis ({width}) is not (H + 2 H_kv) * D with H + 2 H_kv ="
                         f" {n_heads + 2 * n_kv_heads}")
    D = width // (n_heads + 2 * n_kv_heads)
    if k_pool.ndim != 4 or k_pool.shape != v_pool.shape or k_pool.shape[1] != n_kv_heads or k_pool.shape[3] != D:
        raise ValueError(f"paged_attention: pools must both be (num_blocks, H_kv={n_kv_heads}, block_size, D={D}),"
                         f" got {k_pool.shape} and {v_pool.shape}")
    if k_pool.dtype not in FLOATS or v_pool.dtype != k_pool.dtype:
        raise ValueError("paged_attention: the pools must share one dtype, float32, float16 or bfloat16")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"paged_attention: window must be a positive number of positions or None, got {window!r}")
    if meta.slot_mapping is None or meta.block_tables is None:
        raise ValueError("paged_attention: the metadata has no slot mapping or block tables (a paged step's)")
    if sum(meta.query_lens) != qkv.shape[1]:
        raise ValueError(f"paged_attention: qkv holds {qkv.shape[1]} tokens, the metadata {sum(meta.query_lens)}")


def check_block_ids(k_pool: mx.array, meta: AttentionMetadata) -> None:
    """The kernel's words for a block id or slot outside the pools (the twin would read or write
    out of bounds); reads the step's block tables and slots, so the twin's path only."""
    num_blocks, block_size = k_pool.shape[0], k_pool.shape[2]
    for b, (table, context) in enumerate(zip(meta.block_tables.tolist(), meta.context_lens_list, strict=True)):
        for i, block in enumerate(table[: -(-context // block_size)]):
            if not 0 <= block < num_blocks:
                raise ValueError(f"paged_attention: block_tables[{b}, {i}] = {block} is not a block of the pools"
                                 f" (num_blocks = {num_blocks})")
    for t, slot in enumerate(meta.slot_mapping.tolist()):
        if not 0 <= slot < num_blocks * block_size:
            raise ValueError(f"paged_attention: slot_mapping[{t}] = {slot} is outside the pools' {num_blocks} *"
                             f" {block_size} slots")


def paged_attention_mlx(qkv: mx.array, k_pool: mx.array, v_pool: mx.array, rope, meta: AttentionMetadata,
                        n_heads: int, n_kv_heads: int, scale: float | None = None, window: int | None = None
                        ) -> tuple[mx.array, mx.array, mx.array]:
    """The twin (topic 3.1): qkv (1, T, (H + 2 H_kv) D) -> (out (1, T, H D), k_pool', v_pool').
    window: each query sees itself and the window - 1 positions before it (Gemma 3's local layers)."""
    check_paged_attention(qkv, k_pool, v_pool, meta, n_heads, n_kv_heads, window)
    check_block_ids(k_pool, meta)
    T, H, H_kv = qkv.shape[1], n_heads, n_kv_heads
    D = qkv.shape[2] // (H + 2 * H_kv)
    block_size = k_pool.shape[2]
    heads = qkv.reshape(T, 1, H + 2 * H_kv, D)  # each token its own "sequence" of one, for RoPE
    q = rope(heads[:, :, :H], meta.positions)  # (T, 1, H, D), each row at its own position
    k = rope(heads[:, :, H:H + H_kv], meta.positions)  # (T, 1, H_kv, D)
    v = heads[:, :, H + H_kv:]
    k_pool, v_pool = write_slots(k_pool, k[:, 0], meta.slot_mapping), write_slots(v_pool, v[:, 0], meta.slot_mapping)
    outs, row = [], 0
    for b, (n, context) in enumerate(zip(meta.query_lens, meta.context_lens_list, strict=True)):
        table = meta.block_tables[b, : -(-context // block_size)]  # this sequence's blocks
        keys = gather(k_pool, table, context).astype(qkv.dtype)  # (1, H_kv, context, D)
        values = gather(v_pool, table, context).astype(qkv.dtype)
        q_b = q[row:row + n, 0].transpose(1, 0, 2)[None]  # (1, H, n, D): positions context - n ...
        row += n
        mask = "causal" if window is None else sliding_window_mask(n, context, window, q_b.dtype)  # lower-right
        out = scaled_dot_product_attention_grouped(q_b, keys, values, scale=scale, mask=mask)
        outs.append(out[0].transpose(1, 0, 2).reshape(n, H * D))
    return mx.concatenate(outs, axis=0)[None], k_pool, v_pool


def write_slots(pool: mx.array, x: mx.array, slot_mapping: mx.array) -> mx.array:
    """pool (num_blocks, H_kv, block_size, D) with x (T, H_kv, D) written at slot_mapping (T,):
    slot s is block s // block_size, offset s % block_size."""
    num_blocks, H_kv, block_size, D = pool.shape
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size  # (T,)
    rows = (blocks[:, None] * H_kv + mx.arange(H_kv)[None]) * block_size + offsets[:, None]  # (T, H_kv)
    flat = pool.reshape(-1, D)  # (num_blocks * H_kv * block_size, D): one row per (block, head, offset)
    flat[rows] = x.astype(pool.dtype)
    return flat.reshape(pool.shape)


def gather(pool: mx.array, table: mx.array, context: int) -> mx.array:
    """A sequence's first `context` positions from its blocks: (1, H_kv, context, D), a copy."""
    blocks = pool[table]  # (n_blocks, H_kv, block_size, D)
    n, H_kv, block_size, D = blocks.shape
    return blocks.transpose(1, 0, 2, 3).reshape(1, H_kv, n * block_size, D)[:, :, :context]


def paged_attention(qkv: mx.array, k_pool: mx.array, v_pool: mx.array, rope, meta: AttentionMetadata,
                    n_heads: int, n_kv_heads: int, scale: float | None = None, window: int | None = None
                    ) -> tuple[mx.array, mx.array, mx.array]:
    """RoPE, the cache write and attention through the block tables in one kernel node on the
    CPU when built (topic 3.2), a sliding window (Gemma 3's local layers) too; the twin otherwise.
    Returns (out (1, T, H D), k_pool', v_pool')."""
    kernel = getattr(kernels, "paged_attention", None)
    if kernel is None or mx.default_device() != mx.cpu:
        return paged_attention_mlx(qkv, k_pool, v_pool, rope, meta, n_heads, n_kv_heads, scale, window)
    check_paged_attention(qkv, k_pool, v_pool, meta, n_heads, n_kv_heads, window)
    rope._check(max(meta.context_lens_list) - 1)
    # The old pools go into the graph and nowhere else, so the kernel may write into them.
    return kernel(qkv, k_pool, v_pool, rope.cos, rope.sin, meta.positions, meta.slot_mapping, meta.block_tables,
                  meta.cu_seqlens_q, meta.context_lens, n_heads, n_kv_heads, scale=scale,
                  traditional=rope.traditional, window=window or 0)
