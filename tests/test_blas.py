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
