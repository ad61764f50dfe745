"""`python -m bench.moe [--quick]`: mixture of experts (topic 3.3) on this machine.

1. An MoE layer (impl.moe.SparseMoeBlock: X experts, top k) against a dense SwiGLU MLP of the same
   active parameters (hidden size k * I, so each token multiplies as many weights), on T tokens,
   fp32 and 4-bit (group 32) weights. The MoE layer holds X / k times the weights; a token reads only
   k experts', but T tokens together touch up to all X.
2. tiny_llm_kernels.gather_quantized_matmul against mx.gather_qmm (rows sorted by expert, as the
   MoE block sends them) and the pure-MLX twin, 4-bit, group 32.

Times are medians of repeated mx.eval calls (ms), checked first: the kernel against the twin.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import impl  # noqa: F401  (loads tiny_llm_kernels, and the BLAS fix, before mlx)
from impl.config import ModelArgs
from impl.mlp import MLP
from impl.moe import Experts, SparseMoeBlock, gather_quantized_matmul_mlx
from impl.native import kernels
from impl.quantized_weight import QuantizedWeight

# isort: split
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

E, I, X, K_TOP = 576, 768, 8, 2  # SmolLM2-sized hidden; 8 experts of 768, top 2 = one dense MLP of 1536
GROUP, BITS = 32, 4


def timed(f, reps: int) -> float:
    """Median ms of mx.eval(f()) over reps, after one warm-up."""
    mx.eval(f())
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        mx.eval(f())
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def quantized(w: mx.array) -> QuantizedWeight:
    return QuantizedWeight(*mx.quantize(w, group_size=GROUP, bits=BITS), GROUP, BITS)


def layers(quantize: bool):
    """(MoE block, dense MLP of the same active parameters), random weights."""
    key = iter(mx.random.split(mx.random.key(0), 8))
    w = lambda *s: mx.random.normal(s, key=next(key)) / s[-1] ** 0.5  # noqa: E731
    q = quantized if quantize else (lambda a: a)
    args = ModelArgs(model_type="qwen3_moe", hidden_size=E, num_hidden_layers=1, intermediate_size=I,
                     num_attention_heads=9, vocab_size=8, num_experts=X, num_experts_per_tok=K_TOP,
                     norm_topk_prob=True)
    experts = Experts(q(w(X, I, E)), q(w(X, I, E)), q(w(X, E, I)))
    moe = SparseMoeBlock(args, w(X, E), experts)
    dense = MLP(E, K_TOP * I, q(w(K_TOP * I, E)), q(w(K_TOP * I, E)), q(w(E, K_TOP * I)))
    return moe, dense


def bench_layers(tokens: list[int], reps: int) -> None:
    print(f"MoE layer ({X} experts of {I}, top {K_TOP}) vs dense MLP ({K_TOP * I}), hidden {E}; ms")
    print(f"{'weights':>8} {'T':>5} {'MoE':>9} {'dense':>9} {'MoE/dense':>10}")
    for quantize in (False, True):
        moe, dense = layers(quantize)
        for T in tokens:
            x = mx.random.normal((T, E), key=mx.random.key(T))
            a, b = timed(lambda: moe(x), reps), timed(lambda: dense(x), reps)  # noqa: B023
            print(f"{'q4' if quantize else 'fp32':>8} {T:>5} {a:>9.3f} {b:>9.3f} {a / b:>10.2f}")


def bench_kernel(rows: list[int], reps: int) -> None:
    kernel = getattr(kernels, "gather_quantized_matmul", None)
    if kernel is None:
        print("tiny_llm_kernels.gather_quantized_matmul is not built: pip install --no-build-isolation ./kernels")
        return
    w_q, scales, biases = mx.quantize(mx.random.normal((X, I, E), key=mx.random.key(1)) / E**0.5,
                                      group_size=GROUP, bits=BITS)
    print(f"gather_quantized_matmul, {X} experts of ({I}, {E}), {BITS}-bit group {GROUP}, rows sorted by expert; ms")
    print(f"{'M':>5} {'kernel':>9} {'gather_qmm':>11} {'twin':>9} {'vs gather_qmm':>14}")
    for M in rows:
        ids = mx.array(np.sort(np.random.default_rng(M).integers(0, X, M)).astype(np.uint32))
        x = mx.random.normal((M, E), key=mx.random.key(M))
        got, twin = kernel(x, w_q, scales, biases, ids, GROUP, BITS), gather_quantized_matmul_mlx(
            x, w_q, scales, biases, ids, GROUP, BITS)
        err = float(mx.max(mx.abs(got - twin)))
        assert err < 1e-3, f"M={M}: the kernel differs from its twin by {err}"
        k = timed(lambda: kernel(x, w_q, scales, biases, ids, GROUP, BITS), reps)  # noqa: B023
        g = timed(lambda: mx.gather_qmm(x[:, None], w_q, scales, biases, rhs_indices=ids, transpose=True,  # noqa: B023
                                        group_size=GROUP, bits=BITS, sorted_indices=True), reps)
        t = timed(lambda: gather_quantized_matmul_mlx(x, w_q, scales, biases, ids, GROUP, BITS), reps)  # noqa: B023
        print(f"{M:>5} {k:>9.3f} {g:>11.3f} {t:>9.3f} {g / k:>13.1f}x")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.moe", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    a = p.parse_args(argv)
    reps = 3 if a.quick else 10
    bench_layers([1, 32] if a.quick else [1, 16, 128, 512], reps)
    print()
    bench_kernel([2, 64] if a.quick else [2, 16, 64, 256], reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
