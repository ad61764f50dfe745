"""The paged KV cache's bookkeeping (topic 3.1) and prefix caching (topic 3.2): block ids,
reference counts, the free list and the prefix hashes. It holds no arrays (the pool does:
impl/engine/kv_pool.py), so it is testable anywhere.

A sequence's `block_table` lists the blocks that hold its positions: position p lives in block
block_table[p // block_size] at offset p % block_size. Blocks are allocated as a sequence's
computed tokens grow (a prefill chunk, a decode token) and freed when it ends or is preempted.

Prefix caching: once a block is full and its keys and values computed, it is hashed, chained
with the hash of the block before it, so the hash names the whole prefix. A new sequence whose
leading full blocks hash the same (and whose token ids compare equal: a hash collision is not a
hit) shares those blocks, reference counted, and skips their prefill. A freed block keeps its
hash on the free list until it is reused, least recently freed first.
"""

from __future__ import annotations

from collections import OrderedDict

from impl.engine.sequence import Sequence


class Block:
    """One block of the pool: its id, its holders, and the prefix it caches (if hashed)."""

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None  # of the block's tokens chained with its prefix; None: not full yet
        self.token_ids: tuple[int, ...] = ()

    def reset(self) -> None:
        self.ref_count, self.hash, self.token_ids = 1, None, ()


def compute_hash(token_ids: tuple[int, ...], prefix_hash: int | None) -> int:
    """The hash of a full block, chained with the hash of everything before it (topic 3.2)."""
    return hash((prefix_hash, token_ids))


class BlockManager:
    """num_blocks blocks of block_size positions; `can_allocate`/`allocate` a sequence's next
    tokens, `deallocate` its blocks, `get_computed_blocks` its cached prefix."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one position, got {num_blocks} x {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in eviction order: the front is reused first (least recently freed).
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hash_to_block_id: dict[int, int] = {}
        self.num_touched_blocks = 0  # ids below this have been handed out at least once (the pool grows to it)
        self.num_queried_tokens = 0  # prefix-cache lookups, in tokens: the hit rate's denominator
        self.num_hit_tokens = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---------------------------------------------------------------- prefix cache

    def get_computed_blocks(self, seq: Sequence) -> list[int]:
        """The ids of the longest run of seq's leading full blocks found in the prefix cache (topic
        3.2). At least one token is always left to compute: its logits give the next token."""
        if not self.enable_prefix_caching:
            return []
        hits, prefix_hash = [], None
        for i in range((seq.num_tokens - 1) // self.block_size):
            tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            prefix_hash = compute_hash(tokens, prefix_hash)
            block_id = self.hash_to_block_id.get(prefix_hash)
            if block_id is None or self.blocks[block_id].token_ids != tokens:  # a miss, or a collision
                break
            hits.append(block_id)
        return hits

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Hash the blocks seq has filled and computed since the last call, so later sequences
        can share them (topic 3.2)."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        prev = self.blocks[seq.block_table[seq.num_hashed_blocks - 1]].hash if seq.num_hashed_blocks else None
        for i in range(seq.num_hashed_blocks, num_full):
            block = self.blocks[seq.block_table[i]]
            tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            if block.hash is None:  # a shared hit already carries its hash
                block.hash, block.token_ids = compute_hash(tokens, prev), tokens
                self.hash_to_block_id.setdefault(block.hash, block.block_id)  # a twin computed alongside stays unlisted
            prev = block.hash
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, num_full)

    # ---------------------------------------------------------------- allocation

    def _cost(self, seq: Sequence, num_new_tokens: int, hits: list[int]) -> int:
        """Free blocks that giving seq room for num_new_tokens more tokens takes."""
        held = len(seq.block_table) or len(hits)
        computed = seq.num_computed_tokens or len(hits) * self.block_size
        revived = sum(self.blocks[b].ref_count == 0 for b in hits) if not seq.block_table else 0
        return max(self.num_blocks_for(computed + num_new_tokens) - held, 0) + revived

    def can_allocate(self, seq: Sequence, num_new_tokens: int, hits: list[int] = ()) -> bool:
        """Whether seq's next num_new_tokens tokens fit (on top of `hits`, for a sequence that
        holds no blocks yet)."""
        return self._cost(seq, num_new_tokens, list(hits)) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int, hits: list[int] = ()) -> None:
        """Give seq blocks for its next num_new_tokens tokens; a sequence that holds none first
        takes the cached prefix `hits` (from get_computed_blocks) and skips computing it."""
        assert self.can_allocate(seq, num_new_tokens, hits), "allocate without can_allocate"
        if not seq.block_table:  # admitted (again): its cached prefix, if any
            for block_id in hits:
                self._hold(block_id)
            seq.block_table = list(hits)
            seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * self.block_size
            seq.num_hashed_blocks = len(hits)
        need = self.num_blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        seq.block_table += [self._allocate_block() for _ in range(need)]

    def deallocate(self, seq: Sequence) -> None:
        """Release seq's blocks (the last first, so a shared prefix outlives its tails on the
        free list); nothing of it is in the cache any more."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self.free_block_ids[block_id] = None
        seq.block_table = []
        seq.num_computed_tokens = seq.num_hashed_blocks = 0

    def rewind(self, seq: Sequence, num_computed_tokens: int) -> None:
        """Speculative decoding (topic 3.4): after a verify step, only the first num_computed_tokens
        positions hold verified keys and values; the rejected drafts' stay in their slots until
        overwritten. Blocks wholly past seq's tokens go back to the pool (no other sequence holds
        them: only leading full blocks are shared, and those are verified)."""
        assert seq.num_hashed_blocks * self.block_size <= num_computed_tokens <= seq.num_computed_tokens, \
            "a rewind past hashed blocks, or forwards"
        seq.num_computed_tokens = num_computed_tokens
        keep = self.num_blocks_for(seq.num_tokens)
        for block_id in reversed(seq.block_table[keep:]):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count == 0, f"block {block_id} past a rewind is shared"
            self.free_block_ids[block_id] = None
        del seq.block_table[keep:]

    def record_lookup(self, num_queried: int, num_hit: int) -> None:
        """Count a prefix-cache lookup for the hit rate (tokens looked up, tokens found)."""
        self.num_queried_tokens += num_queried
        self.num_hit_tokens += num_hit

    def _hold(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:  # cached but free: take it back off the free list
            del self.free_block_ids[block_id]
        block.ref_count += 1

    def _allocate_block(self) -> int:
        block_id, _ = self.free_block_ids.popitem(last=False)  # least recently freed
        block = self.blocks[block_id]
        if block.hash is not None and self.hash_to_block_id.get(block.hash) == block_id:
            del self.hash_to_block_id[block.hash]  # evicted from the prefix cache
        block.reset()
        self.num_touched_blocks = max(self.num_touched_blocks, block_id + 1)
        return block_id
