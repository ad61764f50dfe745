"""Speculative decoding inside the engine (topic 3.4): each decoding sequence drafts up to k tokens
by n-gram prompt lookup, the step verifies all of them in its one model call (a decode becomes a
chunk of 1 + k positions), and each sequence keeps the drafts its target agrees with.

The pieces are impl/speculative.py's (NgramProposer, accept_greedy, accept_sampled); this module
fits them to the engine: the config (vLLM's `speculative_config`), the drafts of one sequence
within its limits, and the verification of one sequence's rows. The scheduler gives the drafts
slots, the runner keeps the logits of every verify row, and the engine rewinds the sequence's
paged cache to its accepted length (BlockManager.rewind).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

import mlx.core as mx

from impl.engine.sequence import Sequence
from impl.speculative import NgramProposer, Sampling, accept_greedy, accept_sampled

TOPIC = "3.4"
METHODS = ("ngram",)
SPEC_SEED_OFFSET = 0x9E3779B97F4A7C15  # rejection sampling's key is another seed's: independent of the sampler's draws


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's names: method "ngram" (prompt lookup), num_speculative_tokens (k, drafts per step at
    most), prompt_lookup_max / prompt_lookup_min (the n-gram sizes tried, longest first)."""

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 3
    prompt_lookup_min: int = 2  # a 1-gram match mostly drafts wrong tokens, each a row of the verify pass

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"speculative method {self.method!r} is not one the engine has: {', '.join(METHODS)}"
                             " (a draft model speculates single-stream: impl.speculative.DraftModel)")
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"num_speculative_tokens must be an integer >= 1, got {k!r}")
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in (lo, hi)) or not 1 <= lo <= hi:
            raise ValueError(f"n-gram sizes must satisfy 1 <= prompt_lookup_min <= prompt_lookup_max,"
                             f" got {lo!r} and {hi!r}")

    @classmethod
    def of(cls, config: SpeculativeConfig | dict | str | None) -> SpeculativeConfig | None:
        """A config from itself, a dict of its fields or their JSON (vLLM's --speculative-config);
        None stays None. Unknown fields are a one-line ValueError."""
        if config is None or isinstance(config, cls):
            return config
        if isinstance(config, str):
            try:
                config = json.loads(config)
            except json.JSONDecodeError as e:
                raise ValueError(f"the speculative config is not JSON: {e}") from None
        if not isinstance(config, dict):
            raise ValueError(f"a speculative config is a dict of its fields, got {config!r:.60}")
        unknown = sorted(set(config) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown speculative config fields {unknown}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**config)


class SpecDecoder:
    """Drafts (propose) and verification (verify) for the engine's sequences under one config."""

    def __init__(self, config: SpeculativeConfig, max_model_len: int):
        self.config, self.max_model_len = config, max_model_len
        self.proposer = NgramProposer(config.prompt_lookup_max, config.prompt_lookup_min)

    def max_drafts(self, seq: Sequence) -> int:
        """k clipped so that even all drafts and the bonus token stay within max_tokens and the context."""
        left = min(seq.params.max_tokens - seq.num_output_tokens, self.max_model_len - seq.num_tokens)
        return max(0, min(self.config.num_speculative_tokens, left - 1))

    def propose(self, seq: Sequence) -> list[int]:
        """Drafts for a decoding sequence (all its tokens known): prompt lookup, within its limits."""
        k = self.max_drafts(seq)
        return self.proposer.propose(seq.token_ids, k)[0] if k else []

    @staticmethod
    def verify(seq: Sequence, logits: mx.array) -> list[int]:
        """logits (1 + k, V) fp32 of the target at [last, d1 .. dk] -> the tokens seq gains: the
        accepted drafts, then one of the target's own. Greedy keeps drafts equal to the argmax;
        sampling is the modified rejection sampling, the n-gram drafts' q one-hot (impl/speculative.py)."""
        drafts = seq.spec_token_ids
        if seq.params.greedy:
            a, token = accept_greedy(logits, drafts)
        else:
            p = seq.params
            probs = Sampling(p.temperature, p.top_k, p.top_p, p.min_p).probs(logits)  # (1 + k, V)
            seq.spec_key, sub = mx.random.split(spec_key(seq))
            a, token = accept_sampled(probs, None, drafts, sub)
        seq.num_draft_tokens += len(drafts)
        seq.num_accepted_tokens += a
        return [*drafts[:a], token]


def spec_key(seq: Sequence) -> mx.array:
    """The sequence's own key for rejection sampling: from its seed (a stream apart from its sampler's), so a
    seeded request draws the same tokens in any batch."""
    if seq.spec_key is None:
        seed = secrets.randbits(32) if seq.params.seed is None else seq.params.seed
        seq.spec_key = mx.random.key((seed + SPEC_SEED_OFFSET) % 2**64)  # not key(seed): the sampler's
    return seq.spec_key
