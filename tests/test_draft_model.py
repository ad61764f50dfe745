"""What makes a draft model cheaper beyond topic 3.4's spec (docs/speculative.md): impl.requantize (its
quantized weights requantized to 4-bit affine triples; the engine's draft_quantization), p_min
(drafting only while the draft is confident; the engine's draft_p_min) and impl.draft_vocab (its
head cut to the first ids and its sequence's; the engine's draft_vocab_size).

A draft only proposes: the greedy output must stay the target's whatever the draft's weights and
however many tokens it drafts, so the oracle is speculation == no speculation, on the default model
(Q4_1 in groups of 32) drafting for itself after requantization to groups of 128.
"""

from __future__ import annotations

import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

import impl  # (loads tiny_llm_kernels and the BLAS fix before mlx is used)
from impl.draft_vocab import DraftVocab
from impl.engine import LLM, SamplingParams
from impl.kquant_weight import KQuantWeight
from impl.kv_cache import make_cache
from impl.loader import dequantized, load_model
from impl.quantize import quantized_matmul_int8_mlx
from impl.quantized_weight import QuantizedWeight
from impl.requantize import requantize_weight, requantized
from impl.speculative import DraftModel, Sampling, SpeculativeStats, speculative_generate_step
from spec.chat_command import assert_one_line_error
from spec.day_3_4_speculative import assert_cache_matches_prefill, decode_reference
from spec.ladder import assert_greedy_tokens


@pytest.fixture(scope="module")
def smol():
    return load_model(quantized=True)


def quantized_weights(model) -> list:
    """Every quantized weight of an impl Model, in layer order, the head (or tied embedding) last."""
    out = []
    for layer in model.layers:
        a, m = layer.self_attn, layer.mlp
        out += [a.wqkv, a.wo, m.w_gate_up, m.w_down]
    return out + [model.embed_tokens.weight if model.lm_head is None else model.lm_head]


def test_every_weight_is_4bit_in_the_largest_group_up_to_128_within_a_step(smol):
    model = requantized(smol.model)
    old, new = quantized_weights(smol.model), quantized_weights(model)
    assert all(isinstance(w, QuantizedWeight) for w in old), "the default model's weights are affine triples"
    for o, n in zip(old, new, strict=True):
        group = next(g for g in (128, 64, 32) if o.shape[1] % g == 0)  # SmolLM2's K = 576 takes 64
        assert (n.bits, n.group_size, n.precision) == (4, group, "int8"), f"{n.shape}: {n.bits} bits, groups of {n.group_size}"
        assert n.shape == o.shape
        # mx.quantize puts the grid's edge exactly on the group's end of larger magnitude and refits the
        # step to it, so rounding to nearest leaves the other end up to a step off (not half a step):
        # 0.94 of a step measured on random normals. Plus a few ulps of fp32 arithmetic.
        err = np.abs(np.array(dequantized(n)) - np.array(dequantized(o))).reshape(n.shape[0], -1, n.group_size)
        step = np.abs(np.array(n.scales))[..., None]  # MLX may store a negative scale (its grid then runs down)
        ulps = 4 * np.finfo(np.float32).eps * np.abs(np.array(dequantized(o))).max()
        assert (err <= step + ulps).all(), f"{n.shape}: error {(err / step).max():.3g} steps"
        assert (err <= step / 2 + ulps).mean() > 0.9, "most values should round to their nearest grid point"


def test_the_model_given_is_left_as_it_was(smol):
    before = quantized_weights(smol.model)
    w0 = np.array(before[0].w_q)
    model = requantized(smol.model)
    assert model is not smol.model and model.layers[0] is not smol.model.layers[0]
    assert all(a is b for a, b in zip(before, quantized_weights(smol.model), strict=True))
    assert np.array_equal(np.array(quantized_weights(smol.model)[0].w_q), w0)
    assert model.norm.weight is smol.model.norm.weight  # not a quantized weight: shared, not copied
    if smol.model.lm_head is None:  # a tied head stays tied: one requantized weight, not two
        assert model.lm_head is None


