"""Topic 2.7, chunked prefill: each step has a token budget; a prompt longer than what is left
of it is prefilled over several steps, a chunk at a time, and the running sequences' decode
tokens are scheduled first, so a long prompt never stalls them.

Checked by invariances: chunked prefill == whole prefill for every chunk size (the same greedy
tokens and the same log-probabilities: a chunk's rows see exactly the keys the whole prompt's
rows see; bitwise on the real model's quantized kernels, on the fp32 rung for the tiny dense
models, whose BLAS picks its kernel by the number of rows), on tiny random Llama and Qwen2
models and on the real model; with a long prompt prefilling, a decoding request gets a token at every step; a
short request that arrives behind long prompts gets its first token within the bound the
budget sets (the prefill work ahead of it divided by what the budget leaves after the
decodes); the scheduler's budget is never exceeded under random traces.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reference.tiny_models import tiny_folder
from spec.engine_cases import (
    CHUNKED_WEEK1_ATTENTION,
    DENSE_BATCH,
    Request,
    assert_same_logprobs,
    fake_step,
    random_prompts,
    run,
)


def engine(impl, loaded, budget: int, chunked: bool = True, **kw):
    """Topic 2.6's engine (contiguous caches) with chunked prefill under a budget of `budget` tokens."""
    kw = {"paged": False, "max_num_seqs": min(8, budget), "log": False} | kw
    return impl.engine.LLMEngine(loaded.model, loaded.tokenizer, enable_chunked_prefill=chunked,
                                 max_num_batched_tokens=budget, **kw)


@pytest.fixture(scope="module", params=["llama-mqa", "qwen2-untied"])
def tiny(request, impl, tmp_path_factory):
    _, folder = tiny_folder(tmp_path_factory.mktemp("tiny"), request.param, seed=5)
    return impl.loader.load_model(folder)


@pytest.mark.presence
def test_has_names(impl):
    assert hasattr(impl.engine.scheduler.Scheduler, "chunk"), "missing: engine.scheduler.Scheduler.chunk"


@given(data=st.data())
@settings(max_examples=10)
def test_chunked_prefill_equals_whole_prefill(impl, tiny, data):
    budget = data.draw(st.integers(1, 48), label="token budget (chunk size)")
    seed = data.draw(st.integers(0, 2**16), label="prompt seed")
    prompts = random_prompts(seed, 3, 1, 100, 320)
    P = impl.engine.SamplingParams
    requests = [Request(str(i), ids, P(max_tokens=5, ignore_eos=True, logprobs=4), join_step=i)
                for i, ids in enumerate(prompts)]
    chunked = run(engine(impl, tiny, budget), requests)
    whole = run(engine(impl, tiny, 512, chunked=False), requests)
    for r in requests:
        got, want = chunked[r.request_id], whole[r.request_id]
        assert got.token_ids == want.token_ids, f"budget {budget}, request {r.request_id}: chunked != whole"
        assert_same_logprobs(got.logprobs, want.logprobs, tol=DENSE_BATCH, what=f"budget {budget}, request {r.request_id}")


def test_decodes_go_first_and_the_budget_holds(impl, tiny, tmp_path):
    trace = tmp_path / "trace.jsonl"
    eng = engine(impl, tiny, 16, trace=str(trace))
    P = impl.engine.SamplingParams
    short, long_ = random_prompts(8, 2, 6, 6, 320)[0], random_prompts(9, 1, 100, 100, 320)[0]
    run(eng, [Request("short", short, P(max_tokens=30, ignore_eos=True)),
              Request("long", long_, P(max_tokens=2, ignore_eos=True), join_step=1)])
    eng.close()
    steps = [r for r in impl.engine.trace.read_trace(trace) if r["event"] == "step"]
    chunks = []
    for r in steps:
        scheduled = {rid: n for rid, n, _ in r["scheduled"]}
        assert sum(scheduled.values()) <= 16, f"step {r['step']}: {scheduled} over the budget"
        if 1 <= r["step"] < 30:  # the short request decodes from step 1 until its 30th token
            assert scheduled.get("short") == 1, f"step {r['step']}: the decoding request was stalled: {scheduled}"
            assert r["scheduled"][0][0] == "short", f"step {r['step']}: the decode is not scheduled first"
        if "long" in scheduled:
            chunks.append(scheduled["long"])
    assert chunks[:3] == [15, 15, 15] and sum(chunks[:-1]) == len(long_), f"the long prompt's chunks: {chunks}"
    assert impl.engine.trace.check_trace(trace) == [], "the scheduler broke an invariant"


