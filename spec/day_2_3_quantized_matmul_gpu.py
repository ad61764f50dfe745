"""Topic 2.3: quantized matmul on the GPU, a Metal and a CUDA kernel.

The same contract as topic 2.2 (day_2_2_quantized_matmul.py): y = x @ dequantize(w_q,
scales, biases).T in MLX's affine format (bits 4 and 8, groups 32/64/128), x in
fp32/fp16/bf16, y in x's dtype, fp32 accumulation; `impl.quantize.quantized_matmul` runs
the GPU kernel whenever MLX's default device is a GPU.

Every test here runs on the GPU (MLX's default device set to it) and is marked `gpu`:
machines without one skip the file and PROGRESS.md shows "needs a GPU". Checked, with
2.2's checks and tolerances: the GPU kernel is one node of MLX's lazy graph; kernel ==
twin (impl.quantize.quantized_matmul_mlx) == mx.quantized_matmul == torch float64 over
Hypothesis-drawn shapes; SmolLM2-135M's shapes at M = 1, 16, 512; batched and strided x;
a row's bits do not depend on its batch; the model on the GPU keeps its weights quantized.
The model running on the GPU kernels (logits, greedy tokens) needs flash attention too: it
is checked in day_2_5_flash_attention_gpu.py, as 2.4 checks the CPU engine.
"""

from __future__ import annotations

import mlx.core as mx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from spec.day_2_2_quantized_matmul import (
    MODEL_SHAPES,
    check_batch_invariance,
    check_batched_and_strided_x,
    check_drawn_case,
    check_model_keeps_weights_quantized,
    check_model_shape,
    check_one_lazy_node,
)
from spec.draw import DTYPES

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("on_the_gpu")]  # see conftest.py
BUILD = "pip install --no-build-isolation ./kernels  (the GPU kernels are sources in tiny_llm_kernels/gpu_src)"


@pytest.fixture
def quantize(impl):
    return impl.quantize


def test_gpu_kernels_are_built(impl):
    gpu = getattr(impl.native, "gpu_kernels", None)
    assert gpu is not None, f"tiny_llm_kernels.gpu is missing, so the GPU kernel never runs: {BUILD}"
    assert gpu.backend() in ("metal", "cuda"), f"MLX has a GPU but tiny_llm_kernels.gpu sees {gpu.backend()}"


FIRST_USE = [(x, bits, group) for x in sorted(DTYPES) for bits in (4, 8) for group in (32, 64, 128)]


@pytest.mark.parametrize("x_dtype, bits, group_size", FIRST_USE, ids=["-".join(map(str, v)) for v in FIRST_USE])
def test_every_variant_passes_the_first_use_check(impl, x_dtype, bits, group_size):
    """impl runs its twin, after one line on stderr, where a GPU kernel variant fails its first-use
    check (tiny_llm_kernels.gpu.first_use_check); every variant must pass it, or the other tests
    here would check the twin, not the kernel."""
    variant = (DTYPES[x_dtype], mx.float16, group_size, bits)  # float16 scales, as the GGUF loader gives
    reason = impl.native.gpu_kernels.first_use_check("quantized_matmul", variant)
    assert reason is None, f"the GPU quantized matmul fails its first-use check in {variant}: {reason}"


def test_kernel_is_one_lazy_node(quantize):
    check_one_lazy_node(quantize)


@given(data=st.data())
def test_matches_twin_mx_and_torch(quantize, data):
    check_drawn_case(quantize, data)


@pytest.mark.parametrize("M", [1, 16, 512])
@pytest.mark.parametrize("shape", MODEL_SHAPES, ids=[s[0] for s in MODEL_SHAPES])
def test_model_shapes(impl, shape, M):
    check_model_shape(impl, shape, M)


@pytest.mark.parametrize("x_dtype", sorted(DTYPES))
def test_batched_and_strided_x(impl, x_dtype):
    check_batched_and_strided_x(impl, x_dtype)


def test_a_row_gives_the_same_bits_alone_and_in_any_batch(impl):
    check_batch_invariance(impl)


@pytest.fixture(scope="module")
def quantized_model(impl, default_model):
    return impl.loader.load_model(default_model, quantized=True)


def test_model_keeps_weights_quantized(impl, quantized_model, default_model):
    check_model_keeps_weights_quantized(impl, quantized_model, default_model)