def test_kquant_blocks_requantize_and_group_size_falls_back_to_one_that_divides_k():
    from spec.day_2_2_quantized_matmul import gguf_weights, kquant_rows

    rng = np.random.default_rng(0)
    rows = kquant_rows("Q4_K", 8, 512, seed=0)
    w = KQuantWeight((mx.array(rows),), ("Q4_K",))
    assert np.array_equal(np.array(dequantized(w)), gguf_weights(rows, "Q4_K").astype(np.float32))  # exact: 2.2's claim
    n = requantize_weight(w, 4, 128)
    assert (n.group_size, n.bits) == (128, 4)
    q = QuantizedWeight(*mx.quantize(mx.array(rng.standard_normal((4, 96)).astype(np.float32)), group_size=32, bits=8), 32, 8)
    assert requantize_weight(q, 4, 128).group_size == 32  # 96 = 3 x 32: 128 and 64 do not divide it
    with pytest.raises(ValueError, match="bits must be one of"):
        requantized(object(), bits=7)


def test_a_weights_own_precision_wins_over_the_global_one(smol):
    w = quantized_weights(smol.model)[1]
    x = mx.array(np.random.default_rng(1).standard_normal((3, w.shape[1])).astype(np.float32))
    mine = QuantizedWeight(w.w_q, w.scales, w.biases, w.group_size, w.bits, "int8")
    want = quantized_matmul_int8_mlx(x, w.w_q, w.scales, w.biases, w.group_size, w.bits)
    # The int8 kernel equals its twin bit for bit (2.2's claim): so this weight ran at int8 whatever
    # TINY_LLM_MATMUL_PRECISION says, packed once for it.
    assert np.array_equal(np.array(mine.matmul_t(x)), np.array(want))
    assert mine.int8_packed() is not None


def test_engine_with_a_requantized_draft_equals_the_engine_without(smol):
    prompts = [{"prompt_token_ids": smol.tokenizer.encode(t)} for t in
               ("The capital of France is", "def fibonacci(n):\n    ", "Once upon a time")]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    plain = LLM(smol, log=False).generate(prompts, params)
    llm = LLM(smol, log=False, speculative_config={"method": "draft_model", "model": smol, "num_speculative_tokens": 4,
                                                   "draft_vocab_size": 16384})
    drafter = llm.engine.spec.drafter
    assert drafter.quantization == "4bit" and drafter.model is not smol.model
    assert quantized_weights(drafter.model)[0].bits == 4
    assert drafter.vocab.size == 16384 < smol.model.args.vocab_size  # its head: the ids below 16384 and the sequence's
    spec = llm.generate(prompts, params)
    for p, s in zip(plain, spec, strict=True):
        assert list(s.token_ids) == list(p.token_ids)
    drafted = sum(s.metrics.num_draft_tokens for s in spec)
    assert drafted > 0, "the draft drafted nothing: the oracle checked no speculation"


@pytest.mark.parametrize("value, message", [("3bit", "draft_quantization '3bit' is not known: '4bit' or null"),
                                            (4, "draft_quantization 4 is not known")])
def test_bad_draft_quantization_is_one_line(smol, value, message):
    with pytest.raises(ValueError, match=message) as e:
        LLM(smol, log=False, speculative_config={"model": smol, "draft_quantization": value})
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def draft4(smol):
    return requantized(smol.model)


@pytest.mark.parametrize("p_min", [0.0, 0.5, 0.9, 1.0])
def test_confident_drafting_keeps_the_targets_greedy_output(smol, draft4, p_min):
    prompt = smol.tokenizer.encode("def fibonacci(n):\n    ")
    want, gaps = decode_reference(impl, smol.model, prompt, 40)
    stats = SpeculativeStats()
    steps = speculative_generate_step(smol.model, prompt, DraftModel(draft4, p_min), 4, stats=stats)
    # 1 + k rows sum in another order than one row: compared while the top-2 gap is clear (the ladder's rule)
    assert_greedy_tokens(steps, want, gaps, f"p_min={p_min}")
    per_step = stats.drafted / stats.steps
    if p_min == 1.0:
        assert stats.drafted == 0, "a top probability is below 1: nothing is confident enough to draft"
    if p_min == 0.0:
        assert per_step == 4, "every probability is at least 0: k drafts a step"