def test_a_short_request_behind_long_prompts_starts_within_the_budget_bound(impl, tiny):
    budget = 32
    eng = engine(impl, tiny, budget)
    P = impl.engine.SamplingParams
    longs = random_prompts(10, 2, 110, 120, 320)
    for i, ids in enumerate(longs):
        eng.add_request(f"long{i}", ids, P(max_tokens=4, ignore_eos=True))
    eng.step()
    ahead = sum(len(p) for p in longs) - budget  # prefill work still ahead of the newcomer
    short = random_prompts(11, 1, 5, 5, 320)[0]
    eng.add_request("short", short, P(max_tokens=1))
    arrival, first = eng.num_steps, None
    while first is None:
        for out in eng.step():
            if out.request_id == "short":
                first = eng.num_steps
    # Each step computes `budget` prefill tokens, less one per decoding sequence (at most 2 here);
    # the step that computes its first token returns it with the next step (the engine reads a
    # step's tokens while the next one computes).
    bound = math.ceil((ahead + len(short)) / (budget - len(longs))) + 1
    print(f"the short request's first token came {first - arrival} steps after it arrived; bound {bound}")
    assert first - arrival <= bound, f"first token after {first - arrival} steps, over the bound {bound}"


@given(data=st.data())
def test_scheduler_budget_and_progress_with_chunks(impl, data):
    eng = impl.engine
    budget = data.draw(st.integers(4, 40), label="max_num_batched_tokens")
    cap = data.draw(st.integers(1, min(budget, 6)), label="max_num_seqs")
    capacity = data.draw(st.integers(120, 400), label="KV capacity (tokens)")
    kv = eng.contiguous_cache.ContiguousKVCache(num_layers=1, capacity=capacity)
    scheduler = eng.scheduler.Scheduler(kv, max_num_seqs=cap, max_num_batched_tokens=budget)
    shapes = data.draw(st.lists(st.tuples(st.integers(1, 100), st.integers(1, 10)), min_size=1, max_size=8),
                       label="requests (prompt length, max_tokens)")
    seqs = [eng.sequence.Sequence(str(i), [1] * n, eng.SamplingParams(max_tokens=m)) for i, (n, m) in enumerate(shapes)]
    for s in seqs:
        scheduler.add(s)
    step, finished_at = 0, {}
    while scheduler.has_unfinished():
        batch = scheduler.schedule()
        assert batch.num_batched_tokens <= budget and len(scheduler.running) <= cap
        for s in fake_step(scheduler, batch):
            finished_at[s.request_id] = step
        step += 1
        assert step < 10_000, "no progress"
    for i, s in enumerate(seqs):
        bound = sum(x.num_prompt_tokens + x.params.max_tokens for x in seqs[:i + 1])
        assert finished_at[s.request_id] <= bound, f"request {i} starved: step {finished_at[s.request_id]} > {bound}"


@pytest.fixture(scope="module")
def real(impl, default_model):
    return impl.loader.load_model(default_model)


@pytest.mark.parametrize("budget", [7, 64])
def test_real_model_chunked_equals_whole(impl, real, budget):
    tok, P = real.tokenizer, impl.engine.SamplingParams
    prompts = [tok.encode("The history of the printing press: " * 6), tok.encode("def fib(n):")]
    requests = [Request(str(i), ids, P(max_tokens=6, ignore_eos=True, logprobs=3)) for i, ids in enumerate(prompts)]
    chunked = run(engine(impl, real, budget, max_num_seqs=2), requests)
    whole = run(engine(impl, real, 512, chunked=False), requests)
    for r in requests:
        assert chunked[r.request_id].token_ids == whole[r.request_id].token_ids, f"budget {budget}: tokens differ"
        assert_same_logprobs(chunked[r.request_id].logprobs, whole[r.request_id].logprobs, CHUNKED_WEEK1_ATTENTION,
                             what=f"budget {budget}, request {r.request_id}")
