"""Benchmark of tiny_llm_kernels.quantized_matmul (topic 2.2) against its pure-MLX
twin (impl.quantize.quantized_matmul_mlx) and mx.quantized_matmul, on the shapes of
SmolLM2-135M (GGUF: group size 32, Q4_1 layers, Q8_0 tied head; fp16 scales, fp32
activations), for M = 1 (decode), 16 and 512 (prefill).

Per case: time per call, GFLOPS (2*M*N*K / time), GB/s (bytes of packed weights,
scales and biases / time) and the speedup over mx.quantized_matmul. Calls are
timed as MLX runs them in a model: many in one mx.eval (lazy graph), each on its
own copy of the weights, with enough copies to overflow the L3 cache, so M = 1
reads its weights from DRAM as decode does. The machine's memory bandwidth is
measured first (numpy, large arrays) for scale.

    python kernels/bench_qmm.py            # from the repository root
    python kernels/bench_qmm.py --quick    # fewer repetitions, skips mx's slowest case
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# The repository root instead of kernels/: from kernels/, `import tiny_llm_kernels`
# would find the source folder (no compiled files) instead of the installed package.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import impl  # noqa: E402,F401  (loads tiny_llm_kernels, and the BLAS fix, before mlx)
from impl.native import kernels  # noqa: E402
from impl.quantize import quantized_matmul_mlx  # noqa: E402

# isort: split
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

# (K, N, bits, what): SmolLM2-135M, hidden 576, intermediate 1536, vocab 49152: each projection
# as the course has it, then q/k/v and gate/up stacked into one matmul each, as the engine runs
# them (impl.loader.fuse_projections).
SHAPES = [
    (576, 576, 4, "q/o proj"),
    (576, 192, 4, "k/v proj"),
    (576, 1536, 4, "gate/up"),
    (1536, 576, 4, "down"),
    (576, 49152, 8, "tied head"),
    (576, 960, 4, "q+k+v stacked"),
    (576, 3072, 4, "gate+up stacked"),
]
GROUP = 32
MS = (1, 16, 512)
L3_BYTES = 64 << 20  # weight copies per case: at least this many bytes, past any L3


def memory_bandwidth(quick: bool) -> dict[str, float]:
    """GB/s of a large numpy read (sum) on 1 and 2 threads, and of a copy (read + write)."""
    n = (128 if quick else 512) << 20
    a = np.ones(n // 4, np.float32)
    b = np.empty_like(a)
    halves = np.array_split(a, 2)

    def best(fn, reps=3 if quick else 5):
        fn()
        return min(_timed(fn) for _ in range(reps))

    with ThreadPoolExecutor(2) as pool:  # numpy releases the GIL in reductions
        two = best(lambda: list(pool.map(np.sum, halves)))
    return {"read, 1 thread": n / best(a.sum) / 1e9, "read, 2 threads": n / two / 1e9,
            "copy (read + write)": 2 * n / best(lambda: np.copyto(b, a)) / 1e9}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def make_case(K: int, N: int, bits: int, copies: int, seed: int = 0):
    """`copies` independent (w_q, scales, biases) triples, fp16 scales as in the GGUF."""
    out = []
    for i in range(copies):
        w = mx.random.normal((N, K), key=mx.random.key(seed + i)) * 0.05
        w_q, scales, biases = mx.quantize(w, group_size=GROUP, bits=bits)
        out.append((w_q, scales.astype(mx.float16), biases.astype(mx.float16)))
    mx.eval(out)
    return out


def time_per_call(fn, x, weights, bits: int, budget: float) -> float:
    """Median seconds per call, calls evaluated together in one mx.eval as in a model."""
    def once():
        return _timed(lambda: mx.eval([fn(x, *w, GROUP, bits) for w in weights])) / len(weights)

    first = once()  # warm-up (first-call setup, page faults); kept only when slow
    if first * len(weights) > budget:
        return first
    times = [once()]
    while sum(times) * len(weights) < budget and len(times) < 50:
        times.append(once())
    return statistics.median(times)


def op_overhead() -> float:
    """Seconds per op of MLX's own per-op cost: 300 tiny adds evaluated in one graph (the fastest
    of 30 tries: 5 once read 11 us where a quiet minute reads 4 to 5)."""
    a = [mx.zeros((4,)) + i for i in range(300)]
    mx.eval(a)
    return min(_timed(lambda: mx.eval([t + 1 for t in a])) for _ in range(30)) / len(a)


IMPLS = {
    "twin": quantized_matmul_mlx,
    "mx.qmm": lambda x, w, s, b, group_size, bits: mx.quantized_matmul(
        x, w, s, b, transpose=True, group_size=group_size, bits=bits),
}


def results(quick: bool) -> list[dict]:
    """One dict per (shape, M, implementation): ms, GFLOPS, GB/s, speedup over mx.quantized_matmul."""
    kernel = getattr(kernels, "quantized_matmul", None)
    if kernel is None:
        raise RuntimeError("tiny_llm_kernels.quantized_matmul is not built: pip install --no-build-isolation ./kernels")
    budget = 0.3 if quick else 1.0
    impls = {"kernel": kernel, **IMPLS}
    rows = []
    for K, N, bits, what in SHAPES:
        nbytes = N * K * bits // 8 + 2 * N * (K // GROUP) * 2  # packed weights + fp16 scales, biases
        copies = max(1, min(512, -(-L3_BYTES // nbytes)))
        weights = make_case(K, N, bits, copies)
        for M in MS:
            x = mx.random.normal((M, K), key=mx.random.key(M))
            mx.eval(x)
            case = []
            for name, fn in impls.items():
                slow = name != "kernel" and 2.0 * M * N * K > 2e9  # mx.qmm ~2.5 GFLOPS: > ~1 s a call
                if name == "mx.qmm" and quick and slow:
                    continue
                # M > 1 is compute bound: one weight copy is enough for the slow ones.
                t = time_per_call(fn, x, weights[:1] if name != "kernel" and M > 1 else weights, bits, budget)
                case.append({"kernel": "quantized_matmul", "impl": name, "what": what, "K": K, "N": N,
                             "bits": bits, "M": M, "ms": t * 1e3, "gflops": 2 * M * N * K / t / 1e9,
                             "gbs": nbytes / t / 1e9})
            mx_ms = next((r["ms"] for r in case if r["impl"] == "mx.qmm"), None)
            for r in case:
                r["vs_mx"] = mx_ms / r["ms"] if mx_ms else None
            rows += case
        del weights
    return rows


def table(rows: list[dict]) -> str:
    head = f"{'shape (K -> N, bits)':<28}{'M':>4}  {'impl':<7}{'ms':>10}{'GFLOPS':>9}{'GB/s':>8}{'vs mx':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        ratio = f"{r['vs_mx']:8.1f}x" if r["vs_mx"] else f"{'-':>9}"
        first = r["impl"] == "kernel"
        label = f"{r['K']} -> {r['N']}, {r['bits']}-bit ({r['what']})" if first else ""
        lines.append(f"{label:<28}{r['M'] if first else '':>4}  {r['impl']:<7}{r['ms']:10.3f}"
                     f"{r['gflops']:9.1f}{r['gbs']:8.1f}{ratio}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--quick", action="store_true", help="shorter runs; skips mx.quantized_matmul's slowest case")
    args = parser.parse_args()
    if getattr(kernels, "quantized_matmul", None) is None:
        sys.exit("tiny_llm_kernels.quantized_matmul is not built: pip install --no-build-isolation ./kernels")
    bw = memory_bandwidth(args.quick)
    peak = max(bw.values())
    print("memory bandwidth (numpy): " + ", ".join(f"{k} {v:.1f} GB/s" for k, v in bw.items()))
    print(f"kernel: {kernels.quantized_matmul_info()}  (TINY_LLM_THREADS overrides the thread count)")
    print(f"mx {mx.__version__}, default device {mx.default_device()}; one MLX op costs about"
          f" {op_overhead() * 1e6:.1f} us of dispatch however small (it dominates M = 1 on small shapes)\n")
    print(table(results(args.quick)))
    print(f"\nM = 1 reads each weight once: its GB/s is to be compared with {peak:.1f} GB/s measured above.")


if __name__ == "__main__":
    main()
