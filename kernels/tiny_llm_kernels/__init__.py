"""Compiled pieces of tiny-llm spec, loaded before mlx.

On Linux: the BLAS fix. MLX's CPU wheel links the reference BLAS; we load
OpenBLAS (scipy-openblas32) and a shim that defines cblas_sgemm/cblas_dgemm
on top of it, both RTLD_GLOBAL, so MLX's matmuls resolve to OpenBLAS.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

blas = "platform default"  # what MLX's CPU matmul runs on; "openblas" once the fix is in
_shim = None


def _load_blas_fix() -> None:
    global blas, _shim
    if "mlx.core" in sys.modules:
        print("tiny-llm: mlx was imported before tiny_llm_kernels; the BLAS fix is not applied"
              " (import impl or tiny_llm_kernels first)", file=sys.stderr)
        return
    import scipy_openblas32

    # One OpenBLAS thread unless the user says otherwise: with 2 on a 2-core machine its
    # spinning workers fight MLX's own eval thread; measured on the 135M model, a
    # 512-token forward took 14.4 s with 2 threads and 5.4 s with 1.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

    ctypes.CDLL(str(Path(scipy_openblas32.get_lib_dir()) / f"lib{scipy_openblas32.get_library()}.so"),
                mode=ctypes.RTLD_GLOBAL)
    _shim = ctypes.CDLL(str(HERE / "libtiny_llm_blas_shim.so"), mode=ctypes.RTLD_GLOBAL)
    _shim.tiny_llm_blas_shim_sgemm_calls.restype = ctypes.c_long
    blas = "openblas"


def sgemm_calls() -> int:
    """fp32 matmuls MLX sent through the shim so far (-1 when the fix is not loaded)."""
    return _shim.tiny_llm_blas_shim_sgemm_calls() if _shim is not None else -1


if sys.platform.startswith("linux"):
    _load_blas_fix()
