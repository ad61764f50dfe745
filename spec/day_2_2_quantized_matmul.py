"""Topic 2.2: quantized matmul on the CPU, a C++ kernel that is an MLX primitive.

y = x @ dequantize(w_q, scales, biases).T in MLX's affine format: bits 4 and 8,
group sizes 32/64/128, x in fp32/fp16/bf16, scales and biases in fp16/bf16/fp32
whatever x is (the GGUF model has fp16 scales and fp32 activations), y in x's
dtype, accumulated in fp32.

Checked:
- the kernel (impl.quantize.quantized_matmul, backed by tiny_llm_kernels) against
  its pure-MLX twin (impl.quantize.quantized_matmul_mlx);
- both against mx.quantized_matmul (MLX's own format, run in fp32) and against
  torch in float64 on weights dequantized here with numpy, independently of impl;
- over Hypothesis-drawn shapes (odd M and N, K of one group and more) and on
  SmolLM2-135M's real shapes at M = 1, 16 and 512 (decode and prefill);
- that the kernel is one lazy node in MLX's graph, that (B, L, K) and strided x
  give exactly what the flat contiguous x gives, and that a row's output does not
  depend on the batch it comes in (bit for bit).
- the engine's other C++ CPU kernels, written the same way (an MLX primitive, one
  graph node where the twin is many ops): RMSNorm (twin impl.norm.RMSNorm), RoPE
  (twin impl.rope.RoPE) and SwiGLU on the stacked gate/up output (twin
  impl.layer_kernels.swiglu_mlx), kernel == twin == reference (torch; mx.fast.rope);
  and stacked projections (q/k/v, gate/up: one QuantizedWeight, one matmul) ==
  the separate ones, bit for bit.
- that kernel and twin reject the same bad inputs with the same one-line ValueError:
  the matmul's (check_quantized_matmul), the layer kernels' (check_rms_norm,
  check_rope, check_swiglu, run by the entries before the twin) and the fused
  matmul's residual (fused_linear and its twin take only the output's).
- kernel fusion (impl.fusion): the matmul with an RMSNorm or SwiGLU prologue and a
  residual epilogue in one node == the separate kernels, bit for bit, and == the
  twin (fused_linear_mlx).
- precision="int8" (x rounded to int8 per row per weight group, exact integer dots, fp32 group
  scaling in one order): kernel == twin (quantized_matmul_int8_mlx) bit for bit, over bits 4/8,
  groups 32/64/128, x fp32/fp16/bf16 and SmolLM2's shapes; the twin within a bound derived from
  x's rounding (dx / 2 a value) and the fp32 group scaling of a float64 x @ W.T; a row's bits the
  same alone and among 1..70 rows (drawn); and the entry never falls back by row count.
- the loader keeps the model's weights quantized (no dense copy). The model running on
  all of week 2's kernels together (flash attention and the KV cache too) is checked
  in day_2_4_flash_attention.py, the last of the topics it needs.
fp32 tolerances are derived from the fp32 summation error over K (fp32_sum_bound);
fp16/bf16 ones are the ladder's rungs, each with its reason.
"""

from __future__ import annotations

import functools
import io

import mlx.core as mx
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from spec.day_1_2_rope import rope_tol
from spec.draw import DTYPES
from spec.ladder import (
    BY_DTYPE,
    FP32,
    Tol,
    assert_close,
    to_numpy,
)
from spec.rejects import assert_rejected_alike

NAMES = ("dequantize", "quantized_matmul", "quantized_matmul_mlx")
BUILD = "pip install --no-build-isolation ./kernels  (needs a C++ compiler, cmake, mlx, nanobind>=3,<4)"

# SmolLM2-135M: (what, K, N, bits); GGUF group size 32, Q4_1 layers, Q8_0 tied head.
MODEL_SHAPES = [("q_o_proj", 576, 576, 4), ("k_v_proj", 576, 192, 4), ("gate_up", 576, 1536, 4),
                ("down", 1536, 576, 4), ("tied_head", 576, 49152, 8)]

U32 = 2.0**-24  # fp32 unit roundoff


def fp32_sum_bound(K: int, A: np.ndarray) -> float:
    """How far an fp32 computation of y = sum_k x_k (s q_k + b) can be from the exact value.

    Each term x_k (s q_k + b) meets at most 2 roundings forming w = s*q + b and one
    in the product, then at most K - 1 in the sum, whatever its order (sequential,
    blocked, SIMD lanes, BLAS): n = K + 2 roundings, so the result is within
    gamma_n * A, gamma_n = n u / (1 - n u) (Higham, Accuracy and Stability, 3.1),
    A = sum_k |x_k| (|s q_k| + |b|). Kernel, twin and mx each meet it; two of them
    differ by at most twice that. The bound grows with K because the error does:
    it is derived, not widened by hand.
    """
    n = K + 2
    return n * U32 / (1 - n * U32) * float(A.max())


def fp32_tol(K: int, A: np.ndarray, pairs: int) -> Tol:
    return Tol(atol=pairs * fp32_sum_bound(K, A), rtol=0.0,
               reason=f"fp32 sums over K={K}: {pairs} x gamma_(K+2) max(A), A = |x| @ (|s q| + |b|).T")


def tol_for(dtype: str, K: int, A: np.ndarray, pairs: int) -> Tol:
    # fp16/bf16: the fp32 results (within the bound above) are each rounded once to
    # x's dtype, so they sit within an ulp or two of the output: the ladder's rung
    # (FP16 1e-2, BF16 5e-2 relative) holds them with room.
    return fp32_tol(K, A, pairs) if dtype == "float32" else BY_DTYPE[dtype]


def numpy_dequantize(w_q: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int):
    """(N, K) float64 weights and the (N, K) float64 |s q| + |b|, unpacked here with numpy."""
    w_q = np.array(w_q)
    s = to_numpy(scales)[..., None]
    b = to_numpy(biases)[..., None]
    N = w_q.shape[0]
    shifts = np.arange(0, 32, bits, dtype=np.uint32)  # value i of a word: bits [i*bits, (i+1)*bits)
    q = ((w_q[..., None] >> shifts) & ((1 << bits) - 1)).reshape(N, -1, group_size).astype(np.float64)
    return (s * q + b).reshape(N, -1), (np.abs(s * q) + np.abs(b)).reshape(N, -1)


def make_weights(N: int, K: int, group_size: int, bits: int, scale_dtype, seed: int):
    w = mx.array(np.random.default_rng(seed).standard_normal((N, K)).astype(np.float32))
    w_q, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
    return w_q, scales.astype(scale_dtype), biases.astype(scale_dtype)


def mx_reference(x, w_q, scales, biases, group_size, bits):
    """mx.quantized_matmul on exactly upcast fp32 inputs, rounded to x's dtype. Its CPU
    path accumulates fp16 inputs in fp16 (measured: 7% off at K = 512), so it is the
    reference for the format, in fp32, not for the precision."""
    f32 = [a.astype(mx.float32) for a in (x, scales, biases)]
    y = mx.quantized_matmul(f32[0], w_q, f32[1], f32[2], transpose=True, group_size=group_size, bits=bits)
    return y.astype(x.dtype)


@pytest.fixture(autouse=True, scope="module")
def on_the_cpu():
    """Topic 2.2 is the CPU kernel: run this file on the CPU, also on a machine with a GPU."""
    before = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(before)
    model_case.cache_clear()  # the model shapes' weights are not needed past this file


@pytest.fixture
def quantize(impl):
    """impl.quantize itself (Hypothesis probes a test's first argument; see day_1_7)."""
    return impl.quantize


@pytest.mark.presence
def test_has_names(impl):
    missing = [n for n in NAMES if not hasattr(impl.quantize, n)]
    assert not missing, f"impl.quantize lacks {missing}"


@pytest.mark.presence
def test_kernel_is_built(impl):
    kernels = impl.native.kernels
    assert kernels is not None, f"tiny_llm_kernels is not installed, so the C++ kernel never runs: {BUILD}"
    assert hasattr(kernels, "quantized_matmul"), (
        f"tiny_llm_kernels has no quantized_matmul ({getattr(kernels, 'ext_error', 'old build')}): rebuild: {BUILD}")


def test_kernel_is_one_lazy_node(quantize):
    check_one_lazy_node(quantize)


