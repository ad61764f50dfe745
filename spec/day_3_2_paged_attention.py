"""Topic 3.2, the paged-attention kernel and prefix caching.

The kernel (`tiny_llm_kernels.paged_attention`, a C++ MLX primitive: AVX-512, AVX2 or portable
code chosen at run time) applies RoPE, writes the new keys and values to their slots and
attends through the block tables in one node, reading keys and values from the blocks in
place (no gathered copy). Prefix caching: each full block is hashed, chained with its prefix;
a new sequence whose leading blocks hash the same (and whose token ids compare equal) shares
them, reference counted, and skips their prefill; freed blocks keep their hash until reused,
least recently freed first.

Checked: the kernel == its twin (`paged_attention_mlx`) == torch SDPA on keys gathered by
numpy, over drawn block sizes, non-contiguous and shared block tables, sequence and chunk
lengths, GQA ratios, fp32/fp16/bf16; the kernel computes each query row the same way whatever
else is in the batch, however the prompt is chunked and whatever the block size (bitwise); the
kernel and the twin refuse the same bad inputs. Prefix caching: hit == miss (bitwise), the
chain (an equal block after another prefix is no hit), a hash collision is no hit, LRU reuse,
the hit rate, the block manager's state machine with shared prefixes. The whole default engine
(kernel, prefix caching, chunked prefill) on the real model: 32 mixed requests, each the same
tokens and log-probabilities (bitwise) as alone, and transformers' greedy tokens.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reference.models import hf_folder_from_gguf, transformers_model
from spec.chat_command import run_chat, stats_lines
from spec.day_3_1_paged_kv_cache import BlockManagerMachine, draw_case, paged_case, reference_paged
from spec.engine_cases import (
    Request,
    assert_same_logprobs,
    assert_transformers_greedy,
    run,
)
from spec.ladder import BY_DTYPE, FP32, assert_close

BUILD = "pip install --no-build-isolation ./kernels (nox builds it)"


def built_kernels(impl):
    """The built kernels package; fails (never skips) with the build command when it is missing."""
    k = impl.native.kernels
    if k is None:
        pytest.fail(f"tiny_llm_kernels is not built: {BUILD}")
    if not hasattr(k, "paged_attention"):
        pytest.fail(f"tiny_llm_kernels has no paged_attention (an older build?); rebuild with: {BUILD}")
    return k


@pytest.mark.presence
def test_kernel_is_built(impl):
    info = built_kernels(impl).paged_attention_info()
    assert info["isa"] in ("avx512", "avx2", "portable"), f"paged_attention_info() = {info}"


@pytest.mark.presence
def test_has_names(impl):
    missing = [n for n in ("paged_attention", "paged_attention_mlx") if not hasattr(impl.engine.paged_attention, n)]
    missing += [n for n in ("get_computed_blocks", "cache_full_blocks")
                if not hasattr(impl.engine.block_manager.BlockManager, n)]
    assert not missing, f"missing: {missing}"


# --- the kernel ---------------------------------------------------------------------------


def _run(impl, fn, qkv, k_pool, v_pool, rope, lens, starts, tables, block_size, H, H_kv, window=None):
    meta = impl.engine.attention_metadata.AttentionMetadata.build(lens, starts, tables, block_size)
    out, k2, v2 = fn(qkv, k_pool, v_pool, rope, meta, H, H_kv, window=window)
    mx.eval(out, k2, v2)
    return out, k2, v2


@given(data=st.data())
@settings(max_examples=25)
def test_kernel_matches_twin_and_torch(impl, data):
    built_kernels(impl)
    pa = impl.engine.paged_attention
    block_size, starts, lens, H, H_kv, D, dtype = draw_case(data)
    shared = data.draw(st.booleans(), label="a shared block")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="seed"))
    need = sum(-(-(s + n) // block_size) for s, n in zip(starts, lens, strict=True))
    qkv, k_pool, v_pool, tables = paged_case(rng, block_size, starts, lens, H, H_kv, D, need + 2, dtype, shared)
    rope = impl.rope.RoPE(D, 128, 10000.0)
    what = f"block {block_size}, starts {starts}, lens {lens}, H {H}/{H_kv}, D {D}, {dtype}, shared {shared}"
    if shared and len(tables) > 1 and tables[1][0] == tables[0][0]:
        # Sequence 1 reads its first block from sequence 0's: neither writes it (both start past it).
        assert starts[0] >= block_size and starts[1] >= block_size
    got, k_got, v_got = _run(impl, pa.paged_attention, qkv, k_pool, v_pool, rope, lens, starts, tables,
                             block_size, H, H_kv)
    twin, k_twin, v_twin = _run(impl, pa.paged_attention_mlx, qkv, k_pool, v_pool, rope, lens, starts, tables,
                                block_size, H, H_kv)
    tol = BY_DTYPE[dtype]
    assert_close(got, twin, tol if dtype != "float32" else FP32, f"kernel vs twin ({what})")
    assert_close(k_got, k_twin, tol, f"keys written, kernel vs twin ({what})")
    assert_close(v_got, v_twin, tol, f"values written, kernel vs twin ({what})")
    want, _, _ = reference_paged(qkv, k_pool, v_pool, rope.cos, rope.sin, tables, starts, lens, H, H_kv, D, block_size)
    assert_close(got[0], want, tol, f"kernel vs torch SDPA on the gathered keys ({what})")


def _prefill_pools(impl, rng, block_size, L, H_kv, D, num_blocks):
    shape = (num_blocks, H_kv, block_size, D)
    return mx.zeros(shape), mx.zeros(shape), rng.permutation(num_blocks).tolist()


@given(data=st.data())
@settings(max_examples=20)
def test_kernel_with_a_sliding_window_matches_twin_and_torch(impl, data):
    """Gemma 3's local layers: a query at p sees keys p - window + 1 .. p. Positions reach past two
    segments of 256, so that segments and tiles wholly before the window are skipped."""
    built_kernels(impl)
    pa = impl.engine.paged_attention
    block_size = data.draw(st.sampled_from([4, 16, 32]), label="block_size")
    B = data.draw(st.integers(1, 3), label="sequences")
    starts = data.draw(st.lists(st.integers(0, 700), min_size=B, max_size=B), label="cached positions")
    lens = data.draw(st.lists(st.sampled_from([1, 1, 2, 9, 40]), min_size=B, max_size=B), label="chunk lengths")
    window = data.draw(st.sampled_from([1, 3, 64, 65, 200, 256, 300, 512]), label="window")
    H_kv, rep = data.draw(st.sampled_from([(1, 1), (1, 4), (2, 2)]), label="H_kv, H / H_kv")
    D = data.draw(st.sampled_from([8, 64]), label="D")
    dtype = data.draw(st.sampled_from(["float32", "float32", "bfloat16"]), label="dtype")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="seed"))
    H = H_kv * rep
    need = sum(-(-(s + n) // block_size) for s, n in zip(starts, lens, strict=True))
    qkv, k_pool, v_pool, tables = paged_case(rng, block_size, starts, lens, H, H_kv, D, need + 2, dtype)
    rope = impl.rope.RoPE(D, 1024, 10000.0)
    what = f"window {window}, block {block_size}, starts {starts}, lens {lens}, H {H}/{H_kv}, D {D}, {dtype}"
    run = lambda fn: _run(impl, fn, qkv, k_pool, v_pool, rope, lens, starts, tables, block_size, H, H_kv,  # noqa: E731
                          window)
    (got, k_got, _), (twin, k_twin, _) = run(pa.paged_attention), run(pa.paged_attention_mlx)
    tol = BY_DTYPE[dtype]
    assert_close(got, twin, tol if dtype != "float32" else FP32, f"kernel vs twin ({what})")
    assert_close(k_got, k_twin, tol, f"keys written, kernel vs twin ({what})")
    want, _, _ = reference_paged(qkv, k_pool, v_pool, rope.cos, rope.sin, tables, starts, lens, H, H_kv, D,
                                 block_size, window)
    assert_close(got[0], want, tol, f"kernel vs torch SDPA with the window's mask ({what})")


def check_rows_invariant(impl, lengths: tuple[int, ...], variants, window: int | None = None) -> None:
    """Each sequence's rows, prefilled whole and batched, equal bit for bit those of every variant
    (block size, chunk size, which sequences share the batch)."""
    built_kernels(impl)
    pa = impl.engine.paged_attention.paged_attention
    rng = np.random.default_rng(0)
    H, H_kv, D = 9, 3, 64
    rope = impl.rope.RoPE(D, 1024, 10000.0)
    prompts = [rng.standard_normal((1, n, (H + 2 * H_kv) * D)).astype(np.float32) for n in lengths]
    num_blocks = sum(-(-n // 4) for n in lengths) + 4

    def prefill(block_size, chunks, which=None):
        """Each sequence's rows, computed in the given chunk sizes, sequences batched together."""
        which = tuple(range(len(lengths))) if which is None else which
        k_pool, v_pool, ids = _prefill_pools(impl, rng, block_size, max(lengths), H_kv, D, num_blocks)
        tables = {i: [ids.pop() for _ in range(-(-prompts[i].shape[1] // block_size))] for i in which}
        done, outs = dict.fromkeys(which, 0), {i: [] for i in which}
        while any(done[i] < prompts[i].shape[1] for i in which):
            live = [i for i in which if done[i] < prompts[i].shape[1]]
            lens = [min(chunks, prompts[i].shape[1] - done[i]) for i in live]
            qkv = mx.array(np.concatenate([prompts[i][:, done[i]:done[i] + n] for i, n in zip(live, lens, strict=True)], axis=1))
            out, k_pool, v_pool = _run(impl, pa, qkv, k_pool, v_pool, rope, lens, [done[i] for i in live],
                                       [tables[i] for i in live], block_size, H, H_kv, window)
            row = 0
            for i, n in zip(live, lens, strict=True):
                outs[i].append(np.array(out[0, row:row + n]))
                done[i] += n
                row += n
        return {i: np.concatenate(o) for i, o in outs.items()}

    whole = prefill(16, 10_000)
    for what, (block_size, chunks, *which) in variants.items():
        got = prefill(block_size, chunks, *which)
        for i in got:
            assert np.array_equal(got[i], whole[i]), (
                f"window {window}, sequence {i}, {what}: not bitwise the whole batched prefill's")


def test_kernel_rows_are_the_same_alone_batched_chunked_and_in_any_block_size(impl):
    """What the engine's bitwise invariances rest on: a query row's output depends only on its
    q, its position and its sequence's keys, computed in one order."""
    check_rows_invariant(impl, (70, 23, 41), {
        "chunks of 7": (16, 7), "chunks of 1 (decode steps)": (16, 1), "block size 4": (4, 10_000),
        "block size 32, chunks of 5": (32, 5), "sequence 0 alone": (16, 10_000, (0,))})


def test_windowed_rows_are_the_same_alone_batched_chunked_and_in_any_block_size(impl):
    """The same with a sliding window of 100 over 600 positions: rows whose window starts in
    another segment share tasks, decode rows split their segments over the threads."""
    check_rows_invariant(impl, (600, 130), {
        "chunks of 37": (16, 37), "chunks of 1 (decode steps)": (16, 1), "block size 4": (4, 10_000),
        "sequence 0 alone, chunks of 200": (32, 200, (0,))}, window=100)


def bad_calls(impl):
    rope = impl.rope.RoPE(8, 64)
    meta = impl.engine.attention_metadata.AttentionMetadata.build([2], [0], [[0]], 4)
    ok = (mx.zeros((1, 2, 4 * 8)), mx.zeros((3, 1, 4, 8)), mx.zeros((3, 1, 4, 8)))
    return rope, meta, {
        "qkv of 2 dims": ((mx.zeros((2, 32)), *ok[1:]), 2, 1),
        "heads not a multiple": (ok, 3, 2),
        "pools of other heads": ((ok[0], mx.zeros((3, 2, 4, 8)), mx.zeros((3, 2, 4, 8))), 2, 1),
        "int qkv": ((ok[0].astype(mx.int32), *ok[1:]), 2, 1),
        "pools of two dtypes": ((ok[0], ok[1], ok[2].astype(mx.float16)), 2, 1),
    }


@pytest.mark.parametrize("case", ["qkv of 2 dims", "heads not a multiple", "pools of other heads", "int qkv",
                                  "pools of two dtypes"])
def test_kernel_and_twin_reject_the_same_inputs(impl, case):
    built_kernels(impl)
    pa = impl.engine.paged_attention
    rope, meta, cases = bad_calls(impl)
    arrays, H, H_kv = cases[case]
    errors = []
    for fn in (pa.paged_attention, pa.paged_attention_mlx):
        with pytest.raises(ValueError) as e:
            mx.eval(fn(*arrays, rope, meta, H, H_kv))
        errors.append(str(e.value))
    assert errors[0] == errors[1] and "\n" not in errors[0], f"{case}: kernel {errors[0]!r} vs twin {errors[1]!r}"


@pytest.mark.parametrize("bad", ["block id", "slot"])
def test_kernel_and_twin_refuse_blocks_and_slots_outside_the_pool(impl, bad):
    built_kernels(impl)
    pa, build = impl.engine.paged_attention, impl.engine.attention_metadata.AttentionMetadata.build
    rope = impl.rope.RoPE(8, 64)
    meta = build([2], [4], [[0, 7 if bad == "block id" else 1]], 4)  # positions 4, 5: the second block
    if bad == "slot":
        meta.slot_mapping = mx.array([4, 99], mx.int32)
    pools = (mx.zeros((1, 2, 4 * 8)), mx.zeros((3, 1, 4, 8)), mx.zeros((3, 1, 4, 8)))
    errors = []
    for fn in (pa.paged_attention, pa.paged_attention_mlx):
        with pytest.raises(ValueError) as e:
            mx.eval(fn(*pools, rope, meta, 2, 1))
        errors.append(str(e.value))
    assert errors[0] == errors[1] and "\n" not in errors[0], f"{bad}: kernel {errors[0]!r} vs twin {errors[1]!r}"


def test_kernel_is_one_node_and_writes_the_pool_in_place(impl):
    built_kernels(impl)
    from spec.day_2_2_quantized_matmul import _ops

    H, H_kv, D, bs = 9, 3, 64, 16
    k_pool, v_pool = mx.zeros((256, H_kv, bs, D)), mx.zeros((256, H_kv, bs, D))
    mx.eval(k_pool, v_pool)
    rope = impl.rope.RoPE(D, 256)
    meta = impl.engine.attention_metadata.AttentionMetadata.build([1], [40], [[5, 9, 200]], bs)
    qkv = mx.random.normal((1, 1, (H + 2 * H_kv) * D))
    mx.eval(qkv, rope.cos, rope.sin)
    mx.synchronize()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    out, k_pool, v_pool = impl.engine.paged_attention.paged_attention(qkv, k_pool, v_pool, rope, meta, H, H_kv)
    assert _ops(out) == ["TinyLLMPagedAttention"], f"expected one lazy node, got {_ops(out)}"
    mx.eval(out, k_pool, v_pool)
    extra = mx.get_peak_memory() - base
    assert extra < k_pool.nbytes / 4, f"a decode step took +{extra / 2**10:.0f} KiB: the pool was copied"


# --- prefix caching -----------------------------------------------------------------------


class PrefixCachingMachine(BlockManagerMachine):
    """3.1's state machine with prefix caching on: sequences with equal prefixes share blocks."""

    prefix_caching = True


def test_block_manager_state_machine_with_shared_prefixes(impl):
    PrefixCachingMachine.impl = impl
    PrefixCachingMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
    PrefixCachingMachine.TestCase().runTest()


def _seq(impl, rid, tokens):
    return impl.engine.sequence.Sequence(rid, tokens, impl.engine.SamplingParams())


def _computed(bm, seq):
    """Admit and compute seq whole, as a step would, and hash its full blocks."""
    hits = bm.get_computed_blocks(seq)
    bm.allocate(seq, seq.num_tokens - len(hits) * bm.block_size, hits)
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_full_blocks(seq)
    return hits


def test_prefix_hits_are_chained_confirmed_and_least_recently_freed_go_first(impl, monkeypatch):
    bm = impl.engine.block_manager.BlockManager(num_blocks=8, block_size=4)
    a = _seq(impl, "a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert _computed(bm, a) == []
    b = _seq(impl, "b", [1, 2, 3, 4, 5, 6, 7, 8, 42, 43])
    assert _computed(bm, b) == a.block_table[:2] and b.num_cached_tokens == 8, "a shared prefix of 2 blocks"
    assert bm.blocks[a.block_table[0]].ref_count == 2
    c = _seq(impl, "c", [0, 0, 0, 0, 5, 6, 7, 8, 1])  # a's second block after another first: no hit
    assert _computed(bm, c) == [], "a block after another prefix was taken for a hit: the hash is not chained"
    d = _seq(impl, "d", [1, 2, 3, 4])  # all in one cached block: the last token is still computed
    assert bm.get_computed_blocks(d) == [], "a hit must leave at least one token to compute"
    a_blocks = list(a.block_table)
    for s in (a, b, c):
        bm.deallocate(s)
    assert bm.num_free_blocks == 8 and bm.hash_to_block_id, "freed blocks keep their hashes"
    e = _seq(impl, "e", [1, 2, 3, 4, 5, 6, 7, 8, 10])
    assert bm.get_computed_blocks(e) == a_blocks[:2], "a freed block's hash was lost before its reuse"
    # Collisions: with every hash equal, token ids decide.
    bm2 = impl.engine.block_manager.BlockManager(num_blocks=8, block_size=4)
    monkeypatch.setattr(impl.engine.block_manager, "compute_hash", lambda tokens, prefix: 7)
    _computed(bm2, _seq(impl, "x", [1, 2, 3, 4, 5]))
    assert bm2.get_computed_blocks(_seq(impl, "y", [9, 9, 9, 9, 5])) == [], "a hash collision was taken for a hit"


def test_freed_blocks_are_reused_least_recently_freed_first(impl):
    bm = impl.engine.block_manager.BlockManager(num_blocks=6, block_size=2)
    old = _seq(impl, "old", [1, 2, 3, 4, 5])  # blocks for [1 2] [3 4] [5]
    _computed(bm, old)
    old_blocks = list(old.block_table)
    bm.deallocate(old)
    new = _seq(impl, "new", [7, 7, 8, 8, 9])
    _computed(bm, new)  # takes the 3 never-used blocks first, then ...
    assert not set(new.block_table) & set(old_blocks), "a cached block was reused while free ones were untouched"
    other = _seq(impl, "other", [6])
    _computed(bm, other)  # ... the least recently freed: old's tail block (freed first, last first)
    assert other.block_table == [old_blocks[2]], f"reused {other.block_table}, expected old's tail {old_blocks[2]}"
    again = _seq(impl, "again", [1, 2, 3, 4, 6])
    assert bm.get_computed_blocks(again) == old_blocks[:2], "the cached prefix was lost"
    assert bm.prefix_cache_hit_rate == 0.0  # lookups are counted by the scheduler (record_lookup), not here


@pytest.fixture(scope="module")
def real(impl, default_model):
    return impl.loader.load_model(default_model)


def default_engine(impl, loaded, **kw):
    """What LLM() runs: the paged kernel, prefix caching, chunked prefill."""
    return impl.engine.LLMEngine(loaded.model, loaded.tokenizer, log=False, **kw)


def test_prefix_hit_equals_miss(impl, real):
    tok, P = real.tokenizer, impl.engine.SamplingParams
    system = tok.encode("You are a helpful assistant who answers in one short sentence. " * 3)
    a, b = system + tok.encode("What is the capital of France?"), system + tok.encode("Name a color.")
    params = P(max_tokens=8, logprobs=5)
    engine = default_engine(impl, real)
    first = run(engine, [Request("a", a, params)])["a"]
    hit = run(engine, [Request("b", b, params)])["b"]
    miss = run(default_engine(impl, real), [Request("b", b, params)])["b"]
    assert first.num_cached_tokens == 0 and miss.num_cached_tokens == 0
    assert hit.num_cached_tokens == len(system) // 16 * 16 > 0, f"cached {hit.num_cached_tokens} of {len(system)}"
    assert hit.token_ids == miss.token_ids, "a prefix-cache hit changed the tokens"
    assert_same_logprobs(hit.logprobs, miss.logprobs, None, "prefix hit vs miss")
    assert 0 < engine.stats()["prefix_cache_hit_rate"] < 1


def test_real_model_32_mixed_requests_on_the_default_engine(impl, real, default_model):
    ref = transformers_model(str(hf_folder_from_gguf(default_model)))
    P = impl.engine.SamplingParams
    tok = real.tokenizer
    shared = tok.encode("Answer in one short sentence, please. " * 3)  # a common prefix: prefix hits among them
    texts = ["The capital of France is", "def add(a, b):", "Once upon a time", "1, 2, 3, 4,", "Water boils at",
             "The quick brown fox", "import numpy as np\n", "Hello, my name is", "The largest planet is",
             "Photosynthesis is", "class Stack:", "Roses are red,", "The speed of light is", "for i in range(",
             "My favourite food is", "In 1492, Columbus"]
    prompts = [shared * (i // 16) + tok.encode(t * (1 + i % 3)) for i, t in enumerate(texts * 2)]
    requests = [Request(str(i), ids, P(max_tokens=5, ignore_eos=True, logprobs=4), join_step=i % 6)
                for i, ids in enumerate(prompts)]
    engine = default_engine(impl, real, max_num_batched_tokens=64)
    got = run(engine, requests)
    assert sum(o.num_cached_tokens for o in got.values()) > 0, "no prefix hit among the requests: vacuous"
    compared = 0
    for r in requests:
        alone = run(default_engine(impl, real), [Request(r.request_id, r.prompt_token_ids, r.params)])[r.request_id]
        assert got[r.request_id].token_ids == alone.token_ids, f"request {r.request_id}: batched != alone"
        # Every row computed the same way in any batch, chunk and block (kernels): bitwise.
        assert_same_logprobs(got[r.request_id].logprobs, alone.logprobs, None, f"request {r.request_id}")
        compared += assert_transformers_greedy(ref, r.prompt_token_ids, got[r.request_id].token_ids,
                                               f"request {r.request_id}")
    assert compared >= 3 * len(requests), f"only {compared} tokens had a clear top-2 gap: a vacuous check"
    assert engine.stats()["blocks_used"] == 0, "blocks held after every request ended"


def test_the_chat_command_runs_on_the_batched_engine(impl):
    r = run_chat(impl, "What is the capital of France?", "--max-tokens", "8")
    assert r.returncode == 0, r.stderr
    assert "[KV cache:" in r.stderr, f"the chat did not start the batched engine: {r.stderr}"
    assert len(stats_lines(r.stderr)) == 1 and "Paris" in r.stdout, (r.stdout, r.stderr)


def test_chat_second_turn_prefills_only_what_it_adds(impl):
    turns = "What is the capital of France?\nAnd of Germany?\n"
    r = run_chat(impl, "--max-tokens", "24", input=turns)
    assert r.returncode == 0, r.stderr[-2000:]
    reports = stats_lines(r.stderr)
    assert len(reports) == 2, f"expected two replies, got: {r.stderr[-2000:]}"
    assert "from the cache" not in reports[0] and "from the cache" in reports[1], reports
