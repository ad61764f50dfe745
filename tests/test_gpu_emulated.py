"""The GPU kernels' bodies (topics 2.3, 2.5), run on the CPU by tiny_llm_kernels.gpu_emulator.

The specs day_2_3 and day_2_5 run the real kernels where MLX has a GPU, and skip here. These
tests check the same bodies on any machine: compiled with dialect_cpu.h, each GPU thread a
std::thread, threadgroups and warps as the launch in tiny_llm_kernels.gpu sets them up, and
compared with the pure-MLX twins on the tolerances the specs use. What they cannot check:
the CUDA and Metal headers and MLX's GPU launch (hardware/nvrtc_check.py compiles the CUDA
source as MLX would; only a GPU runs it).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from tiny_llm_kernels import gpu  # missing: rebuild with pip install --no-build-isolation ./kernels
from tiny_llm_kernels.gpu_emulator import emulate, emulate_run

import impl.flash_attention
import impl.quantize
from impl import native
from impl.flash_attention import flash_attention_mlx
from impl.quantize import quantized_matmul_mlx
from spec.day_2_2_quantized_matmul import (
    BAD_QMM,
    bad_qmm_case,
    make_weights,
    numpy_dequantize,
    tol_for,
)
from spec.day_2_4_flash_attention import BAD_ATTENTION, additive_mask, bad_attention_case, uniform
from spec.day_2_4_flash_attention import tol_for as attention_tol
from spec.draw import DTYPES
from spec.ladder import assert_close, to_numpy

# (x dtype, scales dtype, bits, group size): every x dtype, bits and group size at least once.
QMM_CASES = [("float32", "float16", 4, 32), ("float32", "float32", 8, 64), ("float32", "bfloat16", 4, 128),
             ("float16", "float16", 8, 32), ("float16", "float32", 4, 64), ("bfloat16", "bfloat16", 4, 32),
             ("bfloat16", "float16", 8, 128)]
# (M, N, groups): a decode row, M across the 8-row tiles, N across the 4-warp groups, K of one group.
QMM_SHAPES = [(1, 5, 3), (9, 13, 1), (17, 4, 2)]


def emulated_qmm(x, w_q, scales, biases, group_size, bits):
    M, N = x.shape[0], w_q.shape[0]
    gpu.check_quantized(x, w_q, scales, biases, group_size, bits)
    (y,) = emulate("quantized_matmul", [x, w_q, scales, biases], [(M, N)], [x.dtype],
                   **gpu.qmm_launch(M, N, x.dtype, group_size, bits))
    return y


@pytest.mark.parametrize("shape", QMM_SHAPES, ids=[f"M{m}-N{n}-groups{g}" for m, n, g in QMM_SHAPES])
@pytest.mark.parametrize("case", QMM_CASES, ids=["-".join(map(str, c)) for c in QMM_CASES])
def test_quantized_matmul_body_matches_twin(case, shape):
    x_dtype, s_dtype, bits, group_size = case
    M, N, groups = shape
    K = groups * group_size
    w_q, scales, biases = make_weights(N, K, group_size, bits, DTYPES[s_dtype], seed=M * N + K)
    x = mx.array(np.random.default_rng(K).standard_normal((M, K)).astype(np.float32)).astype(DTYPES[x_dtype])
    got = emulated_qmm(x, w_q, scales, biases, group_size, bits)
    twin = quantized_matmul_mlx(x, w_q, scales, biases, group_size, bits)
    A = np.abs(to_numpy(x)) @ numpy_dequantize(w_q, scales, biases, group_size, bits)[1].T
    assert_close(got, twin, tol_for(x_dtype, K, A, 2), f"emulated GPU qmm vs twin, {case}, M={M} N={N} K={K}")


def test_quantized_matmul_body_on_a_model_shape():
    """SmolLM2's k/v projection at decode (M = 1, K = 576, N = 192, 4-bit, group 32)."""
    w_q, scales, biases = make_weights(192, 576, 32, 4, mx.float16, seed=1)
    x = mx.random.normal((1, 576), key=mx.random.key(1))
    got = emulated_qmm(x, w_q, scales, biases, 32, 4)
    A = np.abs(to_numpy(x)) @ numpy_dequantize(w_q, scales, biases, 32, 4)[1].T
    assert_close(got, quantized_matmul_mlx(x, w_q, scales, biases, 32, 4), tol_for("float32", 576, A, 2),
                 "emulated GPU qmm vs twin, k/v projection at decode")