def check_one_lazy_node(quantize):
    """quantized_matmul leaves one kernel node (not MLX's matmuls) in the lazy graph, == the twin."""
    w_q, scales, biases = make_weights(5, 64, 32, 4, mx.float16, seed=0)
    x = mx.random.normal((3, 64), key=mx.random.key(0))
    mx.eval(x, w_q, scales, biases)
    y = quantize.quantized_matmul(x, w_q, scales, biases, 32, 4)
    ops = _ops(y)
    assert len(ops) == 1 and ops[0] not in ("Matmul", "QuantizedMatmul"), (
        f"expected one kernel primitive waiting in the lazy graph on {mx.default_device()}, got {ops} "
        f"(none: computed eagerly; MLX ops: the twin or mx.quantized_matmul, not the kernel)")
    A = np.abs(to_numpy(x)) @ numpy_dequantize(w_q, scales, biases, 32, 4)[1].T
    assert_close(y, quantize.quantized_matmul_mlx(x, w_q, scales, biases, 32, 4), fp32_tol(64, A, 2),
                 "evaluated kernel vs twin")


@given(data=st.data())
def test_matches_twin_mx_and_torch(quantize, data):
    check_drawn_case(quantize, data)


def check_drawn_case(quantize, data):
    """Draw a case (shapes, bits, group, dtypes); kernel, twin, torch float64 and mx agree. Also day_2_3's."""
    bits = data.draw(st.sampled_from([4, 8]), label="bits")
    group_size = data.draw(st.sampled_from([32, 64, 128]), label="group_size")
    K = group_size * data.draw(st.sampled_from([1, 2, 3, 5]), label="groups (1: K is one group)")
    M = data.draw(st.integers(1, 41), label="M")
    N = data.draw(st.integers(0, 20).map(lambda i: 2 * i + 1), label="N (odd)")
    x_dtype = data.draw(st.sampled_from(sorted(DTYPES)), label="x dtype")
    s_dtype = data.draw(st.sampled_from(["float16", "float32", "bfloat16"]), label="scales dtype")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    w_q, scales, biases = make_weights(N, K, group_size, bits, DTYPES[s_dtype], seed)
    x = mx.array(np.random.default_rng(seed + 1).standard_normal((M, K)).astype(np.float32)).astype(DTYPES[x_dtype])
    what = f"M={M} N={N} K={K} bits={bits} group={group_size} x {x_dtype} scales {s_dtype}"

    got = quantize.quantized_matmul(x, w_q, scales, biases, group_size, bits)
    twin = quantize.quantized_matmul_mlx(x, w_q, scales, biases, group_size, bits)
    assert got.dtype == x.dtype and got.shape == (M, N), f"{what}: got {got.dtype} {got.shape}"
    w64, terms = numpy_dequantize(w_q, scales, biases, group_size, bits)
    x64 = to_numpy(x)
    exact = (torch.from_numpy(x64) @ torch.from_numpy(w64).T).numpy()  # float64: rounding-free reference
    A = np.abs(x64) @ terms.T
    assert_close(got, twin, tol_for(x_dtype, K, A, 2), f"kernel vs twin, {what}")
    assert_close(twin, exact, tol_for(x_dtype, K, A, 1), f"twin vs torch float64, {what}")
    assert_close(got, exact, tol_for(x_dtype, K, A, 1), f"kernel vs torch float64, {what}")
    assert_close(twin, mx_reference(x, w_q, scales, biases, group_size, bits), tol_for(x_dtype, K, A, 2),
                 f"twin vs mx.quantized_matmul, {what}")


@functools.lru_cache(maxsize=1)  # one shape at a time: the head's float64 copy is 226 MB
def model_case(K: int, N: int, bits: int):
    """Weights of one SmolLM2 shape (fp16 scales as in the GGUF) and their numpy dequantization."""
    w_q, scales, biases = make_weights(N, K, 32, bits, mx.float16, seed=K + N)
    w64, terms = numpy_dequantize(w_q, scales, biases, 32, bits)
    return (w_q, scales, biases), torch.from_numpy(w64), torch.from_numpy(terms.astype(np.float32))


@pytest.mark.parametrize("M", [1, 16, 512])
@pytest.mark.parametrize("shape", MODEL_SHAPES, ids=[s[0] for s in MODEL_SHAPES])
def test_model_shapes(impl, shape, M):
    check_model_shape(impl, shape, M)


def check_model_shape(impl, shape, M: int):
    """One of SmolLM2's matmuls at M rows: kernel vs twin, torch float64 and (M = 1) mx."""
    _, K, N, bits = shape
    (w_q, scales, biases), w64, terms = model_case(K, N, bits)
    x = mx.array(np.random.default_rng(M).standard_normal((M, K)).astype(np.float32))  # RMSNorm'd activations
    got = impl.quantize.quantized_matmul(x, w_q, scales, biases, 32, bits)
    twin = impl.quantize.quantized_matmul_mlx(x, w_q, scales, biases, 32, bits)
    x64 = torch.from_numpy(np.array(x)).double()
    exact = x64 @ w64.T
    A = (x64.float().abs() @ terms.T).numpy() * (1 + 1e-3)  # fp32 is plenty for a bound; 1e-3 covers its error
    what = f"{shape[0]} (K={K}, N={N}, {bits}-bit, group 32), M={M}"
    assert_close(got, twin, fp32_tol(K, A, 2), f"kernel vs twin, {what}")
    assert_close(got, exact, fp32_tol(K, A, 1), f"kernel vs torch float64, {what}")
    if M == 1:  # mx.quantized_matmul is a scalar loop (~2 GFLOPS): only where it is quick
        assert_close(got, mx_reference(x, w_q, scales, biases, 32, bits), fp32_tol(K, A, 2),
                     f"kernel vs mx.quantized_matmul, {what}")


@pytest.mark.parametrize("M", [1, 16, 64])
@pytest.mark.parametrize("shape", MODEL_SHAPES[:4], ids=[s[0] for s in MODEL_SHAPES[:4]])
def test_bf16_precision_matches_its_twin(impl, shape, M):
    """precision="bf16" (AVX512-BF16 dot products where the CPU has them, else the fp32 kernels on the
    same rounded operands): the twin rounds x and w to bf16 the same way and its bf16 products are
    exact in fp32, so the two differ only in the order of the fp32 additions: fp32_sum_bound on the
    rounded operands. Against the unrounded float64 product, the bf16 rung (two roundings of 2^-8)."""
    _, K, N, bits = shape
    (w_q, scales, biases), w64, terms = model_case(K, N, bits)
    x = mx.array(np.random.default_rng(M).standard_normal((M, K)).astype(np.float32))
    got = impl.quantize.quantized_matmul(x, w_q, scales, biases, 32, bits, precision="bf16")
    if M < impl.quantize.BF16_MIN_ROWS:  # too few rows to pay: the exact fp32 path
        assert np.array_equal(np.array(got), np.array(impl.quantize.quantized_matmul(x, w_q, scales, biases, 32, bits)))
        return
    raw = impl.native.kernels.quantized_matmul(x, w_q, scales, biases, 32, bits, precision="bf16")
    twin = impl.quantize.quantized_matmul_bf16_mlx(x, w_q, scales, biases, 32, bits)
    xb = np.array(x.astype(mx.bfloat16).astype(mx.float32)).astype(np.float64)
    wb = np.array(impl.quantize.dequantize(w_q, scales, biases, 32, bits).astype(mx.bfloat16).astype(mx.float32))
    A = np.abs(xb) @ np.abs(wb.astype(np.float64)).T
    what = f"{shape[0]} (K={K}, N={N}, {bits}-bit), M={M}, bf16"
    assert np.array_equal(np.array(got), np.array(raw)), f"{what}: the entry did not run the bf16 kernel"
    assert_close(got, twin, fp32_tol(K, A, 2), f"kernel vs twin, {what}")
    exact = (torch.from_numpy(np.array(x)).double() @ w64.T).numpy()
    A_exact = np.abs(np.array(x)).astype(np.float64) @ terms.numpy().astype(np.float64).T
    err = np.abs(np.array(got) - exact) / np.maximum(A_exact, 1e-30)
    assert err.max() <= 2 * 2.0**-8, f"{what}: error {err.max():.3g} of sum |x w| over two bf16 roundings"


