"""Topic 2.1, the KV cache: keys and values of past positions kept per layer, so each
decode step runs the model on the new token only.

Checked by invariances (cached == uncached, as mlx-lm tests its caches): the cache's
bookkeeping exactly (offsets, contents, trim/rewind, nbytes growing linearly; keys of
another batch size or head shape refused, the cache left as it was); cached
logits == uncached logits (the same model, fp32); rewind then re-decode gives the same tokens; and greedy
decoding with the cache == the week-1 loop that recomputes everything, on the
real model. A cache may store another dtype than the activations' (KVCache(mx.float16),
as llama.cpp's cache is by default): it holds the keys and values rounded once to that
dtype, in half the bytes, and the real model's logits stay within the fp16 tolerance of
the uncached ones, with the same greedy tokens where the top-2 gap is clear. A prefill
computes the head on the positions it keeps only (`logits_to_keep`), the same logits. A
PromptCache kept across a chat's turns prefills only what a new prompt adds after its
common prefix with the cached tokens, and gives the logits of a fresh start.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from spec.chat_command import run_chat, stats_lines
from spec.ladder import (
    FP16_KV_GREEDY_MARGIN,
    FP32,
    MODEL_FP16_KV,
    MODEL_FP32,
    assert_close,
    assert_greedy_tokens,
)
from spec.memory import peak_extra

NAMES = {"kv_cache": ["KVCache", "make_cache"], "generate": ["generate_step_cached", "PromptCache"]}


@pytest.mark.presence
def test_has_names(impl):
    missing = [f"{m}.{n}" for m, names in NAMES.items() for n in names if not hasattr(getattr(impl, m), n)]
    assert not missing, f"missing: {missing}"
    for attr in ("update_and_fetch", "trim", "offset", "nbytes", "state"):
        assert hasattr(impl.kv_cache.KVCache(), attr), f"KVCache has no {attr}"


@pytest.fixture(scope="module")
def kv_cache(impl):
    return impl.kv_cache


# --- bookkeeping: exact ---------------------------------------------------------------


@given(data=st.data())
def test_update_and_fetch_returns_everything_so_far(kv_cache, data):
    chunks = data.draw(st.lists(st.integers(1, 300), min_size=1, max_size=5), label="chunk lengths")
    N, H, D = data.draw(st.sampled_from([(1, 3, 8), (2, 1, 4)]), label="N, H_kv, D")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="seed"))
    cache, seen_k, seen_v = kv_cache.KVCache(), [], []
    for L in chunks:
        k = rng.standard_normal((N, H, L, D)).astype(np.float32)
        v = rng.standard_normal((N, H, L, D)).astype(np.float32)
        seen_k.append(k)
        seen_v.append(v)
        got_k, got_v = cache.update_and_fetch(mx.array(k), mx.array(v))
        assert cache.offset == sum(x.shape[2] for x in seen_k), f"offset {cache.offset} after {chunks}"
        assert np.array_equal(np.array(got_k), np.concatenate(seen_k, axis=2)), f"keys after chunks {chunks}"
        assert np.array_equal(np.array(got_v), np.concatenate(seen_v, axis=2)), f"values after chunks {chunks}"


def test_trim_rewinds_and_later_updates_overwrite(kv_cache):
    cache = kv_cache.KVCache()
    k = mx.arange(10, dtype=mx.float32).reshape(1, 1, 10, 1)
    cache.update_and_fetch(k, k)
    assert cache.trim(4) == 4 and cache.offset == 6
    new = mx.full((1, 1, 2, 1), -1.0)
    got_k, _ = cache.update_and_fetch(new, new)
    assert np.array(got_k).ravel().tolist() == [0, 1, 2, 3, 4, 5, -1, -1]
    assert cache.trim(100) == 8 and cache.offset == 0, "trim never goes below zero"


@pytest.mark.parametrize("other", ["N", "H_kv", "D"])
def test_keys_of_other_heads_are_refused_and_leave_the_cache_as_it_was(kv_cache, other):
    # A cache holds one sequence batch of one model's layer: keys of another batch size, head
    # count or head size are a ValueError (one line), and the cache goes on as before.
    cache = kv_cache.KVCache()
    k = mx.ones((1, 2, 3, 4))
    cache.update_and_fetch(k, k)
    bad = mx.ones({"N": (2, 2, 1, 4), "H_kv": (1, 3, 1, 4), "D": (1, 2, 1, 8)}[other])
    with pytest.raises(ValueError) as e:
        mx.eval(cache.update_and_fetch(bad, bad))
    assert "\n" not in str(e.value), f"the error is not one line: {e.value}"
    assert cache.offset == 3, f"the refused keys moved the offset to {cache.offset}"
    got_k, _ = cache.update_and_fetch(2 * k[:, :, :1], 2 * k[:, :, :1])
    assert np.array(got_k)[0, 0, :, 0].tolist() == [1, 1, 1, 2], "the cache after a refused update"


def test_nbytes_grows_linearly(kv_cache):
    cache, per_token = kv_cache.KVCache(), 2 * 3 * 64 * 4  # keys + values, 3 heads, D = 64, fp32
    sizes = []
    for _ in range(300):
        x = mx.zeros((1, 3, 1, 64))
        cache.update_and_fetch(x, x)
        sizes.append(cache.nbytes)
    assert sizes == [per_token * (i + 1) for i in range(300)], sizes[:5]


def test_a_float16_cache_stores_rounded_values_in_half_the_bytes(kv_cache):
    rng = np.random.default_rng(7)
    cache, seen_k, seen_v = kv_cache.KVCache(mx.float16), [], []
    for L in (5, 300, 1):  # past the first 256-position step
        k, v = (rng.standard_normal((1, 3, L, 8)).astype(np.float32) for _ in range(2))
        seen_k.append(k)
        seen_v.append(v)
        got_k, got_v = cache.update_and_fetch(mx.array(k), mx.array(v))
        assert got_k.dtype == got_v.dtype == mx.float16, f"fetched {got_k.dtype}, {got_v.dtype}"
        # Rounded once, to nearest even (numpy's float16 cast): bit for bit.
        assert np.array_equal(np.array(got_k), np.concatenate(seen_k, axis=2).astype(np.float16))
        assert np.array_equal(np.array(got_v), np.concatenate(seen_v, axis=2).astype(np.float16))
    assert cache.nbytes == 2 * 3 * 306 * 8 * 2, f"{cache.nbytes} bytes for 306 fp16 positions"


def test_state_round_trip(kv_cache):
    a = kv_cache.KVCache()
    k = mx.random.normal((1, 2, 5, 4), key=mx.random.key(0))
    a.update_and_fetch(k, k + 1)
    b = kv_cache.KVCache()
    b.state = a.state
    assert b.offset == 5 and all(np.array_equal(np.array(x), np.array(y)) for x, y in zip(a.state, b.state, strict=True))


# --- invariance: cached == uncached ----------------------------------------------------


def _tiny_model(impl, model_type: str, seed: int):
    """A random-weight model of impl's own (no reference needed: this checks an invariance)."""
    args = impl.config.ModelArgs(model_type=model_type, hidden_size=64, num_hidden_layers=2, intermediate_size=96,
                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                 max_position_embeddings=256, rope_theta=10000.0)
    rng = np.random.default_rng(seed)
    shapes = {"model.embed_tokens.weight": (128, 64), "model.norm.weight": (64,), "lm_head.weight": (128, 64)}
    for i in range(2):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (64, 64), p + "self_attn.k_proj.weight": (32, 64),
                   p + "self_attn.v_proj.weight": (32, 64), p + "self_attn.o_proj.weight": (64, 64),
                   p + "mlp.gate_proj.weight": (96, 64), p + "mlp.up_proj.weight": (96, 64),
                   p + "mlp.down_proj.weight": (64, 96), p + "input_layernorm.weight": (64,),
                   p + "post_attention_layernorm.weight": (64,)}
        if model_type == "qwen2":
            shapes |= {p + "self_attn.q_proj.bias": (64,), p + "self_attn.k_proj.bias": (32,),
                       p + "self_attn.v_proj.bias": (32,)}
    weights = {k: mx.array(rng.standard_normal(s).astype(np.float32) * 0.2) for k, s in shapes.items()}
    return impl.model.Model(args, weights)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("chunks", [[7, 1, 1, 1], [1] * 6, [4, 3, 2]])
