"""Topic 3.9, long context: a rolling-buffer KV cache for sliding-window attention, attention
sinks (StreamingLLM), and RoPE scaling.

- `impl.kv_cache.RotatingKVCache(max_size, keep=0)`: the KV cache protocol of topic 2.1 over a
  buffer of max_size positions, the oldest overwritten: each query sees the `keep` first positions
  and the most recent ones, itself included, max_size in all. Its memory stays constant as the
  sequence grows. `make_window_cache(model)` gives Gemma 3's sliding layers one of their window
  (and its global layers a KVCache): checked against transformers on a tiny Gemma 3 (window 8) and
  against the full computation on the real Gemma 3 270M past its 512-token window.
- `impl.kv_cache.SinkKVCache(rope, max_size, sinks)`, `make_sink_cache(model, window, sinks)`:
  the first `sinks` positions kept for good, a rolling window after them. RoPE positions are those
  within the cache (StreamingLLM's choice): keys enter unrotated and are rotated by their place in
  the cache on each step, so generation runs past the model's context in constant memory. Checked
  exactly on a one-layer model, where a cache of sinks + window must give what a fresh forward over
  those tokens gives; and, on the default model, on StreamingLLM's result: reading a text past the
  window, the window alone loses the model (perplexity blows up) while 4 sinks keep it close to the
  full cache (bench/long_context.py measures it at several windows).

Prerequisites: 2.1 (the KV cache protocol, and through it the models of 1.5 and the tokenizer of
1.6) and 2.4: the sink check runs the default model on its 4-bit weights (week 2's kernels), three
times as fast a token as fp32. Checked against transformers (Gemma3ForCausalLM, fp32) and invariances: rolling == full
cache with the window's mask, sink cache == fresh forward over what it holds.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from reference.tiny_models import tiny_folder
from spec.ladder import FP32, MODEL_FP32, assert_close, assert_greedy_tokens

NAMES = {
    "kv_cache": ["RotatingKVCache", "SinkKVCache", "make_window_cache", "make_sink_cache"],
}


def test_has_names(impl):
    missing = [f"{m}.{n}" for m, names in NAMES.items() for n in names if not hasattr(getattr(impl, m), n)]
    assert not missing, f"missing: {missing}"


# --- the rolling buffer, on its own ------------------------------------------------

def _positions(keys: mx.array) -> list[int]:
    """The positions a (1, 1, S, 1) key tensor holds (each key is its own position)."""
    return np.array(keys[0, 0, :, 0]).astype(int).tolist()


@given(data=st.data())
def test_rotating_cache_holds_the_sinks_and_the_most_recent(impl, data):
    """Keys that are their own positions, appended in random chunks: each update returns the `keep`
    first positions, the max_size - keep - 1 before the chunk (fewer at the start) and the chunk,
    in time order for a chunk of several (their mask needs it), in any order for one token."""
    max_size = data.draw(st.integers(3, 12), label="max_size")
    keep = data.draw(st.integers(0, max_size - 2), label="keep")
    chunks = data.draw(st.lists(st.integers(1, 2 * max_size), min_size=1, max_size=12), label="chunks")
    cache, seen = impl.kv_cache.RotatingKVCache(max_size, keep=keep), 0
    for L in chunks:
        x = mx.arange(seen, seen + L, dtype=mx.float32).reshape(1, 1, L, 1)
        k, v = cache.update_and_fetch(x, -x)
        before = list(range(seen))
        held = before if seen < max_size else before[:keep] + before[max(keep, seen - (max_size - keep - 1)):]
        want = held + list(range(seen, seen + L))
        got = _positions(k)
        assert (got if L > 1 else sorted(got)) == want, f"max_size {max_size} keep {keep} after {seen}, +{L}: {got}"
        assert _positions(-v) == got, "values must follow their keys"
        seen += L
        assert cache.offset == seen
        assert cache.nbytes == min(seen, max_size) * 2 * 4, f"{seen} positions: {cache.nbytes} bytes"


def test_rotating_cache_memory_stays_constant(impl):
    """nbytes after N single-token steps: grows to the window, then stays (a KVCache keeps growing)."""
    per_token = 2 * 3 * 64 * 4  # keys + values, 3 heads, D = 64, fp32
    caches = {"rotating": impl.kv_cache.RotatingKVCache(64), "kv": impl.kv_cache.KVCache()}
    at = {1, 32, 64, 65, 256, 1000}
    sizes = {name: {} for name in caches}
    x = mx.zeros((1, 3, 1, 64))
    for n in range(1, 1001):
        for name, c in caches.items():
            c.update_and_fetch(x, x)
            if n in at:
                sizes[name][n] = c.nbytes
    assert sizes["rotating"] == {n: per_token * min(n, 64) for n in at}, sizes
    assert sizes["kv"] == {n: per_token * n for n in at}, sizes


def test_rotating_cache_rewinds_only_before_it_rolls(impl):
    cache = impl.kv_cache.RotatingKVCache(8)
    x = mx.arange(6, dtype=mx.float32).reshape(1, 1, 6, 1)
    cache.update_and_fetch(x, x)
    assert cache.trim(2) == 2 and cache.offset == 4 and _positions(cache.state[0]) == [0, 1, 2, 3]
    y = mx.arange(4, 10, dtype=mx.float32).reshape(1, 1, 6, 1)
    cache.update_and_fetch(y, y)
    assert cache.trim(1) == 0 and cache.offset == 10, "what a rolled cache dropped cannot come back"
    assert _positions(cache.state[0]) == list(range(2, 10))


# --- sliding windows: Gemma 3 ------------------------------------------------------

def test_tiny_gemma3_window_cache_matches_transformers(impl, tmp_path):
    """Gemma 3 (window 8 on 6 of its 7 layers) decoded in chunks that cross the window every way, its
    local layers on a RotatingKVCache of 8: transformers' logits, and local caches of 8 positions."""
    ref, folder = tiny_folder(tmp_path, "gemma3", seed=5)
    model = impl.loader.load_model(folder).model
    chunks = [5, 1, 1, 1, 1, 6, 1, 1, 9, 1, 1, 12, 1, 1, 1]
    ids = np.random.default_rng(4).integers(0, 320, size=(1, sum(chunks)))
    cache, start, parts = impl.kv_cache.make_window_cache(model), 0, []
    for n in chunks:
        parts.append(model(mx.array(ids[:, start:start + n]), cache=cache))
        start += n
    with torch.no_grad():
        want = ref(torch.tensor(ids)).logits
    assert_close(mx.concatenate(parts, axis=1), want, MODEL_FP32, f"tiny Gemma 3, chunks {chunks}")
    per_token = 2 * model.args.num_key_value_heads * model.args.head_dim * 4
    local = [c.nbytes for layer, c in zip(model.layers, cache, strict=True) if layer.self_attn.window]
    assert len(local) == 6 and set(local) == {8 * per_token}, f"local layers hold {local} bytes after {start} positions"


