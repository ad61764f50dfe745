"""A draft model's reduced vocabulary (topic 3.4; EAGLE-3 calls it the draft vocabulary, FR-Spec ranks it
by frequency): the draft scores only the first `size` ids of the vocabulary and the ids its own
sequence holds, and every other token gets -inf.

The output head is a small model's largest matmul when its vocabulary is large: Qwen2.5-Coder 0.5B's
is 151,936 x 896, about a quarter of what its 4-bit pass reads. A byte-level BPE vocabulary numbers
its tokens in merge order, and the early merges are the common pieces, so the first 65,536 ids hold
nearly everything an English or code answer writes; the sequence's own ids add the rare ones it
repeats (a file's identifiers). Measured on the 1.5B's greedy answers to seven prompts
(docs/speculative.md): at most 4 tokens of 192 that the sequence did not hold before lie past
65,536 (up to 10 past 32,768: "```" is id 73594); a 4-bit pass of the 0.5B 12.5 ms against 14.

A draft only proposes: the target's check keeps greedy output, and the sampled distribution, exactly
what they are without speculation, whatever the draft can propose. A token outside the draft's
vocabulary is one it never drafts, so only the acceptance rate can fall.
"""

from __future__ import annotations

import copy

import mlx.core as mx

from impl.kquant_weight import KQuantWeight
from impl.quantized_weight import QuantizedWeight

TOPIC = "3.4"
DEFAULT_SIZE = 65536  # the engine's and the chat command's default draft_vocab_size


def take_rows(w, ids: mx.array):
    """Rows `ids` of a weight (N, K), kept in its own format: a dense array, a QuantizedWeight's triples,
    or a one-part KQuantWeight's blocks."""
    return w.take(ids) if isinstance(w, (QuantizedWeight, KQuantWeight)) else w[ids]


def draft_vocab(model, size: int | None) -> DraftVocab | None:
    """The DraftVocab of `model` cut at `size`; None (every id scored) where size is None or covers the
    vocabulary."""
    return None if size is None or size >= model.args.vocab_size else DraftVocab(model, size)


class DraftVocab:
    """The head of `model` (an impl Model) cut to the ids below `size` (< the vocabulary), plus any
    ids a sequence adds (rows): logits() gives (1, V) logits, -inf at the ids not scored."""

    def __init__(self, model, size: int):
        V = model.args.vocab_size
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size < V:
            raise ValueError(f"a draft vocabulary size is an integer in [1, {V}) (the vocabulary), got {size!r}")
        self.model, self.size = model, size
        self.weight = model.embed_tokens.weight if model.lm_head is None else model.lm_head  # (V, E)
        self.base = self.head_of(mx.arange(size))
        self.pad = mx.full((1, V - size), -mx.inf, dtype=mx.float32)  # the scores of ids [size, V)

    def head_of(self, ids: mx.array):
        """A shallow copy of the model whose head (final norm, rows `ids`, a cap where the model has one)
        scores those ids only; the layers stay shared."""
        m = copy.copy(self.model)
        m.lm_head = take_rows(self.weight, ids)
        mx.eval(m.lm_head)
        return m

    def logits(self, h: mx.array, extra: tuple[mx.array, object] | None = None) -> mx.array:
        """h (1, E), the last block's output -> (1, V) fp32 logits: the first `size` ids and extra's
        (ids (n,), head_of(ids)) scored, -inf elsewhere."""
        logits = mx.concatenate([self.base.head(h).astype(mx.float32), self.pad], axis=-1)  # (1, V)
        if extra is not None:
            ids, m = extra
            logits[:, ids] = m.head(h).astype(mx.float32)  # (1, n)
        return logits
