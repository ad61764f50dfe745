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
a boolean mask; peak memory at L = S = 4096 far below one score matrix.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from spec.day_2_2_quantized_matmul import _ops
from spec.day_2_4_flash_attention import (
    ONLINE_FP32,
    check_boolean_mask,
    check_drawn_case,
    check_long_context,
    check_peak_memory,
    uniform,
)
from spec.ladder import assert_close

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("on_the_gpu")]  # see conftest.py


@pytest.fixture
def fa(impl):
    return impl.flash_attention


def test_public_entry_runs_a_kernel(fa):
    rng = np.random.default_rng(0)
    q, k, v = (uniform(rng, shape, "float32")[0] for shape in ((1, 4, 70, 64), (1, 2, 90, 64), (1, 2, 90, 64)))
    mx.eval(q, k, v)
    out = fa.flash_attention(q, k, v, mask="causal")
    ops = _ops(out)
    # The twin is dozens of ops (matmuls, exp, max, where per key block); the kernel is one node
    # (plus, at most, the constant inputs it is handed).
    assert not {"Matmul", "Exp", "Softmax"} & set(ops) and len(ops) <= 3, (
        f"expected the GPU kernel in the lazy graph, got {ops}")
    assert_close(out, fa.flash_attention_mlx(q, k, v, mask="causal"), ONLINE_FP32, "GPU kernel vs twin")


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
