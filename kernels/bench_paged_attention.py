"""Benchmark of tiny_llm_kernels.paged_attention (topic 3.2) against the dense
cached_attention kernel (the same RoPE + cache write + attention over a contiguous cache)
and the pure-MLX twin (impl.engine.paged_attention.paged_attention_mlx), on the default
model's attention shape: 9 query heads over 3 kv heads, head_dim 64, block size 16.

Cases (one attention layer's call):
- decode, batch 1, context 512 (fp32 and fp16 pools): the hot path, 30 calls a token;
- decode, 64 sequences at context 512 (the dense kernel needs one offset for all), and 64
  sequences at contexts 100..768 (paged only: the serving benchmark's spread), also as the
  serving bench's tuned peers run it (bf16 pools, blocks of 64);
- prefill, one sequence of 512 tokens, and 8 chunks of 64 tokens at starts 0..448.

Per case and implementation: median ms per layer, MLX's scheduling included, the paged and
the dense kernel timed in alternate rounds (these shared machines drift). A decode step
runs `layers` calls, each on its own layer's pools, in one evaluation (30 at batch 1, as the
model does a token: every layer's cache comes from memory, not from the cache of the call
before); a prefill case one call. Then the ratio to the paged kernel's time and the peak
memory above the inputs. The pools are passed the way the engine passes them (the old pools
held by nothing but the call), so both kernels write in place. Every output is checked
against the twin's.

    python kernels/bench_paged_attention.py            # from the repository root
    python kernels/bench_paged_attention.py --quick    # fewer repetitions, no twin on the big cases

`results(quick)` returns the rows as dicts, `table(rows)` formats them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository root, not kernels/

import impl  # noqa: E402,F401,I001  (loads tiny_llm_kernels, and the BLAS fix, before mlx)
from impl.engine.attention_metadata import AttentionMetadata  # noqa: E402
from impl.engine.paged_attention import paged_attention_mlx  # noqa: E402
from impl.native import kernels  # noqa: E402
from impl.rope import RoPE  # noqa: E402

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

H, H_KV, D, BLOCK = 9, 3, 64, 16  # SmolLM2-135M; vLLM's default block size


def cases(quick: bool) -> list[dict]:
    rng = np.random.default_rng(0)
    spread = [int(x) for x in rng.integers(100, 769, 64)]
    return [
        {"case": "decode B=1 ctx 512", "seqs": [(511, 1)], "pool": mx.float32, "dense": True, "layers": 30},
        {"case": "decode B=1 ctx 512 fp16 pool", "seqs": [(511, 1)], "pool": mx.float16, "dense": True,
         "layers": 30},
        {"case": "decode B=1 ctx 2048", "seqs": [(2047, 1)], "pool": mx.float32, "dense": True, "layers": 30},
        {"case": "decode B=64 ctx 512", "seqs": [(511, 1)] * 64, "pool": mx.float32, "dense": True, "layers": 4},
        {"case": "decode B=64 ctx 100-768", "seqs": [(s - 1, 1) for s in spread], "pool": mx.float32,
         "dense": False, "layers": 4},
        {"case": "decode B=64 100-768 bf16/64", "seqs": [(s - 1, 1) for s in spread], "pool": mx.bfloat16,
         "dense": False, "layers": 4, "block": 64},
        {"case": "prefill 1 x 512", "seqs": [(0, 512)], "pool": mx.float32, "dense": True, "layers": 1},
        {"case": "prefill 8 chunks of 64", "seqs": [(64 * i, 64) for i in range(8)], "pool": mx.float32,
         "dense": False, "layers": 1},
    ]


class Step:
    """One layer's inputs for a step, paged (random block placement) and dense."""

    def __init__(self, seqs, pool_dtype, dense: bool, block: int = BLOCK):
        rng = np.random.default_rng(1)
        self.seqs, self.T = seqs, sum(n for _, n in seqs)
        needs = [-(-(s + n) // block) for s, n in seqs]
        ids = list(rng.permutation(sum(needs)))
        tables = [[int(ids.pop()) for _ in range(need)] for need in needs]
        shape = (sum(needs), H_KV, block, D)
        self.k_pool = mx.array(rng.standard_normal(shape).astype(np.float32)).astype(pool_dtype)
        self.v_pool = mx.array(rng.standard_normal(shape).astype(np.float32)).astype(pool_dtype)
        self.qkv = mx.array(rng.standard_normal((1, self.T, (H + 2 * H_KV) * D)).astype(np.float32))
        self.rope = RoPE(D, max(s + n for s, n in seqs) + 1)
        self.meta = AttentionMetadata.build([n for _, n in seqs], [s for s, _ in seqs], tables, block)
        self.dense = None
        if dense:  # every sequence at one offset: (N, L, ...) qkv and (N, H_kv, C, D) caches
            (start, n), N = seqs[0], len(seqs)
            assert all(s == seqs[0] for s in seqs)
            cache = (N, H_KV, start + n, D)
            self.dense = (self.qkv.reshape(N, n, -1),
                          mx.array(rng.standard_normal(cache).astype(np.float32)).astype(pool_dtype),
                          mx.array(rng.standard_normal(cache).astype(np.float32)).astype(pool_dtype), start)
        mx.eval(self.k_pool, self.v_pool, self.qkv, self.rope.cos, self.rope.sin, *(self.dense[:3] if dense else ()))

    def paged(self):
        m = self.meta
        out, self.k_pool, self.v_pool = kernels.paged_attention(
            self.qkv, self.k_pool, self.v_pool, self.rope.cos, self.rope.sin, m.positions, m.slot_mapping,
            m.block_tables, m.cu_seqlens_q, m.context_lens, H, H_KV)
        return out, self.k_pool, self.v_pool

    def cached(self):
        qkv, keys, values, start = self.dense
        out, keys, values = kernels.cached_attention(qkv, keys, values, self.rope.cos, self.rope.sin, start, H, H_KV)
        self.dense = (qkv, keys, values, start)
        return out, keys, values

    def twin(self):
        out, self.k_pool, self.v_pool = paged_attention_mlx(self.qkv, self.k_pool, self.v_pool, self.rope, self.meta,
                                                            H, H_KV)
        return out, self.k_pool, self.v_pool


def measure(impls: dict, reps: int) -> dict:
    """impls: name -> one call per layer. Rounds interleaved (each implementation once a round:
    these shared machines drift). {name: (median seconds per layer, peak bytes of its first
    evaluation above what was live before, its first layer's first output)}."""
    res = {}
    for name, fns in impls.items():  # the first evaluation (warm-up): peak memory, the output to check
        mx.synchronize()
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        outs = [fn() for fn in fns]
        mx.eval(outs)
        res[name] = [[], mx.get_peak_memory() - base, outs[0][0]]
        del outs  # the pools they returned are the next call's inputs: held by nothing else, written in place
    for _ in range(reps):
        for name, fns in impls.items():
            t0 = time.perf_counter()
            mx.eval([fn() for fn in fns])
            res[name][0].append((time.perf_counter() - t0) / len(fns))
    return {name: (statistics.median(t), peak, out) for name, (t, peak, out) in res.items()}


def results(quick: bool) -> list[dict]:
    rows = []
    for c in cases(quick):
        layers = c["layers"] if not quick else max(1, c["layers"] // 3)
        steps = [Step(c["seqs"], c["pool"], c["dense"], c.get("block", BLOCK)) for _ in range(layers)]
        T = steps[0].T
        decode = all(n == 1 for _, n in c["seqs"])
        reps = (20 if quick else 100) if decode else (5 if quick else 20)
        impls = {"paged": [s.paged for s in steps]}
        if c["dense"]:
            impls["cached_attention"] = [s.cached for s in steps]
        got = measure(impls, reps)
        big = T * max(s + n for s, n in c["seqs"]) > 64 * 800
        if not (quick and big):  # one layer, fewer rounds: the twin is slow, and its time is its own
            got.update(measure({"twin": [steps[0].twin]}, max(3, reps // 10)))
        if "twin" in got:  # a wrong answer is not a result
            err = float(mx.max(mx.abs(got["paged"][2] - got["twin"][2])))
            assert err < 1e-4, f"{c['case']}: the kernel differs from the twin by {err:.3g}"
        for name, (seconds, peak, _) in got.items():
            n = len(impls.get(name, [None]))
            rows.append({"kernel": "paged_attention", "case": c["case"], "impl": name, "T": T, "layers": n,
                         "pool": str(c["pool"]).removeprefix("mlx.core."), "ms": seconds * 1e3,
                         "peak_mib": peak / 2**20 / n, "paged_speedup": seconds / got["paged"][0]})
    return rows


def table(rows: list[dict]) -> str:
    head = f"{'case':<30}{'impl':<18}{'T':>5}{'layers':>7}{'ms/layer':>10}{'vs paged':>10}{'peak MiB':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['case']:<30}{r['impl']:<18}{r['T']:>5}{r['layers']:>7}{r['ms']:10.3f}"
                     f"{r['paged_speedup']:9.2f}x{r['peak_mib']:10.1f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, no twin on the big cases")
    args = parser.parse_args()
    if kernels is None or not hasattr(kernels, "paged_attention"):
        sys.exit("tiny_llm_kernels.paged_attention is not built (pip install --no-build-isolation ./kernels)")
    print(f"kernel: {kernels.paged_attention_info()}  (TINY_LLM_THREADS overrides the thread count)")
    print(f"mx {mx.__version__}; H = {H}, H_kv = {H_KV}, D = {D}, block size {BLOCK} (bf16/64: bf16 pools,"
          " blocks of 64), fp32 qkv; 'vs paged' = that row's ms / the paged kernel's; peak MiB a layer\n")
    print(table(results(args.quick)))


if __name__ == "__main__":
    main()
