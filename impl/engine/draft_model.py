"""A draft model inside the engine (topic 3.4): a smaller model with the target's vocabulary drafts k
tokens for each decoding sequence, one at a time, on a KV cache of its own.

Each sequence drafts on its own contiguous cache: impl/speculative.py's DraftModel, made when the
sequence first drafts (a prefill of its tokens so far), rewound at each proposal to the longest
prefix it shares with the sequence's tokens (what the target accepted stays, the rejected drafts go),
and freed when the sequence finishes, is aborted or is preempted (a preempted sequence prefills its
draft cache again when it drafts next). The sequences draft one after another: contiguous caches of
different lengths do not stack into one batch.

These caches live outside the paged pool. Together they hold at most as many positions as the pool
(`max_positions`): a sequence whose draft cache would pass that drafts nothing that step (its cache
is freed), and its step is a plain decode. The buffers grow 256 positions at a time (KVCache.step),
so each cache may hold up to 255 positions more than it counts.
"""

from __future__ import annotations

import mlx.core as mx

from impl.engine.kv_pool import bytes_per_block
from impl.engine.sequence import Sequence
from impl.speculative import DraftModel, Sampling

TOPIC = "3.4"


class DraftModelDrafter:
    """Drafts by `model` for the engine's sequences, each on its own DraftModel cache (request id -> it)."""

    def __init__(self, model, name: str, max_positions: int, quantization: str | None = None,
                 p_min: float | None = None, vocab_size: int | None = None):
        from impl.draft_vocab import draft_vocab

        self.model, self.name, self.max_positions = model, name, max_positions
        self.quantization = quantization  # what load requantized the draft's weights to (for describe)
        self.p_min = p_min  # DraftModel's: stop drafting below this probability
        # DraftModel's vocab, one for every sequence; None when it would hold the whole vocabulary
        self.vocab = draft_vocab(model, vocab_size)
        self.caches: dict[str, DraftModel] = {}
        dtype = model.embed_tokens(mx.array([[0]])).dtype  # the caches store the activations' dtype
        self.bytes_per_position = bytes_per_block(model.args, 1, dtype)

    @classmethod
    def load(cls, model, vocab_size: int, max_positions: int, quantization: str | None = None,
             p_min: float | None = None, draft_vocab_size: int | None = None) -> DraftModelDrafter:
        """The drafter for `model` (a path or known name, a LoadedModel or an impl Model), its quantized
        weights requantized to `quantization` (impl.requantize.LAYOUTS; None: as loaded) in a copy (a
        model given is left as it was), scoring the ids below draft_vocab_size and its sequence's
        (None: every id); a one-line ValueError if its vocabulary is not the target's."""
        from impl.loader import LoadedModel, load_model
        from impl.requantize import LAYOUTS, requantized

        name = "a given model"
        if not hasattr(model, "args"):  # a path or a known name
            name, model = str(model), load_model(model)
        if isinstance(model, LoadedModel):
            name, model = model.path.name, model.model
        if model.args.vocab_size != vocab_size:
            raise ValueError(f"the draft model's vocabulary has {model.args.vocab_size} tokens, the target's"
                             f" {vocab_size}: a draft must share the target's tokenizer")
        if quantization is not None:
            bits, group_size = LAYOUTS[quantization]
            model = requantized(model, bits, group_size)
        return cls(model, name, max_positions, quantization, p_min, draft_vocab_size)

    @property
    def num_positions(self) -> int:
        """Positions the draft caches hold now, all sequences together."""
        return sum(len(d.tokens) for d in self.caches.values())

    def propose(self, seq: Sequence, k: int, sampling: Sampling | None = None,
                key: mx.array | None = None) -> tuple[list[int], mx.array | None]:
        """k drafts for seq and, when it samples, q (k, V): the distributions they were drawn from."""
        mine = self.caches.get(seq.request_id)
        others = self.num_positions - (len(mine.tokens) if mine else 0)
        if others + seq.num_tokens + k - 1 > self.max_positions:  # its cache would hold tokens and k - 1 drafts
            self.caches.pop(seq.request_id, None)  # over the budget: no drafts this step
            return [], None
        draft = self.caches[seq.request_id] = mine or DraftModel(self.model, self.p_min, self.vocab)
        return draft.propose(seq.token_ids, k, sampling, key)

    def release(self, running: list[Sequence]) -> None:
        """Free the caches of the sequences not running (finished, aborted or preempted)."""
        keep = {seq.request_id for seq in running}
        for request_id in [r for r in self.caches if r not in keep]:
            del self.caches[request_id]

    def describe(self) -> str:
        mib = self.max_positions * self.bytes_per_position / 2**20
        weights = f" (weights requantized: {self.quantization})" if self.quantization else ""
        confident = f", drafting while its probability is at least {self.p_min}" if self.p_min is not None else ""
        vocab = f", scoring ids below {self.vocab.size} and its sequence's" if self.vocab is not None else ""
        return (f"draft model {self.name}{weights}{confident}{vocab}, its KV caches outside the pool: up to"
                f" {self.max_positions} positions, {mib:.0f} MiB")
