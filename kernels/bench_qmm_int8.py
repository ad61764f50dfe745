"""GFLOPS of tiny_llm_kernels.quantized_matmul at precision "fp32", "bf16" and "int8" on
SmolLM2-135M's shapes (group 32, fp16 scales, fp32 x; the head 8-bit), M = 1, 16, 64, 256, 512.
int8 reads each weight packed once (quantized_matmul_int8_pack), as the engine's weights are.

Per (shape, M): the three precisions are timed in turn within each round (interleaved, so that a
neighbour's load hits all three alike), `--rounds` rounds, the median kept. Each timing is one
mx.eval of `calls` matmuls on distinct weight copies (enough bytes to overflow the L3 cache, so
M = 1 reads its weights from DRAM, as decode does). The 2-core machine is shared: run `uptime`
alongside and repeat.

    .nox/_spec/bin/python kernels/bench_qmm_int8.py            # from the repository root
    .nox/_spec/bin/python kernels/bench_qmm_int8.py --rounds 3 --ms 1,64
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository root, not kernels/

import impl  # noqa: E402,F401  (tiny_llm_kernels and the BLAS fix before mlx)
from impl.native import kernels  # noqa: E402

# isort: split
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

SHAPES = [(576, 1536, 4, "gate/up"), (1536, 576, 4, "down"), (576, 576, 4, "q/o proj"),
          (576, 192, 4, "k/v proj"), (576, 49152, 8, "tied head")]
PRECISIONS = ("fp32", "bf16", "int8")
GROUP = 32
L3_BYTES = 48 << 20


def weight_copies(N: int, K: int, bits: int) -> list:
    w = mx.array(np.random.default_rng(0).standard_normal((N, K)).astype(np.float32) * 0.05)
    w_q, s, b = mx.quantize(w, group_size=GROUP, bits=bits)
    s, b = s.astype(mx.float16), b.astype(mx.float16)
    copies = max(2, min(16, -(-L3_BYTES // (N * K * bits // 8))))
    out = [(w_q + 0, s + 0, b + 0) for _ in range(copies)]
    out = [(*t, kernels.quantized_matmul_int8_pack(*t, GROUP, bits)) for t in out]  # + int8's packed weight
    mx.eval(out)
    return out


def seconds(x: mx.array, ws: list, precision: str, calls: int) -> float:
    def call(w_q, s, b, packed):
        extra = {"int8_packed": packed} if precision == "int8" else {}
        return kernels.quantized_matmul(x, w_q, s, b, GROUP, bits, precision=precision, **extra)

    ys = [call(*ws[i % len(ws)]) for i in range(calls)]
    t = time.perf_counter()
    mx.eval(ys)
    return (time.perf_counter() - t) / calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ms", default="1,16,64,256,512")
    args = ap.parse_args()
    global bits
    print(kernels.quantized_matmul_info(), "uptime:", os.getloadavg())
    print(f"{'shape':<11}{'K':>6}{'N':>7}{'M':>5}" + "".join(f"{p:>9}" for p in PRECISIONS) + "   GFLOPS (median)")
    for K, N, bits, what in SHAPES:
        ws = weight_copies(N, K, bits)
        for M in map(int, args.ms.split(",")):
            x = mx.array(np.random.default_rng(M).standard_normal((M, K)).astype(np.float32))
            calls = max(len(ws), min(64, int(4e9 / (2 * M * N * K)) or 1))
            for p in PRECISIONS:
                seconds(x, ws, p, 2)  # warm up: thread pool, panels' buffers
            times = {p: [] for p in PRECISIONS}
            for _ in range(args.rounds):
                for p in PRECISIONS:
                    times[p].append(seconds(x, ws, p, calls))
            gf = {p: 2 * M * N * K / statistics.median(t) / 1e9 for p, t in times.items()}
            print(f"{what:<11}{K:>6}{N:>7}{M:>5}" + "".join(f"{gf[p]:>9.1f}" for p in PRECISIONS), flush=True)
    print("uptime:", os.getloadavg())


if __name__ == "__main__":
    main()
