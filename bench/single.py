"""The batch-1 benchmark (`nox -s bench`): the same workload on this project, mlx-lm,
transformers (fp32) and llama.cpp, in one run, reported as ratios.

Workload on the default model (or --model, a known name or a GGUF path: the same file for
every peer): prefill a 512-token prompt, then decode 128 tokens greedily at batch 1. impl runs twice: with its default KV cache (the
activations' fp32, exact) and with an fp16 one, as llama.cpp's is by default
(impl-fp16-kv). Each peer runs in its own process (so its peak
memory is its own). Achieved GB/s = decode tok/s x the weight bytes one token
reads, set against this machine's measured memory bandwidth. The kernel table
times the quantized matmul and flash attention against MLX's own ops.

    python -m bench [--quick] [--model qwen2.5-coder-1.5b] [--peers impl,impl-fp16-kv,mlx-lm,transformers,llama.cpp]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

PEERS = ("impl", "impl-fp16-kv", "mlx-lm", "transformers", "llama.cpp")
TEXT = ("The history of computing is a story of abstraction. Each layer hides the one below it, "
        "from transistors to logic gates, from machine code to compilers, from operating systems "
        "to the programs people use every day. ")


def prompt_ids(n: int, model: Path) -> list[int]:
    """n token ids of English text, from the reference tokenizer of `model` (shared by every peer)."""
    from reference.tokenizer import hf_tokenizer

    ids = hf_tokenizer(model).encode(TEXT, add_special_tokens=False)
    return (ids * (n // len(ids) + 1))[:n]


def measure_bandwidth() -> float:
    """Memory bandwidth in GB/s: the best of a large numpy copy (read + write) and sum (read)."""
    import numpy as np

    a = np.ones(64 * 2**20, dtype=np.float64)  # 512 MiB
    b = np.empty_like(a)
    best_copy = min(_timed(lambda: np.copyto(b, a)) for _ in range(5))
    best_sum = min(_timed(lambda: a.sum()) for _ in range(5))
    return max(2 * a.nbytes / best_copy, a.nbytes / best_sum) / 1e9


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: ru_maxrss survives exec, so a
    worker would report its parent's peak when that was higher."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# --- workers: one process per peer --------------------------------------------------------


def _time_stream(tokens, n_decode):
    """(prefill_s, decode_s) of a token iterator: first token = prefill, the next n_decode = decode."""
    t = time.perf_counter()
    next(tokens)
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(n_decode):
        next(tokens)
    return prefill, time.perf_counter() - t


def worker_impl(ids, n_decode, model: Path, kv_cache_dtype: str = "auto"):
    """kv_cache_dtype: what the KV cache stores, as the chat's --kv-cache-dtype (auto: the activations')."""
    import impl  # noqa: F401  (the BLAS fix and kernels, before mlx)
    from impl.cli import kv_dtype
    from impl.generate import generate_step_cached
    from impl.kv_cache import make_cache
    from impl.loader import kernels_built, load_model

    loaded = load_model(model, quantized=None)
    cache = lambda: make_cache(loaded.model, kv_dtype(kv_cache_dtype))  # noqa: E731
    steps = lambda: generate_step_cached(loaded.model, ids, cache=cache())  # noqa: E731
    _time_stream(steps(), 2)  # warm up at the same shapes
    prefill, decode = _time_stream(steps(), n_decode)
    weights = _impl_weight_bytes(loaded.model)
    note = "quantized weights, C++ kernels" if kernels_built() else "dequantized fp32 (kernels not built)"
    return prefill, decode, weights, note + ("" if kv_cache_dtype == "auto" else f", {kv_cache_dtype} KV cache")


def worker_impl_fp16_kv(ids, n_decode, model: Path):
    """impl with an fp16 KV cache, as llama.cpp's is by default."""
    return worker_impl(ids, n_decode, model, kv_cache_dtype="float16")