def test_gemma3_270m_window_cache_past_512(impl, gemma_gguf):
    """The real Gemma 3 270M: a prompt of 600 tokens (<bos> and Hamlet's opening), then greedy
    decoding, its local layers on 512-position rolling caches: logits of each step equal to the full
    computation's (the whole sequence at once, the window as a mask), the same greedy tokens,
    constant local memory. (impl's own tokenizer, topic 1.6: the reference's takes 40 s to build.)"""
    from reference.texts import play_text

    loaded = impl.loader.load_model(gemma_gguf, quantized=False)
    model, window, steps = loaded.model, loaded.args.sliding_window, 4
    ids = [loaded.tokenizer.bos_token_id] + loaded.tokenizer.encode(play_text()[:4000])[:599]
    assert len(ids) > window + 32, f"a prompt of {len(ids)} tokens does not pass the {window}-token window"
    cache = impl.kv_cache.make_window_cache(model)
    logits = model(mx.array([ids]), cache=cache, logits_to_keep=1)[:, -1]
    got, tokens = [logits], []
    for _ in range(steps - 1):
        tokens.append(int(mx.argmax(logits, axis=-1).item()))
        logits = model(mx.array([tokens[-1:]]), cache=cache)[:, -1]
        got.append(logits)
    tokens.append(int(mx.argmax(logits, axis=-1).item()))
    full = model(mx.array([ids + tokens[:-1]]), logits_to_keep=steps)[0]  # (steps, V), no cache
    # Same fp32 math on differently shaped matmuls over 18 layers: the whole-model rung.
    assert_close(mx.concatenate(got, axis=0), full, MODEL_FP32, "Gemma 3 270M, rolling cache vs full")
    top2 = np.sort(np.array(full), axis=-1)[:, -2:]
    assert_greedy_tokens(iter(tokens), np.array(full).argmax(-1).tolist(), (top2[:, 1] - top2[:, 0]).tolist(),
                         "Gemma 3 270M greedy tokens, rolling cache vs full")
    local = {c.nbytes for layer, c in zip(model.layers, cache, strict=True) if layer.self_attn.window}
    per_token = 2 * loaded.args.num_key_value_heads * loaded.args.head_dim * 4
    assert local == {window * per_token}, f"local layers hold {local} bytes, not {window} positions' worth"