def test_cached_logits_equal_uncached(impl, model_type, chunks):
    model = _tiny_model(impl, model_type, seed=3)
    ids = np.random.default_rng(1).integers(0, 128, size=(1, sum(chunks)))
    full = model(mx.array(ids))  # (1, L, V), no cache
    cache, start, parts = impl.kv_cache.make_cache(model), 0, []
    for n in chunks:
        parts.append(model(mx.array(ids[:, start:start + n]), cache=cache))
        start += n
    # Same fp32 math on differently shaped matmuls: summation order only.
    assert_close(mx.concatenate(parts, axis=1), full, FP32, f"{model_type} chunks {chunks}")
    assert all(c.offset == sum(chunks) for c in cache)


def test_gemma3_cached_equals_uncached_past_the_sliding_window(impl, tmp_path):
    """Gemma 3's local layers see the last 8 positions (the tiny window): a cached decode must apply the
    window to the cached keys too, one new token at a time (its mask is no longer "everything")."""
    from reference.tiny_models import tiny_folder

    _, folder = tiny_folder(tmp_path, "gemma3", seed=5)
    model = impl.loader.load_model(folder).model
    chunks = [5, 1, 1, 1, 1, 6, 1, 1, 7]  # 24 positions, crossing the window in every way
    ids = np.random.default_rng(4).integers(0, 320, size=(1, sum(chunks)))
    full = model(mx.array(ids))
    cache, start, parts = impl.kv_cache.make_cache(model), 0, []
    for n in chunks:
        parts.append(model(mx.array(ids[:, start:start + n]), cache=cache))
        start += n
    # Same fp32 math on differently shaped matmuls: summation order only.
    assert_close(mx.concatenate(parts, axis=1), full, FP32, f"gemma3 chunks {chunks}")