def int8_reference(x: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """x (M, K) float32 rounded as precision="int8" rounds it, in numpy (independently of impl): per
    row and group of `group_size`, d = max|x| / 127 (fp32), xq = round(x / d) (fp32 division, ties to
    even, clamped to +-127; 0 where d = 0). Returns x' = d * xq (float64, exact) and, per value, the
    bound of |x - x'|: d / 2 where x / d is exact; fp32's division can move x / d by |x / d| u <= 127 u
    across a .5 and clamping 127.0000x costs as much: d (1/2 + 128 u)."""
    M, K = x.shape
    xg = x.astype(np.float32).reshape(M, K // group_size, group_size)
    d = np.abs(xg).max(-1, keepdims=True) / np.float32(127)
    xq = np.where(d > 0, np.clip(np.rint(xg / np.where(d > 0, d, 1)), -127, 127), 0)
    step = np.broadcast_to(d.astype(np.float64) * (0.5 + 128 * U32), xg.shape)
    return (xq * d.astype(np.float64)).reshape(M, K), step.reshape(M, K)


def int8_bound(x: np.ndarray, w64: np.ndarray, terms: np.ndarray, group_size: int, out_dtype: str) -> np.ndarray:
    """(M, N) bound of |twin - x @ W.T| under precision="int8", derived (x float32 here, w64 the
    float64 weights, terms = |s q| + |b|):
    - x's rounding: |sum_k w_k (x_k - x'_k)| <= sum_k |w_k| |x_k - x'_k| (int8_reference's step);
    - fp32 on x' @ W.T: per group isum is exact, then dw * dx, * isum (2 roundings), dx * sum xq,
      * bias (2), their sum (1), and G - 1 additions over the groups: G + 2 roundings of each
      group's |isum dw dx| + |bias dx sum xq| <= sum_k |x'_k| (|s q_k| + |b|): gamma_(G+2) A';
    - fp16/bf16 x: the output rounded once more to x's dtype: u_out (|x @ W.T| + the above)."""
    xr, step = int8_reference(x, group_size)
    n = x.shape[1] // group_size + 2
    rounding = step @ np.abs(w64).T
    fp32 = n * U32 / (1 - n * U32) * (np.abs(xr) @ terms.T)
    bound = rounding + fp32
    u_out = {"float32": 0.0, "float16": 2.0**-11, "bfloat16": 2.0**-8}[out_dtype]
    return bound + u_out * (np.abs(x.astype(np.float64) @ w64.T) + bound)


INT8_CASES = [(bits, group_size, x_dtype) for bits in (4, 8) for group_size in (32, 64, 128)
              for x_dtype in ("float32", "float16", "bfloat16")]


@pytest.mark.parametrize("bits,group_size,x_dtype", INT8_CASES)
def test_int8_precision_equals_its_twin_within_its_bound(impl, bits, group_size, x_dtype):
    """precision="int8": the kernel computes the twin's integers and its fp32 operations in its
    order (no FMA), so kernel == twin bit for bit; the twin is within int8_bound of float64."""
    # odd M and N: the kernel's tile tails (4 rows, blocks of 16 W rows); K not a multiple of 128
    # where the group allows: the last step of a panel's transpose is partial
    M, K, N = 37, {32: 352, 64: 448, 128: 384}[group_size], 75
    scale_dtype = {"float32": mx.float16, "float16": mx.bfloat16, "bfloat16": mx.float32}[x_dtype]  # each once
    w_q, scales, biases = make_weights(N, K, group_size, bits, scale_dtype, seed=bits * group_size)
    w64, terms = numpy_dequantize(w_q, scales, biases, group_size, bits)
    # Magnitudes over 6 decades along K: dx differs group by group, some groups far below others.
    scale = np.exp(np.linspace(-7, 7, K)).astype(np.float32)
    x = mx.array(np.random.default_rng(bits + group_size).standard_normal((M, K)).astype(np.float32) * scale)
    x = x.astype(DTYPES[x_dtype])
    got = impl.quantize.quantized_matmul(x, w_q, scales, biases, group_size, bits, precision="int8")
    twin = impl.quantize.quantized_matmul_int8_mlx(x, w_q, scales, biases, group_size, bits)
    what = f"{bits}-bit, group {group_size}, x {x_dtype}, scales {scale_dtype}, int8"
    assert got.dtype == x.dtype and got.shape == (M, N), f"{what}: {got.shape} {got.dtype}"
    assert np.array_equal(to_numpy(got), to_numpy(twin)), (
        f"{what}: kernel != twin, max diff {np.abs(to_numpy(got) - to_numpy(twin)).max():.3g} (same bits expected)")
    xf = to_numpy(x).astype(np.float32)
    err = np.abs(to_numpy(twin).astype(np.float64) - xf.astype(np.float64) @ w64.T)
    bound = int8_bound(xf, w64, terms, group_size, x_dtype)
    assert (err <= bound).all(), f"{what}: twin off float64 by {(err / bound).max():.3g} x its derived bound"
    assert err.max() > 0, f"{what}: the exact product: is x rounded at all?"


@pytest.mark.parametrize("M", [1, 16, 64])
@pytest.mark.parametrize("shape", MODEL_SHAPES, ids=[s[0] for s in MODEL_SHAPES])
def test_int8_precision_on_the_model_shapes(impl, shape, M):
    """SmolLM2's matmuls under precision="int8", from decode (M = 1: no fallback to fp32 by row
    count, unlike bf16) to prefill: the entry runs the int8 kernel, == twin bit for bit, and the
    twin within int8_bound of float64."""
    _, K, N, bits = shape
    (w_q, scales, biases), w64, terms = model_case(K, N, bits)
    x = mx.array(np.random.default_rng(M).standard_normal((M, K)).astype(np.float32))
    got = impl.quantize.quantized_matmul(x, w_q, scales, biases, 32, bits, precision="int8")
    raw = impl.native.kernels.quantized_matmul(x, w_q, scales, biases, 32, bits, precision="int8")
    twin = impl.quantize.quantized_matmul_int8_mlx(x, w_q, scales, biases, 32, bits)
    what = f"{shape[0]} (K={K}, N={N}, {bits}-bit), M={M}, int8"
    assert np.array_equal(np.array(got), np.array(raw)), f"{what}: the entry did not run the int8 kernel"
    assert np.array_equal(np.array(got), np.array(twin)), f"{what}: kernel != twin (same bits expected)"
    xf = np.array(x)
    err = np.abs(np.array(twin).astype(np.float64) - (torch.from_numpy(xf).double() @ w64.T).numpy())
    assert (err <= int8_bound(xf, w64.numpy(), terms.numpy().astype(np.float64), 32, "float32")).all(), (
        f"{what}: twin beyond its derived bound")


@given(data=st.data())
def test_int8_precision_gives_a_row_the_same_bits_alone_and_in_any_batch(impl, data):
    """Batch invariance under precision="int8": x is quantized row by row and every output's
    operations do not depend on M, the tile or the task, so a row alone == the same row among
    M = 1..70 others (drawn), bit for bit."""
    bits, group_size = data.draw(st.sampled_from([(4, 32), (4, 128), (8, 64)]), label="bits, group")
    M = data.draw(st.integers(1, 70), label="M")
    row = data.draw(st.integers(0, M - 1), label="row")
    w_q, scales, biases = make_weights(83, 256, group_size, bits, mx.float16, seed=11)
    x = mx.random.normal((M, 256), key=mx.random.key(data.draw(st.integers(0, 99), label="seed")))
    qmm = functools.partial(impl.quantize.quantized_matmul, w_q=w_q, scales=scales, biases=biases,
                            group_size=group_size, bits=bits, precision="int8")
    whole, alone = to_numpy(qmm(x)), to_numpy(qmm(x[row:row + 1]))
    assert np.array_equal(alone, whole[row:row + 1]), (
        f"row {row} alone differs from the same row among {M}: max diff {np.abs(alone - whole[row]).max():.3g}")


@pytest.mark.parametrize("bits", [4, 8])
def test_int8_precision_on_the_smallest_shapes(impl, bits):
    """One group (K = 32), fewer W rows than a block (N = 1, 5), empty x: kernel == twin."""
    for M, K, N in [(1, 32, 1), (3, 32, 5), (2, 64, 17), (0, 32, 5)]:
        w_q, scales, biases = make_weights(N, K, 32, bits, mx.float32, seed=N)
        x = mx.random.normal((M, K), key=mx.random.key(M))
        got = impl.quantize.quantized_matmul(x, w_q, scales, biases, 32, bits, precision="int8")
        twin = impl.quantize.quantized_matmul_int8_mlx(x, w_q, scales, biases, 32, bits)
        assert got.shape == (M, N) and np.array_equal(to_numpy(got), to_numpy(twin)), f"M={M}, K={K}, N={N}"


def test_int8_precision_keeps_a_nan_or_inf_of_x_visible(impl):
    """A NaN or an infinity in x cannot be rounded to int8: its group gets dx = NaN, so that row's
    outputs are NaN (as the fp32 product's are), not finite values hiding it; other rows as before."""
    w_q, scales, biases = make_weights(20, 64, 32, 4, mx.float16, seed=1)
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    x[1, 5], x[2, 40] = np.nan, -np.inf
    got = impl.quantize.quantized_matmul(mx.array(x), w_q, scales, biases, 32, 4, precision="int8")
    twin = impl.quantize.quantized_matmul_int8_mlx(mx.array(x), w_q, scales, biases, 32, 4)
    assert np.isnan(to_numpy(got)[1:3]).all() and np.isfinite(to_numpy(got)[[0, 3]]).all(), "NaN rows"
    assert np.array_equal(to_numpy(got), to_numpy(twin), equal_nan=True), "kernel != twin"


def test_a_bad_precision_is_one_clear_error(impl):
    x, w_q, s, b = mx.zeros((2, 64)), *make_weights(4, 64, 32, 4, mx.float16, seed=0)
    want = "quantized_matmul: precision must be 'fp32', 'bf16' or 'int8', got 'fp8'"
    for call in (impl.quantize.quantized_matmul, impl.native.kernels.quantized_matmul):
        with pytest.raises(ValueError) as e:
            mx.eval(call(x, w_q, s, b, 32, 4, precision="fp8"))
        assert str(e.value) == want, f"{call.__module__}: {e.value}"


@pytest.mark.parametrize("x_dtype", sorted(DTYPES))
def test_batched_and_strided_x(impl, x_dtype):
    check_batched_and_strided_x(impl, x_dtype)


def check_batched_and_strided_x(impl, x_dtype: str):
    """(B, L, K), strided and sliced x give exactly the flat contiguous x's rows."""
    w_q, scales, biases = make_weights(7, 128, 64, 4, mx.float16, seed=3)
    x = mx.random.normal((2, 5, 128), key=mx.random.key(1)).astype(DTYPES[x_dtype])  # (B, L, K)
    qmm = functools.partial(impl.quantize.quantized_matmul, w_q=w_q, scales=scales, biases=biases,
                            group_size=64, bits=4)
    got = qmm(x)
    assert got.shape == (2, 5, 7) and got.dtype == x.dtype, f"{got.shape} {got.dtype}"
    # The same rows, the same arithmetic: exactly equal, whatever the layout.
    flat = qmm(x.reshape(10, 128)).reshape(2, 5, 7)
    assert np.array_equal(to_numpy(got), to_numpy(flat)), "(B, L, K) x differs from the flat (B*L, K) x"
    strided = mx.swapaxes(x, 0, 1)  # (L, B, K), a view that is not row-contiguous
    assert np.array_equal(to_numpy(qmm(strided)), to_numpy(mx.swapaxes(got, 0, 1))), "strided x differs"
    last = x[:, -1, :]  # (B, K): the last position, as in decode
    assert np.array_equal(to_numpy(qmm(last)), to_numpy(got[:, -1, :])), "x[:, -1] differs"


def test_a_row_gives_the_same_bits_alone_and_in_any_batch(impl):
    """Batch invariance: decode (M = 1), a batch of requests and a whole prompt give each
    row bit-identical outputs, so batched == single and chunked == whole prefill hold
    exactly, not just within a tolerance (M here spans the decode and prefill paths)."""
    check_batch_invariance(impl)


def check_batch_invariance(impl):
    """Rows alone and in batches of every size give the same bits."""
    w_q, scales, biases = make_weights(67, 576, 32, 4, mx.float16, seed=5)
    x = mx.random.normal((40, 576), key=mx.random.key(2))
    qmm = functools.partial(impl.quantize.quantized_matmul, w_q=w_q, scales=scales, biases=biases,
                            group_size=32, bits=4)
    whole = to_numpy(qmm(x))
    for lo, hi in [(0, 1), (7, 8), (39, 40), (0, 3), (5, 21), (0, 16), (3, 40)]:
        part = to_numpy(qmm(x[lo:hi]))
        assert np.array_equal(part, whole[lo:hi]), (
            f"rows {lo}:{hi} alone differ from the same rows in the batch of 40:"
            f" max abs diff {np.abs(part - whole[lo:hi]).max():.3g}")


# Twin and kernel take the same inputs: whether the kernels built, or a GPU runs, must not
# change what a call accepts. Each case makes (x, w_q, scales, biases, group_size, bits) from
# x (2, 64) and 4 rows of 64 4-bit values in groups of 32 with fp16 scales.
BAD_QMM = {
    "x of another K": lambda x, w_q, s, b: (mx.zeros((2, 96)), w_q, s, b, 32, 4),
    "a 0-d x": lambda x, w_q, s, b: (mx.array(1.0), w_q, s, b, 32, 4),
    "an int32 x": lambda x, w_q, s, b: (x.astype(mx.int32), w_q, s, b, 32, 4),
    "2 bits": lambda x, w_q, s, b: (x, *make_weights(4, 64, 32, 2, mx.float16, seed=0), 32, 2),
    "group size 16": lambda x, w_q, s, b: (x, w_q, s, b, 16, 4),
    "group size 64 on groups of 32": lambda x, w_q, s, b: (x, w_q, s, b, 64, 4),
    "int32 w_q": lambda x, w_q, s, b: (x, w_q.astype(mx.int32), s, b, 32, 4),
    "int32 scales": lambda x, w_q, s, b: (x, w_q, s.astype(mx.int32), b.astype(mx.int32), 32, 4),
    "scales of another shape": lambda x, w_q, s, b: (x, w_q, s[:, :1], b[:, :1], 32, 4),
}


def bad_qmm_case(name: str) -> tuple:
    """The arguments of BAD_QMM's case `name`."""
    return BAD_QMM[name](mx.zeros((2, 64)), *make_weights(4, 64, 32, 4, mx.float16, seed=0))


@pytest.mark.parametrize("case", list(BAD_QMM))
def test_twin_and_kernel_reject_the_same_inputs(quantize, case):
    # check_quantized_matmul states the contract; the twin calls it, the kernel checks the same in C++.
    calls = {"check_quantized_matmul": quantize.check_quantized_matmul,
             "quantized_matmul": quantize.quantized_matmul, "quantized_matmul_mlx": quantize.quantized_matmul_mlx}
    assert_rejected_alike(calls, lambda: bad_qmm_case(case), "^quantized_matmul: ", case)


@pytest.mark.parametrize("x_shape", [(64,), (2, 3, 64), (0, 64)])
def test_twin_and_kernel_take_any_leading_axes(quantize, x_shape):
    w_q, s, b = make_weights(4, 64, 32, 4, mx.float16, seed=0)
    x = mx.array(np.random.default_rng(1).uniform(-1, 1, x_shape).astype(np.float32))
    got = quantize.quantized_matmul(x, w_q, s, b, 32, 4)
    twin = quantize.quantized_matmul_mlx(x, w_q, s, b, 32, 4)
    assert got.shape == twin.shape == (*x_shape[:-1], 4), f"x {x_shape}: kernel {got.shape}, twin {twin.shape}"
    if x.size:  # (0, 64): the shapes are the check
        A = np.abs(to_numpy(x)) @ numpy_dequantize(w_q, s, b, 32, 4)[1].T
        assert_close(got, twin, fp32_tol(64, A, 2), f"x {x_shape}: kernel vs twin")


# --- the model on the kernels: weights kept quantized ------------------------------------

@pytest.fixture(scope="module")
def quantized_model(impl, default_model):
    return impl.loader.load_model(default_model, quantized=True)


def _linear_weights(model):
    for layer in model.layers:
        a, m = layer.self_attn, layer.mlp
        parts = (a.wq, a.wk, a.wv, a.wqkv, a.wo, m.w_gate, m.w_up, m.w_gate_up, m.w_down)
        yield from (w for w in parts if w is not None)  # stacked (wqkv, w_gate_up) or separate
    yield model.embed_tokens.weight


def test_model_keeps_weights_quantized(impl, quantized_model, default_model):
    check_model_keeps_weights_quantized(impl, quantized_model, default_model)


def check_model_keeps_weights_quantized(impl, quantized_model, default_model):
    """Every linear weight and the embedding stay QuantizedWeight, in no more bytes than the GGUF's."""
    weights = list(_linear_weights(quantized_model.model))
    dense = [type(w).__name__ for w in weights if not isinstance(w, impl.quantized_weight.QuantizedWeight)]
    assert not dense, f"{len(dense)} weights are dense copies: {dense[:3]}"
    total = sum(w.nbytes for w in weights)
    # The GGUF's own bits, re-laid out: Q4_1 is MLX's 4-bit affine format byte for byte, and Q8_0
    # gains at most an fp16 bias per 32 weights (9 bits a weight, not 8.5: +6%). A dense fp32
    # copy would be 5x the file.
    limit = 1.06 * default_model.stat().st_size
    assert total <= limit, f"quantized weights take {total / 1e6:.1f} MB, the GGUF file {limit / 1.06e6:.1f} MB"


# --- the engine's other CPU kernels: RMSNorm and RoPE; stacked projections --------------


def _ops(y: mx.array) -> list[str]:
    """The primitives still to evaluate in y's lazy graph."""
    dot = io.StringIO()
    mx.export_to_dot(dot, y)
    return [line.split('label ="')[1].split('"')[0] for line in dot.getvalue().splitlines() if 'label ="' in line]


@pytest.mark.parametrize("name", ["rms_norm", "rope", "swiglu"])
@pytest.mark.presence
def test_layer_kernel_is_built(impl, name):
    kernels = impl.native.kernels
    assert kernels is not None and hasattr(kernels, name), (
        f"tiny_llm_kernels has no {name} ({getattr(kernels, 'ext_error', 'old build')}): rebuild: {BUILD}")


@given(data=st.data())
def test_rms_norm_kernel_matches_twin_and_torch(impl, data):
    dtype = data.draw(st.sampled_from(sorted(DTYPES)), label="dtype")
    shape = data.draw(st.sampled_from([(1, 1, 576), (2, 5, 64), (7, 8), (3, 1)]), label="shape")
    scale = data.draw(st.sampled_from([1.0, 1000.0]), label="scale (1000: fp16 squares overflow)")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="seed"))
    x = mx.array(rng.uniform(-scale, scale, shape).astype(np.float32)).astype(DTYPES[dtype])
    weight = mx.array(rng.uniform(0.5, 1.5, shape[-1:]).astype(np.float32)).astype(DTYPES[dtype])
    mx.eval(x, weight)
    norm = impl.layer_kernels.KernelRMSNorm(shape[-1], weight, 1e-5)
    got = norm(x)
    assert _ops(got) == ["TinyLLMRMSNorm"], f"expected the kernel as one lazy node, got {_ops(got)}"
    twin = impl.norm.RMSNorm(shape[-1], weight, 1e-5)(x)
    # torch in fp32 on the same rounded values, rounded to x's dtype at the twin's two points.
    x32, w32 = (torch.from_numpy(to_numpy(a)).float() for a in (x, weight))
    t_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    ref = torch.nn.functional.rms_norm(x32, (shape[-1],), eps=1e-5).to(t_dtype) * w32.to(t_dtype)
    assert got.dtype == x.dtype, f"kernel output dtype {got.dtype}, expected {x.dtype}"
    # Same steps in the same dtypes; only the order of the sum of squares may differ: the rung.
    assert_close(got, twin, BY_DTYPE[dtype], f"rms_norm kernel vs twin, {dtype} {shape}")
    assert_close(got, ref, BY_DTYPE[dtype], f"rms_norm kernel vs torch, {dtype} {shape}")


