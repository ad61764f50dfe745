"""Topic 3.4, speculative decoding: a proposer drafts k tokens (a smaller draft model, or n-gram
prompt lookup), the target checks them in one forward pass, and both caches are rewound past the
first rejected draft.

Checked against:
- the n-gram proposer's drafts, exactly, against a brute-force search written here (of the earlier
  occurrences of the last n tokens, falling back to shorter n-grams, the one whose match runs
  furthest back, up to MATCH_CAP tokens, the latest on a tie);
- greedy verification, exactly, on logits built here;
- modified rejection sampling: analytically, q * min(1, p/q) + (rejection mass) * norm(max(0, p - q))
  equals p (fp32), for random p, q and for a one-hot q (an n-gram draft); and statistically, the
  tokens that `accept_sampled` emits over many seeded trials follow the target's p at every
  position (chi-squared at a fixed seed, as 1.7's sampler tests); with top-k, top-p and min-p, the p
  and q it takes (Sampling.probs) against 1.7's float64 reference distribution (renormalized over the
  kept tokens), and the emitted tokens against it;
- invariances on tiny random pairs (a target and a draft that is the target's weights plus noise,
  sharing the vocabulary; Hypothesis draws k, the noise, the n-gram size and the prompt):
  speculative greedy == the target's own greedy, the target's cache after the run == a fresh
  prefill of the same tokens, the draft's cache == a fresh prefill of what it records, and the
  stats add up (tokens emitted = passes + accepted drafts);
- inside the batched engine (n-gram drafts, or a draft model's on a cache of its own per sequence,
  verified in the step's one call, the paged cache rewound): the engine without speculation is the oracle. Batched requests joining at
  different steps give its greedy tokens and log-probabilities (a tiny dense model: GREEDY_MARGIN and
  DENSE_BATCH; the default model on the kernels: exactly), a request that never drafts is undisturbed,
  streaming delivers each token once, the counts add up, every block is free at the end; prefix hits
  on blocks filled while speculating, preemption while speculating, lengths and the context's end,
  stop tokens and strings inside an accepted run, seeded sampling alone == batched, one-line errors;
  with a draft model (a tiny target's weights plus noise, saved as a folder): the same greedy and
  preemption checks, an aborted request's draft cache freed at once, seeded sampling alone ==
  batched, sampled drafts checked against the draft's q (the target drafting for itself keeps every
  draft), one-line errors for a vocabulary mismatch, an unknown model, k < 1;
- the real pair: Qwen2.5-Coder 0.5B drafting for the 1.5B (both quantized, week 2's kernels),
  single-stream and in the engine (== the engine without, exactly), and n-gram lookup on a prompt that asks for an edited copy of a code file: the target's own
  greedy tokens.

Greedy equality and rounding: the verify pass runs the target on k + 1 positions where plain decode
runs it on one; the fp32 matmuls of the two shapes sum in different orders, so logits differ by
ulps and a near tie can flip. Greedy tokens are therefore compared by the ladder's top-2 gap rule
(assert_greedy_tokens, GREEDY_MARGIN): token for token while the reference's gap is clear. The tiny
models' heads are scaled up so that their gaps are clear at every step compared.

Prerequisites beyond 2.1 (the cache it rewinds): 1.7 (sampling: the target's filtered
distribution is 1.7's), 2.4 (the real pair runs quantized on week 2's kernels) and, for the
engine's section, 3.1 (the paged cache it rewinds; the engine of 2.6 and 2.7).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from scipy.stats import chisquare

from spec.chat_command import assert_one_line_error, run_chat, stats_lines
from spec.engine_cases import DENSE_BATCH, Request, assert_same_logprobs, run
from spec.ladder import FP32, GREEDY_MARGIN, MIN_GREEDY_TOKENS, assert_close, assert_greedy_tokens

NAMES = ("NgramProposer", "DraftModel", "Sampling", "SpeculativeStats", "accept_greedy", "accept_sampled",
         "acceptance_probability", "residual_distribution", "speculative_generate_step")


@pytest.mark.presence
def test_has_names(impl):
    missing = [n for n in NAMES if not hasattr(impl.speculative, n)]
    assert not missing, f"impl.speculative lacks {missing}"


@pytest.fixture(scope="module")
def spec_mod(impl):
    return impl.speculative


# --- the n-gram proposer: exact -------------------------------------------------------------


def ngram_reference(tokens: list[int], k: int, n: int, min_n: int, cap: int) -> list[int]:
    """Brute force: for n down to min_n, every earlier start whose n tokens equal the last n; the one
    with the longest common suffix with the whole sequence (counted up to cap) wins, the latest on a tie."""

    def suffix(end: int) -> int:  # common suffix of tokens[:end] and tokens, up to cap
        length = 0
        while length < min(cap, end) and tokens[end - 1 - length] == tokens[-1 - length]:
            length += 1
        return length

    for m in range(n, min_n - 1, -1):
        if m >= len(tokens):
            continue
        starts = [s for s in range(len(tokens) - m) if tokens[s:s + m] == tokens[-m:]]
        if starts:
            s = max(starts, key=lambda s: (suffix(s + m), s))
            return tokens[s + m:s + m + k]
    return []


@given(data=st.data())
def test_ngram_proposes_the_continuation_of_the_longest_match(spec_mod, data):
    # A small alphabet makes matches (and repeated ones, and long ones) common.
    tokens = data.draw(st.lists(st.integers(0, 3), min_size=1, max_size=60), label="tokens")
    n = data.draw(st.integers(1, 4), label="n")
    min_n = data.draw(st.integers(1, n), label="min_n")
    k = data.draw(st.integers(0, 6), label="k")
    P = spec_mod.NgramProposer
    drafts, q = P(n, min_n).propose(tokens, k)
    assert q is None, "n-gram drafts are deterministic: q is None (one-hot)"
    assert drafts == ngram_reference(tokens, k, n, min_n, P.MATCH_CAP), f"tokens {tokens}, n {n}, min_n {min_n}, k {k}"


def test_ngram_cases(spec_mod):
    P = spec_mod.NgramProposer
    assert P(2).propose([1, 2, 3, 4, 1, 2], 3)[0] == [3, 4, 1], "the continuation may run into the tail"
    assert P(2).propose([1, 2, 7, 1, 2, 8, 1, 2], 1)[0] == [8], "the latest of equally long matches wins"
    assert P(2).propose([1, 2, 3, 9, 5, 2, 3, 8, 1, 2, 3], 1)[0] == [9], "the match running furthest back wins"
    assert P(2).propose([4] * 50 + [1], 2)[0] == [], "no earlier [4, 1]: nothing"
    assert P(1).propose([7] * 50, 3)[0] == [7], "repetitive text: matches tie at MATCH_CAP, the latest wins"
    assert P(3).propose([1, 2, 3, 9, 2, 3], 2)[0] == [], "no earlier 3-gram: nothing (no fallback)"
    assert P(3, 1).propose([1, 2, 3, 9, 2, 3], 2)[0] == [9, 2], "falls back to the 2-gram"
    assert P(2).propose([5, 5], 4)[0] == [], "the tail is not its own match"
    with pytest.raises(ValueError):
        P(2, 3)


# --- greedy verification: exact -------------------------------------------------------------


def test_accept_greedy(spec_mod):
    V = 10
    best = [3, 1, 4, 1]  # the target's argmax at [last, d1, d2, d3]
    logits = mx.array(np.eye(V, dtype=np.float32)[best])  # (4, V)
    assert spec_mod.accept_greedy(logits, [3, 1, 4]) == (3, 1), "all kept, then the bonus token"
    assert spec_mod.accept_greedy(logits, [3, 2, 4]) == (1, 1), "stops at the first mismatch, with the target's token"
    assert spec_mod.accept_greedy(logits, [0, 1, 4]) == (0, 3)
    assert spec_mod.accept_greedy(logits[:1], []) == (0, 3), "no drafts: a plain decode step"


# --- rejection sampling: analytic and statistical ----------------------------------------


def dirichlet(rng, V, zeros=0):
    p = rng.dirichlet(np.ones(V))
    p[rng.choice(V, zeros, replace=False)] = 0  # tokens a filter masked out
    return (p / p.sum()).astype(np.float32)


@given(data=st.data())
def test_one_step_output_distribution_is_p_analytically(spec_mod, data):
    # The first emitted token is x = draft with probability q(x) min(1, p(x)/q(x)) = min(q, p)(x),
    # or, after a rejection (probability 1 - sum min(p, q)), a draw from norm(max(0, p - q)):
    # together p exactly. Computed here from impl's two pieces.
    V = data.draw(st.integers(2, 12), label="V")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="seed"))
    p = dirichlet(rng, V, data.draw(st.integers(0, V - 1), label="zeros in p"))
    kind = data.draw(st.sampled_from(["dense", "zeros", "one-hot", "equal"]), label="q")
    q = {"dense": lambda: dirichlet(rng, V), "zeros": lambda: dirichlet(rng, V, V // 2),
         "one-hot": lambda: np.eye(V, dtype=np.float32)[rng.integers(V)], "equal": lambda: p.copy()}[kind]()
    acc = np.array(spec_mod.acceptance_probability(mx.array(p), mx.array(q)))
    assert ((acc >= 0) & (acc <= 1)).all(), f"acceptance probabilities {acc}"
    kept = q * acc
    residual = np.array(spec_mod.residual_distribution(mx.array(p), mx.array(q)))
    assert abs(residual.sum() - 1) < 1e-5 and (residual >= 0).all(), f"the residual is no distribution: {residual}"
    assert_close(kept + (1 - kept.sum()) * residual, p, FP32, f"the emitted token's distribution, q {kind}")


N_TRIALS = 12_000  # a probability off by 0.02 moves chi-squared by ~ 12000 * 0.02**2 / 0.2 = 24
ALPHA = 1e-3  # as 1.7: a fixed seed fails with probability 1e-3 for a correct sampler, and never flips


@pytest.mark.parametrize("case", ["k=1", "k=3", "k=2 q with zeros", "k=2 one-hot q"])
def test_emitted_tokens_follow_p(spec_mod, case):
    # Context-free distributions per position (p_0 .. p_k, q_1 .. q_k), so the draft at position j is
    # independent of the earlier ones: emitted token j, over the trials that reach it, follows p_j.
    V, k = 5, int(case[2])
    rng = np.random.default_rng(42)
    p = np.stack([dirichlet(rng, V, 1 if j == 1 else 0) for j in range(k + 1)])  # (k + 1, V)
    if "one-hot" in case:  # deterministic drafts (n-gram): q one-hot, passed as None
        q, drafts = None, [int(x) for x in rng.integers(0, V, k)]
    else:
        q, drafts = np.stack([dirichlet(rng, V, 2 if "zeros" in case else 0) for _ in range(k)]), None
    assert_emitted_tokens_follow(spec_mod, p, q, p, case, drafts)


def assert_emitted_tokens_follow(spec_mod, p: np.ndarray, q: np.ndarray | None, want: np.ndarray, case: str,
                                 drafts_fixed: list[int] | None = None):
    """Over N_TRIALS seeded steps of accept_sampled(p, q): drafts drawn from q (or drafts_fixed, q one-hot),
    emitted token j, over the trials that reach it, follows want[j] (chi-squared)."""
    k, V = p.shape[0] - 1, p.shape[1]
    emitted = [[] for _ in range(k + 1)]
    key = mx.random.key(1234)
    for _ in range(N_TRIALS):
        key, k_draft, k_check = mx.random.split(key, 3)
        drafts = drafts_fixed if q is None else mx.random.categorical(mx.log(mx.array(q)), key=k_draft).tolist()
        a, token = spec_mod.accept_sampled(mx.array(p), None if q is None else mx.array(q), drafts, k_check)
        assert 0 <= a <= k, f"{a} accepted of {k}"
        if q is not None:
            assert all(q[j, drafts[j]] > 0 for j in range(a)), "a draft q could not have drawn"
        for j, t in enumerate([*drafts[:a], token]):
            emitted[j].append(t)
    for j in range(k + 1):
        counts = np.bincount(emitted[j], minlength=V)
        n = counts.sum()
        if n < 500:  # too few trials reach this position for the test to say anything
            continue
        ok = want[j] > 0
        assert counts[~ok].sum() == 0, f"{case}, position {j}: emitted tokens p gives 0: {counts}"
        w = want[j][ok].astype(np.float64)
        stat, pvalue = chisquare(counts[ok], w / w.sum() * n)
        assert pvalue > ALPHA, (f"{case}, position {j}: chi-squared {stat:.1f}, p={pvalue:.2e}; counts {counts.tolist()},"
                                f" expected {np.round(want[j] * n).astype(int).tolist()}")


# (temperature, top_k, top_p, min_p): each filter alone, then all three
FILTERS = [(0.8, 3, 1.0, 0.0), (1.0, 0, 0.7, 0.0), (1.3, 0, 1.0, 0.1), (0.7, 4, 0.9, 0.05)]


@pytest.mark.parametrize("temperature, top_k, top_p, min_p", FILTERS)
def test_sampling_probs_are_the_filtered_distribution(spec_mod, temperature, top_k, top_p, min_p):
    # A sampled request draws from 1.7's filtered distribution: the kept tokens' probabilities,
    # renormalized. Sampling.probs is what p / q and the residual are computed from, so it must be that
    # distribution itself, summing to 1 (1.7's filters leave log-probabilities that sum to less).
    from spec.day_1_7_sampling import ref_distribution

    logits = np.random.default_rng(7).standard_normal((3, 8)).astype(np.float32) * 2  # gaps clear of every cut
    got = np.array(spec_mod.Sampling(temperature, top_k, top_p, min_p).probs(mx.array(logits)))
    assert_close(got, ref_distribution(logits, temperature, top_k, top_p, min_p), FP32,
                 f"Sampling({temperature}, {top_k}, {top_p}, {min_p}).probs")


def test_emitted_tokens_follow_the_filtered_distribution(spec_mod):
    # The engine's path with top-k, top-p and min-p all on: p and q from Sampling.probs of a target's and
    # a draft's logits (the draft near the target, so drafts are often kept); the emitted tokens must
    # follow the target's filtered distribution (1.7's reference).
    from spec.day_1_7_sampling import ref_distribution

    rng = np.random.default_rng(4)  # the filters keep 3 or 4 of the 8 tokens at each position, for p and q alike
    target = rng.standard_normal((3, 8)).astype(np.float32) * 0.7  # (k + 1, V), k = 2
    draft = target[:2] + rng.standard_normal((2, 8)).astype(np.float32) * 0.35
    sampling = spec_mod.Sampling(*FILTERS[-1])
    p, q = (np.array(sampling.probs(mx.array(x))) for x in (target, draft))
    assert_emitted_tokens_follow(spec_mod, p, q, ref_distribution(target, *FILTERS[-1]), "all three filters")


# --- tiny random pairs: invariances ---------------------------------------------------------

V_TINY = 128
HEAD_SCALE = 6.0  # the head scaled so the tiny target's top-2 logit gaps clear GREEDY_MARGIN (measured >= 0.026)


def tiny_weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {"model.embed_tokens.weight": (V_TINY, 64), "model.norm.weight": (64,), "lm_head.weight": (V_TINY, 64)}
    for i in range(2):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (64, 64), p + "self_attn.k_proj.weight": (32, 64),
                   p + "self_attn.v_proj.weight": (32, 64), p + "self_attn.o_proj.weight": (64, 64),
                   p + "self_attn.q_proj.bias": (64,), p + "self_attn.k_proj.bias": (32,),
                   p + "self_attn.v_proj.bias": (32,), p + "mlp.gate_proj.weight": (96, 64),
                   p + "mlp.up_proj.weight": (96, 64), p + "mlp.down_proj.weight": (64, 96),
                   p + "input_layernorm.weight": (64,), p + "post_attention_layernorm.weight": (64,)}
    w = {k: rng.standard_normal(s).astype(np.float32) * 0.2 for k, s in shapes.items()}
    w["lm_head.weight"] *= HEAD_SCALE
    return w


def tiny_model(impl, weights: dict[str, np.ndarray]):
    args = impl.config.ModelArgs(model_type="qwen2", hidden_size=64, num_hidden_layers=2, intermediate_size=96,
                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=V_TINY,
                                 max_position_embeddings=256, rope_theta=10000.0)
    return impl.model.Model(args, {k: mx.array(v) for k, v in weights.items()})


@pytest.fixture(scope="module")
def target_weights():
    return tiny_weights(1)


@pytest.fixture(scope="module")
def target(impl, target_weights):
    return tiny_model(impl, target_weights)


def draft_of(impl, target_weights, noise: float, seed: int = 2):
    """The target's weights plus noise: a draft that agrees with the target often, not always."""
    extra = tiny_weights(seed)
    return tiny_model(impl, {k: v + noise * extra[k] for k, v in target_weights.items()})


