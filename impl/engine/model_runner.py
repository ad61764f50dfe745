"""The model runner (topic 2.6): a step's scheduled chunks as arrays, one model call, sampling.

The chunks are packed end to end, (1, T) token ids with no padding to the longest; the cache
views carry each token's position and, for the paged cache, its slot. Only the rows that
end a sequence's computed tokens are sent through the output head (`logits_to_keep`): a
prefill chunk that does not reach the end of its prompt samples nothing.
"""

from __future__ import annotations

import mlx.core as mx

from impl.engine.attention_metadata import AttentionMetadata
from impl.engine.scheduler import ScheduledBatch
from impl.engine.sequence import Sequence


class ModelRunner:
    """Runs `model` over a ScheduledBatch with the KV cache `kv` (contiguous or paged)."""

    def __init__(self, model, kv):
        self.model, self.kv = model, kv

    def prepare(self, batch: ScheduledBatch) -> tuple[mx.array, AttentionMetadata, list[int]]:
        """(1, T) input ids, the attention metadata, and the packed rows whose logits are sampled."""
        ids, rows, starts, lens = [], [], [], []
        for seq, n in batch.scheduled:
            start = seq.num_computed_tokens
            ids += seq.token_ids[start:start + n]
            if start + n == seq.num_tokens:  # its last token: the logits give the next one
                rows.append(len(ids) - 1)
            starts.append(start)
            lens.append(n)
        paged = hasattr(self.kv, "block_manager")
        tables = [seq.block_table for seq, _ in batch.scheduled] if paged else None
        meta = AttentionMetadata.build(lens, starts, tables, getattr(self.kv, "block_size", 0))
        return mx.array([ids], mx.int32), meta, rows

    def run(self, batch: ScheduledBatch) -> dict[str, int]:
        """Compute the step; returns the sampled token of each sequence that completed its tokens."""
        ids, meta, rows = self.prepare(batch)
        seqs = [seq for seq, _ in batch.scheduled]
        caches = self.kv.layer_views(seqs, meta)
        if not rows:  # prefill chunks only: fill the cache, sample nothing
            mx.eval(self.model(ids, cache=caches, logits_to_keep=1))
            return {}
        sampling = [seq for seq, n in batch.scheduled if seq.num_computed_tokens + n == seq.num_tokens]
        logits = self.model(ids, cache=caches, logits_to_keep=mx.array(rows, mx.int32))[0]  # (S, V)
        logits = logits.astype(mx.float32)
        tokens = self.sample(sampling, logits)
        for i, seq in enumerate(sampling):
            if seq.params.logprobs is not None:
                seq.logprobs.append(top_logprobs(logits[i], tokens[i], seq.params.logprobs))
        return {seq.request_id: t for seq, t in zip(sampling, tokens, strict=True)}

    @staticmethod
    def sample(seqs: list[Sequence], logits: mx.array) -> list[int]:
        """logits (S, V) -> one token per sequence: argmax where greedy (all rows in one op when
        every sequence is), else each sequence's own sampler (its own seed) on its row."""
        if all(s.params.greedy for s in seqs):
            return mx.argmax(logits, axis=-1).tolist()
        picked = [mx.argmax(logits[i], axis=-1) if s.params.greedy else s.sampler(logits[i:i + 1])[0]
                  for i, s in enumerate(seqs)]
        return mx.stack(picked).tolist()


def top_logprobs(logits: mx.array, token: int, k: int) -> dict[int, float]:
    """logits (V,) -> {token id: log-probability} for the k most likely tokens and `token`."""
    logprobs = logits - mx.logsumexp(logits)
    top = mx.argpartition(-logprobs, k)[:k] if k else mx.array([], mx.int32)
    ids = top.tolist() + [token]
    return dict(zip(ids, logprobs[mx.array(ids)].tolist(), strict=True))