@given(data=st.data())
def test_swiglu_kernel_matches_twin_and_torch(impl, data):
    dtype = data.draw(st.sampled_from(sorted(DTYPES)), label="dtype")
    shape = data.draw(st.sampled_from([(1, 1, 3072), (2, 5, 16), (3, 2), (4, 6)]), label="shape (..., 2I)")
    strided = data.draw(st.booleans(), label="x a transposed view")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="seed"))
    x = mx.array(rng.uniform(-8, 8, shape).astype(np.float32)).astype(DTYPES[dtype])  # past sigmoid's knee
    if strided:  # the same values in column-major order: a view that is not row-contiguous
        x = mx.contiguous(x.T).T
    mx.eval(x)
    got = impl.layer_kernels.swiglu(x)
    assert _ops(got) == ["TinyLLMSwiGLU"], f"expected the kernel as one lazy node, got {_ops(got)}"
    twin = impl.layer_kernels.swiglu_mlx(x)
    I = shape[-1] // 2
    x32 = torch.from_numpy(to_numpy(x)).float()
    t_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    ref = torch.nn.functional.silu(x32[..., :I]).to(t_dtype) * x32[..., I:].to(t_dtype)
    what = f"{dtype} {shape} strided={strided}"
    assert got.dtype == x.dtype and got.shape == (*shape[:-1], I), f"{what}: got {got.dtype} {got.shape}"
    # exp from libm (kernel) vs MLX's own (twin) and torch's: ulps apart, then at most three
    # roundings to x's dtype (sigmoid, gate * sigmoid, * up): the dtype's rung.
    assert_close(got, twin, BY_DTYPE[dtype], f"swiglu kernel vs twin, {what}")
    assert_close(got, ref, BY_DTYPE[dtype], f"swiglu kernel vs torch, {what}")