def _impl_weight_bytes(model) -> int:
    seen, total = set(), 0
    def add(w):  # noqa: E306
        nonlocal total
        if w is not None and id(w) not in seen:
            seen.add(id(w))
            total += w.nbytes
    add(model.embed_tokens.weight)
    add(model.lm_head)
    add(model.norm.weight)
    for layer in model.layers:
        a = layer.self_attn
        for w in (a.wq, a.wk, a.wv, a.wqkv, a.wo, a.bq, a.bk, a.bv, a.bqkv, a.bo, layer.mlp.w_gate,
                  layer.mlp.w_up, layer.mlp.w_gate_up, layer.mlp.w_down, layer.input_layernorm.weight,
                  layer.post_attention_layernorm.weight):  # separate or stacked (week 2) projections
            add(w)
    return total


def worker_mlx_lm(ids, n_decode, model: Path):
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    from reference.models import hf_folder_from_gguf

    net, _ = load(str(hf_folder_from_gguf(model)))
    # The default GGUF's layout: 4-bit weights, group 32 (mlx-lm quantizes the embedding at 4 bits
    # too, where the GGUF has 8; a k-quant GGUF has 6-bit tensors too).
    nn.quantize(net, group_size=32, bits=4)
    mx.eval(net.parameters())
    def stream(prompt):  # mlx-lm's own pipelined decode loop, greedy
        return (int(t) for t, _ in generate_step(mx.array(prompt), net, max_tokens=n_decode + 1))

    _time_stream(stream(ids), 2)  # warm up at the same shapes
    prefill, decode = _time_stream(stream(ids), n_decode)
    weights = sum(v.nbytes for _, v in tree_flatten(net.parameters()))
    return prefill, decode, weights, "4-bit group 32 (mx.quantized_matmul)"


