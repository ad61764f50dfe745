"""Topic 2.6, continuous batching: many requests in one engine, joining and leaving between
steps, each step one model call over sequences of different lengths with no padding.

The engine (impl/engine/, nano-vllm's split): Sequence (a request's state), Scheduler (waiting
and running queues, a cap on sequences and on tokens per step, preemption by recompute),
ModelRunner (the packed arrays, one model call, sampling), LLMEngine (step = schedule, run,
postprocess) and LLM (vLLM's offline API). This topic runs it on week 2.1's contiguous cache,
one per sequence (`paged=False`), without chunked prefill (topic 2.7).

Checked by invariances: a request's greedy tokens and its log-probabilities are the same
whatever else is in the batch and whenever it joined (bitwise: every row of the model is
computed alone, the same way in any batch); a seeded sampled request draws the same tokens
alone and in any batch; greedy tokens equal transformers' on tiny random Llama and Qwen2 models
and on the real model's 32 mixed requests (where the top-2 gap is clear); batched == alone bitwise
on the real model under int8 matmuls too (impl.quantize's precision "int8"). The scheduler, on its
own with a fake step under random arrival traces: the token budget and the sequence cap never
exceeded, admissions in arrival order, every request finished within a stated bound, every
token of the cache free at the end. Bad requests get one-line errors and leave the running
ones undisturbed; an aborted request frees its cache at once.
"""

from __future__ import annotations

import mlx.core as mx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from reference.models import hf_folder_from_gguf, transformers_model
from reference.tiny_models import tiny_folder
from spec.engine_cases import (
    DENSE_BATCH,
    Request,
    assert_same_logprobs,
    assert_transformers_greedy,
    fake_step,
    random_prompts,
    run,
)

NAMES = {
    "engine": ["LLM", "LLMEngine", "SamplingParams", "RequestOutput"],
    "engine.scheduler": ["Scheduler", "ScheduledBatch"],
    "engine.sequence": ["Sequence", "SequenceStatus"],
    "engine.model_runner": ["ModelRunner"],
    "engine.contiguous_cache": ["ContiguousKVCache"],
    "engine.attention_metadata": ["AttentionMetadata"],
}


@pytest.mark.presence
def test_has_names(impl):
    missing = []
    for module, names in NAMES.items():
        mod = impl
        for part in module.split("."):
            mod = getattr(mod, part)
        missing += [f"{module}.{n}" for n in names if not hasattr(mod, n)]
    assert not missing, f"missing: {missing}"


def contiguous(impl, loaded, **kw):
    """An engine on topic 2.6's own pieces: per-sequence contiguous caches, whole prefills."""
    kw = {"paged": False, "enable_chunked_prefill": False, "max_num_batched_tokens": 2048, "log": False} | kw
    return impl.engine.LLMEngine(loaded.model, loaded.tokenizer, **kw)


@pytest.fixture(scope="module", params=["llama-untied-bias", "qwen2-tied"])
def tiny(request, impl, tmp_path_factory):
    """(transformers model, impl's LoadedModel) of one tiny random config."""
    ref, folder = tiny_folder(tmp_path_factory.mktemp("tiny"), request.param, seed=3)
    return ref, impl.loader.load_model(folder)


# --- the scheduler alone: bookkeeping, exact ----------------------------------------------