def test_confident_drafts_are_the_same_tokens_as_unconditional_ones_up_to_the_stop(smol):
    # The default model drafts as loaded here (fp32 matmuls): its cache can be held to the spec's fp32
    # tolerance against a prefill, where int8 matmuls would round a hair's difference to a grid step.
    draft = smol.model
    tokens = smol.tokenizer.encode("import numpy as np\n")
    lazy, _ = DraftModel(draft).propose(tokens, 6)
    # The draft's top probability at each of the 6 positions (one prefill), and a p_min between the
    # first that falls clearly (by 0.05: the prefill rounds otherwise than the drafting passes) below
    # all before it and those: drafting must stop exactly there.
    logits = draft(mx.array([[*tokens, *lazy[:5]]]))[0, len(tokens) - 1:].astype(mx.float32)  # (6, V)
    tops = np.array(mx.softmax(logits, axis=-1).max(axis=-1)).tolist()
    stop = next(j for j in range(1, 6) if min(tops[:j]) - tops[j] > 0.05)
    confident = DraftModel(draft, (min(tops[:stop]) + tops[stop]) / 2)
    drafts, _ = confident.propose(tokens, 6)
    assert drafts == lazy[:stop], f"top probabilities {tops}"
    # The cache holds the prompt and every draft fed after it, as a fresh prefill of those tokens does
    # (the spec's check for rewound caches, at its fp32 tolerance: the same math in other shapes).
    assert confident.tokens == [*tokens, *drafts]
    assert_cache_matches_prefill(impl, draft, confident.cache, confident.tokens, "after an early stop")


def test_engine_with_confident_drafting_equals_the_engine_without(smol):
    prompts = [{"prompt_token_ids": smol.tokenizer.encode(t)} for t in ("Once upon a time", "import numpy as np\n")]
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    plain = LLM(smol, log=False).generate(prompts, params)
    llm = LLM(smol, log=False, speculative_config={"model": smol, "num_speculative_tokens": 6, "draft_p_min": 0.5})
    assert llm.engine.spec.drafter.p_min == 0.5
    for p, s in zip(plain, llm.generate(prompts, params), strict=True):
        assert list(s.token_ids) == list(p.token_ids)


@pytest.mark.parametrize("config, message", [
    ({"model": "x", "draft_p_min": 1.5}, "draft_p_min must be a probability in \\[0, 1\\] or null, got 1.5"),
    ({"method": "ngram", "draft_p_min": 0.5}, "draft_p_min is a draft model's confidence"),
])
def test_bad_draft_p_min_is_one_line(smol, config, message):
    config = {**config, "model": smol} if "model" in config else config
    with pytest.raises(ValueError, match=message):
        LLM(smol, log=False, speculative_config=config)
    with pytest.raises(ValueError, match="p_min must be a probability"):
        DraftModel(smol.model, -0.1)


@pytest.mark.parametrize("flags, message", [
    (("--draft-model", "qwen2.5-coder-0.5b", "--draft-p-min", "1.5"), "--draft-p-min is a probability in [0, 1]"),
    (("--draft-p-min", "0.5"), "without --draft-model"),
    (("--draft-model", "qwen2.5-coder-0.5b", "--draft-quantization", "3bit"), "invalid choice: '3bit'"),
    (("--draft-model", "qwen2.5-coder-0.5b", "--draft-vocab-size", "-1"), "--draft-vocab-size must be 0 (every id)"),
])
def test_chat_draft_flags_out_of_range(flags, message):
    r = subprocess.run([sys.executable, "-m", "impl.cli", *flags, "hi"], capture_output=True, text=True, timeout=300)
    assert_one_line_error(r, message)


