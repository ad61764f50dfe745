"""Topic 3.1, the paged KV cache and its block manager: keys and values live in a pool of
fixed-size blocks per layer; each sequence has a block table (its blocks, in position order)
and each step a slot mapping (where each new token's keys and values go). The BlockManager
keeps the block ids, reference counts and the free list, and holds no arrays; the pool's size
comes from a memory budget.

Checked: the block manager by a Hypothesis state machine (allocate, append, preempt, free,
abort: no block leaked or freed twice, reference counts equal the holders, the pool never
over-committed, every block free at the end); the slot mapping and block tables exactly; the
twin `paged_attention_mlx` against torch's SDPA on keys and values gathered by numpy; the
engine on the paged cache == on topic 2.6's contiguous cache for every block size, on tiny
random Llama and Qwen2 models and the real model; preempted and resumed == never preempted;
budgets and prompts too large for the pool refused in one line. (Prefix caching, sharing
blocks between sequences, and the kernel are topic 3.2's.)
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from reference.tiny_models import tiny_folder
from spec.engine_cases import DENSE_BATCH, Request, assert_same_logprobs, random_prompts, run
from spec.ladder import BY_DTYPE, assert_close

NAMES = {
    "engine.block_manager": ["BlockManager", "Block"],
    "engine.kv_pool": ["KVPool", "PagedKVCache", "num_blocks_for_budget", "bytes_per_block"],
    "engine.paged_attention": ["paged_attention_mlx", "check_paged_attention"],
}


@pytest.mark.presence
def test_has_names(impl):
    missing = []
    for module, names in NAMES.items():
        mod = impl.engine
        for part in module.split(".")[1:]:
            mod = getattr(mod, part)
        missing += [f"{module}.{n}" for n in names if not hasattr(mod, n)]
    assert not missing, f"missing: {missing}"


# --- the block manager: a state machine --------------------------------------------------


class BlockManagerMachine(RuleBasedStateMachine):
    """Sequences come and go through a BlockManager; after every rule the books must balance.
    `prefix_caching` is topic 3.2's (its spec runs this machine with it on)."""

    impl = None  # set by the test
    prefix_caching = False

    def __init__(self):
        super().__init__()
        eng = self.impl.engine
        self.num_blocks, self.block_size = 24, 4
        self.bm = eng.block_manager.BlockManager(self.num_blocks, self.block_size, self.prefix_caching)
        self.seqs, self.ids = [], 0
        self.P = eng.SamplingParams

    def _new(self, tokens: list[int]):
        self.ids += 1
        return self.impl.engine.sequence.Sequence(str(self.ids), tokens, self.P(max_tokens=100))

    def _admit(self, seq, n: int) -> None:
        hits = self.bm.get_computed_blocks(seq) if self.prefix_caching else []
        n = min(n, seq.num_tokens - len(hits) * self.block_size)
        if self.bm.can_allocate(seq, n, hits):
            self.bm.allocate(seq, n, hits)
            seq.num_computed_tokens += n
            self._cache(seq)
            self.seqs.append(seq)
        else:  # it must really not fit
            need = -(-(len(hits) * self.block_size + n) // self.block_size) - len(hits)
            revived = sum(self.bm.blocks[b].ref_count == 0 for b in hits)
            assert need + revived > self.bm.num_free_blocks, "can_allocate refused what fits"

    def _cache(self, seq) -> None:
        if self.prefix_caching:
            self.bm.cache_full_blocks(seq)

    @rule(length=st.integers(1, 30), n=st.integers(1, 30), seed=st.integers(0, 3))
    def add(self, length, n, seed):
        tokens = np.random.default_rng(seed).integers(0, 5, size=length).tolist()  # few values: prefixes repeat
        self._admit(self._new(tokens), n)

    @precondition(lambda self: self.seqs)
    @rule(which=st.integers(0, 100), n=st.integers(1, 9))
    def append(self, which, n):
        seq = self.seqs[which % len(self.seqs)]
        if seq.num_computed_tokens == seq.num_tokens:
            for _ in range(n):
                seq.append_token(seq.num_tokens % 5)
        n = seq.num_tokens - seq.num_computed_tokens
        if self.bm.can_allocate(seq, n):
            self.bm.allocate(seq, n)
            seq.num_computed_tokens += n
            self._cache(seq)
        else:
            need = -(-(seq.num_computed_tokens + n) // self.block_size) - len(seq.block_table)
            assert need > self.bm.num_free_blocks, "can_allocate refused what fits"

    @precondition(lambda self: self.seqs)
    @rule(which=st.integers(0, 100), readmit=st.booleans())
    def free(self, which, readmit):  # finished, aborted, or preempted (and readmitted at once)
        seq = self.seqs.pop(which % len(self.seqs))
        self.bm.deallocate(seq)
        assert seq.block_table == [] and seq.num_computed_tokens == 0
        if readmit:
            self._admit(seq, seq.num_tokens)

    @invariant()
    def books_balance(self):
        holders = {}
        for seq in self.seqs:
            assert len(set(seq.block_table)) == len(seq.block_table), f"a block twice in one table: {seq.block_table}"
            assert len(seq.block_table) == -(-seq.num_computed_tokens // self.block_size), "table and tokens disagree"
            for b in seq.block_table:
                holders[b] = holders.get(b, 0) + 1
        for block in self.bm.blocks:
            assert block.ref_count == holders.get(block.block_id, 0), (
                f"block {block.block_id}: ref_count {block.ref_count}, held by {holders.get(block.block_id, 0)}")
        free = list(self.bm.free_block_ids)
        assert len(free) == len(set(free)), "a block is on the free list twice"
        assert set(free) == {b.block_id for b in self.bm.blocks if b.ref_count == 0}, "free list != unheld blocks"
        assert self.bm.num_free_blocks + len(holders) == self.num_blocks, "a block leaked"

    def teardown(self):
        for seq in self.seqs:
            self.bm.deallocate(seq)
        assert self.bm.num_free_blocks == self.num_blocks, "blocks still held when every sequence has ended"


def test_block_manager_state_machine(impl):
    BlockManagerMachine.impl = impl
    BlockManagerMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
    BlockManagerMachine.TestCase().runTest()


def test_block_tables_and_slot_mapping(impl):
    eng = impl.engine
    bm = eng.block_manager.BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = eng.sequence.Sequence("a", list(range(6)), eng.SamplingParams())
    b = eng.sequence.Sequence("b", list(range(3)), eng.SamplingParams())
    bm.allocate(a, 6)
    bm.allocate(b, 3)
    assert a.block_table == [0, 1] and b.block_table == [2], (a.block_table, b.block_table)
    a.num_computed_tokens, b.num_computed_tokens = 6, 3
    bm.allocate(a, 1)  # position 6: still block 1
    bm.allocate(b, 2)  # positions 3, 4: block 2 offset 3, then a new block
    assert a.block_table == [0, 1] and b.block_table == [2, 3]
    meta = eng.attention_metadata.AttentionMetadata.build([1, 2], [6, 3], [a.block_table, b.block_table], 4)
    assert meta.slot_mapping.tolist() == [1 * 4 + 2, 2 * 4 + 3, 3 * 4 + 0]
    assert meta.block_tables.tolist() == [[0, 1], [2, 3]] and meta.positions.tolist() == [6, 3, 4]
    assert meta.context_lens.tolist() == [7, 5] and meta.cu_seqlens_q.tolist() == [0, 1, 3]


# --- the twin against torch -------------------------------------------------------------


def paged_case(rng, block_size, starts, lens, H, H_kv, D, num_blocks, dtype, shared=False):
    """Pools with random contents, shuffled (non-contiguous) block tables, packed qkv."""
    pool_shape = (num_blocks, H_kv, block_size, D)
    k_pool = rng.standard_normal(pool_shape).astype(np.float32)
    v_pool = rng.standard_normal(pool_shape).astype(np.float32)
    ids = rng.permutation(num_blocks).tolist()
    tables = []
    for s, n in zip(starts, lens, strict=True):
        need = -(-(s + n) // block_size)
        tables.append([ids.pop() for _ in range(need)])
    if shared and len(tables) > 1 and starts[0] >= block_size and starts[1] >= block_size:
        tables[1][0] = tables[0][0]  # a shared first block (what prefix caching does): read-only here
    T = sum(lens)
    qkv = rng.standard_normal((1, T, (H + 2 * H_kv) * D)).astype(np.float32)
    cast = {"float32": np.float32, "float16": np.float16, "bfloat16": np.float32}[dtype]
    to = lambda a: mx.array(a.astype(cast)).astype(getattr(mx, dtype))  # noqa: E731
    return to(qkv), to(k_pool), to(v_pool), tables


def reference_paged(qkv, k_pool, v_pool, rope_cos, rope_sin, tables, starts, lens, H, H_kv, D, block_size,
                    window: int | None = None):
    """numpy RoPE + slot write + gather, then torch SDPA per sequence: (T, H D) float64 numpy.
    window: a query at p sees keys p - window < j <= p only."""
    q_all = np.array(qkv.astype(mx.float32))[0].reshape(-1, H + 2 * H_kv, D).astype(np.float64)
    kp = np.array(k_pool.astype(mx.float32)).astype(np.float64)
    vp = np.array(v_pool.astype(mx.float32)).astype(np.float64)
    cos, sin = np.array(rope_cos).astype(np.float64), np.array(rope_sin).astype(np.float64)

    def rot(x, p):  # half-split RoPE at position p, x (heads, D)
        c, s = cos[p], sin[p]
        x1, x2 = x[:, : D // 2], x[:, D // 2:]
        return np.concatenate([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)

    out, row = [], 0
    for table, s, n in zip(tables, starts, lens, strict=True):
        qs = []
        for t in range(n):
            p = s + t
            q, k, v = q_all[row + t, :H], q_all[row + t, H:H + H_kv], q_all[row + t, H + H_kv:]
            blk, off = table[p // block_size], p % block_size
            kp[blk, :, off], vp[blk, :, off] = rot(k, p), v
            qs.append(rot(q, p))
        ctx = s + n
        keys = np.concatenate([kp[b] for b in table], axis=1)[:, :ctx]  # (H_kv, ctx, D)
        values = np.concatenate([vp[b] for b in table], axis=1)[:, :ctx]
        q = torch.tensor(np.stack(qs, axis=1))[None]  # (1, H, n, D)
        j, pos = np.arange(ctx)[None, :], (s + np.arange(n))[:, None]
        mask = torch.tensor((j <= pos) & ((j > pos - window) if window else True))
        o = torch.nn.functional.scaled_dot_product_attention(
            q, torch.tensor(keys)[None], torch.tensor(values)[None], attn_mask=mask, enable_gqa=True)
        out.append(o[0].permute(1, 0, 2).reshape(n, H * D).numpy())
        row += n
    return np.concatenate(out, axis=0), kp, vp


def draw_case(data):
    block_size = data.draw(st.sampled_from([1, 2, 4, 8, 16, 32]), label="block_size")
    B = data.draw(st.integers(1, 4), label="sequences")
    starts = data.draw(st.lists(st.integers(0, 60), min_size=B, max_size=B), label="cached positions")
    lens = data.draw(st.lists(st.integers(1, 20), min_size=B, max_size=B), label="chunk lengths")
    H_kv, rep = data.draw(st.sampled_from([(1, 1), (2, 2), (1, 4), (3, 3)]), label="H_kv, H / H_kv")
    D = data.draw(st.sampled_from([8, 16, 64]), label="D")
    dtype = data.draw(st.sampled_from(["float32", "float16", "bfloat16"]), label="dtype")
    return block_size, starts, lens, H_kv * rep, H_kv, D, dtype


@given(data=st.data())
@settings(max_examples=20)
def test_twin_matches_torch_on_gathered_keys(impl, data):
    block_size, starts, lens, H, H_kv, D, dtype = draw_case(data)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="seed"))
    need = sum(-(-(s + n) // block_size) for s, n in zip(starts, lens, strict=True))
    qkv, k_pool, v_pool, tables = paged_case(rng, block_size, starts, lens, H, H_kv, D, need + 3, dtype)
    rope = impl.rope.RoPE(D, 128, 10000.0)
    meta = impl.engine.attention_metadata.AttentionMetadata.build(lens, starts, tables, block_size)
    out, k2, v2 = impl.engine.paged_attention.paged_attention_mlx(qkv, k_pool, v_pool, rope, meta, H, H_kv)
    want, kp, vp = reference_paged(qkv, k_pool, v_pool, rope.cos, rope.sin, tables, starts, lens, H, H_kv, D,
                                   block_size)
    tol = BY_DTYPE[dtype]
    what = f"block {block_size}, starts {starts}, lens {lens}, H {H}/{H_kv}, D {D}, {dtype}"
    assert_close(out[0], want, tol, f"paged attention twin vs torch SDPA ({what})")
    assert_close(k2, kp, tol, f"keys written to their slots ({what})")
    assert_close(v2, vp, tol, f"values written to their slots ({what})")


# --- the engine on the paged cache == on the contiguous one ----------------------------------


def paged(impl, loaded, block_size: int, **kw):
    """The engine on the paged cache with the twin, no prefix caching (3.2's)."""
    kw = {"block_size": block_size, "enable_prefix_caching": False, "use_kernels": False, "log": False,
          "max_num_batched_tokens": 256, "max_num_seqs": 8} | kw
    return impl.engine.LLMEngine(loaded.model, loaded.tokenizer, **kw)


def contiguous(impl, loaded, **kw):
    kw = {"paged": False, "log": False, "max_num_batched_tokens": 256, "max_num_seqs": 8} | kw
    return impl.engine.LLMEngine(loaded.model, loaded.tokenizer, **kw)


# gemma3: a sliding window of 8 on most layers, its own query scale; the twin masks the window.
@pytest.fixture(scope="module", params=["llama-tied", "qwen2-untied", "gemma3"])
def tiny(request, impl, tmp_path_factory):
    _, folder = tiny_folder(tmp_path_factory.mktemp("tiny"), request.param, seed=9)
    return impl.loader.load_model(folder)


@pytest.mark.parametrize("block_size", [1, 4, 16, 32])
def test_paged_equals_contiguous(impl, tiny, block_size):
    P = impl.engine.SamplingParams
    prompts = random_prompts(12, 5, 1, 70, 320)
    requests = [Request(str(i), ids, P(max_tokens=8, ignore_eos=True, logprobs=4), join_step=i)
                for i, ids in enumerate(prompts)]
    got = run(paged(impl, tiny, block_size, max_num_batched_tokens=48), requests)  # chunked too
    want = run(contiguous(impl, tiny, max_num_batched_tokens=48), requests)
    for r in requests:
        assert got[r.request_id].token_ids == want[r.request_id].token_ids, f"block size {block_size}: tokens differ"
        assert_same_logprobs(got[r.request_id].logprobs, want[r.request_id].logprobs, DENSE_BATCH,
                             f"block size {block_size}, request {r.request_id}")


def test_preempted_and_resumed_equals_never_preempted_paged(impl, tiny):
    P = impl.engine.SamplingParams
    prompts = random_prompts(13, 4, 10, 30, 320)
    requests = [Request(str(i), ids, P(max_tokens=30, ignore_eos=True, logprobs=3)) for i, ids in enumerate(prompts)]
    args = tiny.args
    per_block = impl.engine.kv_pool.bytes_per_block(args, 4, mx.float32)
    small = paged(impl, tiny, 4, kv_cache_memory=30 * per_block)  # 120 positions for 4 requests of up to 60
    got = run(small, requests)
    assert small.num_preemptions > 0, "nothing was preempted: the check is vacuous"
    roomy = run(paged(impl, tiny, 4), requests)
    for r in requests:
        assert got[r.request_id].token_ids == roomy[r.request_id].token_ids, f"request {r.request_id} changed"
        assert_same_logprobs(got[r.request_id].logprobs, roomy[r.request_id].logprobs, DENSE_BATCH,
                             f"request {r.request_id} after preemption")
    assert small.kv.num_free_blocks == small.kv.num_blocks, "blocks held after every request ended"


def test_budget_sets_the_pool_and_is_printed(impl, tiny, capsys):
    per_block = impl.engine.kv_pool.bytes_per_block(tiny.args, 16, mx.float32)
    engine = paged(impl, tiny, 16, kv_cache_memory=10 * per_block + 5, log=None)
    assert engine.kv.num_blocks == 10 and engine.kv_tokens == 160
    assert "10 blocks of 16 positions" in capsys.readouterr().err, "the pool's size is not printed at start"


def test_bad_budgets_and_prompts_are_refused_in_one_line(impl, tiny):
    per_block = impl.engine.kv_pool.bytes_per_block(tiny.args, 16, mx.float32)
    with pytest.raises(impl.errors.TinyLLMError, match="holds no block") as e:
        paged(impl, tiny, 16, kv_cache_memory=per_block - 1)
    assert "\n" not in str(e.value)
    engine = paged(impl, tiny, 16, kv_cache_memory=4 * per_block)  # 64 positions
    engine.add_request("ok", [1, 2, 3], impl.engine.SamplingParams(max_tokens=4))
    with pytest.raises(impl.errors.TinyLLMError, match="whole KV cache holds 64"):
        engine.add_request("big", [1] * 70, impl.engine.SamplingParams())
    outs = run(engine, [])
    assert outs["ok"].finish_reason == "length" and len(outs["ok"].token_ids) == 4


@pytest.fixture(scope="module")
def real(impl, default_model):
    return impl.loader.load_model(default_model)


@pytest.mark.parametrize("block_size", [8, 16])
def test_real_model_paged_equals_contiguous(impl, real, block_size):
    tok, P = real.tokenizer, impl.engine.SamplingParams
    prompts = [tok.encode(t) for t in ("The capital of France is", "def fib(n):\n    ", "Once upon a time, " * 4)]
    requests = [Request(str(i), ids, P(max_tokens=6, ignore_eos=True, logprobs=3), join_step=i)
                for i, ids in enumerate(prompts)]
    got = run(paged(impl, real, block_size), requests)
    want = run(contiguous(impl, real), requests)
    for r in requests:
        assert got[r.request_id].token_ids == want[r.request_id].token_ids, f"block size {block_size}: tokens differ"
        # The twin gathers the same keys and values and runs week 1's attention on them: the
        # same arithmetic as the contiguous cache's, up to the BLAS kernel choice.
        assert_same_logprobs(got[r.request_id].logprobs, want[r.request_id].logprobs, DENSE_BATCH,
                             f"block size {block_size}, request {r.request_id}")