def worker_transformers(ids, n_decode, gguf: Path):
    import torch

    from reference.models import hf_folder_from_gguf, transformers_model

    model = transformers_model(str(hf_folder_from_gguf(gguf)))
    x = torch.tensor([ids])
    with torch.no_grad():
        # logits_to_keep=1: the prefill's head on the last position only, as the other peers do
        model(x, logits_to_keep=1)  # warm up at the same shapes
        t = time.perf_counter()
        out = model(x, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        prefill = time.perf_counter() - t
        past = out.past_key_values
        t = time.perf_counter()
        for _ in range(n_decode):
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        decode = time.perf_counter() - t
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return prefill, decode, weights, f"fp32, {torch.get_num_threads()} threads"


def worker_llama_cpp(ids, n_decode, path: Path):
    from llama_cpp import Llama

    # n_batch = n_ctx: without logits_all, llama-cpp-python keeps n_batch rows of logits and
    # indexes them by position, so a position past n_batch would fall off the end.
    llm = Llama(model_path=str(path), n_ctx=1024, n_batch=1024, n_threads=os.cpu_count(), verbose=False)
    llm.eval(ids)  # warm up at the same shapes
    llm.reset()
    t = time.perf_counter()
    llm.eval(ids)
    prefill = time.perf_counter() - t
    token = int(llm.scores[llm.n_tokens - 1].argmax())
    t = time.perf_counter()
    for _ in range(n_decode):
        llm.eval([token])
        token = int(llm.scores[llm.n_tokens - 1].argmax())
    decode = time.perf_counter() - t
    return prefill, decode, path.stat().st_size, f"{os.cpu_count()} threads, the GGUF as it is"


WORKERS = {"impl": worker_impl, "impl-fp16-kv": worker_impl_fp16_kv, "mlx-lm": worker_mlx_lm,
           "transformers": worker_transformers, "llama.cpp": worker_llama_cpp}


def run_worker(name: str, ids_file: Path, n_decode: int, model: Path) -> None:
    """Run one peer's workload and print its result as one JSON line."""
    ids = json.loads(ids_file.read_text())  # tokenized by the driver: no tokenizer in the peer's memory
    n_prompt = len(ids)
    prefill, decode, weight_bytes, note = WORKERS[name](ids, n_decode, model)
    print(json.dumps({
        "peer": name, "note": note, "prompt_tokens": n_prompt, "decode_tokens": n_decode,
        "prefill_tps": n_prompt / prefill, "decode_tps": n_decode / decode,
        "weight_bytes": weight_bytes, "peak_rss_mb": peak_rss_mb(),
    }))


# --- the driver ------------------------------------------------------------------------


def run_peer(name: str, ids_file: Path, n_decode: int, model: Path) -> dict:
    """One peer in a fresh process; a failure becomes an entry with its error line."""
    print(f"bench: {name} ...", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "bench.single", "--worker", name, "--prompt-file", str(ids_file),
           "--decode-tokens", str(n_decode), "--model", str(model)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        error = (r.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"bench: {name} failed: {error}", file=sys.stderr)
        return {"peer": name, "error": error}
    result = json.loads(lines[-1])
    print(f"bench: {name}: prefill {result['prefill_tps']:.0f} tok/s, decode {result['decode_tps']:.1f} tok/s",
          file=sys.stderr)
    return result


def median_of_runs(runs: list[dict]) -> dict:
    """One peer's repeated runs as one result: the median prefill and decode rates, the largest
    peak memory, and every run's decode rate (a failed run fails the peer)."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    mid = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    return {**runs[0], "prefill_tps": mid("prefill_tps"), "decode_tps": mid("decode_tps"),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "decode_tps_runs": [r["decode_tps"] for r in runs]}


def peer_table(results: list[dict], bandwidth: float) -> str:
    """Markdown table of the peers, with ratios to llama.cpp and transformers."""
    ok = {r["peer"]: r for r in results if "error" not in r}
    base_llama, base_tf = ok.get("llama.cpp"), ok.get("transformers")
    ratio = lambda r, base, key: f"{r[key] / base[key]:.2f}x" if base else "-"  # noqa: E731
    rows = ["| peer | prefill tok/s | vs llama.cpp | vs transformers | decode tok/s | vs llama.cpp |"
            " decode GB/s | of bandwidth | peak MB | notes |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['peer']} | failed: {r['error']} | | | | | | | | |")
            continue
        gbs = r["decode_tps"] * r["weight_bytes"] / 1e9
        runs = r.get("decode_tps_runs", [])
        note = r["note"] + (f"; decode runs {', '.join(f'{x:.0f}' for x in runs)}" if len(runs) > 1 else "")
        rows.append(f"| {r['peer']} | {r['prefill_tps']:.0f} | {ratio(r, base_llama, 'prefill_tps')} |"
                    f" {ratio(r, base_tf, 'prefill_tps')} | {r['decode_tps']:.1f} |"
                    f" {ratio(r, base_llama, 'decode_tps')} | {gbs:.1f} | {gbs / bandwidth:.0%} |"
                    f" {r['peak_rss_mb']:.0f} | {note} |")
    return "\n".join(rows)


def chart(results: list[dict], path: Path, model_name: str) -> None:
    """Bars of prefill and decode tokens/s per peer, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "prefill_tps", "prefill tok/s (512-token prompt)"),
                           (axes[1], "decode_tps", "decode tok/s (batch 1)")):
        ax.bar([r["peer"] for r in ok], [r[key] for r in ok], color=[f"C{i}" for i in range(len(ok))])
        ax.set_title(title)
    fig.suptitle(f"tiny-llm spec benchmark: {model_name} on this machine")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write build/bench/bench.json, bench.md and bench.png."""
    p = argparse.ArgumentParser(prog="python -m bench", description=" ".join(__doc__.split("\n\n")[0].split()),
                                epilog="--serving: the serving benchmark instead (python -m bench --serving --help)")
    p.add_argument("--quick", action="store_true", help="shorter workload: 128-token prompt, 32 decode tokens")
    p.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated subset of {','.join(PEERS)}")
    p.add_argument("--model", help="a known name (qwen2.5-coder-0.5b, qwen2.5-coder-1.5b: fetched on first use) or a"
                                    " GGUF path, the same file for every peer (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--out", default="build/bench", help="folder for bench.json, bench.md, bench.png")
    p.add_argument("--repeat", type=int, metavar="N",
                   help="run the peers N times, in turn, and report each one's median (default 3, 1 with --quick:"
                        " on 2 shared cores one round's decode ratios swing by a third)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--prompt-file", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--decode-tokens", type=int, default=128, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker == "kernels":
        worker_kernels(args.quick)
        return 0
    if args.worker:
        run_worker(args.worker, args.prompt_file, args.decode_tokens, Path(args.model))
        return 0
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.repeat < 1:
        p.error(f"--repeat must be at least 1, not {args.repeat}")
    peers = [x.strip() for x in args.peers.split(",") if x.strip()]
    unknown = [x for x in peers if x not in PEERS]
    if unknown:
        p.error(f"unknown peer(s) {unknown}; choose from {', '.join(PEERS)}")
    n_prompt, n_decode = (128, 32) if args.quick else (512, 128)
    model = resolve_model(args.model, p)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bandwidth = measure_bandwidth()
    print(f"bench: memory bandwidth {bandwidth:.1f} GB/s", file=sys.stderr)
    ids_file = out / "prompt_ids.json"
    ids_file.write_text(json.dumps(prompt_ids(n_prompt, model)))
    runs = {name: [] for name in peers}
    for i in range(args.repeat):  # in turn, so that a slow spell of the machine hits every peer
        if args.repeat > 1:
            print(f"bench: round {i + 1} of {args.repeat}", file=sys.stderr)
        for name in peers:
            runs[name].append(run_peer(name, ids_file, n_decode, model))
    results = [median_of_runs(runs[name]) for name in peers]
    kernels = kernel_results(args.quick)
    report = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu_count": os.cpu_count(),
              "model": model.name, "bandwidth_gbs": bandwidth, "prompt_tokens": n_prompt, "decode_tokens": n_decode,
              "peers": results, "kernels": kernels}
    md = [f"# Benchmark, {report['when']}", "",
          f"{model.name}; {os.cpu_count()} cores, measured memory bandwidth {bandwidth:.1f} GB/s;"
          f" prefill {n_prompt} tokens, decode {n_decode} tokens at batch 1"
          + (f"; medians of {args.repeat} runs per peer, taken in turn." if args.repeat > 1 else "."), "",
          peer_table(results, bandwidth), "", kernel_table(kernels, bandwidth)]
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    (out / "bench.md").write_text("\n".join(md) + "\n")
    chart(results, out / "bench.png", model.stem)
    print("\n".join(md))
    print(f"\nwrote {out / 'bench.json'}, {out / 'bench.md'}, {out / 'bench.png'}", file=sys.stderr)
    return 0


def resolve_model(name: str | None, parser: argparse.ArgumentParser) -> Path:
    """--model as a GGUF path: the default model, a known name (fetched into the cache), or a file."""
    from impl.errors import TinyLLMError
    from impl.model_files import KNOWN_MODELS, known_model_path
    from reference.models import default_model_path

    if name is None:
        return default_model_path()
    if name in KNOWN_MODELS:
        try:
            return known_model_path(name)
        except TinyLLMError as e:
            parser.error(str(e))
    path = Path(name)
    if path.suffix != ".gguf" or not path.is_file():
        parser.error(f"--model {name!r} is neither a known name ({', '.join(KNOWN_MODELS)}) nor a GGUF file")
    return path


def _load_script(name: str):
    """kernels/<name>.py as a module (they are scripts, not a package; they rewrite sys.path[0])."""
    import importlib.util

    saved = list(sys.path)
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "kernels" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module


def worker_kernels(quick: bool) -> None:
    """Print the kernel rows as one JSON line: qmm at the model's shapes, flash attention, fp32 matmul peak."""
    import impl  # noqa: F401  (first: the BLAS fix only takes effect before mlx is imported)

    # isort: split
    import mlx.core as mx

    a = mx.random.normal((1024, 1024))
    mx.eval(a @ a)
    seconds = min(_timed(lambda: mx.eval(a @ a)) for _ in range(5))
    bench_qmm = _load_script("bench_qmm")
    # MLX's cost of one op, measured first, next in time to the M = 1 cases it is set beside
    # (taken last, after minutes of attention cases, one run read 14.9 us where others read 4 to 6).
    op_us = bench_qmm.op_overhead() * 1e6
    rows = bench_qmm.results(quick) + _load_script("bench_flash_attention").results(quick)
    print(json.dumps({"fp32_matmul_gflops": 2 * 1024**3 / seconds / 1e9, "op_overhead_us": op_us, "rows": rows}))


