"""Topic 1.2: rotary position embedding (RoPE), in both layouts, with offsets.

`impl.rope.RoPE(dims, seq_len, base, traditional)(x, offset)` rotates x of shape
(N, L, H, D) by the positions `offset` names; the angle of pair i at position p
is p * base^(-2i/D).
- traditional=False rotates the half-split pairs (x_i, x_{i+D/2}), as Hugging
  Face Llama/Qwen2 do: checked against transformers' LlamaRotaryEmbedding and
  apply_rotary_pos_emb, and mx.fast.rope(traditional=False).
- traditional=True rotates interleaved pairs (x_2i, x_2i+1), as the RoFormer
  paper, Meta's llama and llama.cpp do: checked against a complex rotation in
  torch (x as complex numbers times e^{i p theta}) and mx.fast.rope(traditional=True).
- The two layouts are one rotation seen through a permutation of the dims (the
  reason GGUF permutes Q/K rows): checked directly.
- offset: an int (positions offset..offset+L-1), a slice of positions, None
  (same as 0), or one start per sequence (a list or an (N,) array). Offsets are
  bookkeeping: rotating a cut of a sequence at its offset must give what rotating
  the whole sequence gives there. That is compared at the dtype's rung, not
  bit for bit (an implementation may compute cos/sin per call, and vectorized
  and scalar paths differ by an ulp), which still pins positions exactly: one
  position off turns pair 0 by a whole radian. A position at or past seq_len
  is a ValueError.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from spec.draw import DTYPES
from spec.ladder import BY_DTYPE, FP32, Tol, assert_close

BASES = [10000.0, 100000.0, 1000000.0]


def rope_tol(dtype: str, max_position: int) -> Tol:
    """The angle p * theta_i is only as exact as theta_i = base^(-2i/D), and that
    depends on how it is computed (pow, exp/log, ...): a few fp32 ulps apart, an
    error the position p multiplies. Measured between mx.fast.rope and
    transformers on |x| <= 1, bases 1e4-1e6, D <= 128, p < 4096: outputs differ
    by up to 1.5e-7 * p. Allowed: twice that, on top of the dtype's own rung."""
    base = BY_DTYPE[dtype]
    return Tol(atol=base.atol + 3e-7 * max_position, rtol=base.rtol,
               reason=f"{base.reason}; angles carry ~1.5e-7 rad of theta's rounding per position, p <= {max_position}")


@pytest.mark.presence
def test_has_names(impl):
    assert hasattr(impl.rope, "RoPE"), "impl.rope lacks RoPE"


# Hypothesis probes a test's first argument for attributes, which the `impl`
# fixture would take for a missing module: hand tests the module instead.
@pytest.fixture
def rope(impl):
    return impl.rope


# -- drawing inputs -------------------------------------------------------------


def draw_case(data):
    """dtype, rng, shape (N, L, H, D), base, seq_len and a start offset that fits the table."""
    dtype = data.draw(st.sampled_from(sorted(DTYPES)), label="dtype")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    N, H = data.draw(st.integers(1, 3), label="N"), data.draw(st.integers(1, 3), label="H")
    D = data.draw(st.sampled_from([2, 4, 8, 16, 32, 64]), label="D")
    L = data.draw(st.integers(1, 8), label="L")
    base = data.draw(st.sampled_from(BASES), label="base")
    # Mostly short tables; a few up to 4096 positions, where angles are large and fp32 rounding grows.
    seq_len = data.draw(st.integers(L, 64) | st.integers(L, 4096), label="seq_len")
    offset = data.draw(st.integers(0, seq_len - L), label="offset")
    return dtype, rng, (N, L, H, D), base, seq_len, offset


def uniform(rng, shape, dtype: str) -> tuple[mx.array, torch.Tensor]:
    """U(-1, 1) in `dtype` for the implementation, and the same rounded values as fp32 torch."""
    x = mx.array(rng.uniform(-1, 1, shape).astype(np.float32)).astype(DTYPES[dtype])
    return x, torch.from_numpy(np.array(x.astype(mx.float32)))


def fast_rope(x: mx.array, traditional: bool, base: float, offset) -> mx.array:
    """mx.fast.rope in fp32 on (N, L, H, D): it wants the positions on axis -2."""
    y = mx.fast.rope(x.astype(mx.float32).transpose(0, 2, 1, 3), x.shape[-1], traditional=traditional,
                     base=base, scale=1.0, offset=offset)
    return y.transpose(0, 2, 1, 3)


