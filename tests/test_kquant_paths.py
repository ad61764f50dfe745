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

ISAS = ["portable", "avx2", "avx512"]
PATHS = {"dots": 0, "panels": 1}  # panel_min_m: 0 never panels, 1 always


@pytest.fixture
def isa(request):
    """Run the test on one instruction set, and put the defaults back after."""
    if getattr(kernels, "kquant_matmul_configure", None) is None:
        pytest.fail("tiny_llm_kernels.kquant_matmul is not built: pip install --no-build-isolation ./kernels")
    try:
        kernels.kquant_matmul_configure(request.param, -1)
    except ValueError as e:  # this CPU lacks the instruction set: not something a test can fix
        pytest.skip(f"needs {request.param} on this CPU ({e})")
    yield request.param
    mx.synchronize()
    kernels.kquant_matmul_configure("auto", -1)


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