# --- the draft vocabulary ----------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["as loaded", "requantized"])
def test_draft_vocabulary_scores_its_ids_as_the_whole_head_does(smol, draft4, which):
    model = smol.model if which == "as loaded" else draft4
    tokens = smol.tokenizer.encode("The capital of France is")
    vocab = DraftVocab(model, 1024)
    want = model(mx.array([tokens]), cache=make_cache(model), logits_to_keep=1)[:, -1].astype(mx.float32)  # (1, V)
    h = model.hidden_states(mx.array([tokens]), 0, make_cache(model))[:, -1]  # (1, E)
    ids = mx.array([5000, 40000])
    got = np.array(vocab.logits(h, (ids, vocab.head_of(ids))))
    want = np.array(want)
    scored = np.zeros(want.shape[1], bool)
    scored[:1024], scored[[5000, 40000]] = True, True
    # Each logit is its own row's dot product with h: the same bits whichever rows the head holds (measured
    # bit for bit on the kernels' fp32 and int8 paths; a kernel that tiled columns otherwise could differ).
    assert np.array_equal(got[0, scored], want[0, scored])
    assert np.isneginf(got[0, ~scored]).all()


def test_a_small_draft_vocabulary_keeps_the_targets_greedy_output(smol, draft4):
    prompt = smol.tokenizer.encode("def fibonacci(n):\n    ")
    want, gaps = decode_reference(impl, smol.model, prompt, 40)
    draft = DraftModel(draft4, vocab=1024)
    proposed, propose = [], draft.propose

    def recording(tokens, k, sampling=None, key=None):
        out = propose(tokens, k, sampling, key)
        proposed.append((set(tokens), out[0]))
        return out

    draft.propose = recording
    stats = SpeculativeStats()
    steps = speculative_generate_step(smol.model, prompt, draft, 4, stats=stats)
    assert_greedy_tokens(steps, want, gaps, "a draft scoring ids below 1024 and its sequence's")
    assert stats.accepted > 0, "the draft never agreed with the target: the check proved little"
    for seen, drafts in proposed:  # a draft is below 1024, or an id the sequence holds
        assert all(t < 1024 or t in seen for t in drafts), f"{drafts} drafted outside the draft vocabulary"
    held = set().union(*(seen for seen, _ in proposed))
    assert draft.extra_ids == {t for t in held if t >= 1024}, "the extra ids are those the sequence held"


@pytest.mark.parametrize("filters", [(0.8, 0, 1.0, 0.0), (0.8, 50, 0.9, 0.05)])
def test_sampled_drafts_come_from_the_draft_vocabulary_and_q_is_a_distribution(smol, draft4, filters):
    tokens = smol.tokenizer.encode("Once upon a time")
    draft = DraftModel(draft4, vocab=1024)
    drafts, q = draft.propose(tokens, 4, Sampling(*filters), mx.random.key(3))
    q = np.array(q)  # (k, V): what the drafts were drawn from, zero wherever the draft scores no id
    outside = np.ones(q.shape[1], bool)
    outside[:1024], outside[list(draft.extra_ids)] = False, False
    assert (q[:, outside] == 0).all() and np.allclose(q.sum(axis=-1), 1, atol=1e-5), q.sum(axis=-1)
    assert all(q[j, t] > 0 for j, t in enumerate(drafts))


def test_draft_vocabulary_size_in_the_engine(smol):
    def drafter(size):
        config = {"model": smol, "draft_quantization": None, "draft_vocab_size": size}
        return LLM(smol, log=False, speculative_config=config).engine.spec.drafter

    assert drafter(None).vocab is None  # every id
    assert drafter(smol.model.args.vocab_size).vocab is None  # the whole vocabulary: nothing to cut
    assert LLM(smol, log=False, speculative_config={"model": smol}).engine.spec.drafter.vocab is None  # 65536 > 49152
    d = drafter(4096)
    assert d.vocab.size == 4096 and "scoring ids below 4096" in d.describe()


@pytest.mark.parametrize("value", [0, "32k", True, 1.5])
def test_bad_draft_vocab_size_is_one_line(smol, value):
    with pytest.raises(ValueError, match="draft_vocab_size must be an integer >= 1 or null") as e:
        LLM(smol, log=False, speculative_config={"model": smol, "draft_vocab_size": value})
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="a draft vocabulary size is an integer in"):
        DraftVocab(smol.model, smol.model.args.vocab_size)