def _rope_reference(x: mx.array, traditional: bool, base: float, offset: int) -> mx.array:
    """mx.fast.rope in fp32 on (N, L, H, D): it wants the positions on axis -2."""
    y = mx.fast.rope(x.astype(mx.float32).transpose(0, 2, 1, 3), x.shape[-1], traditional=traditional,
                     base=base, scale=1.0, offset=offset)
    return y.transpose(0, 2, 1, 3)


@given(data=st.data())
def test_rope_kernel_matches_twin_and_mx_fast(impl, data):
    dtype = data.draw(st.sampled_from(sorted(DTYPES)), label="dtype")
    traditional = data.draw(st.booleans(), label="traditional")
    N, L, H = (data.draw(st.integers(1, 3), label=n) for n in "NLH")
    D = data.draw(st.sampled_from([2, 8, 64]), label="D")
    base = data.draw(st.sampled_from([10000.0, 100000.0]), label="base")
    offset = data.draw(st.integers(0, 500 - L), label="offset")
    strided = data.draw(st.booleans(), label="x a head slice of a wider array (as from fused q/k/v)")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="seed"))
    wide = mx.array(rng.uniform(-1, 1, (N, L, H + 2, D)).astype(np.float32)).astype(DTYPES[dtype])
    x = wide[:, :, 1:H + 1] if strided else mx.contiguous(wide[:, :, :H])
    mx.eval(x)  # a strided view stays one after evaluation
    kernel_rope = impl.layer_kernels.KernelRoPE(D, 500, base, traditional)
    mx.eval(kernel_rope.cos, kernel_rope.sin)  # the tables, computed once
    got = kernel_rope(x, offset)
    assert _ops(got) == ["TinyLLMRoPE"], f"expected the kernel as one lazy node, got {_ops(got)}"
    twin = impl.rope.RoPE(D, 500, base, traditional)(x, offset)
    what = f"{dtype} traditional={traditional} (N, L, H, D)={(N, L, H, D)} offset={offset} strided={strided}"
    assert got.dtype == x.dtype, f"kernel output dtype {got.dtype}, expected {x.dtype}"
    # The same tables and the same fp32 products and sums, rounded once to x's dtype
    # (the kernel is built without fma contraction): bit for bit.
    assert np.array_equal(to_numpy(got), to_numpy(twin)), f"rope kernel differs from its twin, {what}"
    # mx.fast.rope computes its own angles: the RoPE spec's rung (day_1_2's rope_tol, p < 500).
    assert_close(got, _rope_reference(x, traditional, base, offset), rope_tol(dtype, 500),
                 f"rope kernel vs mx.fast.rope, {what}")


def test_rope_kernel_falls_back_to_the_twin_for_per_sequence_offsets(impl):
    x = mx.random.normal((2, 3, 2, 8), key=mx.random.key(4))
    kernel_rope, twin = impl.layer_kernels.KernelRoPE(8, 64), impl.rope.RoPE(8, 64)
    got, want = kernel_rope(x, [5, 9]), twin(x, [5, 9])
    assert np.array_equal(to_numpy(got), to_numpy(want)), "per-sequence offsets differ from the twin"
    with pytest.raises(ValueError):
        kernel_rope(x, 62)  # positions 62..64 are past the table of 64