@given(data=st.data())
def test_scheduler_keeps_its_limits_order_and_progress(impl, data):
    eng = impl.engine
    budget = data.draw(st.integers(8, 64), label="max_num_batched_tokens")
    cap = data.draw(st.integers(1, 8), label="max_num_seqs")
    capacity = data.draw(st.integers(40, 200), label="KV capacity (tokens)")
    kv = eng.contiguous_cache.ContiguousKVCache(num_layers=1, capacity=capacity)
    scheduler = eng.scheduler.Scheduler(kv, max_num_seqs=cap, max_num_batched_tokens=budget,
                                        enable_chunked_prefill=False)
    shapes = data.draw(st.lists(st.tuples(st.integers(1, min(budget, capacity // 2)), st.integers(1, 12),
                                          st.integers(0, 6)), min_size=1, max_size=12),
                       label="requests (prompt length, max_tokens, steps before the next arrives)")
    seqs, arrivals, admitted, finished_at, step = [], [], [], {}, 0
    todo = list(enumerate(shapes))
    while todo or scheduler.has_unfinished():
        while todo and (not arrivals or step - arrivals[-1] >= todo[0][1][2]):
            i, (n, max_tokens, _) = todo.pop(0)
            seq = eng.sequence.Sequence(str(i), [1] * n, eng.SamplingParams(max_tokens=max_tokens))
            scheduler.add(seq)
            seqs.append(seq)
            arrivals.append(step)
        batch = scheduler.schedule()
        assert batch.num_batched_tokens <= budget, f"step {step}: {batch.num_batched_tokens} tokens > budget {budget}"
        assert len(scheduler.running) <= cap, f"step {step}: {len(scheduler.running)} running > cap {cap}"
        assert kv.num_free_blocks >= 0, f"step {step}: the cache is over-committed"
        admitted += [s.request_id for s, _ in batch.scheduled if s.request_id not in admitted]
        for seq in fake_step(scheduler, batch):
            finished_at[seq.request_id] = step
        step += 1
        assert step < 5000, "the scheduler stopped making progress"
    assert admitted == sorted(admitted, key=int), f"admitted out of arrival order: {admitted}"
    # The oldest unfinished request computes at least one token a step and is never preempted
    # (the newest is), so request i ends within the tokens of requests 0..i, counted from its arrival.
    for i, seq in enumerate(seqs):
        bound = sum(s.num_prompt_tokens + s.params.max_tokens for s in seqs[:i + 1])
        assert finished_at[seq.request_id] - arrivals[i] <= bound, f"request {i} starved: {finished_at}, bound {bound}"
    assert kv.num_free_blocks == capacity and not kv.caches, "the cache is not all free at the end"


def test_a_preempted_sequence_that_outgrew_the_budget_is_recomputed_in_chunks(impl):
    """Hypothesis found it: without chunked prefill, a sequence preempted once its prompt and
    output outgrew the step budget (16 + 3 > 18 tokens) could never be admitted again. Its
    recompute is chunked: every request ends at its length, and the budget holds each step."""
    eng = impl.engine
    kv = eng.contiguous_cache.ContiguousKVCache(num_layers=1, capacity=40)
    scheduler = eng.scheduler.Scheduler(kv, max_num_seqs=3, max_num_batched_tokens=18, enable_chunked_prefill=False)
    seqs = [eng.sequence.Sequence(str(i), [1] * n, eng.SamplingParams(max_tokens=m))
            for i, (n, m) in enumerate([(1, 6), (10, 6), (16, 5)])]
    for seq in seqs:
        scheduler.add(seq)
    preempted = 0
    for _ in range(200):
        if not scheduler.has_unfinished():
            break
        batch = scheduler.schedule()
        assert batch.num_batched_tokens <= 18
        preempted += len(batch.preempted)
        fake_step(scheduler, batch)
    assert not scheduler.has_unfinished(), "a request never ran again"
    assert preempted > 0, "nothing was preempted: the case is not the one Hypothesis found"
    assert [s.num_output_tokens for s in seqs] == [6, 6, 5] and all(s.finish_reason == "length" for s in seqs)


def test_scheduler_rejects_a_budget_below_the_sequence_cap(impl):
    kv = impl.engine.contiguous_cache.ContiguousKVCache(num_layers=1, capacity=100)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        impl.engine.scheduler.Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=4)


# --- invariances on tiny random models ----------------------------------------------------


def test_runner_packs_the_batch_without_padding(impl, tiny):
    _, loaded = tiny
    engine = contiguous(impl, loaded)
    prompts = random_prompts(0, 3, 2, 9, 320)
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), ids, impl.engine.SamplingParams(max_tokens=2))
    batch = engine.scheduler.schedule()
    ids, meta, rows = engine.runner.prepare(batch)
    lengths = [len(p) for p in prompts]
    assert ids == sum(prompts, []), "tokens not packed end to end"
    assert meta.positions.tolist() == [p for n in lengths for p in range(n)], "positions restart per sequence"
    assert meta.cu_seqlens_q.tolist() == [0, lengths[0], lengths[0] + lengths[1], sum(lengths)]
    assert rows == [lengths[0] - 1, lengths[0] + lengths[1] - 1, sum(lengths) - 1], "sampled rows: each prompt's last"