def check_dtype(got, dtype):
    assert got.dtype == DTYPES[dtype], f"RoPE output dtype {got.dtype}, expected {dtype} (the input's)"


def assert_same_positions(got: mx.array, want: mx.array, dtype: str, what: str) -> None:
    """Same rotation, up to an ulp of cos/sin: far below what one position's shift changes."""
    assert_close(got, want, BY_DTYPE[dtype], what)


# -- the two layouts against their references -------------------------------------------


def transformers_rope(x32: torch.Tensor, base: float, seq_len: int, positions: torch.Tensor) -> torch.Tensor:
    """HF Llama's RoPE on (N, L, H, D); positions: (N, L)."""
    N, L, H, D = x32.shape
    config = LlamaConfig(hidden_size=H * D, num_attention_heads=H, head_dim=D, rope_theta=base,
                         max_position_embeddings=seq_len)
    cos, sin = LlamaRotaryEmbedding(config)(x32, positions)  # (N, L, D)
    y, _ = apply_rotary_pos_emb(x32, x32, cos, sin, unsqueeze_dim=2)
    return y


def complex_rope(x32: torch.Tensor, base: float, positions: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE as a complex product: (x_2i + i x_2i+1) * e^{i p theta_i}."""
    N, L, H, D = x32.shape
    theta = 1.0 / base ** (torch.arange(0, D, 2, dtype=torch.float32) / D)  # (D/2,)
    angles = positions.float()[..., None] * theta  # (N, L, D/2)
    rotation = torch.polar(torch.ones_like(angles), angles)[:, :, None, :]  # (N, L, 1, D/2)
    pairs = torch.view_as_complex(x32.reshape(N, L, H, D // 2, 2).contiguous())
    return torch.view_as_real(pairs * rotation).reshape(N, L, H, D)


@given(data=st.data())
def test_half_split(rope, data):
    dtype, rng, shape, base, seq_len, offset = draw_case(data)
    N, L = shape[:2]
    x, x32 = uniform(rng, shape, dtype)
    got = rope.RoPE(shape[-1], seq_len, base, traditional=False)(x, offset)
    check_dtype(got, dtype)
    positions = torch.arange(offset, offset + L).expand(N, L)
    what = f"half-split x {shape}, base={base}, offset={offset}"
    tol = rope_tol(dtype, offset + L)
    assert_close(got, transformers_rope(x32, base, seq_len, positions), tol, f"{what} vs transformers")
    assert_close(got, fast_rope(x, False, base, offset), tol, f"{what} vs mx.fast.rope")


@given(data=st.data())
def test_traditional(rope, data):
    dtype, rng, shape, base, seq_len, offset = draw_case(data)
    N, L = shape[:2]
    x, x32 = uniform(rng, shape, dtype)
    got = rope.RoPE(shape[-1], seq_len, base, traditional=True)(x, offset)
    check_dtype(got, dtype)
    positions = torch.arange(offset, offset + L).expand(N, L)
    what = f"traditional x {shape}, base={base}, offset={offset}"
    tol = rope_tol(dtype, offset + L)
    assert_close(got, complex_rope(x32, base, positions), tol, f"{what} vs complex rotation")
    assert_close(got, fast_rope(x, True, base, offset), tol, f"{what} vs mx.fast.rope")


def test_default_base_is_10000(rope):
    x, x32 = uniform(np.random.default_rng(0), (1, 5, 2, 8), "float32")
    positions = torch.arange(5).expand(1, 5)
    assert_close(rope.RoPE(8, 16)(x), transformers_rope(x32, 10000.0, 16, positions), FP32, "RoPE(8, 16)")


@given(data=st.data())
def test_layouts_differ_by_a_permutation(rope, data):
    # Interleaved pairs (2i, 2i+1) are half-split pairs (i, i + D/2) once the
    # dims are reordered evens-then-odds: the same rotation, other bookkeeping.
    dtype, rng, shape, base, seq_len, offset = draw_case(data)
    D = shape[-1]
    x, _ = uniform(rng, shape, dtype)
    evens_then_odds = np.concatenate([np.arange(0, D, 2), np.arange(1, D, 2)])
    back = np.argsort(evens_then_odds)
    half = rope.RoPE(D, seq_len, base, traditional=False)(x[..., mx.array(evens_then_odds)], offset)
    trad = rope.RoPE(D, seq_len, base, traditional=True)(x, offset)
    what = f"half-split on evens-then-odds, permuted back, vs traditional, x {shape}"
    assert_close(half[..., mx.array(back)], trad, BY_DTYPE[dtype], what)


# -- offsets: bookkeeping -----------------------------------------------------------------


@given(data=st.data())
def test_offset_is_a_cut_of_the_whole_sequence(rope, data):
    dtype, rng, (N, L, H, D), base, seq_len, offset = draw_case(data)
    traditional = data.draw(st.booleans(), label="traditional")
    whole, _ = uniform(rng, (N, offset + L, H, D), dtype)
    r = rope.RoPE(D, seq_len, base, traditional=traditional)
    want = r(whole)[:, offset:]
    part = whole[:, offset:]
    assert_same_positions(r(part, offset), want, dtype, f"offset={offset} vs positions {offset}.. of the whole")
    assert_same_positions(r(part, slice(offset, offset + L)), want, dtype, f"offset=slice({offset}, {offset + L})")
    if offset == 0:
        assert_same_positions(r(part, None), want, dtype, "offset=None vs 0")
        assert_same_positions(r(part, slice(None, L)), want, dtype, f"offset=slice(None, {L})")


@given(data=st.data())
def test_offset_per_sequence(rope, data):
    dtype, rng, (_, L, H, D), base, seq_len, _ = draw_case(data)
    traditional = data.draw(st.booleans(), label="traditional")
    offsets = data.draw(st.lists(st.integers(0, seq_len - L), min_size=1, max_size=4), label="offsets")
    x, _ = uniform(rng, (len(offsets), L, H, D), dtype)
    r = rope.RoPE(D, seq_len, base, traditional=traditional)
    got = r(x, offsets)
    for n, o in enumerate(offsets):
        assert_same_positions(got[n:n + 1], r(x[n:n + 1], o), dtype, f"sequence {n} of offsets {offsets}")
    assert_same_positions(r(x, mx.array(offsets)), got, dtype, f"offsets as an mx.array vs a list {offsets}")
    fast = fast_rope(x, traditional, base, mx.array(offsets))
    assert_close(got, fast, rope_tol(dtype, max(offsets) + L), f"offsets {offsets} vs mx.fast.rope")


@pytest.mark.parametrize(("offset", "positions"), [
    (5, [[5, 6, 7], [5, 6, 7]]), (slice(5, 8), [[5, 6, 7], [5, 6, 7]]), ([0, 5], [[0, 1, 2], [5, 6, 7]]),
], ids=["int", "slice", "per-sequence"])
def test_last_position_of_the_table(rope, offset, positions):
    x, x32 = uniform(np.random.default_rng(0), (2, 3, 1, 4), "float32")
    got = rope.RoPE(4, 8)(x, offset)  # position 7 is the table's last
    want = transformers_rope(x32, 10000.0, 8, torch.tensor(positions))
    assert_close(got, want, FP32, f"offset {offset}: positions {positions}")


@pytest.mark.parametrize("offset", [6, slice(6, 9), [0, 6], mx.array([6, 0])],
                         ids=["int", "slice", "per-sequence", "per-sequence array"])
def test_past_the_table_is_an_error(rope, offset):
    x, _ = uniform(np.random.default_rng(0), (2, 3, 1, 4), "float32")
    with pytest.raises(ValueError):
        mx.eval(rope.RoPE(4, 8)(x, offset))  # position 8 of a table of 8


def test_rotation_keeps_norms(rope):
    # A rotation: every pair keeps its length, and position 0 is the identity.
    x, _ = uniform(np.random.default_rng(1), (1, 6, 2, 16), "float32")
    for traditional in (False, True):
        got = np.array(rope.RoPE(16, 6, traditional=traditional)(x))
        assert_close(got[:, 0], np.array(x)[:, 0], FP32, f"position 0, traditional={traditional}")
        norms = np.linalg.norm(got, axis=-1)
        assert_close(norms, np.linalg.norm(np.array(x), axis=-1), FP32, f"norms, traditional={traditional}")