# Inputs the layer kernels refuse. The entries reject them whichever path they take: the
# kernel, or the twin after the check_* that words the kernel's checks (kernels not built,
# or off the CPU); the C++ ops themselves are checked for the same words. The week-1 twins on their own are not held to this (bad dtypes are no
# part of week 1). Case names start with the op; "positions" are RoPE's own check, which
# the entry runs on both paths.
_X, _W = mx.ones((2, 8)), mx.ones((8,))
BAD_LAYER = {
    "rms_norm, an int32 x": (_X.astype(mx.int32), _W),
    "rms_norm, a 0-d x": (mx.array(1.0), _W),
    "rms_norm, a (1,) weight": (_X, mx.ones((1,))),  # the week-1 twin would broadcast it
    "rms_norm, a weight of another D": (_X, mx.ones((9,))),
    "rms_norm, a (1, D) weight": (_X, mx.ones((1, 8))),
    "rms_norm, an int32 weight": (_X, _W.astype(mx.int32)),
    "rope, an int32 x": (mx.ones((1, 2, 1, 8), mx.int32), 0),
    "rope, a 3-D x": (mx.ones((2, 1, 8)), 0),
    "rope, x of another D": (mx.ones((1, 2, 1, 16)), 0),
    "rope positions, a negative offset": (mx.ones((1, 2, 1, 8)), -1),
    "rope positions, a negative per-sequence offset": (mx.ones((2, 2, 1, 8)), [-1, 3]),
    "swiglu, an int32 x": (_X.astype(mx.int32),),
    "swiglu, a 0-d x": (mx.array(1.0),),
    "swiglu, an odd last axis": (mx.ones((2, 5)),),
}


def layer_calls(lk, op: str, kernels=None) -> dict:
    """The functions that must reject op's BAD_LAYER cases: on RMSNorm(D = 8), RoPE(8 dims, 16
    positions); with `kernels` (tiny_llm_kernels), the C++ op itself too, whose words the checks give."""
    calls = {
        "rms_norm": {"KernelRMSNorm": lambda x, w: lk.KernelRMSNorm(8, w, 1e-5)(x), "check_rms_norm": lk.check_rms_norm},
        "rope": {"KernelRoPE": lambda x, offset: lk.KernelRoPE(8, 16)(x, offset),
                 "check_rope": lambda x, offset: lk.check_rope(x, 8)},
        "rope positions": {"KernelRoPE": lambda x, offset: lk.KernelRoPE(8, 16)(x, offset)},
        "swiglu": {"swiglu": lk.swiglu, "swiglu_mlx": lk.swiglu_mlx, "check_swiglu": lk.check_swiglu},
    }[op]
    if kernels is not None and op == "rms_norm":
        calls["tiny_llm_kernels.rms_norm"] = lambda x, w: kernels.rms_norm(x, w, 1e-5)
    if kernels is not None and op == "swiglu":
        calls["tiny_llm_kernels.swiglu"] = kernels.swiglu
    if kernels is not None and op == "rope":  # dtype and shape; a D that is not the dims it words by its tables
        tables = lk.KernelRoPE(8, 16)
        calls["tiny_llm_kernels.rope"] = lambda x, offset: kernels.rope(x, tables.cos, tables.sin, offset)
    return calls


# The errors: the kernel's prefix; for positions, whatever RoPE's own (week 1's) words are.
LAYER_ERRORS = {"rms_norm": "^rms_norm: ", "rope": "^rope: ", "swiglu": "^swiglu: ",
                "rope positions": None}  # week 1's RoPE words it (1.2 asks only for a ValueError)


@pytest.mark.parametrize("case", list(BAD_LAYER))
def test_layer_kernels_reject_what_they_cannot_compute(impl, case):
    op = case.split(",")[0]
    kernels = impl.native.kernels if case != "rope, x of another D" else None
    calls = layer_calls(impl.layer_kernels, op, kernels if hasattr(kernels, "rms_norm") else None)
    assert_rejected_alike(calls, lambda: BAD_LAYER[case], LAYER_ERRORS[op], case)


def _quantized_weight(impl, rng, n: int, k: int):
    """A random (n, k) weight as a QuantizedWeight: 4 bits, group 32, fp16 scales, as in the GGUF."""
    w_q, scales, biases = mx.quantize(mx.array(rng.standard_normal((n, k)).astype(np.float32)), group_size=32, bits=4)
    return impl.quantized_weight.QuantizedWeight(w_q, scales.astype(mx.float16), biases.astype(mx.float16), 32, 4)


def test_stacked_projections_match_separate_ones(impl):
    """A Qwen2-like block (q/k/v biases) with q/k/v and gate/up stacked at load: attention gives,
    bit for bit, what the separate projections give (each output of the kernel comes from its
    weight row alone); the MLP too, up to SwiGLU's exp (the kernel's libm vs MLX's)."""
    from types import SimpleNamespace

    E, H, H_kv, D, I = 64, 4, 2, 16, 96
    args = SimpleNamespace(hidden_size=E, intermediate_size=I, num_attention_heads=H, num_key_value_heads=H_kv,
                           head_dim=D, max_position_embeddings=64, rope_theta=10000.0, rms_norm_eps=1e-5)
    rng, p = np.random.default_rng(7), "model.layers.0"
    weights = {f"{p}.input_layernorm.weight": mx.ones((E,)), f"{p}.post_attention_layernorm.weight": mx.ones((E,))}
    for name, (n, k) in {"self_attn.q_proj": (H * D, E), "self_attn.k_proj": (H_kv * D, E),
                         "self_attn.v_proj": (H_kv * D, E), "self_attn.o_proj": (E, H * D),
                         "mlp.gate_proj": (I, E), "mlp.up_proj": (I, E), "mlp.down_proj": (E, I)}.items():
        weights[f"{p}.{name}.weight"] = _quantized_weight(impl, rng, n, k)
        if name[-6] in "qkv" and name.startswith("self_attn"):
            weights[f"{p}.{name}.bias"] = mx.array(rng.standard_normal(n).astype(np.float32))
    fused = impl.loader.fuse_projections(dict(weights), 1)
    stacked = sorted(k for k in fused if "qkv_proj" in k or "gate_up_proj" in k)
    assert stacked == [f"{p}.mlp.gate_up_proj.weight", f"{p}.self_attn.qkv_proj.bias",
                       f"{p}.self_attn.qkv_proj.weight"], f"stacked: {stacked}"
    assert not any(k in fused for k in weights if k.endswith(("q_proj.weight", "gate_proj.weight"))), (
        "the separate projections were kept next to the stacked ones (twice the memory)")
    x = mx.random.normal((2, 3, E), key=mx.random.key(5))
    got, want = impl.model.TransformerBlock(args, fused, p), impl.model.TransformerBlock(args, weights, p)
    a, b = to_numpy(got.self_attn(x)), to_numpy(want.self_attn(x))
    assert np.array_equal(a, b), f"attention on stacked q/k/v differs: max abs diff {np.abs(a - b).max():.3g}"
    a, b = to_numpy(got.mlp(x)), to_numpy(want.mlp(x))
    # silu's exp a few ulps apart, then down_proj's sum of I terms: relative to the output's scale.
    scale = float(np.abs(b).max())
    tol = Tol(atol=FP32.rtol * scale, rtol=FP32.rtol, reason=f"{FP32.reason}; exp in SiLU, summed over I={I}")
    assert_close(a, b, tol, "MLP on stacked gate/up vs separate")


# --- kernel fusion: the quantized matmul with its neighbours in the same node --------------
#
# impl.fusion.fused_linear(x, w, norm=..., swiglu=..., residual=...): RMSNorm or SwiGLU on x
# before the matmul, + residual after it, in the quantized-matmul kernel's node (twin:
# fused_linear_mlx, the separate ops). The fused pieces run the same row loops as the
# RMSNorm and SwiGLU kernels and round the matmul's output to x's dtype before the add,
# as `linear(x, w) + residual` does: so fused == the separate kernels, bit for bit.