def _alone(impl, loaded, r: Request):
    return run(contiguous(impl, loaded), [Request(r.request_id, r.prompt_token_ids, r.params)])[r.request_id]


def test_batched_equals_alone_whenever_it_joins(impl, tiny):
    _, loaded = tiny
    P = impl.engine.SamplingParams
    prompts = random_prompts(1, 6, 1, 40, 320)
    requests = [Request(str(i), ids, P(max_tokens=6 + i, logprobs=5), join_step=[0, 0, 1, 3, 4, 9][i])
                for i, ids in enumerate(prompts)]
    batched = run(contiguous(impl, loaded), requests)
    for r in requests:
        alone = _alone(impl, loaded, r)
        got = batched[r.request_id]
        assert got.token_ids == alone.token_ids, f"request {r.request_id}: batched {got.token_ids}, alone {alone.token_ids}"
        # Attention is per sequence and every other op row-wise; only dense BLAS's kernel choice
        # depends on the batch (spec/engine_cases.py): these tiny models are dense fp32.
        assert_same_logprobs(got.logprobs, alone.logprobs, tol=DENSE_BATCH, what=f"request {r.request_id}")


def test_seeded_sampling_is_the_same_in_any_batch(impl, tiny):
    _, loaded = tiny
    P = impl.engine.SamplingParams
    prompts = random_prompts(2, 4, 3, 20, 320)
    sampled = P(temperature=1.0, top_p=0.9, seed=1234, max_tokens=10)
    requests = [Request("s", prompts[0], sampled, join_step=2)] + [
        Request(str(i), ids, P(temperature=0.8, seed=i, max_tokens=12)) for i, ids in enumerate(prompts[1:])]
    batched = run(contiguous(impl, loaded), requests)["s"]
    alone = _alone(impl, loaded, requests[0])
    assert batched.token_ids == alone.token_ids, "a seeded request drew other tokens in a batch"
    other_seed = _alone(impl, loaded, Request("s", prompts[0], P(temperature=1.0, top_p=0.9, seed=99, max_tokens=10)))
    assert other_seed.token_ids != alone.token_ids, "another seed drew the same 10 tokens: is the seed used?"


def test_greedy_tokens_match_transformers(impl, tiny):
    ref, loaded = tiny
    prompts = random_prompts(4, 5, 1, 30, 320)
    P = impl.engine.SamplingParams
    requests = [Request(str(i), ids, P(max_tokens=8, ignore_eos=True), join_step=i) for i, ids in enumerate(prompts)]
    got = run(contiguous(impl, loaded), requests)
    compared = sum(assert_transformers_greedy(ref, r.prompt_token_ids, got[r.request_id].token_ids,
                                              f"request {r.request_id}") for r in requests)
    assert compared >= 3 * len(requests), f"only {compared} tokens had a clear top-2 gap: a vacuous check"