def greedy_reference(model, prompt: list[int], steps: int) -> tuple[list[int], list[float]]:
    """The target's greedy tokens by recomputing the whole sequence, with each step's top-2 gap."""
    seq, gaps = list(prompt), []
    for _ in range(steps):
        logits = np.array(model(mx.array([seq]))[0, -1])
        top2 = np.sort(logits)[-2:]
        gaps.append(float(top2[1] - top2[0]))
        seq.append(int(logits.argmax()))
    return seq[len(prompt):], gaps


def take(it, n: int) -> list[int]:
    return [next(it) for _ in range(n)]


def assume_clear_start(gaps: list[float]) -> None:
    """A prompt whose first greedy steps are near ties (a random tiny model has some) checks
    nothing: Hypothesis draws another."""
    assume(min(gaps[:MIN_GREEDY_TOKENS]) >= GREEDY_MARGIN)


def assert_cache_matches_prefill(impl, model, cache, tokens: list[int], what: str) -> None:
    """A rewound cache holds what a fresh prefill of `tokens` holds (same fp32 math, other shapes)."""
    fresh = impl.kv_cache.make_cache(model)
    model(mx.array([tokens]), cache=fresh)
    for i, (c, f) in enumerate(zip(cache, fresh, strict=True)):
        assert c.offset == len(tokens), f"{what}: layer {i} holds {c.offset} positions, {len(tokens)} tokens"
        for got, want in zip(c.state, f.state, strict=True):
            assert_close(got, want, FP32, f"{what}: layer {i}'s cache vs a fresh prefill")


