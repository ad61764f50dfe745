"""The engine's quantized-matmul kernel on every code path this CPU can run.

The 2.2 spec checks the kernel as a user gets it: the best instruction set, and the
path (fused or dequantized panel) that set picks for each M. These tests force each
instruction set (portable, AVX2, AVX-512) and each path in turn, so that no code the
kernel ships goes unchecked because another path is faster here (AVX-512 never picks
the panels, for one). Each result is checked against float64 numpy on the same
weights, and the two paths against each other: they are meant to give the same bits.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import impl  # noqa: F401  (loads tiny_llm_kernels and the BLAS fix before mlx is used)
from impl.native import kernels
from spec.day_2_2_quantized_matmul import make_weights, numpy_dequantize, tol_for
from spec.ladder import assert_close, to_numpy
from tests.kernel_paths import isa_fixture

ISAS = ["portable", "avx2", "avx512"]
PATHS = {"fused": 0, "panel": 1}  # panel_min_m: 0 never panels, 1 always


isa = isa_fixture("quantized_matmul_configure")


def run(x, w, path: str):
    """x @ dequantize(w).T on the given path (evaluated before the path is switched back)."""
    kernels.quantized_matmul_configure("", PATHS[path])
    y = kernels.quantized_matmul(x, *w[:3], group_size=w[3], bits=w[4])
    mx.eval(y)
    return y


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, 64), (4, 128), (8, 32), (8, 128)])
@pytest.mark.parametrize("x_dtype", ["float32", "float16", "bfloat16"])
def test_both_paths_match_numpy_and_each_other(isa, bits, group_size, x_dtype):
    K, N = 384, 75  # N odd: the kernels' tails (tiles of 8 and 4 rows, then single rows)
    w_q, scales, biases = make_weights(N, K, group_size, bits, mx.float16, seed=bits + group_size)
    w_ref, a = numpy_dequantize(w_q, scales, biases, group_size, bits)
    x = mx.random.normal((40, K), key=mx.random.key(7)).astype(getattr(mx, x_dtype))
    xf = to_numpy(x).astype(np.float64)
    want = xf @ w_ref.T
    tol = tol_for(x_dtype, K, np.abs(xf) @ a.T, pairs=1)
    w = (w_q, scales, biases, group_size, bits)
    got = {path: run(x, w, path) for path in PATHS}
    for path, y in got.items():
        assert_close(y, want, tol, f"{isa}, {path} path, {bits}-bit, group {group_size}, x {x_dtype}")
    fused, panel = to_numpy(got["fused"]), to_numpy(got["panel"])
    assert np.array_equal(fused, panel), (
        f"{isa}: the fused and panel paths differ by {np.abs(fused - panel).max():.3g} (they should give the same bits)")


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("path", list(PATHS))
def test_a_row_gives_the_same_bits_alone_and_in_a_batch(isa, path):
    w = (*make_weights(67, 576, 32, 4, mx.float16, seed=5), 32, 4)
    x = mx.random.normal((40, 576), key=mx.random.key(2))
    whole = to_numpy(run(x, w, path))
    for lo, hi in [(0, 1), (39, 40), (5, 21), (3, 40)]:
        part = to_numpy(run(x[lo:hi], w, path))
        assert np.array_equal(part, whole[lo:hi]), f"{isa}, {path}: rows {lo}:{hi} alone differ from the batch"


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, 128), (8, 64)])
def test_int8_gives_the_twins_bits_on_every_path(isa, bits, group_size):
    """precision="int8" on this isa (AVX512-VNNI with avx512 where the CPU has it, else the plain
    C++ kernels): the same integers and fp32 operations everywhere, so the twin's bits, at M from
    1 (decode) to 40, for a row alone and in the batch."""
    from impl.quantize import quantized_matmul_int8_mlx

    K, N = 384, 75
    w_q, scales, biases = make_weights(N, K, group_size, bits, mx.float16, seed=bits + group_size)
    x = mx.random.normal((40, K), key=mx.random.key(3))
    twin = to_numpy(quantized_matmul_int8_mlx(x, w_q, scales, biases, group_size, bits))
    for lo, hi in [(0, 40), (0, 1), (39, 40), (5, 21)]:
        y = kernels.quantized_matmul(x[lo:hi], w_q, scales, biases, group_size=group_size, bits=bits, precision="int8")
        assert np.array_equal(to_numpy(y), twin[lo:hi]), f"{isa}: int8 rows {lo}:{hi} differ from the twin"


@pytest.mark.parametrize("isa", ["portable", "avx512"], indirect=True)
@pytest.mark.parametrize("bits,group_size", [(4, 32), (8, 64)])
def test_int8_on_a_weight_packed_once_gives_the_same_bits(isa, bits, group_size):
    """quantized_matmul_int8_pack: the weight packed once, read by every int8 matmul after (the
    serving engine's weights), gives the bits of packing at each call, i.e. the twin's, at M from 1
    to 40. One packed under the other instruction set (another layout) or for another shape is not
    read: the call packs, as without it."""
    from impl.quantize import quantized_matmul_int8_mlx

    K, N = 384, 75
    w_q, scales, biases = make_weights(N, K, group_size, bits, mx.float16, seed=bits + group_size)
    x = mx.random.normal((40, K), key=mx.random.key(3))
    twin = to_numpy(quantized_matmul_int8_mlx(x, w_q, scales, biases, group_size, bits))
    packed = kernels.quantized_matmul_int8_pack(w_q, scales, biases, group_size, bits)
    other_isa = "avx512" if isa == "portable" else "portable"
    kernels.quantized_matmul_configure(other_isa, -2)
    foreign = kernels.quantized_matmul_int8_pack(w_q, scales, biases, group_size, bits)
    mx.eval(foreign)
    kernels.quantized_matmul_configure(isa, -2)
    w2 = make_weights(N + 16, K, group_size, bits, mx.float16, seed=1)
    wrong_shape = kernels.quantized_matmul_int8_pack(*w2, group_size, bits)
    for lo, hi in [(0, 40), (0, 1), (39, 40), (5, 21)]:
        for what, p in [("packed once", packed), (f"packed under {other_isa}", foreign), ("another shape's", wrong_shape)]:
            y = kernels.quantized_matmul(x[lo:hi], w_q, scales, biases, group_size=group_size, bits=bits,
                                         precision="int8", int8_packed=p)
            assert np.array_equal(to_numpy(y), twin[lo:hi]), f"{isa}: int8 rows {lo}:{hi} on a weight {what} differ"


def test_a_quantized_weight_keeps_its_int8_packing_while_its_arrays_stay(monkeypatch):
    """QuantizedWeight.int8_packed: made at the first int8 matmul, the same array while w_q, scales
    and biases are the same arrays, made again when one is replaced (as a LoRA merge does); None at
    another precision. A packed array of the wrong type, and a pack of an unknown bit width, are
    refused in one line."""
    import impl.quantize
    from impl.quantize import quantized_matmul_int8_mlx
    from impl.quantized_weight import QuantizedWeight

    w = QuantizedWeight(*make_weights(48, 256, 32, 4, mx.float16, seed=3), 32, 4)
    x = mx.random.normal((3, 256), key=mx.random.key(5))
    monkeypatch.setattr(impl.quantize, "MATMUL_PRECISION", "fp32")
    assert w.int8_packed() is None
    monkeypatch.setattr(impl.quantize, "MATMUL_PRECISION", "int8")
    first = w.int8_packed()
    assert first is not None and w.int8_packed() is first
    w.scales = w.scales * 2
    assert w.int8_packed() is not first
    twin = quantized_matmul_int8_mlx(x, w.w_q, w.scales, w.biases, 32, 4)
    assert np.array_equal(to_numpy(w.matmul_t(x)), to_numpy(twin)), "int8 after new scales differs from the twin"
    with pytest.raises(ValueError, match=r"^quantized_matmul: int8_packed must be the 1-D uint8 array"):
        kernels.quantized_matmul(x, w.w_q, w.scales, w.biases, 32, 4, precision="int8", int8_packed=x)
    with pytest.raises(ValueError, match=r"^quantized_matmul_int8_pack: "):
        kernels.quantized_matmul_int8_pack(w.w_q, w.scales, w.biases, 32, 3)  # no 3-bit layout