def test_qwen3_greedy_tokens_match_transformers(impl, tmp_path):
    """Qwen3's q/k norms on the engine's batched attention (they run before it, in the projections)."""
    ref, folder = tiny_folder(tmp_path, "qwen3-mqa", seed=3)
    loaded = impl.loader.load_model(folder)
    P = impl.engine.SamplingParams
    requests = [Request(str(i), ids, P(max_tokens=8, ignore_eos=True), join_step=i)
                for i, ids in enumerate(random_prompts(3, 5, 1, 30, 320))]
    got = run(contiguous(impl, loaded), requests)
    compared = sum(assert_transformers_greedy(ref, r.prompt_token_ids, got[r.request_id].token_ids,
                                              f"qwen3 request {r.request_id}") for r in requests)
    assert compared >= 3 * len(requests), f"only {compared} tokens had a clear top-2 gap: a vacuous check"


def test_gemma3_greedy_tokens_match_transformers(impl, tmp_path):
    """Gemma 3 on the engine's batched attention: its own query scale, and a sliding window of 8 on
    its local layers (their per-layer RoPE base too), with prompts of up to 30 tokens, so most
    queries see only part of their sequence's cache."""
    ref, folder = tiny_folder(tmp_path, "gemma3", seed=3)
    loaded = impl.loader.load_model(folder)
    P = impl.engine.SamplingParams
    requests = [Request(str(i), ids, P(max_tokens=8, ignore_eos=True), join_step=i)
                for i, ids in enumerate(random_prompts(3, 5, 10, 30, 320))]
    got = run(contiguous(impl, loaded), requests)
    compared = sum(assert_transformers_greedy(ref, r.prompt_token_ids, got[r.request_id].token_ids,
                                              f"gemma3 request {r.request_id}") for r in requests)
    assert compared >= 3 * len(requests), f"only {compared} tokens had a clear top-2 gap: a vacuous check"


# --- requests joining, leaving, streaming, failing ----------------------------------------


def test_streamed_outputs_add_up_and_abort_frees_at_once(impl, tiny):
    _, loaded = tiny
    engine = contiguous(impl, loaded)
    P = impl.engine.SamplingParams
    prompts = random_prompts(5, 3, 4, 12, 320)
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), ids, P(max_tokens=20, ignore_eos=True))
    streamed = {str(i): [] for i in range(3)}
    for _ in range(3):
        for out in engine.step():
            streamed[out.request_id] += out.new_token_ids
    held = engine.kv.num_free_blocks
    engine.abort_request("1")
    assert engine.kv.num_free_blocks == held + len(prompts[1]) + 2, "the aborted request's cache was not freed at once"
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            streamed[out.request_id] += out.new_token_ids
            done[out.request_id] = out
    assert "1" not in done and sorted(done) == ["0", "2"]
    for rid, out in done.items():
        assert streamed[rid] == out.token_ids and len(out.token_ids) == 20 and out.finish_reason == "length"
    assert engine.kv.num_free_blocks == engine.kv_tokens, "the cache is not all free at the end"


def test_a_stream_closed_early_aborts_its_request(impl, tiny):
    _, loaded = tiny
    llm = impl.engine.LLM(loaded, paged=False, enable_chunked_prefill=False, log=False)
    stream = llm.stream({"prompt_token_ids": random_prompts(15, 1, 8, 8, 320)[0]},
                        impl.engine.SamplingParams(max_tokens=50, ignore_eos=True))
    got = [next(stream) for _ in range(3)]
    assert [len(o.token_ids) for o in got] == [1, 2, 3] and not got[-1].finished
    stream.close()  # the consumer went away
    assert not llm.engine.scheduler.has_unfinished(), "the abandoned request is still queued"
    assert llm.engine.kv.num_free_blocks == llm.engine.kv_tokens, "the abandoned request still holds its cache"


def bad_requests(impl, loaded) -> dict:
    P = impl.engine.SamplingParams
    context = loaded.args.max_position_embeddings
    return {
        "longer than the context": ([1] * context, P(), "context"),
        "empty": ([], P(), "empty"),
        "max_tokens < 1": ([1, 2], P(max_tokens=0), "max_tokens"),
        "bad temperature": ([1, 2], P(temperature=-1.0), "temperature"),
        "bad top_p": ([1, 2], P(temperature=1.0, top_p=0.0), "top_p"),
        "token id out of range": ([1, 10_000], P(), "token ids"),
        "request id in use": ([1, 2], P(), "in use"),
    }


