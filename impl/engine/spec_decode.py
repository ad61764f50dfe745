"""Speculative decoding inside the engine (topic 3.4): each decoding sequence drafts up to k tokens,
by n-gram prompt lookup or with a smaller draft model, the step verifies all of them in its one
model call (a decode becomes a chunk of 1 + k positions), and each sequence keeps the drafts its
target agrees with.

The pieces are impl/speculative.py's (NgramProposer, DraftModel, accept_greedy, accept_sampled);
this module fits them to the engine: the config (vLLM's `speculative_config`), a drafter per method
(vLLM's word for the engine's proposer: `propose(seq, k, sampling, key) -> (drafts, q)`,
`release(running)`, `describe()`), the drafts of one sequence within its limits, and the
verification of one sequence's rows. The scheduler gives the drafts slots, the runner keeps the
logits of every verify row, and the engine rewinds the sequence's paged cache to its accepted
length (BlockManager.rewind).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from impl.draft_vocab import DEFAULT_SIZE
from impl.engine.sequence import Sequence
from impl.speculative import NgramProposer, Sampling, accept_greedy, accept_sampled

TOPIC = "3.4"
METHODS = ("ngram", "draft_model")
SPEC_SEED_OFFSET = 0x9E3779B97F4A7C15  # rejection sampling's key is another seed's: independent of the sampler's draws


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's names: method "ngram" (prompt lookup) or "draft_model" (a smaller model with the target's
    vocabulary; `model`: its path or known name, or a loaded model), num_speculative_tokens (k, drafts
    per step at most), prompt_lookup_max / prompt_lookup_min (the n-gram sizes tried, longest first).
    With no method, a config with a model is "draft_model" (as vLLM infers), else "ngram".
    draft_quantization (this engine's own): "4bit" (default) drafts with the draft model's quantized
    weights requantized to 4-bit affine triples, groups of 128, int8 matmuls (impl/requantize.py: about
    twice as fast a pass for the Qwen2.5-Coder 0.5B); None, with its weights as loaded.
    draft_p_min (llama.cpp's --draft-p-min): a draft model stops drafting at the first token it gives a
    probability below this (None: always k drafts).
    draft_vocab_size (EAGLE-3's draft vocabulary): a draft model scores only the ids below this and
    those its sequence holds (impl/draft_vocab.py: a pass of the 0.5B 12.5 ms against 14, about
    the same acceptance); None, or a size at least the vocabulary's, scores every id."""

    method: str | None = None
    model: object = None  # a path or known name (impl.loader.load_model), a LoadedModel or an impl Model
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 3
    prompt_lookup_min: int = 2  # a 1-gram match mostly drafts wrong tokens, each a row of the verify pass
    draft_quantization: str | None = "4bit"
    draft_p_min: float | None = None
    draft_vocab_size: int | None = DEFAULT_SIZE

    def __post_init__(self):
        if self.method is None:
            object.__setattr__(self, "method", "ngram" if self.model is None else "draft_model")
        if self.method not in METHODS:
            raise ValueError(f"speculative method {self.method!r} is not one the engine has: {', '.join(METHODS)}")
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"num_speculative_tokens must be an integer >= 1, got {k!r}")
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in (lo, hi)) or not 1 <= lo <= hi:
            raise ValueError(f"n-gram sizes must satisfy 1 <= prompt_lookup_min <= prompt_lookup_max,"
                             f" got {lo!r} and {hi!r}")
        if self.method == "ngram" and self.model is not None:
            raise ValueError("'model' names a draft model, for method 'draft_model'; 'ngram' drafts by lookup")
        if self.method == "draft_model":
            check_draft_model(self.model)
        check_draft_quantization(self.draft_quantization)
        p = self.draft_p_min
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1):
            raise ValueError(f"draft_p_min must be a probability in [0, 1] or null, got {p!r}")
        if p is not None and self.method != "draft_model":
            raise ValueError("draft_p_min is a draft model's confidence, for method 'draft_model'")
        n = self.draft_vocab_size
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"draft_vocab_size must be an integer >= 1 or null (every id), got {n!r}")

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


def check_draft_model(model) -> None:
    """A draft model given by name must be a file, a folder or a known name: checked before anything loads."""
    from impl.model_files import KNOWN_MODELS

    if model is None:
        raise ValueError("method 'draft_model' needs 'model': the draft model's path or known name")
    if isinstance(model, (str, Path)) and str(model) not in KNOWN_MODELS and not Path(model).exists():
        raise ValueError(f"the draft model {str(model)!r} is not a file, a folder or a known name"
                         f" ({', '.join(KNOWN_MODELS)})")


