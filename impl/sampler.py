"""Sampling the next token: greedy, temperature, top-k, top-p, min-p.

Order, as in transformers' generate: logits / temperature, then top-k, then
top-p, then min-p, then one categorical draw. Each filter sees the previous
one's output renormalized, so top-p after top-k counts probability within the
top k. (mlx-lm 0.32 differs: top-p, min-p, then top-k, all on the untempered
logprobs, and the temperature last; the results agree for top-k alone and for
any filter alone at temperature 1.)

Ties: every filter is a threshold on values, never on sort positions, so
tokens tied with the last kept one are kept too. Top-k can keep more than k
tokens and top-p more than the smallest set when values tie at the cut; the
result never depends on how the sort orders equal values. Greedy picks the
lowest index among equal maxima (argmax).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable

import mlx.core as mx


def validate_sampling(temperature: float, top_k: int, top_p: float, min_p: float, seed: int | None = None) -> None:
    """Raise ValueError if a sampling parameter (or the seed) is out of range."""
    # `not (...)` so that NaN fails too.
    if not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be >= 0 and finite (0 means greedy), got {temperature}")
    if not top_k >= 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {top_p}")
    if not 0 <= min_p <= 1:
        raise ValueError(f"min_p must be in [0, 1] (0 disables it), got {min_p}")
    if seed is not None and not 0 <= seed < 2**64:  # what mx.random.key takes
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")


def apply_top_k(logprobs: mx.array, k: int) -> mx.array:
    """Keep the tokens whose value is >= the k-th largest (ties kept); k == 0 keeps all."""
    V = logprobs.shape[-1]
    if k == 0 or k >= V:
        return logprobs
    kth = mx.topk(logprobs, k, axis=-1).min(axis=-1, keepdims=True)  # (B, 1)
    return mx.where(logprobs >= kth, logprobs, -math.inf)


def apply_top_p(logprobs: mx.array, p: float) -> mx.array:
    """Keep the fewest most likely tokens whose probability sums to >= p (ties kept)."""
    if p >= 1.0:
        return logprobs
    order = mx.argsort(-logprobs, axis=-1)  # (B, V), most likely first
    sorted_lp = mx.take_along_axis(logprobs, order, axis=-1)
    # Normalize here so the filter works on logits or on a masked distribution.
    sorted_probs = mx.softmax(sorted_lp.astype(mx.float32), axis=-1)
    before = mx.cumsum(sorted_probs, axis=-1) - sorted_probs  # mass strictly ahead
    # A token is needed while the mass ahead of it is still short of p. The
    # top token is always kept (a p below float32's range would round to 0).
    n_keep = mx.maximum((before < p).sum(axis=-1, keepdims=True), 1)  # (B, 1)
    cut = mx.take_along_axis(sorted_lp, n_keep - 1, axis=-1)  # (B, 1)
    return mx.where(logprobs >= cut, logprobs, -math.inf)


def apply_min_p(logprobs: mx.array, min_p: float) -> mx.array:
    """Keep the tokens with prob >= min_p * (max prob); min_p == 0 keeps all."""
    if min_p <= 0.0:
        return logprobs
    # prob_i >= min_p * prob_max  <=>  logprob_i >= logprob_max + log(min_p);
    # a shift of all values cancels, so logits work as well as logprobs.
    cut = logprobs.max(axis=-1, keepdims=True) + math.log(min_p)  # (B, 1)
    return mx.where(logprobs >= cut, logprobs, -math.inf)


def _filtered_logprobs(logits: mx.array, temperature: float, top_k: int, top_p: float,
                       min_p: float) -> mx.array:
    x = logits.astype(mx.float32) / temperature  # (B, V)
    x = x - mx.logsumexp(x, axis=-1, keepdims=True)
    x = apply_top_k(x, top_k)
    x = apply_top_p(x, top_p)
    return apply_min_p(x, min_p)


def make_sampler(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 min_p: float = 0.0, seed: int | None = None) -> Callable[[mx.array], mx.array]:
    """Return a function mapping logits (B, V) to token ids (B,) uint32."""
    validate_sampling(temperature, top_k, top_p, min_p, seed)
    if temperature == 0:
        # Every filter keeps the top token, so greedy ignores them.
        return lambda logits: mx.argmax(logits, axis=-1)

    # The sampler owns its key and splits it per call: the same seed gives the
    # same sequence, whatever else touches mx.random's global state.
    key = mx.random.key(secrets.randbits(32) if seed is None else seed)

    def sample(logits: mx.array) -> mx.array:
        nonlocal key
        key, sub = mx.random.split(key)
        logprobs = _filtered_logprobs(logits, temperature, top_k, top_p, min_p)
        return mx.random.categorical(logprobs, axis=-1, key=sub)  # (B,)

    return sample