@pytest.mark.parametrize("case", ["longer than the context", "empty", "max_tokens < 1", "bad temperature",
                                  "bad top_p", "token id out of range", "request id in use"])
def test_a_bad_request_is_refused_and_the_others_go_on(impl, tiny, case):
    _, loaded = tiny
    engine = contiguous(impl, loaded)
    P = impl.engine.SamplingParams
    ids = random_prompts(6, 1, 5, 5, 320)[0]
    engine.add_request("busy", ids, P(max_tokens=8, ignore_eos=True))
    engine.step()
    prompt, params, words = bad_requests(impl, loaded)[case]
    with pytest.raises(impl.errors.TinyLLMError, match=words) as e:
        engine.add_request("busy" if case == "request id in use" else "bad", prompt, params)
    assert "\n" not in str(e.value), f"not one line: {e.value}"
    outs = {}
    while engine.has_unfinished_requests():
        outs.update((o.request_id, o) for o in engine.step())
    assert list(outs) == ["busy"] and len(outs["busy"].token_ids) == 8, "the running request was disturbed"
    assert outs["busy"].token_ids == _alone(impl, loaded, Request("busy", ids, P(max_tokens=8, ignore_eos=True))).token_ids


def test_a_kv_budget_below_one_token_is_refused(impl, tiny):
    _, loaded = tiny
    with pytest.raises(impl.errors.TinyLLMError, match="KV cache budget"):
        contiguous(impl, loaded, kv_cache_memory=8)


def test_preempted_and_resumed_equals_never_preempted(impl, tiny):
    _, loaded = tiny
    P = impl.engine.SamplingParams
    prompts = random_prompts(7, 4, 10, 20, 320)
    requests = [Request(str(i), ids, P(max_tokens=24, ignore_eos=True, logprobs=3)) for i, ids in enumerate(prompts)]
    per_token = 2 * loaded.args.num_hidden_layers * loaded.args.num_key_value_heads * loaded.args.head_dim * 4
    small = contiguous(impl, loaded, kv_cache_memory=100 * per_token)  # room for about 2.5 of the 4
    got = run(small, requests)
    assert small.num_preemptions > 0, "the small cache preempted nothing: the check is vacuous"
    for r in requests:
        alone = _alone(impl, loaded, r)
        assert got[r.request_id].token_ids == alone.token_ids, f"request {r.request_id} changed after preemption"
        assert_same_logprobs(got[r.request_id].logprobs, alone.logprobs, tol=DENSE_BATCH, what=f"request {r.request_id}")


# --- the real model -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def real(impl, default_model):
    return impl.loader.load_model(default_model)  # quantized weights on the kernels when built


