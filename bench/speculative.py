"""Speculative decoding (topic 3.4) on Qwen2.5-Coder 1.5B: plain greedy decode vs n-gram prompt lookup
vs the 0.5B drafting (its weights requantized to 4 bits and its head cut to the ids below 64k and the
sequence's, the engine's defaults; requantized with the whole head; as the file has it),
decode tokens/s and acceptance rates, in one run: on the single-stream loop
(impl.speculative) and in the batched engine (speculative_config, one request at a time); and
llama.cpp's own prompt lookup (llama-cpp-python's LlamaPromptLookupDecoding) on the same GGUF,
against its plain decode.

Three prompts: two edits of a code file given in the prompt (what prompt lookup is for): "edit", a
one-line change, whose answer repeats the rest of the file, and "rename", a rename on most of its
lines, whose answer breaks from the file every few tokens; and "code", a fresh question (nothing to
look up: the draft model's case). Each prompt is decoded to the end of its answer (its first EOS,
found by a plain greedy run first, at most --tokens). Tok/s is the median of interleaved runs (the
machine's load changes between runs). Every method decodes the same greedy tokens (checked: "same"
counts the leading tokens equal to plain decode's). The verify-cost
table times one target pass over 1, k + 1 positions: speculation pays while that stays near one
token's cost (batch-1 decode reads every weight once, whatever the rows).

    python -m bench --speculative [--quick] [--tokens 192] [--reps 3] [--k 4] [--ngram-k 6] [--ngram-n 2] [--ngram-min 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import impl  # noqa: F401  (loads tiny_llm_kernels, and the BLAS fix, before mlx)
from impl.draft_vocab import DEFAULT_SIZE, DraftVocab
from impl.engine import LLM, SamplingParams
from impl.generate import _eos_ids, generate_step_cached
from impl.kv_cache import make_cache
from impl.loader import load_model
from impl.requantize import LAYOUTS, requantized
from impl.speculative import DraftModel, NgramProposer, SpeculativeStats, speculative_generate_step

# isort: split
import mlx.core as mx  # noqa: E402

SOURCE = '''import json
from dataclasses import dataclass


@dataclass
class Order:
    order_id: int
    customer: str
    items: list[str]
    total: float


def load_orders(path):
    with open(path) as f:
        rows = json.load(f)
    orders = []
    for row in rows:
        orders.append(Order(row["order_id"], row["customer"], row["items"], row["total"]))
    return orders


def total_by_customer(orders):
    totals = {}
    for order in orders:
        totals[order.customer] = totals.get(order.customer, 0.0) + order.total
    return totals


def biggest_orders(orders, n):
    return sorted(orders, key=lambda order: order.total, reverse=True)[:n]
'''
PROMPTS = {
    "edit": "In this file, make `biggest_orders` sort by the number of items instead of the total."
            " Reply with the whole file only.\n\n" + SOURCE,
    "rename": "Rename the class `Order` to `Purchase` everywhere in this file. Reply with the whole file only.\n\n"
            + SOURCE,
    "code": "Write a Python function that parses an ISO 8601 date string without using datetime, with a docstring.",
}


def chat_ids(loaded, text: str) -> list[int]:
    return loaded.tokenizer.encode(loaded.chat_template.render([{"role": "user", "content": text}]))


def answer_length(loaded, prompt: list[int], most: int) -> int:
    """Tokens of the plain greedy answer to `prompt` up to its first EOS (included), at most `most`."""
    eos = _eos_ids(loaded.tokenizer, loaded.model.args)
    steps = generate_step_cached(loaded.model, prompt)
    for i in range(most):
        if next(steps) in eos:
            return i + 1
    return most


def run(steps, n: int) -> tuple[list[int], float]:
    """(n tokens, decode tok/s): the clock starts once the prefill's token is out."""
    tokens = [next(steps)]
    start = time.perf_counter()
    while len(tokens) < n:
        tokens.append(next(steps))
    return tokens, (n - 1) / (time.perf_counter() - start)


def engine_run(llm: LLM, prompt: list[int], n: int) -> tuple[list[int], float, float | None]:
    """(n greedy tokens, decode tok/s from the request's time per output token, acceptance rate or None)
    of one request on the engine."""
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))[0]
    m = out.metrics
    rate = m.num_accepted_tokens / m.num_draft_tokens if getattr(m, "num_draft_tokens", 0) else None
    return list(out.token_ids), 1.0 / m.tpot, rate


