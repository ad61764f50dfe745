"""What one step's attention needs to know about the packed batch (topic 2.6): vLLM's
AttentionMetadata. The runner builds it; each layer's cache view reads it."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx


@dataclass
class AttentionMetadata:
    """The step's T tokens are B sequences' chunks laid end to end (no padding). Sequence b's
    chunk holds query_lens[b] tokens at positions start_positions[b] ... context_lens[b] - 1."""

    query_lens: list[int]  # (B,) tokens each sequence computes this step
    start_positions: list[int]  # (B,) tokens already in its cache (its num_computed_tokens)
    positions: mx.array  # (T,) int32: each token's position in its sequence
    cu_seqlens_q: mx.array  # (B + 1,) int32: sequence b's tokens are rows cu[b] .. cu[b + 1] - 1
    context_lens: mx.array  # (B,) int32: start + query length: what each sequence attends to
    slot_mapping: mx.array | None = None  # (T,) int32, paged: where each token's K/V go in the pool
    block_tables: mx.array | None = None  # (B, max_blocks) int32, paged: each sequence's blocks

    @classmethod
    def build(cls, query_lens: list[int], start_positions: list[int], block_tables: list[list[int]] | None = None,
              block_size: int = 0) -> AttentionMetadata:
        """From the scheduled chunks; block_tables (with block_size) for the paged cache."""
        positions = [p for start, n in zip(start_positions, query_lens, strict=True) for p in range(start, start + n)]
        cu, total = [0], 0
        for n in query_lens:
            total += n
            cu.append(total)
        context = [s + n for s, n in zip(start_positions, query_lens, strict=True)]
        meta = cls(query_lens, start_positions, mx.array(positions, mx.int32), mx.array(cu, mx.int32),
                   mx.array(context, mx.int32))
        if block_tables is not None:
            width = max(len(t) for t in block_tables)
            slots = []
            for table, start, n in zip(block_tables, start_positions, query_lens, strict=True):
                slots += [table[p // block_size] * block_size + p % block_size for p in range(start, start + n)]
            meta.slot_mapping = mx.array(slots, mx.int32)
            meta.block_tables = mx.array([t + [0] * (width - len(t)) for t in block_tables], mx.int32)
        return meta

    @property
    def context_lens_list(self) -> list[int]:
        return [s + n for s, n in zip(self.start_positions, self.query_lens, strict=True)]
