"""Checks of tiny_llm_kernels.paged_attention (topic 3.2) against its twin
(impl.engine.paged_attention.paged_attention_mlx) and its bitwise contract, for every
instruction set this CPU runs:

- kernel == twin: random block sizes (1, 8, 16, 32), non-contiguous and shared block tables,
  several sequences at different start positions with decode rows and prefill chunks mixed,
  GQA ratios 1/3/4, D 8/64/128, fp32/fp16/bf16 qkv and pools, both RoPE layouts; the written
  pools bit for bit, the output within 1e-5 (fp32; looser where the twin itself computes in
  fp16/bf16) and against torch's SDPA on the gathered keys;
- bitwise: a batch == each sequence alone; chunked prefill (decode steps included) == the
  whole prefill; block size 8 == 16 == 32, with the blocks at random physical places and
  garbage past each sequence's end; 1 thread == the default;
- rejection: the twin's words for bad shapes, dtypes and heads, and a ValueError, not a crash,
  for out-of-range slots, block ids and positions;
- a quick timing against the dense cached_attention kernel (kernels/bench_paged_attention.py
  has the full table).

    python kernels/check_paged_attention.py           # from the repository root
    python kernels/check_paged_attention.py --quick   # fewer random cases
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository root, not kernels/

import impl  # noqa: E402,F401,I001  (loads tiny_llm_kernels, and the BLAS fix, before mlx)
from impl.engine.attention_metadata import AttentionMetadata  # noqa: E402
from impl.engine.paged_attention import check_paged_attention, gather, paged_attention_mlx  # noqa: E402
from impl.native import kernels  # noqa: E402
from impl.rope import RoPE  # noqa: E402

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
TOL = {mx.float32: 1e-5, mx.float16: 2e-3, mx.bfloat16: 1.6e-2}  # fp32: the brief's; else about 2 ulps near 1


def bits(a: mx.array) -> np.ndarray:
    """The raw bits of a (as unsigned integers), for bitwise comparisons."""
    return np.array(a.view({4: mx.uint32, 2: mx.uint16}[a.dtype.size]))


def same_bits(a: mx.array, b: mx.array) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(bits(a), bits(b))


def to_np(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32))


class Case:
    """A step: sequences (start, n) with random cached keys/values, laid out in block pools."""

    def __init__(self, rng, H, H_kv, D, block_size, seqs, qdtype=mx.float32, pdtype=None, traditional=False,
                 shared=False, spare_blocks=3):
        self.H, self.H_kv, self.D, self.block_size = H, H_kv, D, block_size
        self.seqs, self.qdtype, self.pdtype = seqs, qdtype, pdtype or qdtype
        needs = [-(-(s + n) // block_size) for s, n in seqs]
        n_blocks = sum(needs) + spare_blocks
        ids = list(rng.permutation(n_blocks))  # physical blocks in random order: non-contiguous tables
        tables = []
        for i, need in enumerate(needs):
            table = [int(ids.pop()) for _ in range(need)]
            if shared and i > 0:  # share the full blocks of a common prefix with sequence 0 (read only)
                common = min(seqs[0][0], seqs[i][0]) // block_size
                table[:common] = tables[0][:common]
            tables.append(table)
        self.tables = tables
        shape = (n_blocks, H_kv, block_size, D)
        self.k_pool = mx.array(rng.standard_normal(shape).astype(np.float32)).astype(self.pdtype)
        self.v_pool = mx.array(rng.standard_normal(shape).astype(np.float32)).astype(self.pdtype)
        T = sum(n for _, n in seqs)
        self.qkv = mx.array(rng.standard_normal((1, T, (H + 2 * H_kv) * D)).astype(np.float32)).astype(qdtype)
        self.rope = RoPE(D, max(s + n for s, n in seqs) + 7, traditional=traditional)
        self.meta = AttentionMetadata.build([n for _, n in seqs], [s for s, _ in seqs], tables, block_size)
        mx.eval(self.k_pool, self.v_pool, self.qkv)

    def kernel(self, qkv=None, k_pool=None, v_pool=None, meta=None, scale=None):
        meta = meta or self.meta
        return kernels.paged_attention(
            self.qkv if qkv is None else qkv, self.k_pool if k_pool is None else k_pool,
            self.v_pool if v_pool is None else v_pool, self.rope.cos, self.rope.sin, meta.positions,
            meta.slot_mapping, meta.block_tables, meta.cu_seqlens_q, meta.context_lens, self.H, self.H_kv,
            scale=scale, traditional=self.rope.traditional)

    def twin(self, scale=None):
        return paged_attention_mlx(self.qkv, self.k_pool, self.v_pool, self.rope, self.meta, self.H, self.H_kv, scale)


def torch_reference(case: Case, k_pool: mx.array, v_pool: mx.array, scale) -> np.ndarray | None:
    """torch SDPA (fp64) on the gathered keys of the written pools and the twin's rotated q."""
    try:
        import torch
    except ImportError:
        return None
    H, H_kv, D = case.H, case.H_kv, case.D
    T = case.qkv.shape[1]
    heads = case.qkv.reshape(T, 1, H + 2 * H_kv, D)
    q = case.rope(heads[:, :, :H], case.meta.positions)[:, 0]  # (T, H, D) in qkv's dtype, as the kernel rounds it
    outs, row = [], 0
    for b, (start, n) in enumerate(case.seqs):
        context = start + n
        table = case.meta.block_tables[b, : -(-context // case.block_size)]
        k = torch.tensor(to_np(gather(k_pool, table, context)[0]), dtype=torch.float64)  # (H_kv, context, D)
        v = torch.tensor(to_np(gather(v_pool, table, context)[0]), dtype=torch.float64)
        qb = torch.tensor(to_np(q[row:row + n]), dtype=torch.float64).transpose(0, 1)  # (H, n, D)
        row += n
        mask = torch.arange(context)[None, :] <= torch.arange(start, context)[:, None]  # (n, context)
        o = torch.nn.functional.scaled_dot_product_attention(
            qb, k.repeat_interleave(H // H_kv, 0), v.repeat_interleave(H // H_kv, 0), attn_mask=mask,
            scale=scale if scale is not None else D**-0.5)
        outs.append(o.transpose(0, 1).reshape(n, H * D).numpy())
    return np.concatenate(outs)[None]


# --- kernel == twin -------------------------------------------------------------------------

def random_seqs(rng, count: int, max_start: int, max_chunk: int) -> list[tuple[int, int]]:
    seqs = []
    for _ in range(count):
        start = int(rng.integers(0, max_start + 1))
        n = 1 if rng.random() < 0.4 else int(rng.integers(1, max_chunk + 1))  # decode rows and prefill chunks
        seqs.append((start, n))
    return seqs


def check_against_twin(rng, cases: int) -> int:
    done = 0
    shapes = [(4, 4, 8), (9, 3, 64), (8, 2, 64), (12, 3, 128), (4, 1, 16), (6, 2, 8)]  # GQA 1, 3, 4
    for i in range(cases):
        H, H_kv, D = shapes[i % len(shapes)]
        qname = list(DTYPES)[(i // len(shapes)) % 3]
        qdtype = DTYPES[qname]
        pdtype = qdtype if qdtype != mx.float32 or i % 2 == 0 else [mx.float16, mx.bfloat16][(i // 2) % 2]
        bs = [1, 8, 16, 32][int(rng.integers(0, 4))]
        seqs = random_seqs(rng, int(rng.integers(1, 6)), 150, 70)
        case = Case(rng, H, H_kv, D, bs, seqs, qdtype, pdtype, traditional=bool(i % 3 == 1), shared=bool(i % 4 == 3))
        scale = None if i % 5 else 0.3
        out, kp, vp = case.kernel(scale=scale)
        t_out, t_kp, t_vp = case.twin(scale=scale)
        mx.eval(out, kp, vp, t_out, t_kp, t_vp)
        what = f"case {i}: H {H}, H_kv {H_kv}, D {D}, block {bs}, qkv {qname}, pools {pdtype}, seqs {seqs}"
        assert out.shape == t_out.shape and out.dtype == t_out.dtype, what
        assert same_bits(kp, t_kp) and same_bits(vp, t_vp), f"{what}: the written pools differ from the twin's"
        err = float(np.max(np.abs(to_np(out) - to_np(t_out))))
        ref = torch_reference(case, kp, vp, scale)
        if qdtype == mx.float32 or ref is None:
            assert err <= TOL[qdtype], f"{what}: differs from the twin by {err:.3g}"
        if ref is not None:
            # fp32: within 1e-5 of torch too. fp16/bf16: within an ulp of the output (the kernel
            # accumulates in fp32), and no further from the twin than the twin is from torch (the
            # twin's scores and weights are rounded to fp16/bf16) plus that ulp.
            terr = float(np.max(np.abs(to_np(out) - ref)))
            assert terr <= TOL[qdtype] / 2, f"{what}: differs from torch's SDPA (fp64) by {terr:.3g}"
            twin_err = float(np.max(np.abs(to_np(t_out) - ref)))
            assert err <= twin_err + TOL[qdtype] / 2, f"{what}: differs from the twin by {err:.3g} (twin vs torch:" \
                                                     f" {twin_err:.3g})"
        done += 1
    return done


# --- the bitwise contract -------------------------------------------------------------------

def check_batch_equals_alone(rng) -> None:
    for H, H_kv, D, qdtype in [(9, 3, 64, mx.float32), (8, 2, 128, mx.float16), (4, 4, 8, mx.bfloat16)]:
        seqs = [(0, 100), (37, 1), (200, 64), (5, 3), (130, 1), (64, 129), (700, 1), (520, 2)]
        case = Case(rng, H, H_kv, D, 16, seqs, qdtype, shared=True)
        out, _, _ = case.kernel()
        row = 0
        for b, (start, n) in enumerate(seqs):
            meta = AttentionMetadata.build([n], [start], [case.tables[b]], case.block_size)
            alone, _, _ = case.kernel(qkv=case.qkv[:, row:row + n], meta=meta)
            # alone, (700, 1) and (520, 2) are shared out by segment (flash-decoding); in the batch not
            assert same_bits(alone, out[:, row:row + n]), f"sequence {b} {seqs[b]} alone != in the batch ({H}, {D})"
            row += n


def check_chunked_equals_whole(rng) -> None:
    for H, H_kv, D, qdtype, pdtype, bs in [(9, 3, 64, mx.float32, mx.float32, 16),
                                           (9, 3, 64, mx.float32, mx.float16, 8),
                                           (8, 2, 128, mx.bfloat16, mx.bfloat16, 32), (6, 2, 8, mx.float16, None, 1)]:
        N = 300
        case = Case(rng, H, H_kv, D, bs, [(0, N)], qdtype, pdtype)
        whole, wk, wv = case.kernel()
        mx.eval(whole, wk, wv)
        cuts = [0, 1, 2, 70, 71, 128, 129, 200, 263, 264, 265, 299, 300]  # prefill chunks and decode steps
        kp, vp, outs = case.k_pool, case.v_pool, []
        for a, b in zip(cuts[:-1], cuts[1:], strict=True):
            meta = AttentionMetadata.build([b - a], [a], case.tables, bs)
            out, kp, vp = case.kernel(qkv=case.qkv[:, a:b], k_pool=kp, v_pool=vp, meta=meta)
            mx.eval(out, kp, vp)
            outs.append(out)
        chunked = mx.concatenate(outs, axis=1)
        assert same_bits(chunked, whole), f"chunked prefill != whole prefill (H {H}, D {D}, {qdtype}, block {bs})"
        assert same_bits(kp, wk) and same_bits(vp, wv), "the pools after the chunks != after the whole prefill"


def layout(rng, ks: list[np.ndarray], vs: list[np.ndarray], lengths: list[int], block_size: int, dtype):
    """Pools holding each sequence's logical (H_kv, S, D) keys and values in random physical
    blocks (lengths[b] positions' worth), with random garbage everywhere else."""
    H_kv, D = ks[0].shape[0], ks[0].shape[2]
    needs = [-(-n // block_size) for n in lengths]
    n_blocks = sum(needs) + 2
    pools = [rng.standard_normal((n_blocks, H_kv, block_size, D)).astype(np.float32) * 100 for _ in range(2)]
    ids, tables = list(rng.permutation(n_blocks)), []
    for k, v, need in zip(ks, vs, needs, strict=True):
        table = [int(ids.pop()) for _ in range(need)]
        for j in range(k.shape[1]):
            pools[0][table[j // block_size], :, j % block_size] = k[:, j]
            pools[1][table[j // block_size], :, j % block_size] = v[:, j]
        tables.append(table)
    return mx.array(pools[0]).astype(dtype), mx.array(pools[1]).astype(dtype), tables


def check_block_size_invariance(rng) -> None:
    for H, H_kv, D, qdtype, pdtype in [(9, 3, 64, mx.float32, mx.float32), (8, 2, 128, mx.float16, mx.float16),
                                       (9, 3, 64, mx.float32, mx.bfloat16), (4, 1, 8, mx.bfloat16, mx.bfloat16)]:
        seqs = [(90, 1), (0, 40), (33, 17), (150, 1), (64, 64)]
        T = sum(n for _, n in seqs)
        qkv = mx.array(rng.standard_normal((1, T, (H + 2 * H_kv) * D)).astype(np.float32)).astype(qdtype)
        ks = [rng.standard_normal((H_kv, s, D)).astype(np.float32) for s, _ in seqs]
        vs = [rng.standard_normal((H_kv, s, D)).astype(np.float32) for s, _ in seqs]
        rope = RoPE(D, 300)
        results = []
        for bs in (8, 16, 32, 1, 5, 64):
            k_pool, v_pool, tables = layout(rng, ks, vs, [s + n for s, n in seqs], bs, pdtype)
            meta = AttentionMetadata.build([n for _, n in seqs], [s for s, _ in seqs], tables, bs)
            out, _, _ = kernels.paged_attention(qkv, k_pool, v_pool, rope.cos, rope.sin, meta.positions,
                                                meta.slot_mapping, meta.block_tables, meta.cu_seqlens_q,
                                                meta.context_lens, H, H_kv)
            results.append((bs, out))
        for bs, out in results[1:]:
            assert same_bits(out, results[0][1]), f"block size {bs} != block size {results[0][0]} ({H}, {D}, {pdtype})"


THREAD_CASE = dict(H=9, H_kv=3, D=64, block_size=16, seqs=[(0, 200), (300, 1), (17, 1), (100, 50)])


def thread_case_output() -> mx.array:
    case = Case(np.random.default_rng(1234), **THREAD_CASE, pdtype=mx.float16)
    out, _, _ = case.kernel()
    return out


def check_thread_count(isa: str) -> None:
    """The same step with TINY_LLM_THREADS=1 in a fresh process: the same bits."""
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"paged_attention_1thread_{os.getpid()}.npy"
    env = {**os.environ, "TINY_LLM_THREADS": "1"}
    subprocess.run([sys.executable, __file__, "--emit", str(path), "--isa", isa], check=True, env=env)
    try:
        one = np.load(path)
    finally:
        path.unlink(missing_ok=True)
    assert np.array_equal(one, bits(thread_case_output())), "1 thread != the default thread count"


def check_strided_inputs(rng) -> None:
    """Views (a column slice of qkv, transposed pools, strided metadata) give the bits of copies."""
    case = Case(rng, 9, 3, 64, 16, [(0, 20), (40, 1), (300, 1)], pdtype=mx.float16)
    out, kp, vp = case.kernel()
    mx.eval(out, kp, vp)
    T, W = case.qkv.shape[1], case.qkv.shape[2]
    wide = mx.concatenate([case.qkv, mx.ones((1, T, 7), case.qkv.dtype)], axis=2)
    k_t = mx.array(np.ascontiguousarray(np.array(case.k_pool).transpose(0, 2, 1, 3))).transpose(0, 2, 1, 3)
    v_t = mx.array(np.ascontiguousarray(np.array(case.v_pool).transpose(0, 2, 1, 3))).transpose(0, 2, 1, 3)
    m = case.meta
    spread = {name: mx.stack([getattr(m, name), getattr(m, name)], axis=-1) for name in
              ("positions", "slot_mapping", "cu_seqlens_q", "context_lens")}
    tables = mx.stack([m.block_tables, m.block_tables], axis=-1)
    mx.eval(wide, k_t, v_t, tables, *spread.values())
    meta = type("M", (), {**{n: a[..., 0] for n, a in spread.items()}, "block_tables": tables[..., 1]})
    out2, kp2, vp2 = case.kernel(qkv=wide[..., :W], k_pool=k_t, v_pool=v_t, meta=meta)
    assert same_bits(out2, out) and same_bits(kp2, kp) and same_bits(vp2, vp), "views != contiguous inputs"


# --- rejection ------------------------------------------------------------------------------

def check_rejections(rng) -> None:
    case = Case(rng, 9, 3, 64, 16, [(0, 5), (20, 1)])

    def words(fn) -> str:
        try:
            mx.eval(*fn())
        except ValueError as e:
            return str(e)
        raise AssertionError("no ValueError")

    def both(**kw) -> None:  # the twin's check and the kernel say the same
        c = Case(rng, 9, 3, 64, 16, [(0, 5), (20, 1)])
        args = dict(qkv=c.qkv, k_pool=c.k_pool, v_pool=c.v_pool, H=9, H_kv=3)
        args.update(kw)
        twin = words(lambda: check_paged_attention(args["qkv"], args["k_pool"], args["v_pool"], c.meta, args["H"],
                                                   args["H_kv"]) or ())
        kernel = words(lambda: kernels.paged_attention(
            args["qkv"], args["k_pool"], args["v_pool"], c.rope.cos, c.rope.sin, c.meta.positions,
            c.meta.slot_mapping, c.meta.block_tables, c.meta.cu_seqlens_q, c.meta.context_lens, args["H"],
            args["H_kv"]))
        assert twin == kernel, f"twin: {twin!r}\nkernel: {kernel!r}"

    both(qkv=case.qkv[0])
    both(qkv=case.qkv.astype(mx.int32))
    both(H=9, H_kv=2)
    both(H=0, H_kv=3)
    both(qkv=case.qkv[..., :-3])
    both(k_pool=case.k_pool[:, :2])
    both(v_pool=case.v_pool[..., :32])
    both(v_pool=case.v_pool.astype(mx.float16))
    both(k_pool=case.k_pool.astype(mx.int32), v_pool=case.v_pool.astype(mx.int32))
    both(qkv=case.qkv[:, :4])  # fewer tokens than the metadata

    meta = case.meta
    bad = {
        "slot_mapping": mx.array([0, 1, 2, 3, 10**6, 5], mx.int32),
        "slot_mapping ": mx.array([0, 1, 2, 3, -1, 5], mx.int32),
        "block_tables": mx.array([[99, 0], [1, 2]], mx.int32),
        "block_tables ": mx.array([[0, 3], [1, -5]], mx.int32),
        "positions": mx.array([0, 1, 2, 3, 4, 21], mx.int32),
        "context_lens": mx.array([5, 999], mx.int32),
        "cu_seqlens_q": mx.array([0, 6, 5], mx.int32),
    }
    for name, value in bad.items():
        args = dict(positions=meta.positions, slot_mapping=meta.slot_mapping, block_tables=meta.block_tables,
                    cu_seqlens_q=meta.cu_seqlens_q, context_lens=meta.context_lens)
        args[name.strip()] = value
        msg = words(lambda args=args: case.kernel(meta=type("M", (), args)))
        assert msg.startswith("paged_attention: ") and "\n" not in msg, msg
        # Not yet evaluated when the op is built: checked when the node runs (no crash, an error).
        args[name.strip()] = value + mx.zeros_like(value)
        try:
            mx.eval(*case.kernel(meta=type("M", (), args)))
        except (ValueError, RuntimeError) as e:
            assert "paged_attention: " in str(e), e
        else:
            raise AssertionError(f"lazy bad {name.strip()}: no error")
    m = words(lambda: case.kernel(meta=type("M", (), dict(
        positions=meta.positions.astype(mx.int64), slot_mapping=meta.slot_mapping, block_tables=meta.block_tables,
        cu_seqlens_q=meta.cu_seqlens_q, context_lens=meta.context_lens))))
    assert "int32" in m, m
    # A good step still runs after the errors.
    mx.eval(*case.kernel())


# --- donation -------------------------------------------------------------------------------

def check_donation(rng) -> None:
    """The pools reuse the input buffers when nothing else holds them, and copy when something does."""
    case = Case(rng, 9, 3, 64, 16, [(0, 3)], spare_blocks=2000)
    k_before = np.array(case.k_pool)
    out, kp, vp = case.kernel()
    mx.eval(out, kp, vp)
    assert np.array_equal(np.array(case.k_pool), k_before), "a pool still held by the caller was written"
    pools = [case.k_pool, case.v_pool]
    case.k_pool = case.v_pool = None
    mx.synchronize()
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    outs = kernels.paged_attention(case.qkv, pools.pop(0), pools.pop(0), case.rope.cos, case.rope.sin,
                                   case.meta.positions, case.meta.slot_mapping, case.meta.block_tables,
                                   case.meta.cu_seqlens_q, case.meta.context_lens, 9, 3)
    mx.eval(*outs)
    grown = mx.get_peak_memory() - base
    assert grown < outs[1].nbytes / 2, f"donated pools were copied ({grown} bytes more, pool {outs[1].nbytes})"


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--quick", action="store_true", help="fewer random cases")
    parser.add_argument("--emit", help=argparse.SUPPRESS)
    parser.add_argument("--isa", default="auto", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if kernels is None or not hasattr(kernels, "paged_attention"):
        sys.exit("tiny_llm_kernels.paged_attention is not built (pip install --no-build-isolation ./kernels)")
    if args.emit:  # the thread-count check's child
        kernels.paged_attention_configure(args.isa)
        np.save(args.emit, bits(thread_case_output()))
        return
    isas = []
    for isa in ("portable", "avx2", "avx512"):
        try:
            kernels.paged_attention_configure(isa)
            isas.append(isa)
        except ValueError:
            pass
    for isa in isas:
        info = kernels.paged_attention_configure(isa)
        t0 = time.perf_counter()
        rng = np.random.default_rng(7)
        n = check_against_twin(rng, 18 if args.quick else 48)
        check_batch_equals_alone(rng)
        check_chunked_equals_whole(rng)
        check_block_size_invariance(rng)
        check_thread_count(isa)
        print(f"{isa}: {n} random cases == twin (and torch), batch == alone, chunked == whole, block sizes,"
              f" 1 thread == {info['threads']}: ok ({time.perf_counter() - t0:.1f} s)")
    kernels.paged_attention_configure("auto")
    check_strided_inputs(np.random.default_rng(5))
    check_rejections(np.random.default_rng(3))
    check_donation(np.random.default_rng(4))
    print("strided inputs, rejections (the twin's words, ValueError for bad indices) and donation: ok")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_paged_attention

    print()
    print(bench_paged_attention.table(bench_paged_attention.results(quick=True)))


if __name__ == "__main__":
    main()
