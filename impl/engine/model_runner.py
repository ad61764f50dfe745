"""The model runner (topic 2.6): a step's scheduled chunks as arrays, one model call, sampling.

The chunks are packed end to end, (1, T) token ids with no padding to the longest; the cache
views carry each token's position and, for the paged cache, its slot. Only the rows that
end a sequence's computed tokens are sent through the output head (`logits_to_keep`): a
prefill chunk that does not reach the end of its prompt samples nothing.

`launch` returns at once with the step's tokens still being computed (MLX is lazy; async_eval
starts it), so the engine can build the next step's graph meanwhile. A decode token sampled by
the step in flight is not known yet: the sequence holds PENDING in its place, and the next
step reads it from the step in flight's token array, on the device, without waiting.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx

from impl.engine.attention_metadata import AttentionMetadata
from impl.engine.scheduler import ScheduledBatch
from impl.engine.sequence import PENDING, Sequence


@dataclass
class LaunchedStep:
    """A step whose tokens are being computed: the sequences that sample, their (S,) tokens
    (lazy), where each token goes in its sequence, and the log-probabilities asked for (lazy)."""

    batch: ScheduledBatch
    sampling: list[Sequence] = field(default_factory=list)
    tokens: mx.array | None = None  # (S,) uint32
    positions: list[int] = field(default_factory=list)  # index of each sampled token in its sequence
    logprobs: dict[int, tuple[mx.array, mx.array]] = field(default_factory=dict)  # row -> (ids, values)
    ending: set[str] = field(default_factory=set)  # requests that reach their length with this token
    # Speculative decoding (topic 3.4): the logits of every kept row, (R, V) fp32, and each sampling
    # sequence's first row in them (its rows: that one and one per draft). None without drafts.
    logits: mx.array | None = None
    first_rows: list[int] = field(default_factory=list)

    def __post_init__(self):
        self.row_of = {s.request_id: i for i, s in enumerate(self.sampling)}  # request id -> its token's row


class ModelRunner:
    """Runs `model` over a ScheduledBatch with the KV cache `kv` (contiguous or paged)."""

    def __init__(self, model, kv):
        self.model, self.kv = model, kv

    def prepare(self, batch: ScheduledBatch) -> tuple[list[int], AttentionMetadata, list[int]]:
        """The packed input ids (PENDING where a token is still in flight), the attention
        metadata, and the packed rows whose logits are kept: a sequence's last token's, and one
        per draft after it when it speculates (spec_decode.py)."""
        ids, rows, starts, lens = [], [], [], []
        for seq, n in batch.scheduled:
            start = seq.num_computed_tokens
            tokens = seq.token_ids + seq.spec_token_ids if seq.spec_token_ids else seq.token_ids
            ids += tokens[start:start + n]
            if start + n == len(tokens):  # its last token (and drafts): the logits give the next one
                rows += range(len(ids) - 1 - len(seq.spec_token_ids), len(ids))
            starts.append(start)
            lens.append(n)
        paged = hasattr(self.kv, "block_manager")
        tables = [seq.block_table for seq, _ in batch.scheduled] if paged else None
        meta = AttentionMetadata.build(lens, starts, tables, getattr(self.kv, "block_size", 0))
        return ids, meta, rows

    def launch(self, batch: ScheduledBatch, in_flight: LaunchedStep | None = None) -> LaunchedStep:
        """Build the step's graph and start computing it; returns before its tokens are known."""
        ids, meta, rows = self.prepare(batch)
        inputs = mx.array([[max(t, 0) for t in ids]], mx.int32)  # (1, T)
        sampling = [seq for seq, _ in self._ending(batch)]
        first_rows, r = [], 0  # each sampling sequence's first kept row, in `rows`
        for seq in sampling:
            first_rows.append(r)
            r += 1 + len(seq.spec_token_ids)
        # A PENDING input is the last token of its chunk (no drafts follow it), that sequence's first kept row.
        pending = [(rows[r], seq) for r, seq in zip(first_rows, sampling, strict=True) if ids[rows[r]] == PENDING]
        if pending:  # decode inputs still in flight: taken from that step's tokens, on the device
            src = mx.array([in_flight.row_of[seq.request_id] for _, seq in pending])
            inputs[0, mx.array([i for i, _ in pending])] = in_flight.tokens[src].astype(mx.int32)
        seqs = [seq for seq, _ in batch.scheduled]
        caches = self.kv.layer_views(seqs, meta)
        step = LaunchedStep(batch, sampling)
        if not rows:  # prefill chunks only: fill the cache, sample nothing
            mx.async_eval(self.model(inputs, cache=caches, logits_to_keep=1))
            return step
        logits = self.model(inputs, cache=caches, logits_to_keep=mx.array(rows, mx.int32))[0]  # (R, V)
        logits = logits.astype(mx.float32)
        if len(rows) > len(sampling):  # drafts to verify: the engine accepts them from all the rows
            step.logits, step.first_rows = logits, first_rows
            logits = logits[mx.array(first_rows)]  # (S, V): a sequence without drafts samples from its row
        step.tokens = self.sample(step.sampling, logits)
        for i, seq in enumerate(step.sampling):
            if seq.params.logprobs is not None:
                step.logprobs[i] = top_logprobs(logits[i], step.tokens[i], seq.params.logprobs)
        mx.async_eval(step.tokens, *step.logprobs.values())
        return step

    @staticmethod
    def _ending(batch: ScheduledBatch) -> list[tuple[Sequence, int]]:
        """The scheduled chunks that end their sequence's tokens, drafts included (those whose last row is sampled)."""
        return [(seq, n) for seq, n in batch.scheduled
                if seq.num_computed_tokens + n == seq.num_tokens + len(seq.spec_token_ids)]

    @staticmethod
    def sample(seqs: list[Sequence], logits: mx.array) -> mx.array:
        """logits (S, V) -> (S,) tokens, lazy: argmax where greedy (all rows in one op when every
        sequence is), else each sequence's own sampler (its own seed) on its row."""
        if all(s.params.greedy for s in seqs):
            return mx.argmax(logits, axis=-1)
        return mx.stack([mx.argmax(logits[i], axis=-1).astype(mx.uint32) if s.params.greedy
                         else s.sampler(logits[i:i + 1])[0].astype(mx.uint32) for i, s in enumerate(seqs)])


def top_logprobs(logits: mx.array, token: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """logits (V,) -> (ids, log-probabilities) of the k most likely tokens and `token`, lazy."""
    logprobs = logits - mx.logsumexp(logits)
    top = mx.argpartition(-logprobs, k)[:k] if k else mx.array([], mx.uint32)
    ids = mx.concatenate([top.astype(mx.uint32), token.astype(mx.uint32).reshape(1)])
    return ids, logprobs[ids]