STEPS = 24


@given(data=st.data())
def test_tiny_pair_greedy_equals_the_targets_greedy(impl, spec_mod, target, target_weights, data):
    k = data.draw(st.integers(0, 6), label="k")
    noise = data.draw(st.sampled_from([0.0, 0.05, 0.1, 0.3, 1.0]), label="draft noise")
    seed = data.draw(st.integers(0, 2**16), label="prompt seed")
    prompt = [int(t) for t in np.random.default_rng(seed).integers(0, V_TINY, data.draw(st.integers(1, 12), label="prompt length"))]
    want, gaps = greedy_reference(target, prompt, STEPS)
    assume_clear_start(gaps)
    draft = spec_mod.DraftModel(draft_of(impl, target_weights, noise))
    stats, cache = spec_mod.SpeculativeStats(), impl.kv_cache.make_cache(target)
    steps = spec_mod.speculative_generate_step(target, prompt, draft, k, stats=stats, cache=cache)
    compared = assert_greedy_tokens(steps, want, gaps, f"draft model, k={k}, noise {noise}")
    # The generator stopped inside its last pass: that pass's tokens are counted, maybe not all taken.
    assert 1 + stats.steps + stats.accepted >= compared, f"{stats}: fewer tokens made than {compared} compared"
    assert stats.accepted <= stats.drafted <= k * stats.steps, stats
    if noise == 0.0 and k > 0:
        assert stats.acceptance_rate == 1.0, f"a draft identical to the target had drafts rejected: {stats}"


