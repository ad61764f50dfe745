"""GPU kernels (topics 2.3 and 2.5): quantized matmul and flash attention on Metal and CUDA,
through MLX's mx.fast.metal_kernel / mx.fast.cuda_kernel, compiled by MLX at first use.

Each kernel is one body in gpu_src/ (quantized_matmul.inc, flash_attention.inc) written in a
small dialect: C++ plus the tl_* names that one header per backend defines (dialect_cuda.h,
dialect_metal.h; dialect_cpu.h emulates them on the CPU, see gpu_emulator.py). A prologue
per backend gives the body its thread's place: tl_thread (in the threadgroup), tl_lane and
tl_warp (32-thread warps, SIMD groups on Apple GPUs), tl_group_x/y/z (the threadgroup).
MLX writes the signature: each input as a pointer named as in `input_names`, `<name>_shape`
when the body uses it, the outputs, and the template arguments as constants.

    quantized_matmul(x, w_q, scales, biases, group_size=64, bits=4)  (twin: impl.quantize)
    flash_attention(q, k, v, scale=None, mask=None)  (twin: impl.flash_attention)
    first_use_check(kernel, variant)  one small run against numpy, before impl relies on a kernel
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

SRC = Path(__file__).resolve().parent / "gpu_src"
WARP = 32
# What the kernels compute: x/q/k/v dtypes; the matmul's bits and group sizes; attention's head sizes.
FLOATS = (mx.float32, mx.float16, mx.bfloat16)
BITS, GROUP_SIZES, MAX_D = (4, 8), (32, 64, 128), 256

PROLOGUE = {
    "cuda": "const int tl_thread = threadIdx.x;\n"
            "const int tl_group_x = blockIdx.x, tl_group_y = blockIdx.y, tl_group_z = blockIdx.z;\n",
    "metal": "const int tl_thread = int(thread_position_in_threadgroup.x);\n"
             "const int tl_group_x = int(threadgroup_position_in_grid.x);\n"
             "const int tl_group_y = int(threadgroup_position_in_grid.y);\n"
             "const int tl_group_z = int(threadgroup_position_in_grid.z);\n",
    "cpu": "const int tl_thread = tl_emu::self.thread;\n"
           "const int tl_group_x = tl_emu::self.group_x, tl_group_y = tl_emu::self.group_y,"
           " tl_group_z = tl_emu::self.group_z;\n",
}
LANES = "const int tl_lane = tl_thread % 32;\nconst int tl_warp = tl_thread / 32;\n"


@dataclass(frozen=True)
class KernelSource:
    """What mx.fast.<backend>_kernel takes: a name, argument names, a header and a body."""

    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    header: str
    source: str


ARGUMENTS = {  # kernel -> (input names, output names)
    "quantized_matmul": (("x", "w", "scales", "biases"), ("y",)),
    "flash_attention": (("q", "k", "v", "mask", "params"), ("o",)),
}


def kernel_source(kernel: str, backend: str) -> KernelSource:
    """The source of `kernel` ("quantized_matmul", "flash_attention") for "cuda", "metal" or "cpu"."""
    inputs, outputs = ARGUMENTS[kernel]
    header = (SRC / f"dialect_{backend}.h").read_text()
    body = PROLOGUE[backend] + LANES + (SRC / f"{kernel}.inc").read_text()
    return KernelSource(f"tiny_llm_{kernel}", inputs, outputs, header, body)


@functools.cache  # asked on every call of the impl dispatchers; the answer never changes
def backend() -> str | None:
    """"metal" or "cuda" when MLX has that GPU here, else None."""
    if mx.metal.is_available():
        return "metal"
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        return "cuda"
    return None


@functools.cache
def _kernel(kernel: str, which: str):
    src = kernel_source(kernel, which)
    make = mx.fast.metal_kernel if which == "metal" else mx.fast.cuda_kernel
    return make(name=src.name, input_names=list(src.input_names), output_names=list(src.output_names),
                source=src.source, header=src.header)


def _run(kernel: str, inputs: list, output_shapes: list, output_dtypes: list, stream, launch: dict) -> list:
    """Launch `kernel` on this machine's GPU (tests put gpu_emulator.emulate_run here)."""
    which = backend()
    if which is None:
        raise RuntimeError("tiny_llm_kernels.gpu needs a GPU (Metal or CUDA); MLX finds none here")
    return _kernel(kernel, which)(inputs=inputs, output_shapes=output_shapes, output_dtypes=output_dtypes,
                                  stream=stream, **launch)


