"""Checks and timings of tiny_llm_kernels.quantized_matmul(..., precision="bf16").

precision="bf16": x (after the fused prologue) and w = scales * q + biases (fp32, multiply then add)
are each rounded to bfloat16 (nearest even), their products (exact in fp32) accumulated in fp32,
the output rounded to x's dtype. From bf16_min_m rows on a CPU with AVX512-BF16 the kernel runs
VDPBF16PS on a bf16 panel of the weights; below that (or without the instruction) the fp32 kernels
run on the same rounded operands. The readable twin is `quantized_matmul_bf16_mlx` below.

Checked, on SmolLM2-135M's shapes (K = 576: N = 576, 192, 1536, 3072 (gate+up), 49152 (head, 8
bits); K = 1536: N = 576 (down)), group 32, fp16 scales, fp32 activations, M = 1, 16, 64, 256, 512:
- kernel vs twin: the same operands, so only the fp32 summation order differs: |kernel - twin| <=
  2 gamma_K * A_b, A_b = sum_k |x_b w_b| (the bf16 operands' |products|); the measured max of
  |kernel - twin| / A_b is printed (expect ~1e-7);
- kernel vs the fp32 path and vs float64 torch on the unrounded operands: the bf16 rung, each
  product off by at most (1 + 2^-9)^2 - 1 ~ 3.9e-3 of itself; max |err| / A printed (A = sum |x w|);
- both paths (VDPBF16PS, forced from M = 1; emulated, forced everywhere), the portable/AVX2/AVX-512
  emulations, fp16/bf16 x, fused RMSNorm/SwiGLU prologue and residual epilogue (bit for bit the
  unfused kernels), a row's bits alone and in a batch on the VDPBF16PS path, precision's ValueError.
Timed (interleaved, medians): GFLOPS of precision fp32 vs bf16 at M = 16, 64, 256, 512, the
crossover M for bf16_min_m, and the model's prefill of 512 tokens with every matmul in bf16.

    .nox/_spec/bin/python kernels/check_qmm_bf16.py            # from the repository root
    .nox/_spec/bin/python kernels/check_qmm_bf16.py --no-timing
    .nox/_spec/bin/python kernels/check_qmm_bf16.py --quick    # shorter timings
    TINY_LLM_THREADS=1 .nox/_spec/bin/python kernels/check_qmm_bf16.py --only gflops --cpu-time
        # per-core GFLOPS from the process's CPU time: robust to other jobs sharing the cores
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository root, not kernels/

import impl  # noqa: E402,F401  (tiny_llm_kernels and the BLAS fix before mlx)
from impl.native import kernels  # noqa: E402
from impl.quantize import check_quantized_matmul, dequantize  # noqa: E402

# isort: split
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


# ----------------------------------------------------------------------------- the twin
def quantized_matmul_bf16_mlx(x: mx.array, w_q: mx.array, scales: mx.array, biases: mx.array,
                              group_size: int = 64, bits: int = 4) -> mx.array:
    """x (..., K) @ dequantize(w_q, scales, biases).T with both operands rounded to bfloat16 and the
    products accumulated in float32 -> (..., N) in x's dtype: the pure-MLX twin of
    quantized_matmul(..., precision="bf16"). w = scales * q + biases is computed in float32 (multiply,
    then add), then rounded; bf16 x bf16 products are exact in float32, so the kernel differs from
    this only in the order of the float32 additions (and in bf16 denormals, which VDPBF16PS reads as 0)."""
    check_quantized_matmul(x, w_q, scales, biases, group_size, bits)
    w = dequantize(w_q, scales, biases, group_size, bits, mx.float32)  # (N, K) fp32
    w = w.astype(mx.bfloat16).astype(mx.float32)  # rounded to bf16, nearest even
    xb = x.astype(mx.bfloat16).astype(mx.float32)  # (..., K)
    return (xb @ w.T).astype(x.dtype)  # (..., N), accumulated in fp32


# ----------------------------------------------------------------------------- helpers
GROUP = 32
SHAPES = [(576, 576, 4, "q/o proj"), (576, 192, 4, "k/v proj"), (576, 1536, 4, "gate/up"),
          (576, 3072, 4, "gate+up stacked"), (1536, 576, 4, "down"), (576, 49152, 8, "tied head")]
MS = (1, 16, 64, 256, 512)
U32 = 2.0**-24

qmm = kernels.quantized_matmul
failures: list[str] = []


def check(ok: bool, what: str) -> None:
    print(("  ok    " if ok else "  FAIL  ") + what)
    if not ok:
        failures.append(what)


def configure(isa: str = "auto", panel_min_m: int = -1, bf16_min_m: int = -1) -> dict:
    mx.synchronize()
    return kernels.quantized_matmul_configure(isa, panel_min_m, bf16_min_m)


@functools.cache
def weights(N: int, K: int, bits: int, seed: int = 0):
    """MLX-quantized normal weights, fp16 scales and biases as in the GGUF model."""
    w = mx.array(np.random.default_rng(seed).standard_normal((N, K)).astype(np.float32) * 0.05)
    w_q, s, b = mx.quantize(w, group_size=GROUP, bits=bits)
    s, b = s.astype(mx.float16), b.astype(mx.float16)
    mx.eval(w_q, s, b)
    return w_q, s, b


def np_dequantize(w_q, s, b, bits):
    """(N, K) float64 weights unpacked with numpy (independently of impl), and w rounded as the twin."""
    w_q = np.array(w_q)
    s = np.array(s.astype(mx.float32))[..., None]
    b = np.array(b.astype(mx.float32))[..., None]
    N = w_q.shape[0]
    shifts = np.arange(0, 32, bits, dtype=np.uint32)
    q = ((w_q[..., None] >> shifts) & ((1 << bits) - 1)).reshape(N, -1, GROUP).astype(np.float32)
    w32 = (q * s + b).reshape(N, -1)  # float32: multiply, then add (numpy rounds each)
    return w32.astype(np.float64), bf16_round(w32).astype(np.float64)


def bf16_round(a: np.ndarray) -> np.ndarray:
    """float32 -> the nearest bfloat16 (ties to even), as float32 (torch's conversion)."""
    return torch.from_numpy(np.ascontiguousarray(a, np.float32)).to(torch.bfloat16).to(torch.float32).numpy()


def np32(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32))