def check_draft_quantization(quantization) -> None:
    """draft_quantization must name a layout of impl.requantize.LAYOUTS, or be None (the draft as loaded)."""
    from impl.requantize import LAYOUTS

    if quantization is not None and quantization not in LAYOUTS:
        raise ValueError(f"draft_quantization {quantization!r} is not known: {', '.join(map(repr, LAYOUTS))}"
                         " or null (the draft model's weights as loaded)")


class NgramDrafter:
    """n-gram prompt lookup over each sequence's own tokens (impl/speculative.py's NgramProposer): no state."""

    def __init__(self, config: SpeculativeConfig):
        self.config = config
        self.proposer = NgramProposer(config.prompt_lookup_max, config.prompt_lookup_min)

    def propose(self, seq: Sequence, k: int, sampling=None, key=None) -> tuple[list[int], None]:
        """Up to k drafts; q is None (deterministic drafts: one-hot)."""
        return self.proposer.propose(seq.token_ids, k)

    def release(self, running) -> None:
        pass

    def describe(self) -> str:
        c = self.config
        return f"n-gram lookup, n = {c.prompt_lookup_max} down to {c.prompt_lookup_min}"


class SpecDecoder:
    """Drafts (propose) and verification (verify) for the engine's sequences under one config.
    target_args: the target's ModelArgs (its vocabulary and context); kv_tokens: the paged pool's
    positions (a draft model's caches hold at most as many)."""

    def __init__(self, config: SpeculativeConfig, target_args, kv_tokens: int):
        self.config, self.max_model_len = config, target_args.max_position_embeddings
        if config.method == "draft_model":
            from impl.engine.draft_model import DraftModelDrafter

            self.drafter = DraftModelDrafter.load(config.model, target_args.vocab_size, kv_tokens,
                                                  config.draft_quantization, config.draft_p_min,
                                                  config.draft_vocab_size)
        else:
            self.drafter = NgramDrafter(config)

    def max_drafts(self, seq: Sequence) -> int:
        """k clipped so that even all drafts and the bonus token stay within max_tokens and the context."""
        left = min(seq.params.max_tokens - seq.num_output_tokens, self.max_model_len - seq.num_tokens)
        return max(0, min(self.config.num_speculative_tokens, left - 1))

    def propose(self, seq: Sequence) -> list[int]:
        """Drafts for a decoding sequence (all its tokens known), within its limits; when it samples, the
        drafts' distributions q go to seq.spec_draft_probs (None: one-hot, or greedy)."""
        k = self.max_drafts(seq)
        sampling = None if seq.params.greedy else target_sampling(seq)
        key = None if sampling is None or not k else next_key(seq)
        drafts, seq.spec_draft_probs = self.drafter.propose(seq, k, sampling, key) if k else ([], None)
        return drafts

    def describe(self) -> str:
        """The start-up log line: the method, k, and a draft model's cache budget."""
        return f"[speculative decoding: {self.drafter.describe()}; k = {self.config.num_speculative_tokens}]"

    def release(self, running: list[Sequence]) -> None:
        """Free the draft state of every sequence not running (finished, aborted, preempted)."""
        self.drafter.release(running)

    @staticmethod
    def verify(seq: Sequence, logits: mx.array) -> list[int]:
        """logits (1 + k, V) fp32 of the target at [last, d1 .. dk] -> the tokens seq gains: the
        accepted drafts, then one of the target's own. Greedy keeps drafts equal to the argmax;
        sampling is the modified rejection sampling with the drafts' q (one-hot for n-gram drafts;
        the draft model's distributions, cut to the drafts the scheduler kept) (impl/speculative.py)."""
        drafts = seq.spec_token_ids
        if seq.params.greedy:
            a, token = accept_greedy(logits, drafts)
        else:
            probs = target_sampling(seq).probs(logits)  # (1 + k, V)
            q = None if seq.spec_draft_probs is None else seq.spec_draft_probs[:len(drafts)]  # (k, V)
            a, token = accept_sampled(probs, q, drafts, next_key(seq))
        seq.num_draft_tokens += len(drafts)
        seq.num_accepted_tokens += a
        return [*drafts[:a], token]


def target_sampling(seq: Sequence) -> Sampling:
    """The request's sampling parameters as impl/speculative.py's Sampling: p (and a draft model's q) filter so."""
    p = seq.params
    return Sampling(p.temperature, p.top_k, p.top_p, p.min_p)


def next_key(seq: Sequence) -> mx.array:
    """A fresh key from the sequence's own chain (its seed, a stream apart from its sampler's), so a seeded
    request draws the same drafts and tokens in any batch."""
    if seq.spec_key is None:
        seed = secrets.randbits(32) if seq.params.seed is None else seq.params.seed
        seq.spec_key = mx.random.key((seed + SPEC_SEED_OFFSET) % 2**64)  # not key(seed): the sampler's
    seq.spec_key, sub = mx.random.split(seq.spec_key)
    return sub
