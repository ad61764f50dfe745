"""What the kernel path tests share: a fixture that runs a test on one instruction set."""

from __future__ import annotations

import mlx.core as mx
import pytest

import impl  # noqa: F401  (loads tiny_llm_kernels and the BLAS fix before mlx is used)
from impl.native import kernels


def isa_fixture(configure: str):
    """A fixture, parametrized indirectly with an instruction set's name, that forces that set
    through tiny_llm_kernels.<configure>(isa, -1) and puts the default ("auto") back after."""

    @pytest.fixture
    def isa(request):
        """Run the test on one instruction set, and put the defaults back after."""
        fn = getattr(kernels, configure, None)
        if fn is None:
            pytest.fail(f"tiny_llm_kernels.{configure} is not built: pip install --no-build-isolation ./kernels")
        try:
            fn(request.param, -1)
        except ValueError as e:  # this CPU lacks the instruction set: not something a test can fix
            pytest.skip(f"needs {request.param} on this CPU ({e})")
        yield request.param
        mx.synchronize()
        fn("auto", -1)

    return isa