def x_for(M: int, K: int, seed: int = 1, dtype=mx.float32) -> mx.array:
    x = mx.array(np.random.default_rng(seed + M).standard_normal((M, K)).astype(np.float32)).astype(dtype)
    mx.eval(x)
    return x


# ----------------------------------------------------------------------------- accuracy
def accuracy() -> dict:
    """Kernel (bf16, default paths) vs twin, vs float64 on the rounded and the unrounded operands."""
    print(f"kernel: {kernels.quantized_matmul_info()}")
    print("accuracy, fp32 x, group 32, fp16 scales (max over outputs; A_b = sum |x_b w_b|, A = sum |x w|):")
    print(f"  {'shape':<28}{'M':>4}  {'|k-twin|/A_b':>13}{'|k-exact_b|/A_b':>16}{'|k-exact|/A':>13}"
          f"{'|fp32-exact|/A':>15}{'|k-fp32|/|y|':>13}{'rel L2 k':>10}")
    worst = {"twin": 0.0, "rounded": 0.0, "exact": 0.0, "fp32": 0.0}
    for K, N, bits, what in SHAPES:
        w_q, s, b = weights(N, K, bits)
        w64, wb64 = np_dequantize(w_q, s, b, bits)
        for M in MS:
            if N * M > 49152 * 64 and M > 64:  # the head at M = 256, 512: float64 refs too slow here
                continue
            x = x_for(M, K)
            xn = np32(x).astype(np.float64)
            xb = bf16_round(np32(x)).astype(np.float64)
            yk = qmm(x, w_q, s, b, GROUP, bits, precision="bf16")
            yt = quantized_matmul_bf16_mlx(x, w_q, s, b, GROUP, bits)
            yf = qmm(x, w_q, s, b, GROUP, bits)
            mx.eval(yk, yt, yf)
            yk, yt, yf = np32(yk).astype(np.float64), np32(yt).astype(np.float64), np32(yf).astype(np.float64)
            tx, tw = torch.from_numpy(xb), torch.from_numpy(wb64)
            exact_b = (tx @ tw.T).numpy()
            Ab = (tx.abs() @ tw.abs().T).numpy()
            tx, tw = torch.from_numpy(xn), torch.from_numpy(w64)
            exact = (tx @ tw.T).numpy()
            A = (tx.abs() @ tw.abs().T).numpy()
            e_twin = float(np.max(np.abs(yk - yt) / Ab))
            e_round = float(np.max(np.abs(yk - exact_b) / Ab))
            e_exact = float(np.max(np.abs(yk - exact) / A))
            e_fp32 = float(np.max(np.abs(yf - exact) / A))
            e_kf = float(np.max(np.abs(yk - yf)) / np.max(np.abs(yf)))
            l2 = float(np.linalg.norm(yk - exact) / np.linalg.norm(exact))
            print(f"  {f'{K} -> {N}, {bits}-bit ({what})':<28}{M:>4}  {e_twin:13.2e}{e_round:16.2e}{e_exact:13.2e}"
                  f"{e_fp32:15.2e}{e_kf:13.2e}{l2:10.2e}")
            bound = 2 * (K + 2) * U32  # two fp32 sums of K terms, each within gamma_K of exact
            check(e_twin <= bound and e_round <= bound / 2 + 1e-9,
                  f"{K}->{N} M={M}: kernel == twin within the fp32 summation bound {bound:.2e}")
            check(e_exact <= 2.0**-8 + bound, f"{K}->{N} M={M}: kernel vs exact within the bf16 rung (2^-8 of A)")
            worst["twin"] = max(worst["twin"], e_twin)
            worst["rounded"] = max(worst["rounded"], e_round)
            worst["exact"] = max(worst["exact"], e_exact)
            worst["fp32"] = max(worst["fp32"], e_fp32)
    print(f"  worst: |k-twin|/A_b {worst['twin']:.2e}, |k-exact_b|/A_b {worst['rounded']:.2e},"
          f" |k-exact|/A {worst['exact']:.2e} (fp32 path: {worst['fp32']:.2e})")
    return worst