def test_real_model_32_mixed_requests_match_transformers_and_alone(impl, real, default_model):
    ref = transformers_model(str(hf_folder_from_gguf(default_model)))
    tok, P, steps = real.tokenizer, impl.engine.SamplingParams, 6
    texts = ["The capital of France is", "def add(a, b):", "Once upon a time", "1, 2, 3, 4,",
             "The quick brown fox", "import numpy as np\n", "Water boils at", "Hello, my name is"]
    prompts = [tok.encode(t * (1 + i // 8 * 3)) for i, t in enumerate(texts * 4)]  # 32, lengths 4 to 70
    requests = [Request(str(i), ids, P(max_tokens=steps, ignore_eos=True, logprobs=5), join_step=i % 5)
                for i, ids in enumerate(prompts)]
    got = run(contiguous(impl, real, max_num_seqs=32), requests)
    compared = 0
    for r in requests:
        compared += assert_transformers_greedy(ref, r.prompt_token_ids, got[r.request_id].token_ids,
                                               f"request {r.request_id}")
        alone = _alone(impl, real, r)
        assert got[r.request_id].token_ids == alone.token_ids, f"request {r.request_id}: batched != alone"
        # Quantized weights on the kernels: every row computed the same way in any batch.
        assert_same_logprobs(got[r.request_id].logprobs, alone.logprobs, tol=None, what=f"request {r.request_id}")
    assert compared >= 4 * len(requests), f"only {compared} tokens had a clear top-2 gap: a vacuous check"


@pytest.fixture
def int8_matmuls(impl):
    """Every quantized matmul in precision "int8" (impl.quantize.MATMUL_PRECISION) for one test, put back after."""
    was, impl.quantize.MATMUL_PRECISION = impl.quantize.MATMUL_PRECISION, "int8"
    yield
    impl.quantize.MATMUL_PRECISION = was


def test_real_model_int8_matmuls_batched_equals_alone(impl, real, int8_matmuls):
    """Under precision "int8" (x rounded to int8 per row and weight group, integer dots, at every
    row count: topic 2.2) a row's arithmetic still depends on that row only, so a request's greedy
    tokens and its log-probabilities are the same bits alone and in a batch of 12 joining at
    different steps; and they are not the fp32 ones (the precision took effect)."""
    tok, P = real.tokenizer, impl.engine.SamplingParams
    texts = ["The capital of France is", "def add(a, b):", "Once upon a time", "1, 2, 3, 4,",
             "The quick brown fox", "Water boils at"]
    prompts = [tok.encode(t * (1 + i // 6 * 4)) for i, t in enumerate(texts * 2)]  # 12, lengths 4 to 40
    requests = [Request(str(i), ids, P(max_tokens=6, ignore_eos=True, logprobs=5), join_step=i % 4)
                for i, ids in enumerate(prompts)]
    got = run(contiguous(impl, real, max_num_seqs=12), requests)
    for r in requests:
        alone = _alone(impl, real, r)
        assert got[r.request_id].token_ids == alone.token_ids, f"request {r.request_id}: int8 batched != alone"
        assert_same_logprobs(got[r.request_id].logprobs, alone.logprobs, tol=None, what=f"request {r.request_id}, int8")
    impl.quantize.MATMUL_PRECISION = "fp32"
    fp32 = _alone(impl, real, requests[0])
    assert fp32.logprobs != got["0"].logprobs, "int8 gave the fp32 log-probabilities: did the precision take effect?"


def test_llm_generate_takes_text_and_token_ids(impl, real):
    llm = impl.engine.LLM(real, paged=False, enable_chunked_prefill=False, log=False)
    ids = real.tokenizer.encode("The capital of France is")
    outs = llm.generate(["The capital of France is", {"prompt_token_ids": ids}],
                        impl.engine.SamplingParams(max_tokens=5))
    assert outs[0].token_ids == outs[1].token_ids and outs[0].prompt_token_ids == ids
    assert outs[0].text == real.tokenizer.decode(outs[0].token_ids), "the text is not the tokens' text"
    for out in outs:
        assert out.finished and out.finish_reason == "length" and out.metrics.ttft > 0 and out.metrics.tpot > 0


def test_a_stop_string_ends_the_text_before_it(impl, real):
    llm = impl.engine.LLM(real, paged=False, enable_chunked_prefill=False, log=False)
    full = llm.generate("The capital of France is", impl.engine.SamplingParams(max_tokens=12))[0]
    stop = full.text.strip().split()[1]
    out = llm.generate("The capital of France is", impl.engine.SamplingParams(max_tokens=12, stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.text == full.text[:full.text.index(stop)], (full.text, stop, out.text)


def test_the_engine_computes_each_row_alone(impl, real):
    # What batched == alone rests on: a row's logits do not depend on the rows packed beside it.
    ids = mx.array([real.tokenizer.encode("The capital of France is Paris, and")])
    full = real.model(ids)[0]
    assert mx.array_equal(full[:3], real.model(ids[:, :3])[0]).item(), "a row's logits depend on the rows after it"
