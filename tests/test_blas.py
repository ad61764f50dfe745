"""The BLAS fix (tiny_llm_kernels/__init__.py): on Linux, MLX's fp32 matmul must run on
OpenBLAS through tiny_llm_kernels' shim, not on the reference BLAS the wheel links."""

import sys

import numpy as np
import pytest

import impl  # noqa: F401  (loads tiny_llm_kernels before mlx, as every entry point does)
from spec.ladder import FP32

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fix is Linux-only")


def test_kernels_package_is_built():
    from impl.native import kernels

    assert kernels is not None, "tiny_llm_kernels is not installed: pip install ./kernels --no-build-isolation"
    assert kernels.blas == "openblas", f"BLAS fix not applied: {kernels.blas}"


def test_mlx_matmul_goes_through_the_shim_and_is_right():
    import mlx.core as mx

    from impl.native import kernels

    a = np.random.default_rng(0).standard_normal((64, 96)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((96, 32)).astype(np.float32)
    before = kernels.sgemm_calls()
    c = np.array(mx.array(a) @ mx.array(b))
    assert kernels.sgemm_calls() > before, "MLX's matmul did not call the interposed cblas_sgemm"
    np.testing.assert_allclose(c, a @ b, rtol=FP32.rtol, atol=FP32.atol, err_msg=FP32.reason)


@pytest.mark.parametrize("m,k,n", [(768, 128, 512), (512, 96, 16), (7, 576, 4096), (33, 300, 2000), (2000, 64, 40)])
@pytest.mark.parametrize("transposes", ["nn", "tn", "nt", "tt"])
def test_a_split_sgemm_gives_the_unsplit_bits(m, k, n, transposes):
    """Large fp32 matmuls are cut into row (or column) ranges over the thread pool, one
    single-threaded OpenBLAS call each: every element must be the bits of the whole call."""
    import mlx.core as mx

    from impl.native import kernels

    rng = np.random.default_rng(m + n)
    a = mx.array(rng.standard_normal((k, m) if transposes[0] == "t" else (m, k)).astype(np.float32))
    b = mx.array(rng.standard_normal((n, k) if transposes[1] == "t" else (k, n)).astype(np.float32))
    op = lambda x, t: x.T if t == "t" else x  # noqa: E731  (a transposed view: MLX passes it as such)
    before = kernels.set_sgemm_threads(1)
    try:
        whole = op(a, transposes[0]) @ op(b, transposes[1])
        mx.eval(whole)
        kernels.set_sgemm_threads(0)
        split = op(a, transposes[0]) @ op(b, transposes[1])
        mx.eval(split)
    finally:
        kernels.set_sgemm_threads(before)
    assert mx.array_equal(whole, split).item(), "a split sgemm changed some bits"
    a64, b64 = np.array(op(a, transposes[0]), np.float64), np.array(op(b, transposes[1]), np.float64)
    # fp32's error bound for a sum of k products, in any order: k * 2^-24 * sum |a_i b_i|
    # (the products' own roundings and the adds'; 2^-23 covers both)
    bound = k * 2.0**-23 * (np.abs(a64) @ np.abs(b64))
    assert np.all(np.abs(np.array(split, np.float64) - a64 @ b64) <= bound), "sgemm beyond fp32's summation bound"