@pytest.mark.parametrize("x_dtype", sorted(DTYPES))
@pytest.mark.parametrize("M", [1, 5, 40])  # the fused (decode) and the panel (prefill) paths
def test_fused_matmul_equals_the_separate_kernels(impl, x_dtype, M):
    kernels = impl.native.kernels
    if kernels is None or not hasattr(kernels, "quantized_matmul"):
        pytest.fail(f"tiny_llm_kernels is not built: {BUILD}")
    fusion, lk = impl.fusion, impl.layer_kernels
    dt = DTYPES[x_dtype]
    rng = np.random.default_rng(M)
    K, N = 128, 72
    w = impl.quantized_weight.QuantizedWeight(*make_weights(N, K, 32, 4, mx.float16, seed=M), 32, 4)
    x = mx.array(rng.standard_normal((M, K)).astype(np.float32)).astype(dt)
    gate_up = mx.array(rng.standard_normal((M, 2 * K)).astype(np.float32)).astype(dt)
    r = mx.array(rng.standard_normal((M, N)).astype(np.float32)).astype(dt)
    norm = lk.KernelRMSNorm(K, mx.array(rng.uniform(0.5, 1.5, K).astype(np.float32)).astype(dt), 1e-5)
    twin_norm = impl.norm.RMSNorm(K, norm.weight, 1e-5)
    mx.eval(w.w_q, w.scales, w.biases, x, gate_up, r, norm.weight)  # so that _ops sees only what is fused
    cases = {  # name: (fused, the separate kernels, the twin, the matmul's input)
        "rms_norm": (fusion.fused_linear(x, w, norm=norm), w.matmul_t(norm(x)),
                     fusion.fused_linear_mlx(x, w, norm=twin_norm), twin_norm(x)),
        "swiglu": (fusion.fused_linear(gate_up, w, swiglu=True), w.matmul_t(lk.swiglu(gate_up)),
                   fusion.fused_linear_mlx(gate_up, w, swiglu=True), lk.swiglu(gate_up)),
        "residual": (fusion.fused_linear(x, w, residual=r), w.matmul_t(x) + r,
                     fusion.fused_linear_mlx(x, w, residual=r), x),
        "swiglu + residual": (fusion.fused_linear(gate_up, w, swiglu=True, residual=r),
                              w.matmul_t(lk.swiglu(gate_up)) + r,
                              fusion.fused_linear_mlx(gate_up, w, swiglu=True, residual=r), lk.swiglu(gate_up)),
    }
    w_abs = numpy_dequantize(w.w_q, w.scales, w.biases, 32, 4)[1]  # |s q| + |b|, (N, K)
    for name, (fused, separate, twin, x_in) in cases.items():
        what = f"{name}, M={M}, {x_dtype}"
        assert _ops(fused) == ["TinyLLMQuantizedMatmul"], f"{what}: not one node: {_ops(fused)}"
        assert fused.dtype == dt and fused.shape == (M, N), f"{what}: {fused.dtype} {fused.shape}"
        assert np.array_equal(to_numpy(fused), to_numpy(separate)), (
            f"{what}: fused differs from the separate kernels by {np.abs(to_numpy(fused) - to_numpy(separate)).max():.3g}")
        # The twin runs the pure-MLX ops: fp32 sums over K in another order, on a normalized or
        # gated x whose few-ulp differences are far inside that bound; or the ladder's rung.
        A = np.abs(to_numpy(x_in).astype(np.float32)) @ w_abs.T
        assert_close(fused, twin, tol_for(x_dtype, K, A, 2), f"fused kernel vs twin, {what}")


@pytest.mark.parametrize("residual", ["(N,), broadcast", "(1, N), broadcast", "float16 under float32", "(M, N + 1)"])
def test_fused_linear_and_twin_take_only_the_outputs_residual(impl, residual):
    # The kernel adds the residual into its output as it writes it: exactly the output's shape
    # and dtype. The twin holds the same line, so that a model runs alike with or without kernels.
    w = impl.quantized_weight.QuantizedWeight(*make_weights(8, 64, 32, 4, mx.float16, seed=0), 32, 4)
    x = mx.ones((2, 64))
    r = {"(N,), broadcast": mx.zeros((8,)), "(1, N), broadcast": mx.zeros((1, 8)),
         "float16 under float32": mx.zeros((2, 8), mx.float16), "(M, N + 1)": mx.zeros((2, 9))}[residual]
    calls = {"fused_linear": impl.fusion.fused_linear, "fused_linear_mlx": impl.fusion.fused_linear_mlx}
    assert_rejected_alike({name: lambda x, fn=fn: fn(x, w, residual=r) for name, fn in calls.items()},
                          lambda: (x,), "^quantized_matmul: residual", residual)


@pytest.mark.presence
def test_fused_matmul_rejects_bad_pieces(impl):
    kernels = impl.native.kernels
    w_q, scales, biases = make_weights(8, 64, 32, 4, mx.float16, seed=0)
    x = mx.zeros((2, 64))
    bad = {
        "both prologues": dict(x=x, norm_weight=mx.ones((64,)), swiglu=True),
        "norm weight size": dict(x=x, norm_weight=mx.ones((32,))),
        "swiglu width": dict(x=x, swiglu=True),  # 64 = 2 * 32, but w_q holds K = 64
        "residual shape": dict(x=x, residual=mx.zeros((2, 9))),
        "residual dtype": dict(x=x, residual=mx.zeros((2, 8), mx.float16)),
    }
    for what, kw in bad.items():
        x_ = kw.pop("x")
        with pytest.raises(ValueError, match="quantized_matmul: ") as e:
            kernels.quantized_matmul(x_, w_q, scales, biases, 32, 4, **kw)
        assert "\n" not in str(e.value), f"{what}: the error is not one line"


# --- GGUF k-quants as the file stores them: Q4_K and Q6_K (impl.kquant) -------------------
# tiny_llm_kernels.kquant_matmul multiplies x by the file's blocks (no triple, no requantized
# Q6_K). Checked: the twin's MLX decoding == the gguf package's dequantize, bit for bit (random and
# crafted blocks); kernel == twin and both == float64 numpy on gguf's weights, for x as given
# ("fp32" mode) and for x rounded to int8 per 256 values ("int8" mode, llama.cpp's Q8_K
# activations), that rounding recomputed here with numpy; int8 mode within its stated bound of the
# exact product; fused pieces and stacked Q4_K + Q6_K rows == the separate kernels, bit for bit.

KQUANTS = ("Q4_K", "Q6_K")


def kquant_rows(qtype: str, N: int, K: int, seed: int, crafted: bool = False) -> np.ndarray:
    """(N, K / 256 * block bytes) uint8 rows of random blocks with scales of a model's size (|d| ~ 1e-3,
    so that a row's sum is of order 1), crafted blocks (every fp16 extreme as d, dmin; bytes all 0,
    all 0xFF, 0x80, 0x7F) first if `crafted`."""
    from spec.day_1_5_model import crafted_blocks, random_blocks

    n = N * K // 256
    blocks = random_blocks(qtype, n, seed)
    for at in BLOCKS_F16[qtype]:
        d = np.random.default_rng(seed + 1).uniform(-2e-3, 2e-3, n).astype(np.float16)
        blocks[:, at:at + 2] = d.view(np.uint8).reshape(n, 2)
    if crafted:
        c = crafted_blocks(qtype)[:n]
        blocks[:len(c)] = c
    return blocks.reshape(N, -1)


BLOCKS_F16 = {"Q4_K": (0, 2), "Q6_K": (208,)}


def gguf_weights(rows: np.ndarray, qtype: str) -> np.ndarray:
    """(N, K) float64: the gguf package's dequantize (llama.cpp's values), independent of impl."""
    from spec.day_1_5_model import BLOCKS, gguf_reference

    return gguf_reference(rows.reshape(-1, BLOCKS[qtype][1]), qtype).reshape(rows.shape[0], -1).astype(np.float64)


def int8_rounded(x: np.ndarray) -> np.ndarray:
    """x rounded as "int8" mode rounds it, in numpy: per 256 values d = max|x| / 127 (fp32),
    d * round(x / d), ties to even; and the per-value bound of that rounding, d / 2."""
    xb = x.astype(np.float32).reshape(*x.shape[:-1], -1, 256)
    d = np.abs(xb).max(-1, keepdims=True) / np.float32(127)
    q = np.where(d > 0, np.rint(xb / np.where(d > 0, d, 1)), 0)
    return (q * d).reshape(x.shape), np.broadcast_to(d / 2, xb.shape).reshape(x.shape)