@pytest.mark.parametrize("kind", ["mistral-window", "qwen2-window"])
def test_tiny_mistral_qwen2_sliding_window_matches_transformers(impl, tmp_path, kind):
    """transformers applies `sliding_window` to Mistral (every layer) and to Qwen2 with
    use_sliding_window (layers max_window_layers.. : here 1 and 2 of 3): uncached logits over 24
    positions (window 8), then a rolling cache on the sliding layers, decoded in chunks, the same."""
    ref, folder = tiny_folder(tmp_path, kind, seed=8)
    model = impl.loader.load_model(folder).model
    windows = [layer.self_attn.window for layer in model.layers]
    assert windows == ([8, 8, 8] if kind == "mistral-window" else [None, 8, 8]), windows
    chunks = [6, 1, 1, 1, 9, 1, 5]
    ids = np.random.default_rng(3).integers(0, 320, size=(1, sum(chunks)))
    with torch.no_grad():
        want = ref(torch.tensor(ids)).logits
    assert_close(model(mx.array(ids)), want, MODEL_FP32, f"{kind}, uncached")
    cache, start, parts = impl.kv_cache.make_window_cache(model), 0, []
    for n in chunks:
        parts.append(model(mx.array(ids[:, start:start + n]), cache=cache))
        start += n
    assert_close(mx.concatenate(parts, axis=1), want, MODEL_FP32, f"{kind}, rolling cache, chunks {chunks}")


# --- attention sinks ---------------------------------------------------------------

def test_sink_cache_is_a_fresh_forward_over_what_it_holds(impl, tmp_path):
    """On a one-layer model a layer's keys and values depend on the token alone, so decoding with
    3 sinks and a window of 8 must give, at every step, the logits of a fresh forward over those
    3 + 8 tokens at positions 0..10: positions within the cache, not in the text."""
    _, folder = tiny_folder(tmp_path, "llama-tied", seed=3, num_hidden_layers=1, max_position_embeddings=16)
    model = impl.loader.load_model(folder).model
    ids = np.random.default_rng(4).integers(0, 320, size=80).tolist()  # 5 times the model's context
    cache = impl.kv_cache.make_sink_cache(model, window=8, sinks=3)
    got = [model(mx.array([ids[:5]]), cache=cache)[:, -1]]
    want = [model(mx.array([ids[:5]]))[:, -1]]
    for t in range(5, len(ids)):
        got.append(model(mx.array([[ids[t]]]), cache=cache)[:, -1])
        held = ids[:t + 1] if t < 11 else ids[:3] + ids[t - 7:t + 1]
        want.append(model(mx.array([held]))[:, -1])
    assert_close(mx.concatenate(got), mx.concatenate(want), FP32, "sink cache vs a fresh forward over sinks + window")
    assert {c.nbytes for c in cache} == {11 * 2 * 2 * 16 * 4}, "3 + 8 positions of 2 heads of 16, fp32"


@pytest.mark.parametrize("sinks", [0, 4])
def test_sink_cache_before_it_rolls_is_the_full_cache(impl, tmp_path, sinks):
    """Until the first eviction nothing differs from a KVCache: chunked prefill and decode give the
    uncached logits (two layers, so keys that depend on context are in play)."""
    _, folder = tiny_folder(tmp_path, "qwen2-tied", seed=2)
    model = impl.loader.load_model(folder).model
    ids = np.random.default_rng(5).integers(0, 320, size=(1, 20))
    cache, start, parts = impl.kv_cache.make_sink_cache(model, window=20 - sinks, sinks=sinks), 0, []
    for n in [7, 1, 1, 5, 1, 4, 1]:
        parts.append(model(mx.array(ids[:, start:start + n]), cache=cache))
        start += n
    assert_close(mx.concatenate(parts, axis=1), model(mx.array(ids)), FP32, f"{sinks} sinks, before rolling")


TEXT = 160  # tokens of Hamlet the spec reads one at a time, twice


def test_sinks_keep_the_model_past_the_window(impl, default_model):
    """StreamingLLM's result, small: the default model (its 4-bit weights) reads 160 tokens of
    Hamlet one at a time with a 32-token window. Past the window, the window alone loses it
    (perplexity over 4 times the full cache's; measured 134 against 16.7); 4 sinks + the window
    stay within 2x (measured 22.9). What is left of the gap is the context the window dropped.
    bench/long_context.py runs longer texts and wider windows (docs/long_context.md)."""
    from reference.texts import play_text

    loaded = impl.loader.load_model(default_model)  # its 4-bit weights: a third of the time a token
    model = loaded.model
    ids = loaded.tokenizer.encode(play_text())[:TEXT]
    full = _nll(model(mx.array([ids[:-1]]))[0], ids[1:])

    def streamed(sinks: int) -> np.ndarray:
        cache = impl.kv_cache.make_sink_cache(model, window=32, sinks=sinks)
        logits = [model(mx.array([[t]]), cache=cache)[0, -1] for t in ids[:-1]]
        return _nll(mx.stack(logits), ids[1:])

    past = slice(48, None)  # past the first eviction
    ppl = {name: float(np.exp(nll[past].mean())) for name, nll in
           (("full", full), ("window", streamed(0)), ("sinks", streamed(4)))}
    print(f"perplexity of tokens 49-{TEXT} of Hamlet, window 32: {ppl}")
    assert ppl["window"] > 4 * ppl["full"], f"the window alone should lose the model: {ppl}"
    assert ppl["sinks"] < 2 * ppl["full"], f"4 sinks should keep it near the full cache: {ppl}"