def llama_cpp_rows(prompt: list[int], n: int, k: int, ngram: int, reps: int) -> dict[str, tuple[float, int]] | None:
    """llama.cpp on the 1.5B's GGUF: {label: (decode tok/s, tokens equal to its own plain greedy)} for
    plain greedy decode and its prompt lookup (k tokens, n-grams up to `ngram`); None without the
    llama-cpp-python binding."""
    try:
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
    except ImportError:
        return None
    from impl.model_files import known_model_path

    path = str(known_model_path("qwen2.5-coder-1.5b"))
    threads = os.cpu_count()
    llms = {"llama.cpp greedy": Llama(model_path=path, n_ctx=2048, n_threads=threads, verbose=False),
            f"llama.cpp lookup k={k}": Llama(model_path=path, n_ctx=2048, n_threads=threads, verbose=False,
                                              draft_model=LlamaPromptLookupDecoding(max_ngram_size=ngram,
                                                                                    num_pred_tokens=k))}
    rates: dict[str, list[float]] = {label: [] for label in llms}
    tokens: dict[str, list[int]] = {}
    for _ in range(reps):
        for label, llm in llms.items():
            llm.reset()
            steps = llm.generate(prompt, top_k=1, temp=0.0, reset=True)
            got, tps = run(steps, n)
            rates[label].append(tps)
            tokens[label] = [int(t) for t in got]
    want = tokens["llama.cpp greedy"]
    return {label: (statistics.median(r), next((i for i, (a, b) in enumerate(zip(tokens[label], want, strict=True))
                                                if a != b), n)) for label, r in rates.items()}