# --- quantized matmul ------------------------------------------------------------------

QMM_ROWS, QMM_WARPS = 8, 4  # as in quantized_matmul.inc: rows of x per warp, warps per group


def qmm_launch(M: int, N: int, x_dtype: mx.Dtype, group_size: int, bits: int) -> dict:
    """Grid, threadgroup and template arguments of the quantized matmul for (M, K) @ (N, K).T."""
    return dict(grid=(math.ceil(N / QMM_WARPS) * QMM_WARPS * WARP, math.ceil(M / QMM_ROWS), 1),
                threadgroup=(QMM_WARPS * WARP, 1, 1),
                template=[("T", x_dtype), ("BITS", bits), ("GROUP_SIZE", group_size)])


def check_quantized(x: mx.array, w_q: mx.array, scales: mx.array, biases: mx.array,
                    group_size: int, bits: int) -> None:
    """One-line ValueErrors for what the kernel cannot compute: the contract and messages of the
    C++ op and of impl.quantize.check_quantized_matmul (tests/test_gpu_emulated checks they agree)."""
    def fail(what: str):
        raise ValueError(f"quantized_matmul: {what}")

    if bits not in BITS:
        fail(f"bits must be 4 or 8, got {bits}")
    if group_size not in GROUP_SIZES:
        fail(f"group_size must be 32, 64 or 128, got {group_size}")
    if w_q.ndim != 2 or w_q.dtype != mx.uint32:
        fail(f"w_q must be a 2-D uint32 array (N, K * bits / 32), got {w_q.shape} {_name(w_q.dtype)}")
    if x.ndim < 1 or x.dtype not in FLOATS:
        fail(f"x must be float32, float16 or bfloat16 with shape (..., K), got {x.shape} {_name(x.dtype)}")
    N, K = w_q.shape[0], w_q.shape[1] * 32 // bits
    if x.shape[-1] != K:
        fail(f"x has K = {x.shape[-1]} but w_q {w_q.shape} holds {K} {bits}-bit values per row")
    if K == 0 or K % group_size:
        fail(f"K = {K} must be a positive multiple of group_size = {group_size}")
    if scales.shape != (N, K // group_size) or biases.shape != scales.shape:
        fail(f"scales and biases must be {(N, K // group_size)}, got {scales.shape} and {biases.shape}")
    if scales.dtype not in FLOATS or biases.dtype not in FLOATS:
        fail("scales and biases must be float32, float16 or bfloat16")


def _name(dtype: mx.Dtype) -> str:
    return str(dtype).removeprefix("mlx.core.")


def quantized_matmul(x: mx.array, w_q: mx.array, scales: mx.array, biases: mx.array,
                     group_size: int = 64, bits: int = 4, stream=None) -> mx.array:
    """x (..., K) @ dequantize(w_q, scales, biases).T -> (..., N) in x's dtype, on the GPU."""
    check_quantized(x, w_q, scales, biases, group_size, bits)
    *lead, K = x.shape
    N, M = w_q.shape[0], math.prod(lead)
    flat = x if x.ndim == 2 else x.reshape(M, K)  # (M, K); MLX copies it row-contiguous if it is not
    (y,) = _run("quantized_matmul", [flat, w_q, scales, biases], [(M, N)], [x.dtype], stream,
                qmm_launch(M, N, x.dtype, group_size, bits))
    return y if x.ndim == 2 else y.reshape(*lead, N)  # (..., N)


# --- flash attention -------------------------------------------------------------------

FA_ROWS = 4  # as in flash_attention.inc: query rows (warps) per threadgroup
MASK_MODES = {None: 0, "causal": 1, "array": 2}  # what the kernel's MASK_MODE means


def attention_inputs(q: mx.array, k: mx.array, v: mx.array, scale: float | None,
                     mask: mx.array | str | None) -> tuple[list[mx.array], int]:
    """The kernel's inputs (q, k, v, mask, params) for 4-D q, k, v, and its MASK_MODE."""
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"q must be (B, H, L, D) and k, v (B, H_kv, S, D); got {q.shape}, {k.shape}, {v.shape}")
    (B, H, L, D), H_kv, S = q.shape, k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[3] != D or H % H_kv:
        raise ValueError(f"k and v {k.shape} do not fit q {q.shape} (same B and D; H a multiple of H_kv)")
    if D > MAX_D:
        raise ValueError(f"head size {D} is over the kernel's {MAX_D}")
    if isinstance(mask, str) and mask != "causal":
        raise ValueError(f"mask must be None, 'causal' or an array, not {mask!r}")
    mode = MASK_MODES["array" if isinstance(mask, mx.array) else mask]
    if mode == 2:  # additive fp32 (B, H, L, S); a boolean mask says True = may attend
        mask = mx.where(mask, 0.0, -mx.inf) if mask.dtype == mx.bool_ else mask.astype(mx.float32)
        mask = mx.broadcast_to(mask, (B, H, L, S))
    else:
        mask = mx.zeros((1,), mx.float32)  # unread
    params = mx.array([1.0 / math.sqrt(D) if scale is None else scale], mx.float32)
    return [q, k, v, mask, params], mode


