"""tiny_llm_kernels.huge_pages and the loader's use of it: a copy on 2 MB pages has the input's
exact values, shape and dtype, whatever the input's layout; on Linux a large one starts on a 2 MB
boundary (whether the kernel then backs it with huge pages is its choice, not checked); a model
loaded with its weights moved there gives the same logits, bit for bit, as one loaded without."""

import impl  # noqa: F401  (the kernels and the BLAS fix before mlx)

# isort: split
import gc
import sys

import mlx.core as mx
import numpy as np
import pytest

from impl import loader
from impl.native import HUGE_PAGES_MIN, kernels
from impl.quantized_weight import QuantizedWeight

HUGE = 2 << 20


def _address(a: mx.array) -> int:
    """Where a's first byte is: its buffer seen by numpy without a copy (uint8 views only)."""
    return np.asarray(a).ctypes.data


@pytest.mark.parametrize("dtype", [mx.uint8, mx.uint32, mx.float16, mx.bfloat16, mx.float32])
@pytest.mark.parametrize("shape", [(7,), (300, 129), (3, 1024, 1500)])
def test_the_copy_has_the_values_shape_and_dtype(dtype, shape):
    a = mx.random.randint(0, 250, shape, key=mx.random.key(1)).astype(dtype)
    out = kernels.huge_pages(a)
    assert out.shape == a.shape and out.dtype == a.dtype
    assert mx.array_equal(out, a).item()


def test_a_strided_input_is_copied_row_major():
    a = mx.random.normal((1500, 2000), key=mx.random.key(2))
    for view in (a.T, a[:, ::3], a[100:1300, 7:]):
        out = kernels.huge_pages(view)
        assert out.shape == view.shape and mx.array_equal(out, view).item()
        assert np.array_equal(np.asarray(out), np.asarray(view))  # numpy reads out's buffer as row-major


def test_the_copy_outlives_its_input():
    a = mx.random.randint(0, 256, (5 * HUGE,), key=mx.random.key(3)).astype(mx.uint8)
    total = mx.sum(a.astype(mx.uint32)).item()
    out = kernels.huge_pages(a)
    mx.eval(out)
    del a
    gc.collect()
    assert mx.sum(out.astype(mx.uint32)).item() == total


def test_a_large_copy_starts_on_a_2mb_boundary_on_linux():
    a = mx.zeros((3 * HUGE + 12345,), mx.uint8) + 7
    out = kernels.huge_pages(a)
    mx.eval(out)
    if sys.platform.startswith("linux"):  # elsewhere a plain copy, wherever the allocator puts it
        assert _address(out) % HUGE == 0
    assert mx.all(out == 7).item()


def test_the_loaded_model_is_the_same_with_its_weights_on_huge_pages(monkeypatch):
    ids = mx.array([[1, 504, 3146, 314, 260, 1345, 30]])
    monkeypatch.setenv("TINY_LLM_HUGE_PAGES", "0")
    plain = loader.load_model()
    expected = plain.model(ids)
    mx.eval(expected)
    monkeypatch.delenv("TINY_LLM_HUGE_PAGES")
    moved = loader.load_model()
    embedding = moved.model.embed_tokens.weight  # the default model's one weight of 4 MB or more
    assert isinstance(embedding, QuantizedWeight) and embedding.w_q.nbytes >= HUGE_PAGES_MIN
    if sys.platform.startswith("linux"):  # the path was taken: it was moved
        assert _address(embedding.w_q.view(mx.uint8)) % HUGE == 0
    assert mx.array_equal(moved.model(ids), expected).item()