def test_prompt_cache_prefills_only_past_the_common_prefix(impl):
    model = _tiny_model(impl, "llama", seed=4)
    rng = np.random.default_rng(2)
    first = [int(t) for t in rng.integers(0, 128, 12)]
    pc = impl.generate.PromptCache(model)
    steps = pc.steps(model, first)
    answer = [next(steps) for _ in range(4)]
    steps.close()  # the chat moves on to its next turn
    assert pc.tokens == first + answer and all(c.offset == 16 for c in pc.cache), "the cache lost track of its tokens"
    # The next turn repeats the conversation so far but for its last 2 tokens, then adds 5.
    second = first + answer[:2] + [int(t) for t in rng.integers(0, 128, 7)]
    new = pc.new_tokens(second)
    assert pc.reused == 14 and new == second[14:], f"reused {pc.reused} positions, prefills {len(new)} tokens"
    assert all(c.offset == 14 for c in pc.cache), "the cache was not rewound to the common prefix"
    got = model(mx.array([new]), cache=pc.cache)
    want = model(mx.array([second]))[:, 14:]  # a fresh start, no cache
    assert_close(got, want, FP32, "logits after reusing the cached prefix vs recomputing the whole prompt")
    # A prompt equal to the cached tokens still prefills its last token (for the next logits).
    assert len(pc.new_tokens(second)) == 1 and pc.reused == len(second) - 1


def test_prompt_cache_after_an_interrupted_prefill(impl):
    # Ctrl-C during a prefill can leave some layers holding fewer positions than the tokens
    # recorded: the next prompt reuses only what every layer holds.
    model = _tiny_model(impl, "qwen2", seed=5)
    pc = impl.generate.PromptCache(model)
    ids = [int(t) for t in np.random.default_rng(3).integers(0, 128, 10)]
    pc.new_tokens(ids)
    for i, c in enumerate(pc.cache):  # layer 0 got the first 6 positions; the others nothing
        if i == 0:
            c.update_and_fetch(*(mx.zeros((1, 2, 6, 16)),) * 2)
    new = pc.new_tokens(ids + [5])
    assert pc.reused == 0 and new == ids + [5] and all(c.offset == 0 for c in pc.cache)


# The chat command with the KV cache on week 1's model (--dequantize): the kernels are 2.2's and 2.4's.