def attention_launch(q: mx.array, mode: int) -> dict:
    """Grid, threadgroup and template arguments of flash attention for q (B, H, L, D)."""
    B, H, L, D = q.shape
    return dict(grid=(math.ceil(L / FA_ROWS) * FA_ROWS * WARP, H, B), threadgroup=(FA_ROWS * WARP, 1, 1),
                template=[("T", q.dtype), ("D", D), ("MASK_MODE", mode)])


def flash_attention(q: mx.array, k: mx.array, v: mx.array, scale: float | None = None,
                    mask: mx.array | str | None = None, stream=None) -> mx.array:
    """Grouped-query flash attention on the GPU; q (B, H, L, D), k/v (B, H_kv, S, D) -> (B, H, L, D)."""
    inputs, mode = attention_inputs(q, k, v, scale, mask)
    (o,) = _run("flash_attention", inputs, [q.shape], [q.dtype], stream, attention_launch(q, mode))
    return o


# --- first use: does this kernel work on this GPU? ----------------------------------------
# These sources have run only on the CPU emulator here (no GPU was at hand), so impl runs each
# kernel variant once on a small input before relying on it (impl.native.gpu_works). A kernel
# that does not compile or computes garbage on some GPU then costs its user speed, not the answer.

# Of the reference's largest |value|. A broken kernel (a compile error, a wrong layout, another
# SIMD width) is off by O(1); precision is the spec's business (day_2_3, day_2_5), not this check's.
CHECK_TOL = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}


def _mx(a: np.ndarray, dtype: mx.Dtype) -> tuple[mx.array, np.ndarray]:
    """a as an mx array of `dtype`, and the float64 values that dtype holds."""
    x = mx.array(a.astype(np.float32)).astype(dtype)
    return x, np.array(x.astype(mx.float32), np.float64)