@given(data=st.data())
def test_tiny_ngram_greedy_equals_the_targets_greedy(impl, spec_mod, target, data):
    k = data.draw(st.integers(1, 6), label="k")
    n = data.draw(st.integers(1, 4), label="n")
    seed = data.draw(st.integers(0, 2**16), label="prompt seed")
    # A prompt that repeats a random span: lookups find matches in it.
    span = [int(t) for t in np.random.default_rng(seed).integers(0, V_TINY, 8)]
    prompt = span + [5] + span[:data.draw(st.integers(1, 8), label="repeated")]
    want, gaps = greedy_reference(target, prompt, STEPS)
    assume_clear_start(gaps)
    stats = spec_mod.SpeculativeStats()
    steps = spec_mod.speculative_generate_step(target, prompt, spec_mod.NgramProposer(n, 1), k, stats=stats)
    assert_greedy_tokens(steps, want, gaps, f"n-gram n={n}, k={k}")
    assert stats.accepted <= stats.drafted <= k * stats.steps, stats


@pytest.mark.parametrize("proposer", ["draft", "ngram"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_caches_after_rewinds_equal_a_fresh_prefill(impl, spec_mod, target, target_weights, proposer, temperature):
    # After many accept/reject rounds the target's cache holds every emitted token but the last
    # (the invariant), exactly what a fresh prefill of them gives; the draft's holds its recorded tokens.
    # Tokens from a 12-token alphabet: the lookup finds (mostly wrong) matches everywhere.
    prompt = [int(t) for t in np.random.default_rng(7).integers(0, 12, 16)]
    draft = spec_mod.DraftModel(draft_of(impl, target_weights, 0.1)) if proposer == "draft" else spec_mod.NgramProposer(2, 1)
    stats, cache = spec_mod.SpeculativeStats(), impl.kv_cache.make_cache(target)
    sampling = spec_mod.Sampling(temperature=temperature, seed=11)
    steps = spec_mod.speculative_generate_step(target, prompt, draft, 4, sampling, stats, cache)
    tokens = []
    while stats.steps < 12 or len(tokens) < 1 + stats.steps + stats.accepted:  # end on a pass's last token
        tokens.append(next(steps))
    assert len(tokens) == 1 + stats.steps + stats.accepted, f"{len(tokens)} tokens, {stats}"
    assert 0 < stats.accepted < stats.drafted, f"no rejection (or no acceptance) to check: {stats}"
    assert_cache_matches_prefill(impl, target, cache, prompt + tokens[:-1], "the target's cache")
    if proposer == "draft":
        # It records the sequence it last drafted from, then that proposal's drafts but the last.
        assert draft.tokens[:len(prompt)] == prompt, "the draft's cache records another prompt"
        assert_cache_matches_prefill(impl, draft.model, draft.cache, draft.tokens, "the draft's cache")


def test_sampling_is_seeded(impl, spec_mod, target, target_weights):
    draft = draft_of(impl, target_weights, 0.1)
    runs = []
    for _ in range(2):
        steps = spec_mod.speculative_generate_step(target, [1, 2, 3], spec_mod.DraftModel(draft), 3,
                                                   spec_mod.Sampling(temperature=0.8, top_k=20, seed=5))
        runs.append(take(steps, 16))
    assert runs[0] == runs[1], f"the same seed gave {runs[0]} and {runs[1]}"


# --- the real pair --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def coder_pair(impl, coder_gguf, coder_15b_gguf):
    """(target 1.5B, draft 0.5B), both quantized (week 2's kernels), one tokenizer."""
    return impl.loader.load_model(coder_15b_gguf, quantized=True), impl.loader.load_model(coder_gguf, quantized=True)


def decode_reference(impl, model, prompt: list[int], steps: int) -> tuple[list[int], list[float]]:
    """The target's plain one-token-at-a-time greedy decode, with each step's top-2 gap."""
    cache, tokens, gaps = impl.kv_cache.make_cache(model), [], []
    logits = model(mx.array([prompt]), cache=cache, logits_to_keep=1)[0, -1]
    for _ in range(steps):
        top2 = np.sort(np.array(logits))[-2:]
        gaps.append(float(top2[1] - top2[0]))
        tokens.append(int(mx.argmax(logits).item()))
        logits = model(mx.array([[tokens[-1]]]), cache=cache)[0, -1]
    return tokens, gaps


def chat_prompt(loaded, text: str) -> list[int]:
    return loaded.tokenizer.encode(loaded.chat_template.render([{"role": "user", "content": text}]))


def test_real_draft_model_greedy_equals_the_targets(impl, spec_mod, coder_pair):
    target, draft = coder_pair
    prompt = chat_prompt(target, "Write a Python function that returns the n-th Fibonacci number.")
    want, gaps = decode_reference(impl, target.model, prompt, 16)
    stats = spec_mod.SpeculativeStats()
    steps = spec_mod.speculative_generate_step(target.model, prompt, spec_mod.DraftModel(draft.model), 4, stats=stats)
    compared = assert_greedy_tokens(steps, want, gaps, "0.5B drafting for the 1.5B, k=4")
    print(f"0.5B draft: {stats}, acceptance rate {stats.acceptance_rate:.2f}")
    assert compared >= MIN_GREEDY_TOKENS and stats.accepted > 0, f"the 0.5B draft never agreed with the 1.5B: {stats}"


def test_real_draft_model_in_the_engine_equals_the_engine_without(impl, coder_pair):
    # Quantized weights on the kernels: a verify chunk's rows are a plain decode's, bit for bit (topic
    # 3.2's claim), so the tokens are equal exactly. The draft is given loaded (the fixture's).
    target, draft = coder_pair
    prompt = chat_prompt(target, "Write a Python function that returns the n-th Fibonacci number.")
    request = [Request("0", prompt, impl.engine.SamplingParams(max_tokens=16))]

    def engine(spec=None):
        return impl.engine.LLMEngine(target.model, target.tokenizer, speculative_config=spec, log=False)

    spec = engine({"method": "draft_model", "model": draft, "num_speculative_tokens": 4})
    got, want = run(spec, request)["0"], run(engine(), request)["0"]
    assert (got.token_ids, got.finish_reason) == (want.token_ids, want.finish_reason), \
        f"{got.token_ids} vs plain {want.token_ids}"
    print(f"0.5B drafting in the engine: {spec.stats()}")
    assert spec.stats()["spec_num_accepted_tokens"] > 0, f"the 0.5B draft never agreed with the 1.5B: {spec.stats()}"


EDIT_SOURCE = '''def mean(values):
    total = 0
    for v in values:
        total += v
    return total / len(values)


def variance(values):
    m = mean(values)
    return sum((v - m) ** 2 for v in values) / len(values)
'''


def test_real_ngram_on_an_edit_equals_the_targets_greedy(impl, spec_mod, coder_pair):
    # The answer copies most of the file: prompt lookup drafts whole runs of it.
    target, _ = coder_pair
    prompt = chat_prompt(target, "Rename the parameter `values` to `xs` in this code. Reply with the whole code only.\n\n"
                         + EDIT_SOURCE)
    want, gaps = decode_reference(impl, target.model, prompt, 24)
    stats = spec_mod.SpeculativeStats()
    steps = spec_mod.speculative_generate_step(target.model, prompt, spec_mod.NgramProposer(3, 1), 6, stats=stats)
    assert_greedy_tokens(steps, want, gaps, "n-gram lookup on an edit, k=6")
    print(f"n-gram: {stats}, acceptance rate {stats.acceptance_rate:.2f}")
    assert stats.tokens_per_step > 1.5, f"lookup on a repeated file should keep drafts: {stats}"


# --- the chat command -----------------------------------------------------------------------


def test_chat_with_ngram_speculation_gives_the_greedy_answer(impl, default_model):
    # The default model on week 2's kernels (as 2.4's chat check), n-gram lookup drafting: the reply is
    # transformers' greedy answer while its top-2 gaps are clear, and the stats line says what was accepted.
    from spec.day_1_6_generate import CONVERSATIONS, assert_answer, transformers_answer

    messages = CONVERSATIONS["one_user"]
    r = run_chat(impl, "--speculative", "ngram", messages[0]["content"], "--max-tokens", "24")
    assert r.returncode == 0, r.stderr[-2000:]
    stats = stats_lines(r.stderr)
    assert stats and "drafts accepted" in stats[-1], f"the stats line says nothing of speculation: {stats}"
    assert_answer(r.stdout.removesuffix("\n"), *transformers_answer(default_model, messages),
                  "the chat command with --speculative ngram")


def test_chat_with_a_draft_model_runs_on_the_engine(impl, default_model):
    # --draft-model drafts in the batched engine (the start-up line names the draft, the stats line
    # counts its drafts). The default model drafting for itself keeps the check quick: the reply is
    # transformers' greedy answer, as above.
    from spec.day_1_6_generate import CONVERSATIONS, assert_answer, transformers_answer

    messages = CONVERSATIONS["one_user"]
    r = run_chat(impl, "--draft-model", str(default_model), messages[0]["content"], "--max-tokens", "24")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"[speculative decoding: draft model {default_model.name}" in r.stderr, r.stderr[-2000:]
    stats = stats_lines(r.stderr)
    assert stats and "drafts accepted" in stats[-1], f"the stats line says nothing of speculation: {stats}"
    assert_answer(r.stdout.removesuffix("\n"), *transformers_answer(default_model, messages),
                  "the chat command with --draft-model")


@pytest.mark.parametrize("flags, message", [
    (("--speculative", "ngram", "--no-kv-cache"), "drop --no-kv-cache"),
    (("--speculative", "ngram", "--draft-model", "qwen2.5-coder-0.5b"), "give one"),
    (("--speculative", "ngram", "--num-draft-tokens", "0"), "--num-draft-tokens must be at least 1"),
    (("--draft-model", "no-such-draft"), "model not found: no-such-draft"),
])
def test_chat_speculation_flags_out_of_range(impl, flags, message):
    assert_one_line_error(run_chat(impl, *flags, "hi"), message)


# --- inside the batched engine --------------------------------------------------------------
#
# The oracle is the engine itself without speculation: the same requests, batched the same way,
# give the same greedy tokens (while the plain run's top-2 gap is clear: a verify chunk's rows go
# through OpenBLAS as a block of 1 + k rows where a decode is one, DENSE_BATCH's reason) and the same
# log-probabilities within DENSE_BATCH. A paged cache left wrong by a rewind (a rejected draft's keys
# read, a verified one's lost) moves every later log-probability far beyond that.

NGRAM_ENGINE = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}


@pytest.fixture(scope="module")
def tiny_loaded(impl, tmp_path_factory):
    """A tiny random Qwen2 with the SmolLM2 tokenizer (vocab 320, context 128); initializer_range 0.1
    (not 0.02) so its greedy top-2 gaps are mostly clear of GREEDY_MARGIN."""
    from reference.tiny_models import tiny_folder

    _, folder = tiny_folder(tmp_path_factory.mktemp("tiny-spec"), "qwen2-tied", seed=5, initializer_range=0.1)
    return impl.loader.load_model(folder)


def engine_of(impl, loaded, spec=None, **kw):
    """The paged engine (the twin, blocks of 4: rewinds cross and free blocks), speculating as `spec` says."""
    kw = {"block_size": 4, "use_kernels": False, "log": False, "max_num_seqs": 8, "max_num_batched_tokens": 64} | kw
    return impl.engine.LLMEngine(loaded.model, loaded.tokenizer, speculative_config=spec, **kw)


def engine_prompts(seed: int, n: int, vocab: int = 320) -> list[list[int]]:
    """Even ones repeat a span (lookups find it and drafts are accepted), odd ones are random."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        span = rng.integers(3, vocab, int(rng.integers(6, 12))).tolist()  # 3..: not an end-of-text token
        out.append(span + span + span[:3] if i % 2 == 0 else rng.integers(3, vocab, int(rng.integers(4, 30))).tolist())
    return out


def run_streamed(engine, requests) -> tuple[dict, dict]:
    """run(), also collecting each request's streamed new_token_ids per step: (outputs, request id -> chunks)."""
    chunks: dict[str, list[list[int]]] = {}
    step = engine.step

    def recording_step():
        outs = step()
        for out in outs:
            chunks.setdefault(out.request_id, []).append(list(out.new_token_ids))
        return outs

    engine.step = recording_step
    return run(engine, requests), chunks


def greedy_gaps(out) -> list[float]:
    """Each step's top-2 log-probability gap (the logit gap) from a run with logprobs >= 2."""
    return [sorted(d.values())[-1] - sorted(d.values())[-2] for d in out.logprobs]


def assert_same_as_plain(got, want, what: str) -> int:
    """got (speculative) == want (plain) token for token while want's top-2 gap is clear, with the same
    log-probabilities (DENSE_BATCH) there; returns how many tokens were compared."""
    n = 0
    for gap in greedy_gaps(want):
        if gap < GREEDY_MARGIN:
            break
        n += 1
    assert got.token_ids[:n] == want.token_ids[:n], f"{what}: tokens {got.token_ids} vs plain {want.token_ids}"
    assert_same_logprobs(got.logprobs[:n], want.logprobs[:n], DENSE_BATCH, what)
    if n == len(want.token_ids):
        assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason, what
    return n


@pytest.mark.presence
def test_engine_has_speculative_config(impl):
    assert hasattr(impl.engine.spec_decode, "SpeculativeConfig"), "impl.engine.spec_decode lacks SpeculativeConfig"


@pytest.mark.parametrize("k", [1, 4])
def test_engine_greedy_with_ngram_equals_the_engine_without(impl, tiny_loaded, k):
    assert_batched_greedy_equals_plain(impl, tiny_loaded, NGRAM_ENGINE | {"num_speculative_tokens": k}, f"k={k}")


def assert_batched_greedy_equals_plain(impl, loaded, config: dict, what: str):
    """Six requests joining over the first steps, half of them repeating a span; one asks for 2 tokens,
    so it never drafts (k is clipped by max_tokens) and shares steps with verify chunks. Speculating as
    `config` says gives the plain engine's tokens, streams each once, counts add up, frees every block.
    Returns the speculating engine."""
    P = impl.engine.SamplingParams
    requests = [Request(str(i), p, P(max_tokens=2 if i == 5 else 32, ignore_eos=True, logprobs=2), join_step=i % 3)
                for i, p in enumerate(engine_prompts(3, 6))]
    spec = engine_of(impl, loaded, config)
    got, chunks = run_streamed(spec, requests)
    want = run(engine_of(impl, loaded), requests)
    compared = sum(assert_same_as_plain(got[r.request_id], want[r.request_id], f"{what}, request {r.request_id}")
                   for r in requests)
    assert compared >= len(requests) * MIN_GREEDY_TOKENS, f"only {compared} tokens had a clear top-2 gap"
    stats = spec.stats()
    drafted, accepted = stats["spec_num_draft_tokens"], stats["spec_num_accepted_tokens"]
    assert 0 < accepted < drafted, f"no acceptance (or no rejection) to check: {stats}"
    per_request = [(got[r.request_id].metrics.num_draft_tokens, got[r.request_id].metrics.num_accepted_tokens)
                   for r in requests]
    assert [sum(c) for c in zip(*per_request, strict=True)] == [drafted, accepted], \
        f"the requests' counts {per_request} do not add up to the engine's {drafted} drafted, {accepted} accepted"
    assert per_request[5] == (0, 0), f"a 2-token request drafted: {per_request[5]}"
    assert max(len(c) for cs in chunks.values() for c in cs) > 1, "no step delivered several tokens"
    for r in requests:
        streamed = [t for c in chunks[r.request_id] for t in c]
        assert streamed == got[r.request_id].token_ids, f"request {r.request_id}: streamed {streamed}"
    assert stats["blocks_free"] == stats["num_blocks"], f"blocks held after every request ended: {stats}"
    return spec


def test_engine_prefix_cache_holds_only_verified_blocks(impl, tiny_loaded):
    # A second wave whose prompts are the first wave's prompts and outputs: their leading blocks are
    # prefix hits on blocks filled while speculating. Had a block holding a rejected draft's keys been
    # hashed (or a verified one's lost in a rewind), the hit would feed the second wave wrong keys.
    P = impl.engine.SamplingParams
    first = [Request(str(i), p, P(max_tokens=24, ignore_eos=True)) for i, p in enumerate(engine_prompts(4, 4, vocab=16))]
    spec = engine_of(impl, tiny_loaded, NGRAM_ENGINE)
    out1 = run(spec, first)
    assert spec.stats()["spec_num_accepted_tokens"] < spec.stats()["spec_num_draft_tokens"], "no rejection"
    second = [Request(f"b{r.request_id}", r.prompt_token_ids + out1[r.request_id].token_ids[:-1],
                      P(max_tokens=12, ignore_eos=True, logprobs=2)) for r in first]
    got = run(spec, second)
    want = run(engine_of(impl, tiny_loaded, enable_prefix_caching=False), second)
    assert sum(o.num_cached_tokens for o in got.values()) > 0, "the second wave hit no cached block"
    for r in second:
        assert_same_as_plain(got[r.request_id], want[r.request_id], f"second wave, request {r.request_id}")
    assert spec.kv.num_free_blocks == spec.kv.num_blocks, "blocks held after every request ended"


def test_engine_preempted_while_speculating_equals_never_preempted(impl, tiny_loaded):
    P = impl.engine.SamplingParams
    requests = [Request(str(i), p, P(max_tokens=30, ignore_eos=True, logprobs=2)) for i, p in enumerate(engine_prompts(5, 4))]
    per_block = impl.engine.kv_pool.bytes_per_block(tiny_loaded.args, 4, mx.float32)
    small = engine_of(impl, tiny_loaded, NGRAM_ENGINE, kv_cache_memory=28 * per_block)  # 112 positions for up to 4 x 60
    got = run(small, requests)
    assert small.num_preemptions > 0, "nothing was preempted: the check is vacuous"
    assert small.stats()["spec_num_accepted_tokens"] > 0, "nothing was accepted"
    want = run(engine_of(impl, tiny_loaded), requests)
    for r in requests:
        assert_same_as_plain(got[r.request_id], want[r.request_id], f"request {r.request_id} after preemption")
    assert small.kv.num_free_blocks == small.kv.num_blocks, "blocks held after every request ended"


def test_engine_max_tokens_and_the_context_cut_like_the_engine_without(impl, tiny_loaded):
    # Drafts are clipped so that all of them and the target's token stay within max_tokens and the
    # context (128 here): every length ends exactly where the plain engine's does.
    P = impl.engine.SamplingParams
    prompt = engine_prompts(6, 1)[0]
    requests = [Request(f"m{n}", prompt, P(max_tokens=n, ignore_eos=True)) for n in range(1, 10)]
    requests.append(Request("context", [7] * (120 - len(prompt)) + prompt, P(max_tokens=40, ignore_eos=True)))
    spec = engine_of(impl, tiny_loaded, NGRAM_ENGINE)
    got, want = run(spec, requests), run(engine_of(impl, tiny_loaded), requests)
    assert spec.stats()["spec_num_accepted_tokens"] > 0, "nothing was accepted"
    for r in requests:
        g, w = got[r.request_id], want[r.request_id]
        assert (g.token_ids, g.finish_reason) == (w.token_ids, w.finish_reason), \
            f"{r.request_id}: {g.token_ids} {g.finish_reason} vs plain {w.token_ids} {w.finish_reason}"
    assert len(got["context"].token_ids) == 128 - 120, "the context's end"


def test_engine_seeded_sampling_is_the_same_alone_and_batched(impl, tiny_loaded):
    # Rejection sampling draws from the request's own key (from its seed): other requests and their
    # drafts change nothing. (That each emitted token follows the target's p is test_emitted_tokens_follow_p's,
    # on the same accept_sampled the engine calls, with n-gram drafts as one-hot q.)
    P = impl.engine.SamplingParams
    prompts = engine_prompts(8, 4, vocab=24)
    params = P(max_tokens=24, ignore_eos=True, temperature=0.7, top_k=8, seed=3)
    alone = run(engine_of(impl, tiny_loaded, NGRAM_ENGINE), [Request("s", prompts[0], params)])["s"]
    batch = [Request("s", prompts[0], params)] + [Request(str(i), p, P(max_tokens=24, ignore_eos=True), join_step=i)
                                                  for i, p in enumerate(prompts[1:])]
    spec = engine_of(impl, tiny_loaded, NGRAM_ENGINE)
    got = run(spec, batch)["s"]
    assert got.token_ids == alone.token_ids, f"batched {got.token_ids} vs alone {alone.token_ids}"
    assert got.metrics.num_draft_tokens > 0, "the sampled request drafted nothing"


# --- a draft model inside the engine ---------------------------------------------------------
#
# The same oracle. Each sequence drafts on its own contiguous cache of the draft model (outside the
# paged pool), rewound after rejections and freed when the sequence ends, is aborted or preempted.

DRAFT_NOISE = 0.5  # the draft's weights are the target's plus this much noise (in each tensor's std): some drafts rejected


def noisy_copy(folder, into, noise: float, seed: int = 9):
    """An HF folder holding `folder`'s model with noise * std(w) * N(0, 1) added to every weight: a draft
    with the target's vocabulary and tokenizer that agrees with it often, not always."""
    import shutil

    into = shutil.copytree(folder, into)
    rng = np.random.default_rng(seed)
    for f in into.glob("*.safetensors"):
        w = {k: np.array(v) for k, v in mx.load(str(f)).items()}
        mx.save_safetensors(str(f), {k: mx.array(v + noise * v.std() * rng.standard_normal(v.shape).astype(np.float32))
                                     for k, v in w.items()})
    return into


@pytest.fixture(scope="module")
def draft_folder(tiny_loaded, tmp_path_factory):
    return noisy_copy(tiny_loaded.path, tmp_path_factory.mktemp("tiny-draft") / "draft", DRAFT_NOISE)


def draft_config(folder, k: int = 4) -> dict:
    return {"method": "draft_model", "model": str(folder), "num_speculative_tokens": k}


@pytest.mark.parametrize("k", [1, 4])
def test_engine_greedy_with_a_draft_model_equals_the_engine_without(impl, tiny_loaded, draft_folder, k):
    spec = assert_batched_greedy_equals_plain(impl, tiny_loaded, draft_config(draft_folder, k), f"draft model, k={k}")
    assert spec.stats()["spec_draft_cache_positions"] == 0, f"draft caches held after every request ended: {spec.stats()}"


def test_engine_draft_model_preempted_while_speculating_equals_never_preempted(impl, tiny_loaded, draft_folder):
    # A preempted sequence's draft cache goes with its blocks; readmitted, it prefills the draft again.
    # The draft caches share the pool's budget in positions (112 here), so some steps draft nothing.
    P = impl.engine.SamplingParams
    requests = [Request(str(i), p, P(max_tokens=30, ignore_eos=True, logprobs=2)) for i, p in enumerate(engine_prompts(5, 4))]
    per_block = impl.engine.kv_pool.bytes_per_block(tiny_loaded.args, 4, mx.float32)
    small = engine_of(impl, tiny_loaded, draft_config(draft_folder), kv_cache_memory=28 * per_block)
    step, most = small.step, []

    def recording_step():
        outs = step()
        most.append(small.stats()["spec_draft_cache_positions"])
        return outs

    small.step = recording_step
    got = run(small, requests)
    assert small.num_preemptions > 0, "nothing was preempted: the check is vacuous"
    assert small.stats()["spec_num_accepted_tokens"] > 0, "nothing was accepted"
    assert 0 < max(most) <= 28 * 4, f"the draft caches held up to {max(most)} positions, the budget is 112"
    want = run(engine_of(impl, tiny_loaded), requests)
    for r in requests:
        assert_same_as_plain(got[r.request_id], want[r.request_id], f"request {r.request_id} after preemption")
    assert small.kv.num_free_blocks == small.kv.num_blocks, "blocks held after every request ended"
    assert small.stats()["spec_draft_cache_positions"] == 0, "draft caches held after every request ended"


def test_engine_draft_model_aborted_request_frees_its_draft_cache(impl, tiny_loaded, draft_folder):
    P = impl.engine.SamplingParams
    a, b = engine_prompts(7, 2)
    params = P(max_tokens=24, ignore_eos=True, logprobs=2)
    engine = engine_of(impl, tiny_loaded, draft_config(draft_folder))
    engine.add_request("a", a, params)
    engine.add_request("b", b, params)
    outs = {}
    while not (outs and all(o.metrics.num_draft_tokens for o in outs.values())):  # both have drafted
        outs |= {o.request_id: o for o in engine.step()}
    held = engine.stats()["spec_draft_cache_positions"]
    engine.abort_request("a")
    left = engine.stats()["spec_draft_cache_positions"]
    b_tokens = len(b) + len(outs["b"].token_ids)
    # b's own cache holds at most its tokens and k - 1 drafts; a's went with the abort, before any step.
    assert left < held and left <= b_tokens + 3, f"{held} draft positions before a's abort, {left} after"
    while engine.has_unfinished_requests():
        outs |= {o.request_id: o for o in engine.step()}
    want = run(engine_of(impl, tiny_loaded), [Request("b", b, params)])["b"]
    assert_same_as_plain(outs["b"], want, "b after a was aborted")
    stats = engine.stats()
    assert stats["spec_draft_cache_positions"] == 0 and stats["blocks_free"] == stats["num_blocks"], stats


def test_engine_draft_model_seeded_sampling_is_the_same_alone_and_batched(impl, tiny_loaded, draft_folder):
    # The draft samples its drafts with the request's own key too: other requests change nothing.
    P = impl.engine.SamplingParams
    prompts = engine_prompts(8, 4, vocab=24)
    params = P(max_tokens=24, ignore_eos=True, temperature=0.7, top_k=8, seed=3)
    alone = run(engine_of(impl, tiny_loaded, draft_config(draft_folder)), [Request("s", prompts[0], params)])["s"]
    batch = [Request("s", prompts[0], params)] + [Request(str(i), p, P(max_tokens=24, ignore_eos=True), join_step=i)
                                                  for i, p in enumerate(prompts[1:])]
    got = run(engine_of(impl, tiny_loaded, draft_config(draft_folder)), batch)["s"]
    assert got.token_ids == alone.token_ids, f"batched {got.token_ids} vs alone {alone.token_ids}"
    assert got.metrics.num_draft_tokens > 0, "the sampled request drafted nothing"


def test_engine_sampled_drafts_are_checked_against_the_drafts_q(impl, tiny_loaded):
    # The target drafting for itself, sampling at temperature 1: p == q at every draft (up to rounding:
    # the draft's contiguous cache and the target's paged one sum in other orders), so min(1, p/q) keeps
    # all of them. Had the engine checked a sampled draft as if deterministic (q one-hot), it would
    # keep each only with probability p(x): almost none on this model, whose distributions are flat.
    P = impl.engine.SamplingParams
    requests = [Request(str(i), p, P(max_tokens=24, ignore_eos=True, temperature=1.0, seed=i))
                for i, p in enumerate(engine_prompts(9, 4))]
    spec = engine_of(impl, tiny_loaded, draft_config(tiny_loaded.path))
    run(spec, requests)
    stats = spec.stats()
    assert stats["spec_num_draft_tokens"] > 40, stats
    assert stats["spec_num_accepted_tokens"] >= stats["spec_num_draft_tokens"] - 1, f"drafts rejected: {stats}"


def test_engine_draft_model_vocabulary_must_match(impl, tiny_loaded, target_weights):
    # A given model (not a path) of 128 tokens for a target of 320.
    with pytest.raises(ValueError) as e:
        engine_of(impl, tiny_loaded, {"method": "draft_model", "model": tiny_model(impl, target_weights)})
    assert "128" in str(e.value) and "320" in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.fixture(scope="module")
def smol(impl, default_model):
    """The default model, quantized on week 2's kernels (the engine's default)."""
    return impl.loader.load_model(default_model)


COPY_TEXT = "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step."


def test_real_engine_with_ngram_equals_the_engine_without_and_stops_inside_a_run(impl, smol):
    # On quantized weights with the kernels a row is computed the same way in any batch and chunk (topic
    # 3.2's bitwise claim), so a verify chunk's rows are a plain decode's: the tokens are equal exactly.
    tok, P = smol.tokenizer, impl.engine.SamplingParams
    chat = [f"Repeat this sentence exactly: {COPY_TEXT}", "Write a haiku about the sea."]
    prompts = [tok.encode(smol.chat_template.render([{"role": "user", "content": m}])) for m in chat]
    prompts.append(tok.encode("def fib(n):\n    "))
    requests = [Request(str(i), p, P(max_tokens=32)) for i, p in enumerate(prompts)]

    def engine(spec=None):
        return impl.engine.LLMEngine(smol.model, tok, speculative_config=spec, log=False)

    spec = engine(NGRAM_ENGINE)
    got, chunks = run_streamed(spec, requests)
    want = run(engine(), requests)
    for r in requests:
        g, w = got[r.request_id], want[r.request_id]
        assert (g.token_ids, g.text, g.finish_reason) == (w.token_ids, w.text, w.finish_reason), \
            f"request {r.request_id}: {g.token_ids} vs plain {w.token_ids}"
    print(f"the default model, n-gram k=4: {spec.stats()}")
    # A stop token, and a stop string, first met inside a step that accepted tokens after it: the
    # request ends there and what came after it in that step is dropped, as the plain engine never made it.
    tokens, pos, start = got["0"].token_ids, None, 0
    for chunk in chunks["0"]:
        firsts = [start + j for j, t in enumerate(chunk[:-1]) if t not in tokens[:start + j]]
        if firsts:
            pos = firsts[0]
            break
        start += len(chunk)
    assert pos is not None, f"no step accepted a new token with tokens after it: {chunks['0']}"
    piece = tok.decode(tokens[pos:pos + 1])
    cases = {"stop token": P(max_tokens=32, stop_token_ids=[tokens[pos]]), "stop string": P(max_tokens=32, stop=[piece])}
    for what, params in cases.items():
        g = run(engine(NGRAM_ENGINE), [Request("0", prompts[0], params)])["0"]
        w = run(engine(), [Request("0", prompts[0], params)])["0"]
        assert (g.token_ids, g.text, g.finish_reason) == (w.token_ids, w.text, w.finish_reason), \
            f"{what} {piece!r}: {g.token_ids} {g.text!r} vs plain {w.token_ids} {w.text!r}"
        assert g.finish_reason == "stop" and len(g.token_ids) <= pos + 1, f"{what}: did not stop at {pos}: {g.token_ids}"


@pytest.mark.parametrize("config, message", [
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be an integer >= 1"),
    ({"method": "eagle", "num_speculative_tokens": 2}, "'eagle' is not one the engine has"),
    ({"method": "ngram", "prompt_lookup_min": 3, "prompt_lookup_max": 2}, "prompt_lookup_min <= prompt_lookup_max"),
    ({"method": "ngram", "k": 2}, "unknown speculative config fields ['k']"),
    ('{"method": "ngram", ', "not JSON"),
    ({"method": "draft_model", "model": "qwen9-nope"}, "'qwen9-nope' is not a file, a folder or a known name"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "method 'draft_model' needs 'model'"),
    ({"method": "draft_model", "model": "qwen2.5-coder-0.5b", "num_speculative_tokens": 0},
     "num_speculative_tokens must be an integer >= 1"),
    ({"method": "ngram", "model": "qwen2.5-coder-0.5b"}, "'model' names a draft model"),
])
def test_engine_bad_speculative_config_is_one_line(impl, tiny_loaded, config, message):
    with pytest.raises(ValueError) as e:
        engine_of(impl, tiny_loaded, config)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_engine_speculation_needs_the_paged_cache(impl, tiny_loaded):
    with pytest.raises(ValueError, match="paged") as e:
        engine_of(impl, tiny_loaded, NGRAM_ENGINE, paged=False)
    assert "\n" not in str(e.value)
