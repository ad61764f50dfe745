"""The k-quant matmul (impl.kquant) on every code path this CPU can run.

The 2.2 spec checks kquant_matmul as a user gets it: the best instruction set, and the path
each M takes (per-block dots below panel_min_m rows, fp32 panels from there). These tests force
each instruction set (portable, AVX2, AVX-512 with VNNI) and each path, in both modes (x as
given, x rounded to int8), against float64 numpy on gguf's weights, and check that the paths of
one mode agree within fp32 sums.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import impl  # noqa: F401  (loads tiny_llm_kernels and the BLAS fix before mlx is used)
from impl.native import kernels
from spec.day_2_2_quantized_matmul import fp32_tol, gguf_weights, int8_rounded, kquant_rows
from spec.ladder import assert_close
from tests.kernel_paths import isa_fixture

ISAS = ["portable", "avx2", "avx512"]
PATHS = {"dots": 0, "panels": 1}  # panel_min_m: 0 never panels, 1 always


isa = isa_fixture("kquant_matmul_configure")


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
@pytest.mark.parametrize("x_int8", [False, True], ids=["fp32", "int8"])
@pytest.mark.parametrize("M", [1, 9, 20])  # 9, 20: more passes of the 8 rows a decoded block serves (20: 8, 8, 4)
def test_every_path_matches_float64(isa, qtype, x_int8, M):
    K, N = 768, 21
    rows = kquant_rows(qtype, N, K, seed=M, crafted=True)
    w = gguf_weights(rows, qtype)
    x = np.random.default_rng(M).standard_normal((M, K)).astype(np.float32)
    xr = int8_rounded(x)[0] if x_int8 else x
    want = xr.astype(np.float64) @ w.T
    A = np.abs(xr).astype(np.float64) @ np.abs(w).T
    got = {}
    for path, min_m in PATHS.items():
        kernels.kquant_matmul_configure("", min_m)
        got[path] = kernels.kquant_matmul(mx.array(x), [mx.array(rows)], [qtype], x_int8=x_int8)
        # x and w exact in fp32 (int8 mode: x rounded as int8_rounded does): fp32 sums over K remain
        assert_close(got[path], want, fp32_tol(K, A, 1), f"{isa} {path} {qtype} M={M}")
    assert_close(got["dots"], got["panels"], fp32_tol(K, A, 2), f"{isa} dots vs panels {qtype} M={M}")


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
def test_int8_dots_give_a_row_the_same_bits_whatever_the_other_rows(isa, qtype):
    """In int8 mode a row of x gets the same bits alone (M = 1, decode) as among other rows (a
    speculative verify pass, a batch's decode step, a prefill), so that greedy speculation and
    batching reproduce plain decoding token for token: the block sums are exact integers, and
    their fp32 accumulation and lane sums are the same operations whatever the rows. Below 16 rows
    on every instruction set; from 16 where the int8 dots run at every M (AVX-512 VNNI), while
    AVX2 and the portable code take fp32 panels there (the same values within fp32_tol, above)."""
    K, N = 768, 37  # 37: output columns in several tiles and a partial one
    rows = mx.array(kquant_rows(qtype, N, K, seed=3, crafted=True))
    x = np.random.default_rng(3).standard_normal((20, K)).astype(np.float32)
    alone = [np.array(kernels.kquant_matmul(mx.array(x[i:i + 1]), [rows], [qtype], x_int8=True))[0]
             for i in range(20)]
    for M in (2, 3, 5, 8, 9, 15, *((16, 20) if isa == "avx512" else ())):
        got = np.array(kernels.kquant_matmul(mx.array(x[:M]), [rows], [qtype], x_int8=True))
        for i in range(M):
            np.testing.assert_array_equal(got[i], alone[i], f"{isa} {qtype} row {i} of M={M}")