def paths_and_fusion() -> None:
    """Every path that precision="bf16" can take, against the twin; fusion; batch invariance; errors."""
    print("paths, dtypes, fusion:")
    K, N, bits = 576, 200, 4  # N not a multiple of 16 or 48: the tails
    for bits in (4, 8):
        w_q, s, b = weights(N, K, bits, seed=3)
        for M in (1, 3, 17, 40):
            x = x_for(M, K, seed=5)
            yt = np32(quantized_matmul_bf16_mlx(x, w_q, s, b, GROUP, bits))
            _, wb = np_dequantize(w_q, s, b, bits)
            Ab = np.abs(bf16_round(np32(x)).astype(np.float64)) @ np.abs(wb).T
            runs = {"vdpbf16ps": ("avx512", -1, 1), "emulated fused": ("avx512", 0, 0),
                    "emulated panel": ("avx512", 1, 0), "avx2 fused": ("avx2", 0, 0), "avx2 panel": ("avx2", 1, 0),
                    "portable fused": ("portable", 0, 0), "portable panel": ("portable", 1, 0)}
            got = {}
            for name, cfg in runs.items():
                try:
                    configure(*cfg)
                except ValueError:
                    continue
                y = got[name] = np32(qmm(x, w_q, s, b, GROUP, bits, precision="bf16"))
                e = float(np.max(np.abs(y - yt) / Ab))
                check(e <= 2 * (K + 2) * U32, f"{bits}-bit M={M} {name}: == twin within the summation bound ({e:.1e})")
            configure()
            for isa in ("emulated", "avx2", "portable"):  # an isa's fused and panel kernels: the same bits
                if f"{isa} fused" in got:
                    check(np.array_equal(got[f"{isa} fused"], got[f"{isa} panel"]),
                          f"{bits}-bit M={M} {isa}: fused and panel paths give the same bits")
    # fp16 / bf16 activations: output in x's dtype, one more rounding of the output
    w_q, s, b = weights(N, K, 4, seed=3)
    for dt in (mx.float16, mx.bfloat16):
        for M in (2, 64):
            x = x_for(M, K, dtype=dt)
            yk = qmm(x, w_q, s, b, GROUP, 4, precision="bf16")
            yt = quantized_matmul_bf16_mlx(x, w_q, s, b, GROUP, 4)
            check(yk.dtype == dt, f"x {dt}: the output is {dt}")
            ulp = 2.0**-10 if dt == mx.float16 else 2.0**-7
            err = np.abs(np32(yk) - np32(yt)) / (np.abs(np32(yt)) + 1e-3)
            check(float(err.max()) <= 2 * ulp, f"x {dt}, M={M}: == twin within an ulp of {dt} ({err.max():.1e})")
    # batch invariance on the VDPBF16PS path (it holds within any one path)
    configure(bf16_min_m=1)
    x = x_for(40, K, seed=9)
    whole = np32(qmm(x, w_q, s, b, GROUP, 4, precision="bf16"))
    same = all(np.array_equal(np32(qmm(x[lo:hi], w_q, s, b, GROUP, 4, precision="bf16")), whole[lo:hi])
               for lo, hi in [(0, 1), (39, 40), (5, 21), (3, 40)])
    check(same, "VDPBF16PS path: a row gives the same bits alone and in a batch")
    configure()
    # fusion: the prologue and epilogue round as the separate kernels; bit for bit
    for M in (1, 64):
        x = x_for(M, K, seed=11)
        nw = mx.array(np.random.default_rng(2).uniform(0.5, 1.5, K).astype(np.float32))
        r = x_for(M, N, seed=12)
        fused = qmm(x, w_q, s, b, GROUP, 4, norm_weight=nw, eps=1e-5, residual=r, precision="bf16")
        apart = qmm(kernels.rms_norm(x, nw, 1e-5), w_q, s, b, GROUP, 4, precision="bf16") + r
        check(np.array_equal(np32(fused), np32(apart)), f"M={M}: rms_norm + matmul + residual fused == apart, bf16")
        twin = quantized_matmul_bf16_mlx(kernels.rms_norm(x, nw, 1e-5), w_q, s, b, GROUP, 4) + r
        Ab = np.abs(bf16_round(np32(kernels.rms_norm(x, nw, 1e-5)))) @ np.abs(np_dequantize(w_q, s, b, 4)[1]).T
        check(float(np.max(np.abs(np32(fused) - np32(twin)) / (Ab + np.abs(np32(r))))) <= 2 * (K + 3) * U32,
              f"M={M}: fused bf16 == twin composition within the summation bound")
        gu = x_for(M, 2 * K, seed=13)
        fused = qmm(gu, w_q, s, b, GROUP, 4, swiglu=True, precision="bf16")
        apart = qmm(kernels.swiglu(gu), w_q, s, b, GROUP, 4, precision="bf16")
        check(np.array_equal(np32(fused), np32(apart)), f"M={M}: swiglu + matmul fused == apart, bf16")
    # precision's check
    try:
        qmm(x_for(1, K), w_q, s, b, GROUP, 4, precision="fp16")
        check(False, "precision='fp16' is rejected")
    except ValueError as e:
        check(str(e) == "quantized_matmul: precision must be 'fp32', 'bf16' or 'int8', got 'fp16'", f"ValueError: {e}")
    # fp32 stays exact as before: precision="fp32" == the default, bit for bit
    x = x_for(64, K)
    check(np.array_equal(np32(qmm(x, w_q, s, b, GROUP, 4, precision="fp32")), np32(qmm(x, w_q, s, b, GROUP, 4))),
          "precision='fp32' == the default, bit for bit")