def _check_quantized_matmul(rng, x_dtype: mx.Dtype, scales_dtype: mx.Dtype, group_size: int, bits: int):
    M, N, K = 3, 5, 2 * group_size  # a partial tile of rows, a partial group of warps, two groups
    per_word = 32 // bits
    q = rng.integers(0, 2**bits, (N, K), dtype=np.uint32)
    w_q = (q.reshape(N, K // per_word, per_word) << np.arange(0, 32, bits, dtype=np.uint32)).sum(-1, dtype=np.uint32)
    scales, s = _mx(rng.uniform(0.01, 0.1, (N, K // group_size)), scales_dtype)
    biases, b = _mx(rng.uniform(-0.5, 0.5, (N, K // group_size)), scales_dtype)
    x, x64 = _mx(rng.uniform(-1, 1, (M, K)), x_dtype)
    w = np.repeat(s, group_size, axis=1) * q + np.repeat(b, group_size, axis=1)  # (N, K)
    return quantized_matmul(x, mx.array(w_q), scales, biases, group_size, bits), x64 @ w.T


def _check_flash_attention(rng, dtype: mx.Dtype, D: int, mask: str | None):
    B, H, H_kv, L, S = 1, 2, 1, 3, 37  # grouped heads, two blocks of keys, L < S
    (q, q64), (k, k64), (v, v64) = (_mx(rng.uniform(-1, 1, (B, h, n, D)), dtype) for h, n in ((H, L), (H_kv, S), (H_kv, S)))
    scores = q64 @ k64.swapaxes(-1, -2) / math.sqrt(D)  # (B, H, L, S); kv head 0 serves both heads
    if mask == "causal":  # lower-right aligned: row i sees keys j <= i + S - L
        scores = np.where(np.arange(S) <= np.arange(L)[:, None] + S - L, scores, -np.inf)
    elif mask == "array":
        additive = rng.uniform(-1, 0, (B, H, L, S))
        scores, mask = scores + additive, mx.array(additive.astype(np.float32))
    p = np.exp(scores - scores.max(-1, keepdims=True))
    return flash_attention(q, k, v, mask=mask), p / p.sum(-1, keepdims=True) @ v64


def supports(kernel: str, variant: tuple) -> bool:
    """Whether `kernel` computes `variant`: (x dtype, scales dtype, group size, bits) for
    "quantized_matmul"; (dtype, head size D, mask: None, "causal" or "array") for "flash_attention"."""
    if kernel == "quantized_matmul":
        x_dtype, scales_dtype, group_size, bits = variant
        return x_dtype in FLOATS and scales_dtype in FLOATS and group_size in GROUP_SIZES and bits in BITS
    dtype, D, mask = variant
    return dtype in FLOATS and 0 < D <= MAX_D and (mask is None or isinstance(mask, str) and mask in MASK_MODES)


def first_use_check(kernel: str, variant: tuple) -> str | None:
    """Run `kernel` once in `variant` (one it `supports`) on a small input on this GPU and compare it
    with numpy: None when it compiles, runs and agrees, else what went wrong, in one line."""
    run = {"quantized_matmul": _check_quantized_matmul, "flash_attention": _check_flash_attention}[kernel]
    try:
        got, want = run(np.random.default_rng(0), *variant)
        got = np.array(got.astype(mx.float32), np.float64)  # evaluates: a compile error raises here
    except Exception as e:  # noqa: BLE001  (whatever the GPU stack raises, the answer is "not usable")
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    err, limit = np.abs(got - want).max(), CHECK_TOL[str(variant[0]).removeprefix("mlx.core.")] * np.abs(want).max()
    return None if err <= limit else f"off by {err:.3g} from numpy (allowed {limit:.3g})"


# --- for hardware/nvrtc_check.py: instances that cover every template combination ----------


@dataclass(frozen=True)
class Instance:
    """One compilation of a kernel: its source, argument dtypes and ranks, template arguments."""

    name: str
    input_names: list[str]
    output_names: list[str]
    header: str
    source: str
    input_dtypes: list[str]
    input_ndims: list[int]
    output_dtypes: list[str]
    template: list[tuple[str, int | bool | str]]


def example_instances(which: str):
    """Every dtype/bits/group/mask combination the engine and the specs use, for `which` backend."""
    floats = ("float32", "float16", "bfloat16")
    qmm = kernel_source("quantized_matmul", which)
    for x_dtype in floats:
        for s_dtype in floats:
            for bits in (4, 8):
                for group_size in (32, 64, 128):
                    yield Instance(qmm.name, list(qmm.input_names), list(qmm.output_names), qmm.header, qmm.source,
                                   [x_dtype, "uint32", s_dtype, s_dtype], [2, 2, 2, 2], [x_dtype],
                                   [("T", x_dtype), ("BITS", bits), ("GROUP_SIZE", group_size)])
    fa = kernel_source("flash_attention", which)
    for dtype in floats:
        for D in (32, 64, 80, 128):
            for mode in (0, 1, 2):
                yield Instance(fa.name, list(fa.input_names), list(fa.output_names), fa.header, fa.source,
                               [dtype, dtype, dtype, "float32", "float32"], [4, 4, 4, 4 if mode == 2 else 1, 1],
                               [dtype], [("T", dtype), ("D", D), ("MASK_MODE", mode)])