def test_chat_second_turn_prefills_only_what_it_adds(impl):
    turns = "What is the capital of France?\nAnd of Germany?\n"
    r = run_chat(impl, "--single-stream", "--dequantize", "--max-tokens", "24", input=turns)
    assert r.returncode == 0, r.stderr[-2000:]
    reports = stats_lines(r.stderr)
    assert len(reports) == 2, f"expected two replies, got: {r.stderr[-2000:]}"
    assert "from the cache" not in reports[0] and "from the cache" in reports[1], reports


def test_chat_with_a_float16_cache(impl, default_model):
    from spec.day_1_6_generate import CONVERSATIONS, assert_answer, transformers_answer

    messages = CONVERSATIONS["one_user"]
    r = run_chat(impl, "--single-stream", "--dequantize", messages[0]["content"], "--max-tokens", "24", "--kv-cache-dtype", "float16")
    assert r.returncode == 0, r.stderr[-2000:]
    stats = stats_lines(r.stderr)
    assert stats and "KV cache float16" in stats[-1], f"the reply's stats line names another cache: {stats}"
    # fp16 keys and values move each logit by up to MODEL_FP16_KV.atol: compared while the gaps clear twice that.
    assert_answer(r.stdout.removesuffix("\n"), *transformers_answer(default_model, messages,
                                                                    margin=FP16_KV_GREEDY_MARGIN),
                  "the chat command with an fp16 cache")


# --- the real model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real(impl, default_model):
    return impl.loader.load_model(default_model, quantized=False)


@pytest.fixture(scope="module")
def prompt(real):
    return real.tokenizer.encode(real.chat_template.render([{"role": "user", "content": "Name three colors."}]))


def _greedy_uncached(model, ids, steps):
    seq, gaps = list(ids), []
    for _ in range(steps):
        logits = np.array(model(mx.array([seq]))[0, -1])
        top2 = np.sort(logits)[-2:]
        gaps.append(float(top2[1] - top2[0]))
        seq.append(int(logits.argmax()))
    return seq[len(ids):], gaps


def test_real_cached_decode_logits_equal_uncached(impl, real, prompt):
    model = real.model
    cache = impl.kv_cache.make_cache(model)
    model(mx.array([prompt]), cache=cache)
    nxt = 504
    got = model(mx.array([[nxt]]), cache=cache)[0, -1]
    want = model(mx.array([prompt + [nxt]]))[0, -1]
    assert_close(got, want, MODEL_FP32, "decode-step logits with vs without cache")


def test_real_prefill_computes_only_the_logits_it_keeps(impl, real, prompt):
    check_prefill_keeps_only_the_last_logits(impl, real.model, prompt)  # 2.4 runs it on the quantized engine