# (B, H, H_kv, L, S, D): decode, GQA/MQA/MHA, S across 32-key blocks, L > S, D not a multiple of 32.
ATTENTION_SHAPES = [(1, 9, 3, 1, 70, 64), (2, 4, 1, 7, 33, 32), (1, 2, 2, 40, 20, 80), (1, 4, 2, 5, 64, 128)]


@pytest.mark.parametrize("mask_kind", [None, "causal", "array", "array with blank rows", "boolean"])
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=["-".join(map(str, s)) for s in ATTENTION_SHAPES])
def test_flash_attention_body_matches_twin(shape, dtype, mask_kind):
    B, H, H_kv, L, S, D = shape
    rng = np.random.default_rng(L * S + D)
    q, _ = uniform(rng, (B, H, L, D), dtype)
    (k, _), (v, _) = (uniform(rng, (B, H_kv, S, D), dtype) for _ in range(2))
    mask = mask_kind
    if mask_kind and mask_kind.startswith("array"):
        mask, _ = additive_mask(rng, (H, L, S), dtype, blank_rows=mask_kind.endswith("rows"))
    elif mask_kind == "boolean":
        mask = mx.array(rng.random((L, S)) < 0.7)
    scale = 0.3 if D == 80 else None
    inputs, mode = gpu.attention_inputs(q, k, v, scale, mask)
    (got,) = emulate("flash_attention", inputs, [q.shape], [q.dtype], **gpu.attention_launch(q, mode))
    twin = flash_attention_mlx(q, k, v, scale=scale, mask=mask)
    assert_close(got, twin, attention_tol(dtype), f"emulated GPU flash attention vs twin, {shape} {dtype} {mask_kind}")


@pytest.mark.parametrize("where", ["key", "query"])
def test_flash_attention_body_nan_in_nan_out(where):
    """A NaN score makes its row NaN, as in the twin (spec 2.4's test_nan_in_nan_out), not 0."""
    rng = np.random.default_rng(8)
    q, k, v = (rng.standard_normal((1, 2, n, 32)).astype(np.float32) for n in (3, 40, 40))
    (q if where == "query" else k)[0, 0, 1, 5] = np.nan
    q, k, v = mx.array(q), mx.array(k), mx.array(v)
    inputs, mode = gpu.attention_inputs(q, k, v, None, None)
    (got,) = emulate("flash_attention", inputs, [q.shape], [q.dtype], **gpu.attention_launch(q, mode))
    twin = flash_attention_mlx(q, k, v)
    assert np.isnan(np.array(twin)).any(), "the case has no NaN row"
    assert_close(got, twin, attention_tol("float32"), f"emulated GPU flash attention vs twin, a NaN {where}")


def test_public_functions_end_to_end(monkeypatch):
    """gpu.quantized_matmul on (B, L, K) x and gpu.flash_attention with a broadcast boolean mask,
    their launches run by the emulator instead of a GPU."""
    monkeypatch.setattr(gpu, "_run", emulate_run)
    w_q, scales, biases = make_weights(6, 128, 64, 8, mx.bfloat16, seed=2)
    x = mx.random.normal((2, 3, 128), key=mx.random.key(3)).astype(mx.float16)
    got = gpu.quantized_matmul(x, w_q, scales, biases, 64, 8)
    assert got.shape == (2, 3, 6) and got.dtype == mx.float16, f"{got.shape} {got.dtype}"
    assert_close(got, quantized_matmul_mlx(x, w_q, scales, biases, 64, 8), tol_for("float16", 128, None, 2),
                 "gpu.quantized_matmul (emulated) vs twin, (2, 3, 128) fp16 x")
    rng = np.random.default_rng(5)
    q, _ = uniform(rng, (2, 4, 6, 64), "bfloat16")
    (k, _), (v, _) = (uniform(rng, (2, 2, 37, 64), "bfloat16") for _ in range(2))
    allowed = mx.array(rng.random((2, 1, 6, 37)) < 0.5)
    got = gpu.flash_attention(q, k, v, scale=0.2, mask=allowed)
    assert got.shape == q.shape and got.dtype == mx.bfloat16, f"{got.shape} {got.dtype}"
    assert_close(got, flash_attention_mlx(q, k, v, scale=0.2, mask=allowed), attention_tol("bfloat16"),
                 "gpu.flash_attention (emulated) vs twin, boolean (B, 1, L, S) mask, bf16")