def kernel_results(quick: bool) -> dict:
    """The kernel table's data, measured in a fresh process; {} with an error when the kernels are absent."""
    print("bench: kernels ...", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "bench.single", "--worker", "kernels"] + (["--quick"] if quick else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        error = (r.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"bench: kernels failed: {error}", file=sys.stderr)
        return {"error": error}
    return json.loads(lines[-1])


def kernel_table(data: dict, bandwidth: float) -> str:
    """Markdown tables: quantized matmul against mx.quantized_matmul and the machine's limits, then flash attention."""
    if "rows" not in data:
        return f"Kernels: {data.get('error', 'not run')}"
    peak, op_us = data["fp32_matmul_gflops"], data.get("op_overhead_us", 0.0)
    out = [f"Quantized matmul (M = 1 is bandwidth bound: {bandwidth:.1f} GB/s; M = 512 compute bound:"
           f" OpenBLAS fp32 sgemm here runs at {peak:.0f} GFLOPS). The M = 1 limit: one MLX node that"
           f" reads its weights once at {bandwidth:.1f} GB/s, plus MLX's cost of a node ({op_us:.1f} us"
           " measured): what any kernel could reach against mx.quantized_matmul and of the bandwidth.", "",
           "| layer (K -> N, bits) | M | kernel ms | mx.quantized_matmul ms | kernel vs mx | twin ms |"
           " kernel GB/s | of bandwidth | kernel GFLOPS | of sgemm | M = 1 limit: vs mx | of bandwidth |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    qmm = [r for r in data["rows"] if r["kernel"] == "quantized_matmul"]
    for r in (r for r in qmm if r["impl"] == "kernel"):
        same = {x["impl"]: x for x in qmm if (x["K"], x["N"], x["M"]) == (r["K"], r["N"], r["M"])}
        mx_ms = f"{same['mx.qmm']['ms']:.3f}" if "mx.qmm" in same else "skipped"
        ratio = f"{r['vs_mx']:.0f}x" if r.get("vs_mx") else "-"
        limit = "- | -"
        if r["M"] == 1:  # the fastest one node can be: its bytes at the bandwidth, plus the node's cost
            read_ms = r["gbs"] * r["ms"] / bandwidth  # = weight bytes / bandwidth, in ms
            limit_ms = read_ms + op_us / 1e3
            limit_vs_mx = f"{same['mx.qmm']['ms'] / limit_ms:.0f}x" if "mx.qmm" in same else "-"
            limit = f"{limit_vs_mx} | {read_ms / limit_ms:.0%}"
        out.append(f"| {r['what']} ({r['K']} -> {r['N']}, {r['bits']}) | {r['M']} | {r['ms']:.3f} | {mx_ms} |"
                   f" {ratio} | {same['twin']['ms']:.3f} | {r['gbs']:.1f} | {r['gbs'] / bandwidth:.0%} |"
                   f" {r['gflops']:.0f} | {r['gflops'] / peak:.0%} | {limit} |")
    out += ["", "Flash attention (B 1, H 9, H_kv 3, D 64, fp32)", "",
            "| L = S | mask | impl | ms | GFLOPS | vs mx.fast | peak MiB |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in (r for r in data["rows"] if r["kernel"] == "flash_attention"):
        out.append(f"| {r['L']} | {r['mask']} | {r['impl']} | {r['ms']:.1f} | {r['gflops']:.1f} |"
                   f" {r['vs_mx_fast']:.2f}x | {r['peak_mib']:.1f} |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