def check_prefill_keeps_only_the_last_logits(impl, model, prompt: list[int]) -> None:
    # A prefill needs the last position's logits only: logits_to_keep=k runs the final norm and
    # the head on the last k positions (a 512-token prompt spent a quarter of its time in the
    # head over all 512). The kept rows are the full logits' last rows; the caches are the same.
    caches = [impl.kv_cache.make_cache(model) for _ in range(3)]
    vocab = model.args.vocab_size
    full = model(mx.array([prompt]), cache=caches[0])
    assert full.shape == (1, len(prompt), vocab), f"logits_to_keep=0 keeps all: {full.shape}"
    for k, cache in zip((1, 3), caches[1:], strict=True):
        kept = model(mx.array([prompt]), cache=cache, logits_to_keep=k)
        assert kept.shape == (1, k, vocab), f"logits_to_keep={k}: {kept.shape}"
        # The head over k rows instead of all: one fp32 matmul's summation order at most.
        assert_close(kept, full[:, -k:], FP32, f"logits_to_keep={k} vs the full logits' last {k} rows")
        assert np.array_equal(np.array(cache[0].state[0]), np.array(caches[0][0].state[0])), "the caches differ"
    check_prefill_never_makes_the_full_logits(impl, model, (prompt * (256 // len(prompt) + 1))[:256])


def check_prefill_never_makes_the_full_logits(impl, model, prompt: list[int]) -> None:
    # Slicing the full logits would pass the checks above: the claim is that the (L, vocab) fp32
    # logits never exist. So: MLX's peak memory over a prefill that keeps 1 row is below the full
    # prefill's by at least half their size (measured on the default model at L = 256, logits
    # 48 MiB: 47 MiB below dense, 45 below on the quantized engine; slicing gives 0).
    def prefill(**kw) -> tuple[int, mx.array]:  # (peak memory over the prefill, its logits)
        cache = impl.kv_cache.make_cache(model)
        return peak_extra(lambda: model(mx.array([prompt]), cache=cache, **kw))

    logits = prefill()[1].nbytes  # in whatever dtype the model gives; first-call allocations are not the claim
    full, kept = prefill()[0], prefill(logits_to_keep=1)[0]
    assert full - kept > logits / 2, (
        f"a {len(prompt)}-token prefill with logits_to_keep=1 peaked at +{kept / 2**20:.1f} MiB, the full one at"
        f" +{full / 2**20:.1f} MiB: not below it by half the (L, vocab) logits ({logits / 2**20:.0f} MiB),"
        " so they were made and then sliced")


def test_real_greedy_with_cache_equals_recomputing(impl, real, prompt):
    steps = 16
    want, gaps = _greedy_uncached(real.model, prompt, steps)
    assert_greedy_tokens(impl.generate.generate_step_cached(real.model, prompt), want, gaps,
                         "cached decode vs recomputing the whole sequence")


def test_real_rewind_then_redecode_gives_the_same_tokens(impl, real, prompt):
    model = real.model
    cache = impl.kv_cache.make_cache(model)
    logits = model(mx.array([prompt]), cache=cache)[0, -1]
    tokens = []
    for _ in range(8):
        tokens.append(int(mx.argmax(logits).item()))
        logits = model(mx.array([[tokens[-1]]]), cache=cache)[0, -1]
    # The cache holds prompt + tokens[0..7]; keep prompt + tokens[0..2] and feed tokens[3] again.
    for c in cache:
        assert c.trim(5) == 5
    assert cache[0].offset == len(prompt) + 3
    logits = model(mx.array([[tokens[3]]]), cache=cache)[0, -1]
    again = []
    for _ in range(4):
        again.append(int(mx.argmax(logits).item()))
        logits = model(mx.array([[again[-1]]]), cache=cache)[0, -1]
    assert again[:3] == tokens[4:7], f"after rewind: {again[:3]}, first time: {tokens[4:7]}"


def test_real_float16_cache_logits_and_greedy_tokens(impl, real):
    # Keys and values rounded once to fp16 (relative error <= 2^-11) as they enter the cache;
    # everything else is the fp32 model: MODEL_FP16_KV says why 2e-2 (measured here: 0.0083).
    # Not the `prompt` fixture: its first greedy step is a near tie (gap 0.039, under
    # FP16_KV_GREEDY_MARGIN); this chat's 16 steps all clear it.
    from spec.day_1_6_generate import CONVERSATIONS

    prompt = real.tokenizer.encode(real.chat_template.render(CONVERSATIONS["one_user"]))
    model = real.model
    cache = impl.kv_cache.make_cache(model, mx.float16)
    model(mx.array([prompt]), cache=cache)
    assert cache[0].state[0].dtype == mx.float16, f"make_cache(model, mx.float16) stores {cache[0].state[0].dtype}"
    nxt = 504
    got = model(mx.array([[nxt]]), cache=cache)[0, -1]
    want = model(mx.array([prompt + [nxt]]))[0, -1]
    assert_close(got, want, MODEL_FP16_KV, "decode-step logits with an fp16 cache vs without a cache")
    want_tokens, gaps = _greedy_uncached(model, prompt, 16)
    steps = impl.generate.generate_step_cached(model, prompt, cache=impl.kv_cache.make_cache(model, mx.float16))
    assert_greedy_tokens(steps, want_tokens, gaps, "fp16-cache decode vs recomputing the whole sequence",
                         margin=FP16_KV_GREEDY_MARGIN)


def test_real_cache_memory_grows_linearly(impl, real, prompt):
    model, args = real.model, real.args
    cache = impl.kv_cache.make_cache(model)
    model(mx.array([prompt]), cache=cache)
    per_token = args.num_hidden_layers * 2 * args.num_key_value_heads * args.head_dim * 4  # fp32 k and v
    sizes = []
    for t in range(5):
        mx.eval(model(mx.array([[100 + t]]), cache=cache))
        sizes.append(sum(c.nbytes for c in cache))
    assert sizes == [per_token * (len(prompt) + t + 1) for t in range(5)], sizes
