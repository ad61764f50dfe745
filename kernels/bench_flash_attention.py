"""Benchmark of tiny_llm_kernels.flash_attention (topic 2.4) against
mx.fast.scaled_dot_product_attention and the pure-MLX twin
(impl.flash_attention.flash_attention_mlx), on the default model's attention shape:
9 query heads over 3 kv heads, head_dim 64, fp32, batch 1, L = S = 512, 2048, 8192,
causal (and 2048 without a mask).

Per case and implementation: median ms per call, GFLOPS (the attention's 4 * H * L * S * D,
halved under a causal mask, whatever an implementation skips), the speedup over
mx.fast, and peak memory above the inputs (mx.get_peak_memory: MLX's allocator, which
holds every array and the kernel's workspace). Every output is checked against
mx.fast's. At 8192 the references run once each (seconds a call, GiB of scores).

    python kernels/bench_flash_attention.py            # from the repository root
    python kernels/bench_flash_attention.py --quick    # 512 and 2048 (causal) only, fewer repetitions

`results(quick)` returns the rows as dicts, for the benchmark's kernel table (`python -m bench`,
bench/single.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

# The repository root instead of kernels/: from kernels/, `import tiny_llm_kernels`
# would find the source folder (no compiled files) instead of the installed package.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import impl  # noqa: E402,F401,I001  (loads tiny_llm_kernels, and the BLAS fix, before mlx)
from impl.flash_attention import flash_attention_mlx  # noqa: E402
from impl.native import kernels  # noqa: E402

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

H, H_KV, D = 9, 3, 64  # SmolLM2-135M
CASES = [(512, "causal"), (2048, "causal"), (2048, None), (8192, "causal")]
QUICK_CASES = [(512, "causal"), (2048, "causal")]


def implementations() -> dict:
    scale = 1 / D**0.5
    impls = {
        "mx.fast": lambda q, k, v, mask: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask),
        "twin": lambda q, k, v, mask: flash_attention_mlx(q, k, v, scale=scale, mask=mask),
    }
    if kernels is not None and hasattr(kernels, "flash_attention"):
        impls = {"kernel": lambda q, k, v, mask: kernels.flash_attention(q, k, v, scale=scale, mask=mask), **impls}
    return impls


def measure(fn, q, k, v, mask, reps: int) -> tuple[float, float, mx.array]:
    """(median seconds per call, peak bytes above what was live before, the output)."""
    mx.synchronize()
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    out = fn(q, k, v, mask)
    t0 = time.perf_counter()
    mx.eval(out)
    times = [time.perf_counter() - t0]
    peak = mx.get_peak_memory() - base
    if reps > 1:  # the first call was the warm-up (threads, page faults)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            mx.eval(fn(q, k, v, mask))
            times.append(time.perf_counter() - t0)
    return statistics.median(times), peak, out


def results(quick: bool) -> list[dict]:
    """One dict per (case, implementation): ms, GFLOPS, peak MiB, speedup over mx.fast."""
    rows = []
    for N, mask in QUICK_CASES if quick else CASES:
        rng = np.random.default_rng(N)
        q, k, v = (mx.array(rng.standard_normal((1, h, N, D)).astype(np.float32)) for h in (H, H_KV, H_KV))
        mx.eval(q, k, v)
        flops = 4 * H * N * N * D / (2 if mask == "causal" else 1)
        case, outs = [], {}
        for name, fn in implementations().items():
            reps = 1 if N >= 8192 and name != "kernel" else (3 if quick else 7)
            seconds, peak, outs[name] = measure(fn, q, k, v, mask, reps)
            case.append({"kernel": "flash_attention", "impl": name, "L": N, "S": N, "H": H, "H_kv": H_KV, "D": D,
                         "dtype": "float32", "mask": mask or "none", "ms": seconds * 1e3,
                         "gflops": flops / seconds / 1e9, "peak_mib": peak / 2**20})
        for name, out in outs.items():  # a wrong answer is not a result
            err = float(mx.max(mx.abs(out - outs["mx.fast"])))
            assert err < 1e-4, f"{name}, L = S = {N}, mask {mask}: differs from mx.fast by {err:.3g}"
        fast = next(r["ms"] for r in case if r["impl"] == "mx.fast")
        for r in case:
            r["vs_mx_fast"] = fast / r["ms"]
        rows += case
    return rows


def table(rows: list[dict]) -> str:
    head = f"{'L = S':>6} {'mask':<7} {'impl':<8}{'ms':>10}{'GFLOPS':>9}{'vs mx.fast':>12}{'peak MiB':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['L']:>6} {r['mask']:<7} {r['impl']:<8}{r['ms']:10.1f}{r['gflops']:9.1f}"
                     f"{r['vs_mx_fast']:11.2f}x{r['peak_mib']:10.1f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--quick", action="store_true", help="512 and 2048 (causal) only, fewer repetitions")
    args = parser.parse_args()
    if kernels is None or not hasattr(kernels, "flash_attention"):
        print("tiny_llm_kernels.flash_attention is not built (pip install --no-build-isolation ./kernels);"
              " timing mx.fast and the twin only", file=sys.stderr)
    else:
        print(f"kernel: {kernels.flash_attention_info()}  (TINY_LLM_THREADS overrides the thread count)")
    print(f"mx {mx.__version__}, default device {mx.default_device()}; B = 1, H = {H}, H_kv = {H_KV}, D = {D}, fp32\n")
    print(table(results(args.quick)))


if __name__ == "__main__":
    main()
