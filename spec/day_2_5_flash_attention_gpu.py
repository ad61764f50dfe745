"""Topic 2.5: flash attention on the GPU, a Metal and a CUDA kernel.

The same contract as topic 2.4 (day_2_4_flash_attention.py): q (B, H, L, D), k/v
(B, H_kv, S, D), grouped heads, mask None / "causal" (lower-right aligned) / an additive
or boolean array, a row that sees no key gives 0, fp32 inside, O(L * D) memory;
`impl.flash_attention.flash_attention` runs the GPU kernel whenever MLX's default device is
a GPU (and the model's decode attention goes through it there).

Every test here runs on the GPU and is marked `gpu`: machines without one skip the file
and PROGRESS.md shows "needs a GPU". Checked, with 2.4's checks and tolerances: kernel ==
twin (flash_attention_mlx) == torch SDPA == the week-1 attention == mx.fast (where its
semantics agree) over Hypothesis-drawn shapes, masks and dtypes; a long context (S > 4096);
a boolean mask; peak memory at L = S = 4096 far below one score matrix. The model on the
GPU kernels (2.3's quantized matmul, this flash attention): its logits match the dequantized
path's and it generates transformers' greedy tokens.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from spec.day_2_2_quantized_matmul import _ops
from spec.day_2_4_flash_attention import (
    MODEL_PROMPTS,
    ONLINE_FP32,
    check_boolean_mask,
    check_drawn_case,
    check_greedy_tokens,
    check_long_context,
    check_peak_memory,
    check_strided_inputs,
    tol_for,
    uniform,
)
from spec.ladder import MODEL_FP32, assert_close

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("on_the_gpu")]  # see conftest.py


@pytest.fixture
def fa(impl):
    return impl.flash_attention


def test_public_entry_runs_a_kernel(impl, fa):
    rng = np.random.default_rng(0)
    q, k, v = (uniform(rng, shape, "float32")[0] for shape in ((1, 4, 70, 64), (1, 2, 90, 64), (1, 2, 90, 64)))
    mx.eval(q, k, v)
    out = fa.flash_attention(q, k, v, mask="causal")
    ops = _ops(out)
    # The twin is dozens of ops (matmuls, exp, max, where per key block); the kernel is one node
    # (plus, at most, the constant inputs it is handed); mx.fast's attention would be its own node.
    assert not {"Matmul", "Exp", "Softmax", "ScaledDotProductAttention"} & set(ops) and len(ops) <= 3, (
        f"expected the GPU kernel in the lazy graph, got {ops}")
    # ... and that node is this project's kernel: bit for bit its output.
    kernel = impl.native.gpu_kernels.flash_attention(q, k, v, mask="causal")
    assert np.array_equal(np.array(out), np.array(kernel)), "impl.flash_attention.flash_attention is not the kernel"
    assert_close(out, fa.flash_attention_mlx(q, k, v, mask="causal"), ONLINE_FP32, "GPU kernel vs twin")


FIRST_USE = [(dtype, 64, mask) for dtype in ("bfloat16", "float16", "float32") for mask in (None, "causal", "array")]
FIRST_USE += [("float32", D, "causal") for D in (32, 80, 128, 256)]


@pytest.mark.parametrize("dtype, D, mask", FIRST_USE, ids=["-".join(map(str, v)) for v in FIRST_USE])
def test_every_variant_passes_the_first_use_check(impl, dtype, D, mask):
    """impl runs its twin, after one line on stderr, where a GPU kernel variant fails its first-use
    check (tiny_llm_kernels.gpu.first_use_check); every variant must pass it, or the other tests
    here would check the twin, not the kernel."""
    variant = (getattr(mx, dtype), D, mask)
    reason = impl.native.gpu_kernels.first_use_check("flash_attention", variant)
    assert reason is None, f"the GPU flash attention fails its first-use check in {variant}: {reason}"


@given(data=st.data())
def test_flash_attention(impl, fa, data):
    check_drawn_case(impl, fa, data)


@pytest.mark.parametrize("L", [1, 64])
@pytest.mark.parametrize("mask", [None, "causal"])
def test_long_context(impl, fa, L, mask):
    check_long_context(impl, fa, L, mask)


def test_boolean_mask(fa):
    check_boolean_mask(fa)


def test_peak_memory_is_far_below_the_scores(impl, fa):
    check_peak_memory(impl, fa)


@pytest.mark.parametrize("L", [1, 33])
def test_strided_inputs(fa, L):
    check_strided_inputs(fa, L)


@pytest.mark.parametrize("dtype, stored", [("float32", None), ("float32", "float16"), ("float16", None)])
def test_cached_attention_runs_on_the_gpu_kernel(impl, dtype, stored):
    # The model's decode attention on a GPU: RoPE, the cache append, then this kernel through
    # impl.flash_attention (the CPU's fused cached_attention primitive is CPU-only). Against the
    # same steps with the pure-MLX flash twin, over a prefill, decode steps and a chunk.
    lk = impl.layer_kernels
    rng = np.random.default_rng(6)
    H, H_kv, D = 6, 2, 64
    rope = impl.rope.RoPE(D, 1024, 10000.0)
    caches = [impl.kv_cache.KVCache(getattr(mx, stored) if stored else None) for _ in range(2)]
    for L in (40, 1, 1, 3, 1):
        qkv = uniform(rng, (1, L, (H + 2 * H_kv) * D), dtype)[0]
        got = lk.cached_attention(qkv, caches[0], rope, H, H_kv)
        want = lk.cached_attention_mlx(qkv, caches[1], rope, H, H_kv)
        assert got.shape == want.shape == (1, L, H * D) and got.dtype == qkv.dtype, f"{got.shape} {got.dtype}"
        assert_close(got, want, tol_for(dtype), f"cached attention on the GPU kernel vs the twin, {dtype}"
                     f" ({stored or dtype} cache), chunk L={L} at offset {caches[0].offset - L}")
    assert caches[0].offset == caches[1].offset == 46


# --- the model on the GPU kernels (2.3's quantized matmul and this topic's attention) ----


@pytest.fixture(scope="module")
def quantized_model(impl, default_model):
    return impl.loader.load_model(default_model, quantized=True)


@pytest.mark.parametrize("text", MODEL_PROMPTS)
def test_model_logits_match_the_dequantized_path(impl, quantized_model, default_model, text):
    dense = impl.loader.load_model(default_model, quantized=False)
    ids = mx.array([quantized_model.tokenizer.encode(text)])
    # As in 2.4: the same weight values and fp32 accumulation, another summation order.
    assert_close(quantized_model.model(ids), dense.model(ids), MODEL_FP32,
                 f"GPU quantized-kernel logits vs dequantized logits for {text!r}")


def test_model_greedy_tokens_match_transformers(impl, quantized_model, default_model):
    check_greedy_tokens(impl, quantized_model, default_model)