def test_bad_inputs_get_one_line_errors():
    w_q, scales, biases = make_weights(4, 64, 32, 4, mx.float16, seed=0)
    with pytest.raises(ValueError, match="x has K = 96"):
        gpu.check_quantized(mx.zeros((2, 96)), w_q, scales, biases, 32, 4)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        gpu.check_quantized(mx.zeros((2, 64)), w_q, scales, biases, 32, 3)
    q = mx.zeros((1, 3, 2, 64))
    with pytest.raises(ValueError, match="multiple of H_kv"):
        gpu.attention_inputs(q, mx.zeros((1, 2, 5, 64)), mx.zeros((1, 2, 5, 64)), None, None)
    with pytest.raises(ValueError, match="mask must be"):
        gpu.attention_inputs(q, mx.zeros((1, 1, 5, 64)), mx.zeros((1, 1, 5, 64)), None, "sliding")


def on_a_gpu(monkeypatch, backend: str, run) -> None:
    """impl's dispatchers see a `backend` GPU whose launches `run` takes; MLX itself stays on the CPU."""
    monkeypatch.setattr(gpu, "_run", run)
    monkeypatch.setattr(gpu, "backend", lambda: backend)
    monkeypatch.setattr(mx, "default_device", lambda: mx.gpu)  # what impl's dispatchers ask
    monkeypatch.setattr(native, "_gpu_checked", {})  # no first-use check has run yet


@pytest.mark.parametrize("stored", [None, "float16"])
def test_cached_attention_as_on_a_gpu(monkeypatch, stored):
    """impl's decode attention where MLX's default device is a GPU: layer_kernels.cached_attention
    takes the twin's RoPE and cache append, then impl.flash_attention's GPU kernel (here emulated),
    with a float16 cache under fp32 cast back before it; against the all-twin path (2.5's test)."""
    import impl.layer_kernels as lk
    from impl.kv_cache import KVCache
    from impl.rope import RoPE

    on_a_gpu(monkeypatch, "cuda", emulate_run)
    assert native.gpu_works("flash_attention", (mx.float32, 64, "causal"))  # first use, before the count
    calls = []
    monkeypatch.setattr(gpu, "flash_attention", lambda *a, _f=gpu.flash_attention, **k: calls.append(1) or _f(*a, **k))
    rng = np.random.default_rng(6)
    H, H_kv, D = 6, 2, 64
    rope = RoPE(D, 1024, 10000.0)
    caches = [KVCache(getattr(mx, stored) if stored else None) for _ in range(2)]
    for L in (40, 1, 1, 3):  # a prefill, decode steps, a chunk
        qkv = uniform(rng, (1, L, (H + 2 * H_kv) * D), "float32")[0]
        got = lk.cached_attention(qkv, caches[0], rope, H, H_kv)
        want = lk.cached_attention_mlx(qkv, caches[1], rope, H, H_kv)
        assert_close(got, want, attention_tol("float32"),
                     f"cached attention on the emulated GPU kernel vs twin, {stored or 'float32'} cache, L={L}")
    assert len(calls) == 4, f"the GPU flash attention ran {len(calls)} times, not once per step"
    assert caches[0].keys.dtype == (getattr(mx, stored) if stored else mx.float32)


# Variants the engine runs (fp32 activations on fp16 GGUF scales; the 8-bit head) and the rest.
CHECKED = [("quantized_matmul", (mx.float32, mx.float16, 32, 4)), ("quantized_matmul", (mx.float32, mx.float16, 32, 8)),
           ("quantized_matmul", (mx.bfloat16, mx.float32, 128, 8)), ("flash_attention", (mx.float32, 64, "causal")),
           ("flash_attention", (mx.float16, 80, None)), ("flash_attention", (mx.bfloat16, 128, "array"))]


@pytest.mark.parametrize("kernel, variant", CHECKED, ids=[f"{k}-{'-'.join(map(str, v))}" for k, v in CHECKED])
def test_first_use_check_passes_a_working_kernel(monkeypatch, kernel, variant):
    monkeypatch.setattr(gpu, "_run", emulate_run)
    assert gpu.supports(kernel, variant)
    assert gpu.first_use_check(kernel, variant) is None


