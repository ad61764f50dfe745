"""Generating a response (topic 1.6): the decode loop, stop conditions, streaming text.

Week 1 recomputes the whole sequence at every step, as the course does; the
KV cache (week 2) removes that.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import mlx.core as mx

from impl.errors import TinyLLMError
from impl.tokenizer import StreamingDetokenizer


@dataclass
class GenerationStats:
    """Token counts and timings of one generation."""

    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    generated_tokens: int = 0
    decode_seconds: float = 0.0
    finish_reason: str | None = None  # "stop" (EOS or a stop string), "length"

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        # The first generated token comes out of prefill; decode steps make the rest.
        steps = max(self.generated_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds else 0.0


@dataclass
class Generation:
    """What `stream_generate` yields: new text (maybe empty), the token, and the running stats."""

    text: str
    token: int | None
    stats: GenerationStats = field(default_factory=GenerationStats)


def greedy(logits: mx.array) -> mx.array:
    """(B, V) -> (B,) argmax."""
    return mx.argmax(logits, axis=-1)


def generate_step(model, prompt: Sequence[int], sampler: Callable = greedy) -> Iterator[int]:
    """Yield next tokens forever, recomputing the model over the whole sequence each step."""
    tokens = list(prompt)
    while True:
        logits = model(mx.array([tokens]))[:, -1, :]  # (1, V): only the last position predicts
        token = int(sampler(logits.astype(mx.float32)).item())
        yield token
        tokens.append(token)


def generate_step_cached(model, prompt: Sequence[int], sampler: Callable = greedy,
                         cache: list | None = None) -> Iterator[int]:
    """Yield next tokens forever: prefill the prompt once into a KV cache, then one token per step.

    cache: one KVCache per layer that already holds the positions before `prompt` (PromptCache
    keeps one across the turns of a chat); a new one when None.
    Pipelined: step t+1's graph is built (and queued with async_eval) from step t's still
    lazy token before we wait for that token, so Python's graph building overlaps the compute.
    When token t is yielded, its keys and values are already on their way into the cache.
    """
    from impl.kv_cache import make_cache

    cache = make_cache(model) if cache is None else cache

    def next_token(inputs: mx.array) -> mx.array:  # (1, L) -> (1,), lazy; the last position's logits only
        return sampler(model(inputs, cache=cache, logits_to_keep=1)[:, -1, :].astype(mx.float32))

    token = next_token(mx.array([list(prompt)]))  # prefill
    mx.async_eval(token)
    while True:
        following = next_token(token.reshape(1, 1))  # decode: one position
        mx.async_eval(following)
        yield int(token.item())
        token = following


class PromptCache:
    """A KV cache kept across generations, with the tokens it holds: a prompt that starts like
    the last one (the next turn of a chat) prefills only what comes after the common prefix."""

    def __init__(self, model, kv_dtype=None):
        """kv_dtype: what the cache stores (None: the activations' dtype; see KVCache)."""
        from impl.kv_cache import make_cache

        self.model, self.cache = model, make_cache(model, kv_dtype)
        self.tokens: list[int] = []  # the token at each cached position
        self.reused = 0  # positions the last prompt took from the cache

    def new_tokens(self, prompt: Sequence[int]) -> list[int]:
        """Rewind the cache to its longest common prefix with `prompt` (keeping at least one token
        to prefill, which gives the next token's logits) and return the rest of the prompt."""
        # A generation stopped part-way (Ctrl-C in a chat) can leave layers holding fewer positions.
        held = min(len(self.tokens), *(c.offset for c in self.cache))
        n, limit = 0, min(held, len(prompt) - 1)
        while n < limit and self.tokens[n] == prompt[n]:
            n += 1
        for c in self.cache:
            c.trim(c.offset - n)
        self.tokens, self.reused = list(prompt), n
        return list(prompt[n:])

    def steps(self, model, prompt: Sequence[int], sampler: Callable = greedy) -> Iterator[int]:
        """generate_step_cached on this cache (a `step` for stream_generate); records what it caches."""
        assert model is self.model, "a PromptCache serves the model it was made for"
        for token in generate_step_cached(model, self.new_tokens(prompt), sampler, cache=self.cache):
            self.tokens.append(token)  # its keys and values are in the cache once it is yielded
            yield token


def check_context(model, n_prompt: int) -> None:
    """A prompt must leave room for at least one new token in the model's context."""
    context = model.args.max_position_embeddings
    if n_prompt >= context:
        raise TinyLLMError(f"the prompt is {n_prompt} tokens; the model's context is {context} tokens")
    if n_prompt == 0:
        raise TinyLLMError("the prompt is empty")


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing chars of `text` could still be the start of a stop string."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold


def stream_generate(model, tokenizer, prompt: Sequence[int], max_tokens: int = 256,
                    sampler: Callable = greedy, stop_strings: Sequence[str] = (),
                    step: Callable = generate_step) -> Iterator[Generation]:
    """Generate up to `max_tokens`, yielding text as it becomes complete UTF-8 and clear of stop strings.

    Stops at the end-of-sequence token, at a stop string (not included in the text), or
    at max_tokens / the context length. The last item has stats.finish_reason set.
    """
    check_context(model, len(prompt))
    max_tokens = min(max_tokens, model.args.max_position_embeddings - len(prompt))
    stats = GenerationStats(prompt_tokens=len(prompt))
    detok = StreamingDetokenizer(tokenizer)
    eos = _eos_ids(tokenizer, model.args)
    pending = ""  # text decoded but not yet yielded (it may be the start of a stop string)
    matched_stop = False
    start = time.perf_counter()
    tokens = step(model, prompt, sampler)
    stats.finish_reason = "length"
    for n in range(max_tokens):
        token = next(tokens)
        now = time.perf_counter()
        if n == 0:
            stats.prefill_seconds = now - start
        else:
            stats.decode_seconds = now - start - stats.prefill_seconds
        stats.generated_tokens = n + 1
        if token in eos:
            stats.finish_reason = "stop"
            break
        pending += detok.add_token(token)
        cut = min((pending.find(s) for s in stop_strings if s in pending), default=-1)
        if cut >= 0:  # the stop string and anything after it are dropped
            yield Generation(pending[:cut], token, stats)
            pending, matched_stop, stats.finish_reason = "", True, "stop"
            break
        ready = len(pending) - _held_back(pending, stop_strings)
        yield Generation(pending[:ready], token, stats)
        pending = pending[ready:]
    rest = "" if matched_stop else pending + detok.finalize()
    yield Generation(rest, None, stats)


def _eos_ids(tokenizer, args) -> set[int]:
    """The ids that end a response: the tokenizer's EOS and the model config's eos_token_id (one or a list)."""
    ids = {getattr(tokenizer, "eos_token_id", None)}
    extra = args.eos_token_id
    ids.update(extra if isinstance(extra, list) else [extra])
    return {i for i in ids if i is not None}


def generate(model, tokenizer, prompt: Sequence[int], max_tokens: int = 256, sampler: Callable = greedy,
             stop_strings: Sequence[str] = (), step: Callable = generate_step) -> tuple[str, GenerationStats]:
    """The whole response text and its stats."""
    parts, stats = [], None
    for g in stream_generate(model, tokenizer, prompt, max_tokens, sampler, stop_strings, step):
        parts.append(g.text)
        stats = g.stats
    return "".join(parts), stats
