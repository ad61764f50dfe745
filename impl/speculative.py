"""Speculative decoding (topic 3.4): a cheap proposer drafts k tokens, the target model checks all
k in one forward pass, and every drafted token the target agrees with costs no pass of its own.

Batch-1 decode reads every weight once per token, whatever the number of rows it multiplies:
a pass over k + 1 positions costs about what a pass over one costs while k is small. So a step
that feeds the target [last token, d1 .. dk] and keeps the a drafts it agrees with (plus the
target's own next token) makes a + 1 tokens for the price of one weight read.

Two proposers:
- NgramProposer (prompt lookup): no second model; the continuation of an earlier occurrence of
  the last n tokens, the one whose match runs furthest back (an edit of a file repeats most of it);
- DraftModel: a smaller model with the same vocabulary (Qwen2.5-Coder 0.5B for the 1.5B) drafts k
  tokens one at a time on its own KV cache.

Checking the drafts:
- greedy: keep drafts while each equals the target's argmax at its position, then the target's
  argmax at the first mismatch (or after the last draft): token for token the target's own
  greedy output;
- sampling: modified rejection sampling. Draft x drawn from q is kept with probability
  min(1, p(x) / q(x)); at the first rejection the token is drawn from norm(max(0, p - q)); when
  all k are kept a bonus token is drawn from the target's next distribution. Every emitted token
  is distributed exactly as p (the target's filtered distribution). An n-gram draft is
  deterministic: q is one-hot on it.

After a rejection both caches hold positions of tokens that were thrown away: the target's cache
is trimmed by the rejected count (KVCache.trim); the draft model's is rewound to the longest
prefix it shares with the accepted tokens, as PromptCache does.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import mlx.core as mx

from impl.kv_cache import make_cache
from impl.sampler import _filtered_logprobs, validate_sampling

TOPIC = "3.4"


@dataclass
class SpeculativeStats:
    """Counts of one speculative generation (topic 3.4): acceptance rate = accepted / drafted."""

    drafted: int = 0  # draft tokens the target checked
    accepted: int = 0  # of those, kept
    steps: int = 0  # target passes after the prefill (each one emits accepted + 1 tokens)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        return (self.accepted + self.steps) / self.steps if self.steps else 0.0


@dataclass(frozen=True)
class Sampling:
    """The target's sampling parameters (topic 3.4), as 1.7's make_sampler takes them; temperature 0 is greedy."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None

    def __post_init__(self):
        validate_sampling(self.temperature, self.top_k, self.top_p, self.min_p, self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def probs(self, logits: mx.array) -> mx.array:
        """(..., V) logits -> the filtered distribution 1.7's sampler draws from, (..., V) fp32: the kept
        tokens' probabilities renormalized to sum to 1 (the filters leave log-probabilities that sum to
        less; the sampler's categorical renormalizes them, and p / q must be the renormalized ratio)."""
        shape = logits.shape
        lp = _filtered_logprobs(logits.reshape(-1, shape[-1]), self.temperature, self.top_k, self.top_p, self.min_p)
        return mx.softmax(lp, axis=-1).reshape(shape)



class NgramProposer:
    """Prompt lookup (topic 3.4): draft the k tokens that followed an earlier occurrence of the
    sequence's last n tokens (if there is none, of the last n - 1, down to min_n). Of several
    occurrences, the one whose match runs furthest back wins (the longest common suffix with the
    sequence, counted up to MATCH_CAP tokens), the latest on a tie: in a file being copied, a line
    like `    return x` recurs, and the occurrence whose preceding lines also match is the one the
    answer is copying."""

    MATCH_CAP = 32  # tokens of a match counted backwards: bounds a step's search on repetitive text

    def __init__(self, n: int = 3, min_n: int | None = None):
        min_n = n if min_n is None else min_n
        if not 1 <= min_n <= n:
            raise ValueError(f"n-gram sizes must satisfy 1 <= min_n <= n, got n={n}, min_n={min_n}")
        self.n, self.min_n = n, min_n

    def propose(self, tokens: Sequence[int], k: int, sampling: Sampling | None = None,
                key: mx.array | None = None) -> tuple[list[int], mx.array | None]:
        """Up to k draft tokens (fewer, or none, where the sequence has no match); q is None: the
        drafts are deterministic (a one-hot q)."""
        tokens = list(tokens)
        T = len(tokens)
        for n in range(min(self.n, T - 1), self.min_n - 1, -1):
            tail = tokens[-n:]
            best, best_len = -1, 0
            for start in range(T - n - 1, -1, -1):  # latest first (it keeps a tie); not the tail itself
                if tokens[start:start + n] == tail:
                    length = n  # the match, extended backwards: tokens[start - j - 1] == tokens[T - n - j - 1]
                    while length < self.MATCH_CAP and start > length - n and \
                            tokens[start - (length - n) - 1] == tokens[T - length - 1]:
                        length += 1
                    if length > best_len:
                        best, best_len = start, length
            if best >= 0:
                return tokens[best + n:best + n + k], None
        return [], None


class DraftModel:
    """A smaller model with the target's vocabulary drafting k tokens on its own KV cache (topic 3.4).
    p_min (llama.cpp's --draft-p-min): stop drafting at the first token the draft gives less than this
    probability (it is not drafted), so that a step spends no draft passes and verify rows on tokens
    the target is unlikely to keep; None drafts all k.
    vocab (EAGLE-3's draft vocabulary; impl/draft_vocab.py): a DraftVocab of the model, or its size:
    the draft scores only the ids below it and those its sequence holds (a cheaper head); None, or a
    size that covers the vocabulary, scores every id."""

    def __init__(self, model, p_min: float | None = None, vocab=None):
        if p_min is not None and not 0.0 <= p_min <= 1.0:
            raise ValueError(f"p_min must be a probability in [0, 1], got {p_min!r}")
        if isinstance(vocab, int) and not isinstance(vocab, bool):
            from impl.draft_vocab import draft_vocab

            vocab = draft_vocab(model, vocab)
        self.model, self.p_min, self.vocab = model, p_min, vocab
        self.cache = make_cache(model)
        self.tokens: list[int] = []  # the token at each position the cache holds
        self.extra_ids: set[int] = set()  # ids at or past vocab.size the sequence has held
        self.extra = None  # (ids, vocab.head_of(ids)) for them

    def _rewind(self, tokens: Sequence[int]) -> list[int]:
        """Trim the cache to its longest common prefix with `tokens`, keeping at least one token to
        feed (its logits give the first draft); returns the tokens to feed."""
        n, limit = 0, min(len(self.tokens), len(tokens) - 1)
        while n < limit and self.tokens[n] == tokens[n]:
            n += 1
        for c in self.cache:
            c.trim(c.offset - n)
        self.tokens = list(tokens[:n])
        return list(tokens[n:])

    def propose(self, tokens: Sequence[int], k: int, sampling: Sampling | None = None,
                key: mx.array | None = None) -> tuple[list[int], mx.array | None]:
        """k draft tokens and, when sampling, q: the (k, V) distributions they were drawn from
        (None when greedy: argmax drafts)."""
        if k <= 0:
            return [], None
        fed = self._rewind(tokens)
        if self.vocab is not None:
            self._see(fed)
        feed = mx.array([fed])  # (1, L)
        self.tokens += fed
        keys = mx.random.split(key, k) if key is not None else [None] * k
        if self.p_min is not None:
            return self._propose_confident(feed, k, sampling, keys)
        drafts, qs = [], []
        for i in range(k):  # one lazy graph: a draft feeds the next step before anything is evaluated
            token, q, _ = self._draft(feed, sampling, keys[i])
            drafts.append(token)
            if q is not None:
                qs.append(q)
            if i < k - 1:  # the last draft is not fed: the target checks it first
                feed = token.reshape(1, 1)
        drafts = mx.concatenate(drafts)
        q = mx.stack(qs) if qs else None
        mx.eval(drafts, *([q] if q is not None else []))
        drafts = drafts.tolist()
        self.tokens += drafts[:-1]
        return drafts, q

    def _see(self, fed: list[int]) -> None:
        """Add the ids of `fed` outside the draft vocabulary to the ones it scores (its own drafts are inside)."""
        new = {t for t in fed if t >= self.vocab.size} - self.extra_ids
        if new:
            self.extra_ids |= new
            ids = mx.array(sorted(self.extra_ids))
            self.extra = ids, self.vocab.head_of(ids)

    def _draft(self, feed: mx.array, sampling: Sampling | None, key) -> tuple[mx.array, mx.array | None, mx.array]:
        """One pass over feed (1, L): the next draft (1,), when sampling the q (V,) it was drawn from, and
        the logits (1, V)."""
        if self.vocab is None:
            logits = self.model(feed, cache=self.cache, logits_to_keep=1)[:, -1, :].astype(mx.float32)  # (1, V)
        else:
            logits = self.vocab.logits(self.model.hidden_states(feed, 0, self.cache)[:, -1], self.extra)  # (1, V)
        if sampling is None or sampling.greedy:
            return mx.argmax(logits, axis=-1), None, logits
        q = sampling.probs(logits)
        return mx.random.categorical(mx.log(q), axis=-1, key=key), q[0], logits

    def _propose_confident(self, feed: mx.array, k: int, sampling: Sampling | None, keys) -> tuple[list[int], mx.array | None]:
        """propose with p_min: each draft evaluated before the next pass, kept while the draft's top
        probability is at least p_min (q's for a sampled draft, the softmax of its logits for a greedy one)."""
        drafts: list[int] = []
        qs = []
        for i in range(k):
            token, q, logits = self._draft(feed, sampling, keys[i])
            top = (q if q is not None else mx.softmax(logits, axis=-1)[0]).max()
            mx.eval(token, top)
            if top.item() < self.p_min:
                break
            drafts.append(int(token.item()))
            if q is not None:
                qs.append(q)
            if i < k - 1:
                feed = token.reshape(1, 1)
        # The cache holds every draft fed: all kept ones but the last, and the last too if a pass followed it.
        fed = len(drafts) if len(drafts) < k else k - 1
        self.tokens += drafts[:fed]
        return drafts, mx.stack(qs) if qs else None


def acceptance_probability(p: mx.array, q: mx.array) -> mx.array:
    """min(1, p / q) elementwise (topic 3.4): the chance that a draft x drawn from q is kept; 1 where q is 0."""
    return mx.where(q > 0, mx.minimum(1.0, p / mx.where(q > 0, q, 1.0)), 1.0)


def residual_distribution(p: mx.array, q: mx.array) -> mx.array:
    """norm(max(0, p - q)) over the last axis (topic 3.4): where a rejected draft's replacement is drawn
    from. Where p == q nothing is ever rejected; p is returned there so the rows stay distributions."""
    r = mx.maximum(p - q, 0.0)
    total = r.sum(axis=-1, keepdims=True)
    return mx.where(total > 0, r / mx.where(total > 0, total, 1.0), p)


def one_hot(tokens: Sequence[int], V: int) -> mx.array:
    """(k,) ids -> (k, V) fp32: the q of a deterministic draft."""
    return (mx.array(list(tokens))[:, None] == mx.arange(V)[None, :]).astype(mx.float32)


def accept_greedy(logits: mx.array, drafts: Sequence[int]) -> tuple[int, int]:
    """Greedy verification (topic 3.4): logits (k + 1, V) of the target at [last, d1 .. dk] ->
    (a, token): the first a drafts equal the target's argmax, and `token` is its argmax after them."""
    best = mx.argmax(logits, axis=-1).tolist()  # (k + 1,)
    a = 0
    while a < len(drafts) and drafts[a] == best[a]:
        a += 1
    return a, best[a]


def accept_sampled(p: mx.array, q: mx.array | None, drafts: Sequence[int], key: mx.array) -> tuple[int, int]:
    """Modified rejection sampling (topic 3.4): p (k + 1, V) the target's distributions at [last, d1 .. dk],
    q (k, V) those the drafts were drawn from (None: deterministic drafts, q one-hot) -> (a, token):
    a drafts kept, then `token` from the residual at the first rejection, or from p[k] when all are kept."""
    k, V = len(drafts), p.shape[-1]
    if k == 0:
        return 0, int(mx.random.categorical(mx.log(p[0]), key=key).item())
    q = one_hot(drafts, V) if q is None else q
    ids = mx.array(list(drafts))[:, None]  # (k, 1)
    p_x = mx.take_along_axis(p[:k], ids, axis=-1)[:, 0]  # (k,): p and q of each draft
    q_x = mx.take_along_axis(q, ids, axis=-1)[:, 0]
    key_u, key_t = mx.random.split(key)
    kept = mx.random.uniform(shape=(k,), key=key_u) < acceptance_probability(p_x, q_x)  # (k,)
    a = mx.cumprod(kept.astype(mx.int32)).sum()  # the drafts before the first rejection
    # Row i < k: where a rejection at i draws from; row k: the bonus token's distribution.
    rows = mx.concatenate([residual_distribution(p[:k], q), p[k:k + 1]])  # (k + 1, V)
    token = mx.random.categorical(mx.log(rows[a]), key=key_t)
    return int(a.item()), int(token.item())


def speculative_generate_step(model, prompt: Sequence[int], proposer, k: int = 4, sampling: Sampling | None = None,
                              stats: SpeculativeStats | None = None, cache: list | None = None) -> Iterator[int]:
    """Yield the target's next tokens forever, k drafted tokens checked per target pass (topic 3.4).

    proposer: an NgramProposer or DraftModel (anything with propose(tokens, k, sampling, key)).
    stats: counts drafted / accepted / steps as the generation goes (the acceptance rate).
    Invariant: the target's cache holds every token but the last one emitted.
    """
    if k < 0:
        raise ValueError(f"k (draft tokens per step) must be >= 0, got {k}")
    sampling = Sampling() if sampling is None else sampling  # greedy
    stats = SpeculativeStats() if stats is None else stats
    cache = make_cache(model) if cache is None else cache
    key = mx.random.key(secrets.randbits(32) if sampling.seed is None else sampling.seed)
    tokens = list(prompt)
    logits = model(mx.array([tokens]), cache=cache, logits_to_keep=1)[0].astype(mx.float32)  # (1, V): prefill
    key, sub = mx.random.split(key)
    token = (accept_greedy(logits, []) if sampling.greedy else accept_sampled(sampling.probs(logits), None, [], sub))[1]
    tokens.append(token)
    yield token
    while True:
        key, k_draft, k_check = mx.random.split(key, 3)
        drafts, q = proposer.propose(tokens, k, sampling, k_draft)
        logits = model(mx.array([[tokens[-1], *drafts]]), cache=cache)[0].astype(mx.float32)  # (1 + len(drafts), V)
        if sampling.greedy:
            a, nxt = accept_greedy(logits, drafts)
        else:
            a, nxt = accept_sampled(sampling.probs(logits), q, drafts, k_check)
        for c in cache:  # forget the rejected drafts' positions; the last emitted token is fed next step
            c.trim(len(drafts) - a)
        stats.drafted, stats.accepted, stats.steps = stats.drafted + len(drafts), stats.accepted + a, stats.steps + 1
        for t in [*drafts[:a], nxt]:
            tokens.append(t)
            yield t


def speculative_step(proposer, k: int = 4, sampling: Sampling | None = None, stats: SpeculativeStats | None = None):
    """A `step` for generate.stream_generate (topic 3.4): its sampler argument is ignored (sampling says how
    the target samples: rejection sampling needs its distributions, not a sampler's draws)."""

    def step(model, prompt, sampler=None):
        return speculative_generate_step(model, prompt, proposer, k, sampling, stats)

    return step