def _zeros(kernel, inputs, output_shapes, output_dtypes, stream, launch):  # a kernel that computes nothing
    return [mx.zeros(shape, dtype) for shape, dtype in zip(output_shapes, output_dtypes, strict=True)]


def _no_compiler(*args):
    raise RuntimeError("[metal::Device] Unable to build metal library from source\nerror: use of undeclared identifier")


@pytest.mark.parametrize("broken", [_zeros, _no_compiler], ids=["wrong answer", "does not compile"])
def test_impl_falls_back_to_the_twin_once_a_gpu_kernel_fails(monkeypatch, capsys, broken):
    """On a GPU where a kernel does not compile or computes garbage, impl says so once per kernel
    variant and runs the twin: the chat still answers, slower."""
    on_a_gpu(monkeypatch, "metal", broken)
    w_q, scales, biases = make_weights(6, 64, 32, 4, mx.float16, seed=3)
    x = mx.random.normal((2, 64), key=mx.random.key(3))
    rng = np.random.default_rng(7)
    q, k, v = (uniform(rng, shape, "float32")[0] for shape in ((1, 4, 3, 64), (1, 2, 9, 64), (1, 2, 9, 64)))
    for _ in range(2):
        got = impl.quantize.quantized_matmul(x, w_q, scales, biases, 32, 4)
        assert mx.array_equal(got, quantized_matmul_mlx(x, w_q, scales, biases, 32, 4)), "not the twin's answer"
        got = impl.flash_attention.flash_attention(q, k, v, mask="causal")
        assert mx.array_equal(got, flash_attention_mlx(q, k, v, mask="causal")), "not the twin's answer"
    said = [line for line in capsys.readouterr().err.splitlines() if "first-use check" in line]
    assert len(said) == 2, f"expected one line per failed kernel variant, got {said}"
    assert "metal quantized_matmul kernel (float32, float16, 32, 4)" in said[0], said[0]
    assert "metal flash_attention kernel (float32, 64, causal)" in said[1], said[1]
    reason = "off by" if broken is _zeros else "Unable to build metal library"
    assert all(reason in line for line in said), said


def test_impl_takes_the_twin_for_what_a_gpu_kernel_does_not_compute(monkeypatch, capsys):
    """A variant the GPU kernel lacks (a head of 512) goes to the twin with no warning; one no path
    computes (2-bit weights) is the twin's one-line error, as it is on the CPU."""
    on_a_gpu(monkeypatch, "cuda", _no_compiler)  # which would fail loudly if it were asked
    w_q, scales, biases = make_weights(3, 64, 32, 2, mx.float16, seed=4)
    x = mx.random.normal((1, 64), key=mx.random.key(4))
    with pytest.raises(ValueError, match="quantized_matmul: bits must be 4 or 8, got 2"):
        impl.quantize.quantized_matmul(x, w_q, scales, biases, 32, 2)
    q = mx.random.normal((1, 1, 2, 512), key=mx.random.key(5))
    assert mx.array_equal(impl.flash_attention.flash_attention(q, q, q), flash_attention_mlx(q, q, q))
    assert capsys.readouterr().err == "" and native._gpu_checked == {}


@pytest.mark.parametrize("case", [*(("quantized_matmul", c) for c in BAD_QMM), *(("flash_attention", c) for c in BAD_ATTENTION)],
                         ids=lambda c: " ".join(c) if isinstance(c, tuple) else c)
def test_a_gpu_rejects_what_the_cpu_rejects(monkeypatch, case):
    """The inputs the specs (2.2, 2.4) reject on the CPU get the same one-line error on a GPU, before any kernel."""
    on_a_gpu(monkeypatch, "cuda", _no_compiler)  # which would fail loudly if it were asked
    kernel, name = case
    if kernel == "quantized_matmul":
        call, args, kwargs = impl.quantize.quantized_matmul, bad_qmm_case(name), {}
    else:
        q, k, v, mask = bad_attention_case(name)
        call, args, kwargs = impl.flash_attention.flash_attention, (q, k, v), {"mask": mask}
    with pytest.raises(ValueError, match=f"^{kernel}: ") as e:
        mx.eval(call(*args, **kwargs))
    assert "\n" not in str(e.value), f"{name}: the error is not one line: {e.value}"
