"""Helpers the engine's spec files share (topics 2.6, 2.7, 3.1, 3.2): requests that join at
given steps, a run to the end, and a fake step for the scheduler alone."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spec.ladder import FP32, GREEDY_MARGIN, MODEL_FP32, Tol, assert_close

# Bitwise or not. The quantized-matmul kernel and the paged-attention kernel compute a row the
# same way in any batch and chunk, so on quantized weights with the paged kernel every row's
# logits are bitwise the same alone, batched or chunked. Dense fp32 weights go through
# OpenBLAS's sgemm, whose kernel (its small-matrix path or the blocked one) depends on the
# number of rows, so the summation order, and a few ulps, do too: DENSE_BATCH (measured 5e-7
# on logprobs of magnitude 5, 2 layers). Week 1's attention (the contiguous cache's) multiplies
# a chunk's queries by the keys through the same sgemm, so a chunk's rows may differ from the
# whole prompt's by a few ulps a layer: over the real model's 30 layers, MODEL_FP32.
DENSE_BATCH = FP32
CHUNKED_WEEK1_ATTENTION = MODEL_FP32


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: object  # the package's SamplingParams
    join_step: int = 0  # added before this step


def run(engine, requests: list[Request], abort: dict[str, int] | None = None, max_steps: int = 10_000) -> dict:
    """Add each request before its join step, step until every one ends; request id -> its last
    RequestOutput. abort: request id -> the step before which it is aborted."""
    done, step, abort = {}, 0, abort or {}
    pending = sorted(requests, key=lambda r: r.join_step)
    while pending or engine.has_unfinished_requests():
        while pending and pending[0].join_step <= step:
            r = pending.pop(0)
            engine.add_request(r.request_id, r.prompt_token_ids, r.params)
        for rid, at in abort.items():
            if at == step:
                engine.abort_request(rid)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        step += 1
        assert step < max_steps, f"the engine did not finish {len(requests)} requests in {max_steps} steps"
    return done


def random_prompts(seed: int, n: int, low: int, high: int, vocab: int) -> list[list[int]]:
    """n prompts of random token ids, lengths drawn in [low, high]."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=int(rng.integers(low, high + 1))).tolist() for _ in range(n)]


def fake_step(scheduler, batch, token: int = 7) -> list:
    """What the engine does after the model ran, without a model: count the computed tokens,
    append `token` to each sequence that completed its tokens, finish those at max_tokens.
    Returns the finished sequences."""
    finished = []
    for seq, n in batch.scheduled:
        seq.num_computed_tokens += n
        if scheduler.kv.enable_prefix_caching:
            scheduler.kv.cache_full_blocks(seq)
    for seq, _ in batch.scheduled:
        if seq.num_computed_tokens == seq.num_tokens:
            seq.append_token(token)
            if seq.num_output_tokens >= seq.params.max_tokens:
                scheduler.finish(seq, "length")
                finished.append(seq)
    return finished


def assert_same_logprobs(got, want, tol: Tol | None, what: str) -> None:
    """Per output token, the same top log-probabilities: bitwise when tol is None, else within tol."""
    assert len(got) == len(want), f"{what}: {len(got)} positions vs {len(want)}"
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if tol is None:
            assert g == w, f"{what}: position {i}: {g} != {w} (bitwise expected)"
        else:
            assert set(g) == set(w), f"{what}: position {i}: top tokens {sorted(g)} vs {sorted(w)}"
            assert_close([g[k] for k in sorted(g)], [w[k] for k in sorted(w)], tol, f"{what}: position {i}")


def assert_transformers_greedy(ref, prompt: list[int], tokens: list[int], what: str) -> int:
    """`tokens` are transformers' greedy continuation of `prompt` for as long as its top-2 gap is
    clear (GREEDY_MARGIN); returns how many were compared, which may be few for one request: a
    caller checking many requests asserts on the total. One forward over prompt + tokens (teacher
    forcing): while the tokens agree, its logits at each step are those generate() would compute."""
    import torch

    with torch.no_grad():
        logits = ref(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]  # (n, V): each next token's
    top2 = logits.topk(2)
    gaps = (top2.values[:, 0] - top2.values[:, 1]).tolist()
    for i, (token, want, gap) in enumerate(zip(tokens, top2.indices[:, 0].tolist(), gaps, strict=True)):
        if gap < GREEDY_MARGIN:
            return i
        assert token == want, f"{what}: step {i}: got token {token}, transformers {want} (its top-2 gap {gap:.3g})"
    return len(tokens)