def _nll(logits: mx.array, targets: list[int]) -> np.ndarray:
    """(T, V) logits, T targets -> (T,) negative log-likelihoods in nats."""
    logits = logits.astype(mx.float32)
    picked = mx.take_along_axis(logits, mx.array(targets)[:, None], axis=-1)[:, 0]
    return np.array(mx.logsumexp(logits, axis=-1) - picked)


# --- RoPE scaling ------------------------------------------------------------------

# rope_parameters as transformers reads them: an original context of 32, stretched 4 (Llama 3.1's 8).
SCALINGS = {
    "linear": dict(rope_type="linear", factor=4.0),
    "dynamic": dict(rope_type="dynamic", factor=4.0),  # original context: max_position_embeddings
    "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32),
    "llama3": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=32),
}


def _hf_config(arch: str, rope: dict, D: int = 32, base: float = 50000.0):
    from transformers import LlamaConfig, Qwen2Config

    Config = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    return Config(hidden_size=4 * D, num_attention_heads=4, num_key_value_heads=2, head_dim=D, num_hidden_layers=1,
                  intermediate_size=64, vocab_size=64, max_position_embeddings=32 if rope["rope_type"] == "dynamic"
                  else 128, rope_parameters=dict(rope_theta=base, **rope))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("scaling", list(SCALINGS))
def test_rope_scaling_matches_transformers_rotary_embedding(impl, arch, scaling):
    """impl.rope.RoPE with a config's scaling rotates (N, L, H, D) as transformers' rotary embedding
    class and apply_rotary_pos_emb do, over 100 positions, 3 times the original context of 32; and
    differently from plain RoPE (the scaling must matter)."""
    import importlib

    module = importlib.import_module(f"transformers.models.{arch}.modeling_{arch}")
    Rotary = getattr(module, {"llama": "LlamaRotaryEmbedding", "qwen2": "Qwen2RotaryEmbedding"}[arch])
    config = _hf_config(arch, SCALINGS[scaling])
    args = impl.config.ModelArgs.from_dict(config.to_dict())
    assert args.rope_scaling and args.rope_scaling["rope_type"] == scaling, args.rope_scaling
    L, D = 100, args.head_dim
    x = np.random.default_rng(1).standard_normal((1, L, 4, D)).astype(np.float32)
    rope = impl.rope.RoPE(D, args.max_position_embeddings if scaling != "dynamic" else 32, args.rope_theta,
                          traditional=False, scaling=args.rope_scaling)
    got = rope(mx.array(x), 0)
    with torch.no_grad():
        xt = torch.from_numpy(x).transpose(1, 2)  # (N, H, L, D)
        cos, sin = Rotary(config)(xt, torch.arange(L)[None])
        want, _ = module.apply_rotary_pos_emb(xt, xt, cos, sin)
    assert_close(got, want.transpose(1, 2), FP32, f"{arch} {scaling} RoPE over {L} positions")
    plain = impl.rope.RoPE(D, L, args.rope_theta, traditional=False)(mx.array(x), 0)
    assert float(mx.abs(plain - got).max()) > 0.1, f"{scaling} scaling changes nothing"


@pytest.mark.parametrize("scaling", list(SCALINGS))
def test_scaled_rope_model_logits_match_transformers(impl, tmp_path, scaling):
    """A tiny Qwen3 (wide logits) with the scaling in its config.json: transformers' logits over 100
    positions, past the original context of 32."""
    rope = dict(rope_theta=50000.0, **SCALINGS[scaling])
    ref, folder = tiny_folder(tmp_path, "qwen3-tied", seed=6, rope_parameters=rope,
                              max_position_embeddings=32 if scaling == "dynamic" else 128)
    model = impl.loader.load_model(folder).model
    ids = np.random.default_rng(2).integers(0, 320, size=(1, 100))
    with torch.no_grad():
        want = ref(torch.tensor(ids)).logits
    assert_close(model(mx.array(ids)), want, MODEL_FP32, f"tiny Qwen3 with {scaling} RoPE scaling")
