"""The engine's step trace (`LLMEngine(trace=FILE)`, `nox -s bench -- --serving --trace FILE`) and
a checker of the scheduler's invariants over it (topic 2.6).

One JSON object a line: {"event": "add", "step", "request_id", "prompt_tokens", "max_tokens"},
{"event": "step", "step", "scheduled": [[request_id, tokens, cached tokens], ...], "preempted",
"running", "waiting", "num_blocks", "blocks_used", "blocks_free", "prefix_cache_hit_rate",
"max_num_seqs", "max_num_batched_tokens"} and {"event": "finish", "step", "request_id", "reason"}.
"""

from __future__ import annotations

import json
from pathlib import Path


def read_trace(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def check_trace(path: str | Path) -> list[str]:
    """The invariants a trace breaks, one line each (empty: none): the token budget, the sequence
    cap and the pool never exceeded; requests admitted in arrival order; each request finished
    within the tokens of the requests that arrived before it and its own (the oldest running
    request computes at least one token a step and is never preempted); every block free once
    every request has ended."""
    records, problems = read_trace(path), []
    added, first_run, finished, open_ = {}, [], {}, set()
    for r in records:
        if r["event"] == "add":
            added[r["request_id"]] = r
            open_.add(r["request_id"])
        elif r["event"] == "finish":
            finished[r["request_id"]] = r
            open_.discard(r["request_id"])
        elif r["event"] == "step":
            tokens = sum(n for _, n, _ in r["scheduled"])
            if tokens > r["max_num_batched_tokens"]:
                problems.append(f"step {r['step']}: {tokens} tokens > budget {r['max_num_batched_tokens']}")
            if r["running"] > r["max_num_seqs"]:
                problems.append(f"step {r['step']}: {r['running']} running > cap {r['max_num_seqs']}")
            if not 0 <= r["blocks_used"] <= r["num_blocks"]:
                problems.append(f"step {r['step']}: {r['blocks_used']} blocks used of {r['num_blocks']}")
            first_run += [rid for rid, _, _ in r["scheduled"] if rid not in first_run]
            if not open_ and r["blocks_used"]:
                problems.append(f"step {r['step']}: no request left, {r['blocks_used']} blocks still held")
    order = [rid for rid in added if rid in first_run]
    if first_run != order:
        problems.append(f"admitted out of arrival order: {first_run[:8]}... vs {order[:8]}...")
    budget = 0
    for rid, a in added.items():
        budget += a["prompt_tokens"] + a["max_tokens"]
        f = finished.get(rid)
        if f is not None and f["reason"] != "abort" and f["step"] - a["step"] > budget:
            problems.append(f"request {rid} took {f['step'] - a['step']} steps, over the bound {budget}")
    return problems