# ----------------------------------------------------------------------------- timing
L3_BYTES = 64 << 20


TIMER = time.perf_counter  # --cpu-time: time.process_time (all the process's threads)


def _timed(fn) -> float:
    t0 = TIMER()
    fn()
    return TIMER() - t0


def copies_of(K: int, N: int, bits: int) -> list:
    nbytes = N * K * bits // 8 + 2 * N * (K // GROUP) * 2
    n = max(1, min(64, -(-L3_BYTES // nbytes)))
    return [weights(N, K, bits, seed=100 + i) for i in range(n)]


def per_call(x, ws, bits: int, precision: str) -> float:
    """Seconds per call of the kernel at `precision`, over the weight copies `ws` in one mx.eval."""
    return _timed(lambda: mx.eval([qmm(x, *w, GROUP, bits, precision=precision) for w in ws])) / len(ws)


def interleaved(runs: dict, x, ws, bits: int, rounds: int) -> dict:
    """runs: name -> (precision, bf16_min_m). Median seconds per call of each, rounds interleaved."""
    times = {name: [] for name in runs}
    for precision, m in runs.values():  # warm-up
        configure(bf16_min_m=m)
        per_call(x, ws[:2], bits, precision)
    for _ in range(rounds):
        for name, (precision, m) in runs.items():
            configure(bf16_min_m=m)
            times[name].append(per_call(x, ws, bits, precision))
    configure()
    return {name: statistics.median(v) for name, v in times.items()}


def gflops_table(quick: bool) -> None:
    clock = "CPU time" if TIMER is time.process_time else "wall clock"
    print(f"\nGFLOPS (2 M N K / time, {clock}, {kernels.quantized_matmul_info()['threads']} threads; interleaved"
          " rounds, medians; weights past L3 as in bench_qmm.py):")
    print(f"  {'shape':<30}{'M':>4}{'fp32':>9}{'bf16':>9}{'x':>7}")
    for K, N, bits, what in SHAPES:
        ws = copies_of(K, N, bits)
        for M in (16, 64, 256, 512):
            flop = 2.0 * M * N * K
            use = ws[: max(1, min(len(ws), int(2e9 // flop)))] if M > 16 else ws
            t = interleaved({"fp32": ("fp32", -1), "bf16": ("bf16", -1)}, x_for(M, K), use, bits, 3 if quick else 7)
            g = {p: flop / t[p] / 1e9 for p in t}
            print(f"  {f'{K} -> {N}, {bits}-bit ({what})':<30}{M:>4}{g['fp32']:9.1f}{g['bf16']:9.1f}"
                  f"{g['bf16'] / g['fp32']:7.2f}")


def crossover(quick: bool) -> None:
    """bf16 below bf16_min_m (emulated: the fp32 fused kernel on rounded operands) vs VDPBF16PS."""
    print("\nbf16_min_m: GFLOPS of precision='bf16', emulated (fused fp32 kernel) vs VDPBF16PS, and fp32:")
    print(f"  {'shape':<30}{'M':>4}{'fp32':>9}{'emul':>9}{'vdpbf16':>9}")
    runs = {"fp32": ("fp32", -1), "emul": ("bf16", 0), "vdp": ("bf16", 1)}
    for K, N, bits, what in [SHAPES[0], SHAPES[3], SHAPES[4], SHAPES[5]]:
        ws = copies_of(K, N, bits)
        for M in (1, 2, 4, 8, 12, 16, 24, 32):
            t = interleaved(runs, x_for(M, K), ws, bits, 3 if quick else 7)
            g = {k: 2.0 * M * N * K / v / 1e9 for k, v in t.items()}
            print(f"  {f'{K} -> {N}, {bits}-bit ({what})':<30}{M:>4}{g['fp32']:9.1f}{g['emul']:9.1f}{g['vdp']:9.1f}")


def model_prefill(quick: bool) -> None:
    """The model's prefill of 512 tokens with every quantized matmul at precision fp32 vs bf16
    (a monkeypatch of tiny_llm_kernels.quantized_matmul, which impl.fusion and impl.quantize call)."""
    import impl.quantize as iq
    from bench.single import prompt_ids
    from impl.generate import generate_step_cached
    from impl.kv_cache import make_cache
    from impl.loader import load_model

    loaded = load_model(quantized=None)
    model = loaded.model
    ids = prompt_ids(512)
    orig = kernels.quantized_matmul

    def use(precision: str) -> None:
        fn = functools.partial(orig, precision=precision)
        kernels.quantized_matmul = fn
        iq._kernel = fn

    def prefill() -> float:
        t0 = time.perf_counter()
        next(iter(generate_step_cached(model, ids, cache=make_cache(model, None))))
        return time.perf_counter() - t0

    def logits(precision: str) -> np.ndarray:
        use(precision)
        out = model(mx.array([ids]), cache=make_cache(model, None))
        return np32(out[0])

    print(f"\nmodel prefill, {len(ids)} tokens (interleaved, medians):")
    times = {"fp32": [], "bf16": []}
    for p in times:
        use(p)
        prefill()
    for _ in range(3 if quick else 7):
        for p in times:
            use(p)
            times[p].append(prefill())
    for p, v in times.items():
        print(f"  {p}: {statistics.median(v) * 1e3:7.1f} ms  {len(ids) / statistics.median(v):6.0f} tok/s"
              f"  (runs: {', '.join(f'{t * 1e3:.0f}' for t in v)})")
    lf, lb = logits("fp32"), logits("bf16")
    use("fp32")
    kernels.quantized_matmul, iq._kernel = orig, orig
    top_same = float(np.mean(lf.argmax(-1) == lb.argmax(-1)))
    lpf = lf - np.log(np.exp(lf - lf.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lf.max(-1, keepdims=True)
    lpb = lb - np.log(np.exp(lb - lb.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lb.max(-1, keepdims=True)
    kl = float(np.mean(np.sum(np.exp(lpf) * (lpf - lpb), -1)))
    print(f"  logits bf16 vs fp32 over the prompt: top-1 agreement {top_same:.4f}, max |diff| "
          f"{np.abs(lf - lb).max():.3g} (logit range {lf.min():.1f}..{lf.max():.1f}), mean KL {kl:.2e} nats")


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--quick", action="store_true", help="fewer timing rounds")
    parser.add_argument("--no-timing", action="store_true", help="accuracy and path checks only")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time by the process's CPU time, not the wall clock (with TINY_LLM_THREADS=1: per-core)")
    parser.add_argument("--only", choices=["accuracy", "paths", "gflops", "crossover", "model"], action="append")
    args = parser.parse_args()
    global TIMER
    if args.cpu_time:
        TIMER = time.process_time
    mx.set_default_device(mx.cpu)
    parts = args.only or (["accuracy", "paths"] + ([] if args.no_timing else ["gflops", "crossover", "model"]))
    if "accuracy" in parts:
        accuracy()
    if "paths" in parts:
        paths_and_fusion()
    if "gflops" in parts:
        gflops_table(args.quick)
    if "crossover" in parts:
        crossover(args.quick)
    if "model" in parts:
        model_prefill(args.quick)
    print(f"\n{len(failures)} failed" + ("".join(f"\n  {f}" for f in failures) if failures else ""))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
