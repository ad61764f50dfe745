"""Compiled pieces of tiny-llm spec, loaded before mlx.

On Linux: the BLAS fix. MLX's CPU wheel links the reference BLAS; we load
OpenBLAS (scipy-openblas32) and a shim that defines cblas_sgemm/cblas_dgemm
on top of it, both RTLD_GLOBAL, so MLX's matmuls resolve to OpenBLAS.

Then the C++ kernels (module `_ext`, MLX primitives with a CPU implementation):
    quantized_matmul(x, w_q, scales, biases, group_size=64, bits=4, *, norm_weight=None, eps=1e-5, swiglu=False,
                     residual=None, precision="fp32", int8_packed=None, stream=None)
    quantized_matmul_int8_pack(w_q, scales, biases, group_size=64, bits=4, stream=None)  (for precision="int8")
    quantized_matmul_dx(dy, w_q, scales, biases, group_size=64, bits=4, stream=None)  (dy @ W)
    kquant_matmul(x, parts, types, *, x_int8=False, norm_weight=None, eps=1e-5, swiglu=False, residual=None,
                  stream=None)  (x @ W.T, W in GGUF Q4_K/Q6_K blocks)
    gather_quantized_matmul(x, w_q, scales, biases, indices, group_size=64, bits=4, stream=None)
    flash_attention(q, k, v, scale=None, mask=None, stream=None)  (mask: None, "causal", array)
    rms_norm(x, weight, eps=1e-5, stream=None), rms_norm_backward(x, weight, dy, eps=1e-5, stream=None) -> [dx, dw]
    rope(x, cos, sin, offset=0, traditional=False, stream=None)
    swiglu(x, stream=None)  (x = [gate | up] on the last axis)
    softmax(x, stream=None), sigmoid(x, stream=None)  (training's activations; forward only)
    silu_mul(gate, up, stream=None), silu_mul_backward(gate, up, dy, stream=None) -> [dgate, dup]
    gelu(x, stream=None), gelu_backward(x, dy, stream=None)  (training's GELU, tanh form)
    layer_norm(x, weight, bias, eps=1e-5, stream=None), layer_norm_backward(x, weight, dy, eps=1e-5, stream=None)
    adamw(weights, grads, m, v, *, b1, c1, b2, c2, decay, step_size, root_c2, eps, stream=None)
          -> new weights + m + v  (training's optimizer step, every weight in one op)
    causal_attention(q, k, v, scale, stream=None) -> [out, lse]  (training's attention)
    causal_attention_backward(q, k, v, out, lse, dout, scale, stream=None) -> [dq, dk, dv]
    cached_attention(qkv, keys, values, cos, sin, offset, n_heads, n_kv_heads, scale=None,
                     traditional=False, stream=None) -> (out, keys, values)
    paged_attention(qkv, k_pool, v_pool, cos, sin, positions, slot_mapping, block_tables, cu_seqlens_q,
                    context_lens, n_heads, n_kv_heads, *, scale=None, traditional=False, window=0, stream=None)
                    -> (out, k_pool, v_pool)
    huge_pages(a, stream=None)  (a copy on 2 MB pages where Linux gives them, for weights)
Imported only after the BLAS fix: `_ext` imports mlx.core, and the fix must come first.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Python started in kernels/ finds this source folder before the installed package; it holds
# the sources (CMakeLists.txt beside it) and no compiled files.
if (HERE.parent / "CMakeLists.txt").exists() and not any(HERE.glob("_ext*")):
    raise ImportError(f"tiny_llm_kernels was imported from its source folder {HERE}, which shadows the"
                      " installed package: run Python from another folder, such as the repository root")

blas = "platform default"  # what MLX's CPU matmul runs on; "openblas" once the fix is in
_shim = None


def _load_blas_fix() -> None:
    global blas, _shim
    if "mlx.core" in sys.modules:
        print("tiny-llm: mlx was imported before tiny_llm_kernels; the BLAS fix is not applied"
              " (import impl or tiny_llm_kernels first)", file=sys.stderr)
        return
    # One OpenBLAS thread unless the user says otherwise: with 2 on a 2-core machine its
    # spinning workers fight MLX's own eval thread; measured on the 135M model, a
    # 512-token forward took 14.4 s with 2 threads and 5.4 s with 1.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    import scipy_openblas32

    openblas = ctypes.CDLL(str(Path(scipy_openblas32.get_lib_dir()) / f"lib{scipy_openblas32.get_library()}.so"),
                           mode=ctypes.RTLD_GLOBAL)
    # Set it explicitly too: measured, the variable alone was not always honoured (set
    # after `import scipy_openblas32` the library still started 2 threads, and a
    # 16x576x576 sgemm then took 24-36 ms instead of 0.1 ms on a busy machine).
    if os.environ["OPENBLAS_NUM_THREADS"].isdigit():
        openblas.scipy_openblas_set_num_threads(max(1, int(os.environ["OPENBLAS_NUM_THREADS"])))
    _shim = ctypes.CDLL(str(HERE / "libtiny_llm_blas_shim.so"), mode=ctypes.RTLD_GLOBAL)
    _shim.tiny_llm_blas_shim_sgemm_calls.restype = ctypes.c_long
    blas = "openblas"


def sgemm_calls() -> int:
    """fp32 matmuls MLX sent through the shim so far (-1 when the fix is not loaded)."""
    return _shim.tiny_llm_blas_shim_sgemm_calls() if _shim is not None else -1


def set_sgemm_threads(threads: int) -> int:
    """The most row ranges (threads) a large fp32 matmul is cut into: 0, the default, uses the
    kernels' thread pool; 1 keeps every call on one thread. Returns the previous setting
    (-1 when the fix is not loaded)."""
    return _shim.tiny_llm_blas_shim_set_threads(int(threads)) if _shim is not None else -1


if sys.platform.startswith("linux"):
    _load_blas_fix()

try:  # after the BLAS fix: importing _ext loads mlx.core
    import mlx.core  # noqa: F401  (registers mx.array with nanobind before _ext needs it)

    from tiny_llm_kernels._ext import (  # noqa: F401  (re-exported: the package's API)
        adamw,
        cached_attention,
        causal_attention,
        causal_attention_backward,
        flash_attention_configure,
        flash_attention_info,
        gather_quantized_matmul,
        gelu,
        gelu_backward,
        huge_pages,
        kquant_matmul,
        kquant_matmul_configure,
        kquant_matmul_info,
        layer_norm,
        layer_norm_backward,
        paged_attention,
        paged_attention_configure,
        paged_attention_info,
        quantized_matmul,
        quantized_matmul_configure,
        quantized_matmul_dx,
        quantized_matmul_info,
        quantized_matmul_int8_pack,
        rms_norm,
        rms_norm_backward,
        rope,
        sigmoid,
        silu_mul,
        silu_mul_backward,
        softmax,
        swiglu,
    )
    from tiny_llm_kernels._ext import flash_attention as _flash_attention
except ImportError as e:  # e.g. built without a C++ compiler; the BLAS fix above still holds
    ext_error = str(e)
    print(f"tiny-llm: C++ kernels unavailable ({e}); using the pure-MLX paths."
          " Rebuild with: pip install --no-build-isolation ./kernels", file=sys.stderr)
else:
    ext_error = None

    def flash_attention(q, k, v, scale=None, mask=None, stream=None):
        """Grouped-query flash attention on the CPU; mask: None, "causal" or an array (see _ext)."""
        if isinstance(mask, str) and mask != "causal":
            raise ValueError(f"mask must be None, 'causal' or an array, not {mask!r}")
        causal = isinstance(mask, str)
        return _flash_attention(q, k, v, scale=scale, causal=causal, mask=None if causal else mask, stream=stream)

