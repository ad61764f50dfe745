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

from spec.draw import DTYPES
from spec.ladder import BY_DTYPE, Tol, assert_close, to_numpy

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


def test_has_names(impl):
    missing = [n for n in NAMES if not hasattr(impl.quantize, n)]
    assert not missing, f"impl.quantize lacks {missing}"


def test_kernel_is_built(impl):
    kernels = impl.native.kernels
    assert kernels is not None, f"tiny_llm_kernels is not installed, so the C++ kernel never runs: {BUILD}"
    assert hasattr(kernels, "quantized_matmul"), (
        f"tiny_llm_kernels has no quantized_matmul ({getattr(kernels, 'ext_error', 'old build')}): rebuild: {BUILD}")


def test_kernel_is_one_lazy_node(quantize):
    w_q, scales, biases = make_weights(5, 64, 32, 4, mx.float16, seed=0)
    x = mx.random.normal((3, 64), key=mx.random.key(0))
    mx.eval(x, w_q, scales, biases)
    y = quantize.quantized_matmul(x, w_q, scales, biases, 32, 4)
    dot = io.StringIO()
    mx.export_to_dot(dot, y)  # the graph still to evaluate: labels are primitive names
    ops = [line.split('label ="')[1].split('"')[0] for line in dot.getvalue().splitlines() if 'label ="' in line]
    assert len(ops) == 1 and ops[0] not in ("Matmul", "QuantizedMatmul"), (
        f"expected one kernel primitive waiting in the lazy graph, got {ops} "
        f"(none: computed eagerly; MLX ops: the twin or mx.quantized_matmul, not the kernel)")
    A = np.abs(to_numpy(x)) @ numpy_dequantize(w_q, scales, biases, 32, 4)[1].T
    assert_close(y, quantize.quantized_matmul_mlx(x, w_q, scales, biases, 32, 4), fp32_tol(64, A, 2),
                 "evaluated kernel vs twin")


@given(data=st.data())
def test_matches_twin_mx_and_torch(quantize, data):
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


@pytest.mark.parametrize("x_dtype", sorted(DTYPES))
def test_batched_and_strided_x(impl, x_dtype):
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


def test_rejects_mismatched_k(impl):
    w_q, scales, biases = make_weights(4, 64, 32, 4, mx.float16, seed=0)
    with pytest.raises(ValueError):
        mx.eval(impl.quantize.quantized_matmul(mx.zeros((2, 96)), w_q, scales, biases, 32, 4))


# --- the model on the kernels: weights kept quantized ------------------------------------

MODEL_PROMPTS = ["The capital of France is", "def fibonacci(n):\n    if n < 2:"]


@pytest.fixture(scope="module")
def quantized_model(impl, default_model):
    return impl.loader.load_model(default_model, quantized=True)


@pytest.fixture(scope="module")
def dense_model(impl, default_model):
    return impl.loader.load_model(default_model, quantized=False)


def _linear_weights(model):
    for layer in model.layers:
        a, m = layer.self_attn, layer.mlp
        yield from (a.wq, a.wk, a.wv, a.wo, m.w_gate, m.w_up, m.w_down)
    yield model.embed_tokens.weight


def test_model_keeps_weights_quantized(impl, quantized_model):
    weights = list(_linear_weights(quantized_model.model))
    dense = [type(w).__name__ for w in weights if not isinstance(w, impl.quantized_weight.QuantizedWeight)]
    assert not dense, f"{len(dense)} weights are dense copies: {dense[:3]}"
    total = sum(w.nbytes for w in weights)
    # Q4_1 layers and the Q8_0 embedding: ~98 MB in the GGUF; a dense fp32 copy would be ~540 MB.
    assert total < 110e6, f"quantized weights take {total / 1e6:.0f} MB"


@pytest.mark.parametrize("text", MODEL_PROMPTS)
def test_model_logits_match_the_dequantized_path(quantized_model, dense_model, text):
    ids = mx.array([quantized_model.tokenizer.encode(text)])
    # The same weight values (scale * q + bias in fp32) and fp32 accumulation on both paths;
    # only summation order differs (and flash attention's online softmax), so the week-1
    # model rung applies unchanged.
    from spec.ladder import MODEL_FP32

    assert_close(quantized_model.model(ids), dense_model.model(ids), MODEL_FP32,
                 f"quantized-kernel logits vs dequantized logits for {text!r}")


def test_model_greedy_tokens_match_transformers(impl, quantized_model, default_model):
    from reference.models import hf_folder_from_gguf, transformers_model
    from spec.ladder import GREEDY_MARGIN

    loaded, steps = quantized_model, 16
    ids = loaded.tokenizer.encode(loaded.chat_template.render([{"role": "user", "content": "Name three colors."}]))
    x = torch.tensor([ids])
    out = transformers_model(str(hf_folder_from_gguf(default_model))).generate(
        x, attention_mask=torch.ones_like(x), max_new_tokens=steps, do_sample=False, output_scores=True,
        return_dict_in_generate=True, pad_token_id=2, eos_token_id=None)
    want = out.sequences[0, len(ids):].tolist()
    gaps = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
    got = impl.generate.generate_step_cached(loaded.model, ids)  # KV cache + both kernels
    for i in range(steps):
        if gaps[i] < GREEDY_MARGIN:
            print(f"compared {i} tokens; step {i} has top-2 gap {gaps[i]:.2e}")
            break
        token = next(got)
        assert token == want[i], f"step {i}: got {token}, transformers {want[i]} (its top-2 gap {gaps[i]:.3g})"