def verify_cost(model, prompt: list[int], ks: list[int], reps: int) -> dict[int, float]:
    """Seconds of one target pass over 1 or k + 1 positions after the prompt (the cache rewound each time)."""
    cache = make_cache(model)
    mx.eval(model(mx.array([prompt]), cache=cache, logits_to_keep=1))
    out = {}
    for k in ks:
        times = []
        for _ in range(reps + 1):
            t = time.perf_counter()
            mx.eval(model(mx.array([prompt[-k - 1:]]), cache=cache))
            times.append(time.perf_counter() - t)
            for c in cache:
                c.trim(k + 1)
        out[k] = min(times[1:])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench --speculative", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="32 tokens a run")
    p.add_argument("--tokens", type=int, default=192, help="most tokens decoded per run: an answer ends at its EOS"
                   " (default 192)")
    p.add_argument("--reps", type=int, default=3, help="runs of each method, tok/s their median (default 3)")
    p.add_argument("--k", type=int, default=4, help="draft-model tokens per step (default 4)")
    p.add_argument("--ngram-k", type=int, default=6, help="n-gram tokens per step (default 6)")
    p.add_argument("--ngram-n", type=int, default=2, help="n-gram size (default 2)")
    p.add_argument("--ngram-min", type=int, default=2, help="shortest n-gram looked up when n has no match"
                   " (default 2: a 1-gram match mostly drafts wrong tokens, and each costs a row of the pass)")
    args = p.parse_args(argv)
    most, reps = (32, 1) if args.quick else (args.tokens, args.reps)
    results: dict[str, tuple[SpeculativeStats, int]] = {}
    t = time.perf_counter()
    target = load_model("qwen2.5-coder-1.5b", quantized=True)
    draft = load_model("qwen2.5-coder-0.5b", quantized=True)
    draft4 = requantized(draft.model, *LAYOUTS["4bit"])  # the engine's default draft_quantization
    vocab = DraftVocab(draft4, DEFAULT_SIZE)  # and its default draft_vocab_size
    cut = f"{DEFAULT_SIZE // 1024}k"
    prompts = {name: chat_ids(target, text) for name, text in PROMPTS.items()}
    lengths = {name: answer_length(target, prompt, most) for name, prompt in prompts.items()}
    print(f"loaded the 1.5B target and 0.5B draft (quantized) in {time.perf_counter() - t:.1f} s; tokens a run: "
          + ", ".join(f"{name} {n}" for name, n in lengths.items()) + f"; median of {reps}")
    print(f"{'prompt':<6} {'method':<24} {'tok/s':>7} {'speedup':>8} {'accept':>7} {'tok/pass':>9} {'same':>7}")
    for name, prompt in prompts.items():
        n = lengths[name]
        methods = {"greedy decode": None, f"n-gram k={args.ngram_k}": (args.ngram_n, args.ngram_k),
                   f"0.5B 4bit {cut} k={args.k}": ("default", args.k), f"0.5B 4bit k={args.k}": ("draft", args.k),
                   f"0.5B file k={args.k}": ("file", args.k)}
        rates: dict[str, list[float]] = {m: [] for m in methods}
        for _ in range(reps):  # interleaved, so a change of load on the machine hits every method alike
            for label, how in methods.items():
                stats = SpeculativeStats()
                if how is None:
                    steps = generate_step_cached(target.model, prompt)
                else:
                    drafts = {"default": (draft4, vocab), "draft": (draft4, None), "file": (draft.model, None)}
                    proposer = (DraftModel(drafts[how[0]][0], vocab=drafts[how[0]][1]) if how[0] in drafts
                                else NgramProposer(how[0], args.ngram_min))
                    steps = speculative_generate_step(target.model, prompt, proposer, how[1], stats=stats)
                got, tps = run(steps, n)
                rates[label].append(tps)
                if how is None:
                    want = got
                same = next((i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b), n)
                results[label] = (stats, same)
        base = statistics.median(rates["greedy decode"])
        for label in methods:
            stats, same = results[label]
            tps = statistics.median(rates[label])
            accept = f"{stats.acceptance_rate:7.2f}" if stats.steps else f"{'':>7}"
            per_pass = stats.tokens_per_step if stats.steps else 1.0
            print(f"{name:<6} {label:<24} {tps:7.2f} {tps / base:7.2f}x {accept} {per_pass:9.2f} {same:>3}/{n}")
    # The engine: the same methods as speculative_config, one request at a time (kernels, paged cache).
    engines = {"engine greedy": LLM(target, log=False, kv_cache_memory=256 << 20),
               f"engine n-gram k={args.ngram_k}": LLM(target, log=False, kv_cache_memory=256 << 20, speculative_config={
                   "method": "ngram", "num_speculative_tokens": args.ngram_k, "prompt_lookup_max": args.ngram_n,
                   "prompt_lookup_min": args.ngram_min}),
               f"engine 0.5B 4bit {cut} k={args.k}": LLM(target, log=False, kv_cache_memory=256 << 20, speculative_config={
                   "method": "draft_model", "model": draft, "num_speculative_tokens": args.k}),
               f"engine 0.5B file k={args.k}": LLM(target, log=False, kv_cache_memory=256 << 20, speculative_config={
                   "method": "draft_model", "model": draft, "num_speculative_tokens": args.k,
                   "draft_quantization": None, "draft_vocab_size": None})}
    for name, prompt in prompts.items():
        n = lengths[name]
        rates = {label: [] for label in engines}
        accepted: dict[str, float | None] = {}
        same: dict[str, int] = {}
        for _ in range(reps):
            for label, llm in engines.items():
                got, tps, accepted[label] = engine_run(llm, prompt, n)
                rates[label].append(tps)
                want = got if label == "engine greedy" else want
                same[label] = next((i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b), n)
        base = statistics.median(rates["engine greedy"])
        for label in engines:
            tps = statistics.median(rates[label])
            accept = f"{accepted[label]:7.2f}" if accepted[label] is not None else f"{'':>7}"
            print(f"{name:<6} {label:<24} {tps:7.2f} {tps / base:7.2f}x {accept} {'':>9} {same[label]:>3}/{n}")
    for name, prompt in prompts.items():  # llama.cpp: its own greedy tokens are the reference
        n = lengths[name]
        rows = llama_cpp_rows(prompt, n, args.ngram_k, args.ngram_n, reps)
        if rows is None:
            print("llama.cpp: llama-cpp-python is not installed here (the bench environment has it)")
            break
        base = rows["llama.cpp greedy"][0]
        for label, (tps, same) in rows.items():
            print(f"{name:<6} {label:<24} {tps:7.2f} {tps / base:7.2f}x {'':>7} {'':>9} {same:>3}/{n}")
    prompt = prompts["code"]
    for label, model in (("1.5B", target.model), (f"0.5B 4bit {cut}", vocab.base), ("0.5B 4bit", draft4),
                         ("0.5B file", draft.model)):  # vocab.base: draft4, its head the ids below 64k
        cost = verify_cost(model, prompt, [0, 4, 8], reps=2 if args.quick else 5)
        print(f"{label} pass over 1 / 5 / 9 positions: "
              + " / ".join(f"{cost[k] * 1e3:.0f} ms" for k in cost)
              + f" ({cost[4] / cost[0]:.2f}x, {cost[8] / cost[0]:.2f}x one token)")
    return 0