@pytest.mark.presence
def test_kquant_kernel_is_built(impl):
    kernels = impl.native.kernels
    assert kernels is not None and hasattr(kernels, "kquant_matmul"), (
        f"tiny_llm_kernels has no kquant_matmul ({getattr(kernels, 'ext_error', 'old build')}): rebuild: {BUILD}")


@pytest.mark.parametrize("qtype", KQUANTS)
def test_kquant_twin_decodes_like_gguf(impl, qtype):
    """impl.kquant.dequantize_kquant (MLX ops on the file's bytes) == gguf's dequantize, bit for bit,
    including fp16 extremes as d and dmin and all-zero / all-max quants and scales."""
    from spec.day_1_5_model import assert_bits_equal, crafted_blocks, gguf_reference, random_blocks

    for name, blocks in {"random": random_blocks(qtype, 64, seed=1), "crafted": crafted_blocks(qtype)}.items():
        rows = blocks.reshape(2 if name == "random" else 1, -1)  # several blocks a row
        got = impl.kquant.dequantize_kquant(mx.array(rows), qtype)
        assert_bits_equal(np.array(got), gguf_reference(blocks, qtype).reshape(got.shape), f"{qtype} {name}")


@pytest.mark.parametrize("qtype", KQUANTS)
@pytest.mark.parametrize("x_int8", [False, True], ids=["fp32", "int8"])
@pytest.mark.parametrize("M", [1, 3, 40])  # decode (integer dots in int8 mode) and prefill (fp32 panels)
def test_kquant_matmul_matches_twin_and_gguf(impl, qtype, x_int8, M):
    """kernel == twin == x' @ W.T in float64, W from gguf's dequantize and x' = x (fp32 mode) or x
    rounded to int8 per 256 values, recomputed here (int8 mode)."""
    K, N = 512, 40
    rows = kquant_rows(qtype, N, K, seed=M, crafted=True)
    w = gguf_weights(rows, qtype)
    x = np.random.default_rng(M).standard_normal((M, K)).astype(np.float32)
    xr, _ = int8_rounded(x) if x_int8 else (x, None)
    parts = [mx.array(rows)]
    got = impl.kquant.kquant_matmul(mx.array(x), parts, [qtype], x_int8)
    twin = impl.kquant.kquant_matmul_mlx(mx.array(x), parts, [qtype], x_int8)
    want = xr.astype(np.float64) @ w.T
    # Every weight and every rounded x is exact in fp32 (11-bit d times a 6/8-bit scale times a
    # 4/6-bit q; int8 mode: an int8 times d, up to one rounding): what remains is fp32 sums over K.
    A = np.abs(xr).astype(np.float64) @ np.abs(w).T
    what = f"{qtype}, {'int8' if x_int8 else 'fp32'} x, M={M}"
    assert_close(got, twin, fp32_tol(K, A, 2), f"kernel vs twin, {what}")
    assert_close(twin, want, fp32_tol(K, A, 1), f"twin vs float64, {what}")


@pytest.mark.parametrize("qtype", KQUANTS)
def test_kquant_int8_mode_stays_within_its_bound(impl, qtype):
    """int8 mode moves each x by at most d / 2 (d = max|x| / 127 of its 256 values), so y moves by at
    most sum_k d_k / 2 |w_k| from the exact x @ W.T (impl.kquant's stated bound), plus fp32 sums."""
    K, N = 1536, 64
    rows = kquant_rows(qtype, N, K, seed=7)
    w = gguf_weights(rows, qtype)
    x = (np.random.default_rng(7).standard_normal((1, K)) * np.exp(np.linspace(-3, 3, K))).astype(np.float32)
    got = to_numpy(impl.kquant.kquant_matmul(mx.array(x), [mx.array(rows)], [qtype], True)).astype(np.float64)
    xr, half_step = int8_rounded(x)
    bound = half_step.astype(np.float64) @ np.abs(w).T
    A = np.abs(xr).astype(np.float64) @ np.abs(w).T
    err = np.abs(got - x.astype(np.float64) @ w.T)
    assert (err <= bound + 2 * fp32_sum_bound(K, A)).all(), f"{qtype}: error {err.max():.3g} over the bound"
    assert err.max() > 0, "int8 mode gave the exact product: is x rounded at all?"


@pytest.mark.parametrize("x_int8", [False, True], ids=["fp32", "int8"])
def test_kquant_stacked_rows_and_fused_pieces_equal_the_separate_kernels(impl, x_int8):
    """A stacked q/k/v of Q4_K and Q6_K rows (two parts, one node) == each part alone, and the fused
    RMSNorm / SwiGLU / residual == the separate kernels, bit for bit: a row's arithmetic does not
    depend on the rows beside it."""
    K = 512
    fusion, lk, kw = impl.fusion, impl.layer_kernels, impl.kquant_weight
    parts = [kw.KQuantWeight((mx.array(kquant_rows(t, n, K, seed=n)),), (t,), x_int8) for t, n in
             (("Q4_K", 24), ("Q4_K", 8), ("Q6_K", 8))]
    stacked = kw.KQuantWeight.stack(parts)
    assert stacked.types == ("Q4_K", "Q6_K") and stacked.shape == (40, K), f"{stacked.types} {stacked.shape}"
    rng = np.random.default_rng(0)
    for M in (1, 5, 40):
        x = mx.array(rng.standard_normal((M, K)).astype(np.float32))
        whole = to_numpy(stacked.matmul_t(x))
        alone = np.concatenate([to_numpy(p.matmul_t(x)) for p in parts], axis=-1)
        assert np.array_equal(whole, alone), f"M={M}: stacked rows differ from the parts by {np.abs(whole - alone).max()}"
        gate_up = mx.array(rng.standard_normal((M, 2 * K)).astype(np.float32))
        r = mx.array(rng.standard_normal((M, 40)).astype(np.float32))
        norm = lk.KernelRMSNorm(K, mx.array(rng.uniform(0.5, 1.5, K).astype(np.float32)), 1e-5)
        cases = {"rms_norm + residual": (fusion.fused_linear(x, stacked, norm=norm, residual=r),
                                         stacked.matmul_t(norm(x)) + r),
                 "swiglu": (fusion.fused_linear(gate_up, stacked, swiglu=True), stacked.matmul_t(lk.swiglu(gate_up)))}
        for name, (fused, separate) in cases.items():
            assert _ops(fused) == ["TinyLLMKQuantMatmul"], f"{name}, M={M}: not one node: {_ops(fused)}"
            assert np.array_equal(to_numpy(fused), to_numpy(separate)), f"{name}, M={M}: fused != separate"


@pytest.mark.parametrize("case", ["K", "type", "part width", "part dtype", "x dtype", "lengths"])
def test_kquant_twin_and_kernel_reject_the_same_inputs(impl, case):
    kq = impl.kquant
    ok = mx.array(kquant_rows("Q4_K", 4, 256, seed=0))
    x, parts, types = mx.zeros((1, 256)), [ok], ["Q4_K"]
    if case == "K":
        x = mx.zeros((1, 128))
    elif case == "type":
        types = ["Q5_K"]
    elif case == "part width":
        parts = [ok[:, :100]]
    elif case == "part dtype":
        parts = [ok.astype(mx.int32)]
    elif case == "x dtype":
        x = mx.zeros((1, 256), mx.int32)
    else:
        types = ["Q4_K", "Q6_K"]
    assert_rejected_alike({"kernel": kq.kquant_matmul, "twin": kq.kquant_matmul_mlx},
                          lambda: (x, parts, types), "^kquant_matmul: ", case)


def test_real_kquant_model_keeps_the_files_blocks(impl, coder_gguf):
    """Qwen2.5-Coder-0.5B (Q4_K, Q6_K, Q5_0, Q8_0 tensors) loaded for week 2's kernels keeps each 2-D
    Q4_K and Q6_K tensor as a KQuantWeight of the file's bytes, in the mode asked for. (Its logits
    need flash attention too: day_2_4_flash_attention.py checks them.)"""
    kw = impl.kquant_weight
    for mode in ("fp32", "int8"):
        loaded = impl.loader.load_model(coder_gguf, quantized=True, kquant=mode)
        native = [w for w in _linear_weights(loaded.model) if isinstance(w, kw.KQuantWeight)]
        assert len(native) >= 24, f"{mode}: only {len(native)} weights kept as k-quant blocks"  # 1+ a layer
        assert all(w.x_int8 == (mode == "int8") for w in native), f"{mode}: a weight in the other mode"
