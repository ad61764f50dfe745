"""Topic 2.4: flash attention, a C++ CPU kernel and its pure-MLX twin.

- `impl.flash_attention.flash_attention_mlx(q, k, v, scale, mask, block_size)`: the
  readable twin: a loop over key blocks keeping, per query row, the running max m, the
  running sum l of exp(score - m) and the accumulator of exp(score - m) @ v, rescaled by
  exp(m_old - m_new) whenever the max grows (the online softmax). The (L, S) scores
  never exist beyond one (L, block_size) block.
- `impl.flash_attention.flash_attention(q, k, v, scale, mask)`: the C++ kernel
  (`tiny_llm_kernels.flash_attention`, an MLX primitive with a CPU implementation:
  tiled, fp32 accumulation, SIMD, threads) when it is built; the twin otherwise.
- Semantics are those of topic 1.3's `scaled_dot_product_attention_grouped`: q (B, H, L, D),
  k/v (B, H_kv, S, D), query head h reads kv head h // (H / H_kv); mask None, "causal"
  (lower-right aligned: query i sees keys j <= i + S - L) or an additive array
  broadcastable to (B, H, L, S) (boolean: True = may attend); a query row that sees no
  key (causal with L > S, an all -inf mask row) outputs 0, as torch does.

Checked: kernel == twin; both against torch's F.scaled_dot_product_attention
(enable_gqa=True), against impl's week-1 scaled_dot_product_attention_grouped, and
against mx.fast.scaled_dot_product_attention where its semantics agree (it gives NaN
or an average on rows that see no key; see day_1_3_gqa.py). Shapes from Hypothesis:
grouped heads, L != S both ways, decode (L = 1), S not a multiple of the kernel's
64-key tile, D 32/64/128, fp32/fp16/bf16. A long context (S > 4096). Memory: the
kernel's peak at L = S = 4096 stays far below one (L, S) score matrix, measured
with MLX's allocator and with the process's resident set.

The decode step's attention as one node (impl.layer_kernels.cached_attention: RoPE,
the KV-cache append, causal flash attention): kernel == twin (cached_attention_mlx)
over prefill chunks and decode steps (with fp32 activations, also an fp16 or bf16
cache), the cache bit-identical to the twin's, torch over the whole sequence; a
decode step writes the cache in place (its peak memory stays far below the cache's
size) but never into a buffer that a held slice views. Entry, twin and
check_cached_attention reject the same bad inputs with a one-line ValueError and
leave the cache as it was.

The engine, all of week 2's CPU kernels in the real model (quantized weights, fused
matmuls, flash attention, cached attention on 2.1's KV cache): its layers are 5 graph
nodes; its logits match the dequantized week-1 model's, without a cache and decoding
through one; its greedy tokens are transformers' where the top-2 gap is clear, and
the pure-MLX twins' without the compiled kernels; a prefill computes only the logits
it keeps; the chat command runs it by default (fp32 or fp16 cache) and answers as
transformers does.

Low-precision inputs are compared with a float32 reference computed from the same
rounded values.
"""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
import textwrap

import mlx.core as mx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from spec.chat_command import run_chat, stats_lines
from spec.day_2_1_kv_cache import check_prefill_keeps_only_the_last_logits
from spec.day_2_2_quantized_matmul import _ops
from spec.draw import DTYPES
from spec.ladder import (
    BY_DTYPE,
    FP16_KV_GREEDY_MARGIN,
    FP32,
    MODEL_FP32,
    Tol,
    assert_close,
    assert_greedy_tokens,
)
from spec.memory import peak_extra
from spec.rejects import assert_rejected_alike

NAMES = ("flash_attention_mlx", "flash_attention")
HEADS = [(4, 4), (4, 2), (6, 1), (9, 3)]  # (H, H_kv): MHA, GQA, MQA, the default model's
MASKS = [None, "causal", "L S", "per head", "full"]
BUILD = "pip install --no-build-isolation ./kernels"

# fp32 kernel/twin vs fp32 references: the online softmax sums exp(s - m) in another
# order than a one-pass softmax and rescales earlier blocks by exp(m_old - m_new) (one
# more rounding each time the max grows); a few ulps, as for any fp32 op.
ONLINE_FP32 = Tol(atol=FP32.atol, rtol=FP32.rtol, reason="fp32: online-softmax rescaling and summation order")


def tol_for(dtype: str) -> Tol:
    """fp32: ONLINE_FP32; fp16/bf16: the ladder's rung (the output is rounded to the input dtype)."""
    return ONLINE_FP32 if dtype == "float32" else BY_DTYPE[dtype]


@pytest.mark.presence
def test_has_names(impl):
    missing = [n for n in NAMES if not hasattr(impl.flash_attention, n)]
    assert not missing, f"impl.flash_attention lacks {missing}"


# Hypothesis probes a test's first argument for attributes, which the `impl` fixture
# would take for a missing module: hand tests the module instead.
@pytest.fixture
def fa(impl):
    return impl.flash_attention


def built_kernels(impl):
    """The built kernels package; fails (never skips) with the build command when it is missing."""
    k = impl.native.kernels
    if k is None:
        pytest.fail(f"tiny_llm_kernels is not built: {BUILD}")
    if not hasattr(k, "flash_attention"):
        pytest.fail(f"tiny_llm_kernels has no flash_attention (built from an older tree, or the C++"
                    f" extension failed to build: {getattr(k, 'ext_error', None)}); rebuild with: {BUILD}")
    return k


@pytest.mark.presence
def test_kernel_is_built(impl):
    info = built_kernels(impl).flash_attention_info()
    assert info["isa"] in ("avx512", "avx2", "portable"), f"flash_attention_info() = {info}"


# -- drawing inputs -------------------------------------------------------------------


def uniform(rng, shape, dtype: str) -> tuple[mx.array, torch.Tensor]:
    """U(-1, 1) in `dtype` for the implementation, and the same rounded values as fp32 torch."""
    x = mx.array(rng.uniform(-1, 1, shape).astype(np.float32)).astype(DTYPES[dtype])
    return x, torch.from_numpy(np.array(x.astype(mx.float32)))


def additive_mask(rng, shape, dtype: str, blank_rows: bool) -> tuple[mx.array, torch.Tensor]:
    """-inf at random places, [-2, 0] elsewhere; with blank_rows some rows are all -inf."""
    m = rng.uniform(-2, 0, shape).astype(np.float32)
    m[rng.random(shape) < 0.3] = -np.inf
    keep = rng.integers(0, shape[-1], shape[:-1])  # one key per query stays visible...
    np.put_along_axis(m, keep[..., None], 0.0, axis=-1)
    if blank_rows:  # ...except in these rows, which see nothing
        m[rng.random(shape[:-1]) < 0.25] = -np.inf
    x = mx.array(m).astype(DTYPES[dtype])
    return x, torch.from_numpy(np.array(x.astype(mx.float32)))


def lower_right_allowed(L: int, S: int) -> np.ndarray:
    """(L, S) bool, True where query i may see key j (j <= i + S - L)."""
    return np.tril(np.ones((L, S), dtype=bool), k=S - L)


def fast_sdpa(q, k, v, scale, mask) -> mx.array:
    """mx.fast's attention in fp32 (it wants an explicit scale)."""
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    mask = mask.astype(mx.float32) if isinstance(mask, mx.array) else mask
    f32 = [x.astype(mx.float32) for x in (q, k, v)]
    return mx.fast.scaled_dot_product_attention(*f32, scale=scale, mask=mask)


def check_all(impl, fa, q, k, v, q32, k32, v32, scale, mask, mask32, dtype, what, blank: bool):
    """The kernel against the twin, torch, the week-1 attention and (if no row is blank) mx.fast."""
    got = fa.flash_attention(q, k, v, scale=scale, mask=mask)
    assert got.dtype == q.dtype, f"{what}: output dtype {got.dtype}, expected {q.dtype} (the input's)"
    tol = tol_for(dtype)
    twin = fa.flash_attention_mlx(q, k, v, scale=scale, mask=mask)
    assert_close(got, twin, tol, f"kernel vs twin, {what}")
    want = F.scaled_dot_product_attention(q32, k32, v32, attn_mask=mask32, scale=scale, enable_gqa=True)
    assert_close(got, want, tol, f"kernel vs torch SDPA (enable_gqa), {what}")
    assert_close(twin, want, tol, f"twin vs torch SDPA (enable_gqa), {what}")
    f32 = lambda x: x.astype(mx.float32) if isinstance(x, mx.array) else x  # noqa: E731
    week1 = impl.attention.scaled_dot_product_attention_grouped(f32(q), f32(k), f32(v), scale=scale, mask=f32(mask))
    assert_close(got, week1, tol, f"kernel vs week-1 scaled_dot_product_attention_grouped, {what}")
    if not blank:
        assert_close(got, fast_sdpa(q, k, v, scale, mask), tol, f"kernel vs mx.fast, {what}")


# -- the kernel, the twin and the references agree ------------------------------------


@given(data=st.data())
def test_flash_attention(impl, fa, data):
    check_drawn_case(impl, fa, data)


def check_drawn_case(impl, fa, data):
    """Draw shapes, heads, dtype, mask and scale; then check_all. Also day_2_5's."""
    dtype = data.draw(st.sampled_from(sorted(DTYPES)), label="dtype")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    B = data.draw(st.integers(1, 2), label="B")
    H, H_kv = data.draw(st.sampled_from(HEADS), label="(H, H_kv)")
    D = data.draw(st.sampled_from([32, 64, 128]), label="D")
    L = data.draw(st.just(1) | st.integers(1, 80), label="L")  # 1: a decode step
    S = data.draw(st.integers(1, 200), label="S")  # rarely a multiple of the 64-key tile
    mask_kind = data.draw(st.sampled_from(MASKS), label="mask")
    blank_rows = mask_kind not in (None, "causal") and data.draw(st.booleans(), label="all -inf rows")
    scale = data.draw(st.none() | st.floats(0.05, 1.0), label="scale")

    q, q32 = uniform(rng, (B, H, L, D), dtype)
    (k, k32), (v, v32) = (uniform(rng, (B, H_kv, S, D), dtype) for _ in range(2))
    mask_shape = {"L S": (L, S), "per head": (H, L, S), "full": (B, H, L, S)}.get(mask_kind)
    if mask_shape:
        mask, mask32 = additive_mask(rng, mask_shape, dtype, blank_rows)
    else:
        mask, mask32 = mask_kind, None
    if mask_kind == "causal":
        mask32 = torch.from_numpy(lower_right_allowed(L, S))  # bool: True = may attend
    blank = blank_rows or (mask_kind == "causal" and L > S)  # rows that see no key
    what = f"q {q.shape}, k {k.shape}, {dtype}, mask {mask_kind}, blank rows {blank}, scale={scale}"
    check_all(impl, fa, q, k, v, q32, k32, v32, scale, mask, mask32, dtype, what, blank)


@pytest.mark.parametrize("L", [1, 64])
@pytest.mark.parametrize("mask", [None, "causal"])
def test_long_context(impl, fa, L, mask):
    check_long_context(impl, fa, L, mask)


def check_long_context(impl, fa, L: int, mask):
    """check_all at S = 4133 keys."""
    # S > 4096 keys, not a multiple of the tile: 65 tiles of online-softmax rescaling
    # (and, at L = 1, the kernel's split over keys with a merge of the partial softmaxes).
    rng = np.random.default_rng(L)
    S = 4096 + 37
    q, q32 = uniform(rng, (1, 9, L, 64), "float32")
    (k, k32), (v, v32) = (uniform(rng, (1, 3, S, 64), "float32") for _ in range(2))
    mask32 = torch.from_numpy(lower_right_allowed(L, S)) if mask else None
    check_all(impl, fa, q, k, v, q32, k32, v32, None, mask, mask32, "float32", f"L={L} S={S} mask {mask}", False)


@pytest.mark.parametrize("block_size", [1, 7, 64, 1000])
def test_twin_block_size_does_not_change_the_result(fa, block_size):
    # The online softmax is exact: any blocking of the keys gives the one-pass softmax.
    rng = np.random.default_rng(block_size)
    q, k, v = (uniform(rng, shape, "float32")[0] for shape in ((2, 4, 9, 16), (2, 2, 50, 16), (2, 2, 50, 16)))
    mask, _ = additive_mask(rng, (2, 4, 9, 50), "float32", blank_rows=True)
    got = fa.flash_attention_mlx(q, k, v, mask=mask, block_size=block_size)
    want = fa.flash_attention_mlx(q, k, v, mask=mask, block_size=50)
    assert_close(got, want, ONLINE_FP32, f"twin with block_size={block_size} vs one block")


def test_public_entry_runs_the_kernel(impl, fa):
    kernels = built_kernels(impl)
    # flash_attention is the kernel when it is built: bit for bit its output.
    rng = np.random.default_rng(0)
    q, k, v = (uniform(rng, shape, "float32")[0] for shape in ((1, 4, 70, 64), (1, 2, 90, 64), (1, 2, 90, 64)))
    got, kernel = fa.flash_attention(q, k, v, mask="causal"), kernels.flash_attention(q, k, v, mask="causal")
    assert np.array_equal(np.array(got), np.array(kernel)), "impl.flash_attention.flash_attention is not the kernel"


def test_boolean_mask(fa):
    check_boolean_mask(fa)


def check_boolean_mask(fa):
    """A boolean (B, 1, L, S) mask, with a row that sees nothing, vs torch."""
    rng = np.random.default_rng(1)
    q, q32 = uniform(rng, (2, 4, 5, 32), "float32")
    (k, k32), (v, v32) = (uniform(rng, (2, 2, 70, 32), "float32") for _ in range(2))
    allowed = rng.random((2, 1, 5, 70)) < 0.5
    allowed[0, 0, 3] = False  # a row that sees nothing: 0
    want = F.scaled_dot_product_attention(q32, k32, v32, attn_mask=torch.from_numpy(allowed), enable_gqa=True)
    for name in NAMES:
        got = getattr(fa, name)(q, k, v, mask=mx.array(allowed))
        assert_close(got, want, ONLINE_FP32, f"{name} with a boolean mask vs torch")


@pytest.mark.parametrize("L", [1, 33])  # 1: decode, where the kernel reads K and V rows in place
def test_strided_inputs(fa, L):
    check_strided_inputs(fa, L)


def check_strided_inputs(fa, L):
    """The attention layer hands over transposed views (B, L, H, D) -> (B, H, L, D), and a
    KV cache slices: the kernel reads strides (or copies) instead of demanding contiguous arrays."""
    rng = np.random.default_rng(2)
    q = uniform(rng, (2, L, 6, 64), "float32")[0].transpose(0, 2, 1, 3)
    k, v = (uniform(rng, (2, 100, 2, 64), "float32")[0].transpose(0, 2, 1, 3)[:, :, 10:90] for _ in range(2))
    got = fa.flash_attention(q, k, v, mask="causal")
    want = fa.flash_attention(*(mx.contiguous(x) for x in (q, k, v)), mask="causal")
    assert_close(got, want, ONLINE_FP32, "strided views vs contiguous copies")


def test_every_instruction_set_this_cpu_has(impl, fa):
    kernels = built_kernels(impl)
    # One wheel carries all three; the CPU picks at run time. Force each one this CPU has (an
    # instruction set it lacks cannot be selected, and is named in the output, not tested).
    active = kernels.flash_attention_info()["isa"]
    order = ["portable", "avx2", "avx512"]
    checked = []
    try:
        for isa in order[:order.index(active) + 1]:
            now = kernels.flash_attention_configure(isa)["isa"]
            assert now == isa, f"could not select {isa}, below this CPU's best ({active})"
            check_instruction_set(fa, now)
            checked.append(now)
    finally:
        kernels.flash_attention_configure(active)
    print(f"checked {checked}; this CPU lacks {order[len(checked):] or 'none'}")


def check_instruction_set(fa, now):
    """The kernel on instruction set `now` vs torch SDPA, every dtype, prefill and decode shapes."""
    rng = np.random.default_rng(3)
    # L = 40: packed kv tiles; L = 1 (decode): K and V rows read in place, and D = 40 pads
    # rows to 48 (3 AVX-512 vectors, 6 AVX2 ones); S = 300 ends in a partial key tile.
    for dtype, (L, D) in itertools.product(DTYPES, [(40, 64), (1, 64), (1, 40)]):
        q, q32 = uniform(rng, (1, 6, L, D), dtype)
        (k, k32), (v, v32) = (uniform(rng, (1, 2, 300, D), dtype) for _ in range(2))
        mask32 = torch.from_numpy(lower_right_allowed(L, 300))
        got = fa.flash_attention(q, k, v, mask="causal")
        want = F.scaled_dot_product_attention(q32, k32, v32, attn_mask=mask32, enable_gqa=True)
        assert_close(got, want, tol_for(dtype), f"{now} kernels, {dtype}, L={L} D={D}, vs torch")


# Twin and kernel take the same inputs: whether the kernels built, or a GPU runs, must not
# change what a call accepts. Each case makes (q, k, v, mask) from q (1, 4, 3, 8) and k, v (1, 2, 5, 8).
BAD_ATTENTION = {
    "an unknown mask string": lambda q, kv: (q, kv, kv, "upper"),
    "3 kv heads for 4 query heads": lambda q, kv: (q, mx.zeros((1, 3, 5, 8)), mx.zeros((1, 3, 5, 8)), None),
    "k and v of different lengths": lambda q, kv: (q, kv, mx.zeros((1, 2, 6, 8)), None),
    "k of another head size": lambda q, kv: (q, mx.zeros((1, 2, 5, 16)), mx.zeros((1, 2, 5, 16)), None),
    "k of another batch": lambda q, kv: (q, mx.zeros((2, 2, 5, 8)), mx.zeros((2, 2, 5, 8)), None),
    "head size 0": lambda q, kv: (mx.zeros((1, 4, 3, 0)), mx.zeros((1, 2, 5, 0)), mx.zeros((1, 2, 5, 0)), None),
    "fp16 q with fp32 k, v": lambda q, kv: (q.astype(mx.float16), kv, kv, None),
    "int32 inputs": lambda q, kv: (q.astype(mx.int32), kv.astype(mx.int32), kv.astype(mx.int32), None),
    "2-d inputs": lambda q, kv: (q[0, 0], kv[0, 0], kv[0, 0], None),
}


def bad_attention_case(name: str) -> tuple:
    """The (q, k, v, mask) of BAD_ATTENTION's case `name`."""
    return BAD_ATTENTION[name](mx.zeros((1, 4, 3, 8)), mx.zeros((1, 2, 5, 8)))


@pytest.mark.parametrize("case", list(BAD_ATTENTION))
def test_twin_and_kernel_reject_the_same_inputs(fa, case):
    # check_inputs states the contract; the twin and the public entry call it before any kernel.
    q, k, v, mask = bad_attention_case(case)
    calls = {"check_inputs": fa.check_inputs, **{name: getattr(fa, name) for name in NAMES}}
    calls = {name: lambda q, k, v, call=call: call(q, k, v, mask=mask) for name, call in calls.items()}
    assert_rejected_alike(calls, lambda: (q, k, v), "^flash_attention: ", case)


@pytest.mark.parametrize("lead", [(), (2, 3)], ids=["no batch axis", "two batch axes"])
def test_twin_and_kernel_take_any_leading_axes(fa, lead):
    # (..., H, L, D) as week 1's attention takes it: the same rows as with one batch axis.
    rng = np.random.default_rng(len(lead))
    q, k, v = (uniform(rng, (*lead, H, 6, 16), "float32")[0] for H in (4, 2, 2))
    B = int(np.prod(lead))
    flat = [a.reshape(B, *a.shape[-3:]) for a in (q, k, v)]
    masks = [None, "causal"]
    # A mask with every leading axis, one that broadcasts over them all, and (two batch axes) over one.
    for shape in [(*lead, 1, 6, 6), (1, 6, 6), *([(3, 1, 6, 6)] if lead else [])]:
        masks.append(additive_mask(rng, shape, "float32", blank_rows=False)[0])
    for m in masks:
        flat_m = mx.broadcast_to(m, (*lead, 1, 6, 6)).reshape(B, 1, 6, 6) if isinstance(m, mx.array) else m
        want = fa.flash_attention(*flat, mask=flat_m).reshape(*lead, 4, 6, 16)
        for name in NAMES:
            got = getattr(fa, name)(q, k, v, mask=m)
            what = f"{name}, q {q.shape}, mask {m if m is None or isinstance(m, str) else m.shape}"
            assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
            assert_close(got, want, ONLINE_FP32, f"{what} vs one batch axis")


# Where a score is NaN (a NaN in q, k, the mask or the scale; inf - inf from an inf key),
# softmax makes the row NaN. A kernel whose max or exp skips NaN hands finite numbers on, and
# the fault surfaces layers later, if at all. The reference is softmax as written, in float64
# numpy: torch's fused CPU SDPA returns finite rows for a NaN query, so it is not one here.
NAN_CASES = ["a NaN key", "a NaN query", "a NaN mask entry", "an inf key", "a NaN scale"]


@pytest.mark.parametrize("L, S", [(3, 70), (1, 3000)])  # several key tiles; decode split across threads
@pytest.mark.parametrize("case", NAN_CASES)
def test_nan_in_nan_out(fa, case, L, S):
    rng = np.random.default_rng(11)
    q, k, v = (rng.standard_normal((1, 2, n, 16)).astype(np.float32) for n in (L, S, S))
    mask, scale = np.zeros((L, S), np.float32), 0.25
    if case == "a NaN key":
        k[0, 1, 5, 3] = np.nan
    elif case == "a NaN query":
        q[0, 0, L - 1, 2] = np.nan
    elif case == "a NaN mask entry":
        mask[0, 7] = np.nan
    elif case == "an inf key":
        k[0, 0, 5, 3], q[0, 0, -1, 3] = np.inf, 1.0  # the last query row scores it +inf: inf - inf
    else:
        scale = float("nan")
    scores = q.astype(np.float64) @ k.astype(np.float64).swapaxes(-1, -2) * scale + mask  # (1, 2, L, S)
    with np.errstate(invalid="ignore"):  # the NaN is the point
        p = np.exp(scores - scores.max(-1, keepdims=True))
        want = p / p.sum(-1, keepdims=True) @ v.astype(np.float64)
    assert np.isnan(want).any(), f"{case}: the reference has no NaN row; the case is wrong"
    for name in NAMES:
        got = getattr(fa, name)(mx.array(q), mx.array(k), mx.array(v), scale=scale,
                                mask=mx.array(mask) if case == "a NaN mask entry" else None)
        assert_close(got, want, ONLINE_FP32, f"{name} with {case}, L={L} S={S}: NaN rows as softmax's")


# -- the decode step's attention as one node: RoPE, KV-cache append, flash attention ----------
#
# impl.layer_kernels.cached_attention(qkv, cache, rope, H, H_kv) takes the stacked q/k/v
# projection's output (N, L, (H + 2 H_kv) D), rotates q and k at the cache's offset, appends
# k and v to the KV cache and attends causally over every cached position: (N, L, H D).
# The kernel (tiny_llm_kernels.cached_attention) writes the cache in place; its twin,
# cached_attention_mlx, is the week-1/2 composition (slices, RoPE, update_and_fetch, the
# flash-attention twin).


def _rope_pair(impl, D: int, base: float = 10000.0):
    """The kernel-backed RoPE and the twin, sharing one pair of tables (1024 positions: the
    drawn prefill chunks and decode steps below stay under 610)."""
    kernel_rope, twin_rope = impl.layer_kernels.KernelRoPE(D, 1024, base), impl.rope.RoPE(D, 1024, base)
    twin_rope.cos, twin_rope.sin = kernel_rope.cos, kernel_rope.sin
    return kernel_rope, twin_rope


@given(data=st.data())
def test_cached_attention_matches_twin_and_torch(impl, data):
    built_kernels(impl)
    lk = impl.layer_kernels
    dtype = data.draw(st.sampled_from(sorted(DTYPES)), label="dtype")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    N = data.draw(st.integers(1, 2), label="N")
    H, H_kv = data.draw(st.sampled_from(HEADS), label="(H, H_kv)")
    D = data.draw(st.sampled_from([32, 64]), label="D")
    # A prefill, then decode steps and a chunk: the cache grows past its 256-position step.
    chunks = data.draw(st.lists(st.integers(1, 300), min_size=1, max_size=2), label="prefill chunks")
    chunks += [1, 1, 3, 1]
    # Under fp32 activations the cache may store fp16 or bf16 (KVCache(dtype)): the kernel then
    # rounds the new k and v as it writes them and reads the cache converted back to fp32.
    stored = None
    if dtype == "float32":
        stored = data.draw(st.sampled_from([None, "float16", "bfloat16"]), label="cache dtype")
    kernel_rope, twin_rope = _rope_pair(impl, D)
    kernel_cache, twin_cache = (impl.kv_cache.KVCache(getattr(mx, stored) if stored else None) for _ in range(2))
    outs, qkvs = [], []
    for L in chunks:
        qkv, qkv32 = uniform(rng, (N, L, (H + 2 * H_kv) * D), dtype)
        qkvs.append(qkv)
        got = lk.cached_attention(qkv, kernel_cache, kernel_rope, H, H_kv)
        assert got.shape == (N, L, H * D) and got.dtype == qkv.dtype, f"output {got.shape} {got.dtype}"
        want = lk.cached_attention_mlx(qkv, twin_cache, twin_rope, H, H_kv)
        what = (f"N={N} H={H} H_kv={H_kv} D={D} {dtype} ({stored or dtype} cache), chunk L={L} at offset"
                f" {kernel_cache.offset - L}")
        assert_close(got, want, tol_for(dtype), f"cached_attention kernel vs twin, {what}")
        outs.append(got)
    assert kernel_cache.offset == twin_cache.offset == sum(chunks)
    # The cache holds exactly what the twin's holds: the RoPE kernel rounds as the twin does.
    for name, a, b in zip(("keys", "values"), kernel_cache.state, twin_cache.state, strict=True):
        assert a.dtype == b.dtype == getattr(mx, stored or dtype), f"cached {name} are {a.dtype}"
        assert np.array_equal(np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))), (
            f"cached {name} differ from the twin's ({dtype}, {stored or dtype} cache)")
    # Torch on the whole sequence at once: the twin's rotated q (and the cache's k, v), causal.
    S = sum(chunks)
    heads = mx.concatenate(qkvs, axis=1).reshape(N, S, H + 2 * H_kv, D)
    q = twin_rope(heads[:, :, :H], 0).transpose(0, 2, 1, 3)
    t32 = lambda x: torch.from_numpy(np.array(x.astype(mx.float32)))  # noqa: E731
    want = F.scaled_dot_product_attention(t32(q), *(t32(x) for x in twin_cache.state), is_causal=True,
                                          enable_gqa=True)  # (N, H, S, D)
    got = mx.concatenate(outs, axis=1).reshape(N, S, H, D).transpose(0, 2, 1, 3)
    assert_close(got, want, tol_for(dtype), f"cached_attention kernel vs torch SDPA over all {S} positions")


def _prefilled(impl, seed: int, L: int, H: int, H_kv: int, D: int):
    """A KVCache holding L prefilled positions (fp32, through the kernel), the RoPE used and an rng."""
    built_kernels(impl)
    rng = np.random.default_rng(seed)
    kernel_rope, _ = _rope_pair(impl, D)
    cache = impl.kv_cache.KVCache()
    qkv = uniform(rng, (1, L, (H + 2 * H_kv) * D), "float32")[0]
    mx.eval(impl.layer_kernels.cached_attention(qkv, cache, kernel_rope, H, H_kv))
    return cache, kernel_rope, rng


def test_cached_attention_is_one_node_and_writes_the_cache_in_place(impl):
    lk = impl.layer_kernels
    cache, kernel_rope, rng = _prefilled(impl, 5, 500, 9, 3, 64)
    buffers = cache.keys.nbytes + cache.values.nbytes  # (1, 3, 512, 64) fp32 each: 768 KiB
    qkv = uniform(rng, (1, 1, 15 * 64), "float32")[0]
    mx.eval(qkv)
    mx.synchronize()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    out = lk.cached_attention(qkv, cache, kernel_rope, 9, 3)
    from spec.day_2_2_quantized_matmul import _ops

    assert _ops(out) == ["TinyLLMCachedAttention"], f"expected one lazy node, got {_ops(out)}"
    mx.eval(out, cache.keys, cache.values)
    extra = mx.get_peak_memory() - base
    # A decode step writes its row into the buffers; copying them would take +768 KiB.
    assert extra < buffers / 4, f"a decode step took +{extra / 2**10:.0f} KiB: the cache was copied"
    assert cache.offset == 501


@pytest.mark.parametrize("held", ["a slice", "the arrays"])
def test_cached_attention_leaves_a_held_view_of_the_cache_alone(impl, held):
    # A slice of the old cache (here: its state, kept across a rewind) shares its buffer, and
    # the caller may hold the cache's arrays themselves: the kernel must then write a copy, so
    # what is held still shows what it showed (MLX arrays never change under their holder).
    lk = impl.layer_kernels
    cache, kernel_rope, rng = _prefilled(impl, 6, 10, 2, 1, 32)
    keys_before, values_before = cache.state if held == "a slice" else (cache.keys, cache.values)
    mx.eval(keys_before, values_before)
    snapshot = np.array(keys_before), np.array(values_before)
    cache.trim(4)  # rewind: the next step overwrites positions 6..
    out = lk.cached_attention(uniform(rng, (1, 2, 4 * 32), "float32")[0], cache, kernel_rope, 2, 1)
    mx.eval(out, cache.keys)
    assert np.array_equal(np.array(keys_before), snapshot[0]), f"{held} of the old keys changed"
    assert np.array_equal(np.array(values_before), snapshot[1]), f"{held} of the old values changed"
    assert cache.offset == 8


@pytest.mark.presence
def test_cached_attention_rejects_mismatched_inputs(impl):
    kernels = built_kernels(impl)
    cos = sin = mx.zeros((16, 4))
    qkv, cache = mx.zeros((1, 2, 4 * 8)), mx.zeros((1, 1, 16, 8))
    cases = {
        "qkv width": (mx.zeros((1, 2, 30)), cache, cache, 0),
        "cache heads": (qkv, mx.zeros((1, 2, 16, 8)), mx.zeros((1, 2, 16, 8)), 0),
        "cache dtypes": (qkv, cache.astype(mx.float16), cache, 0),  # keys fp16, values fp32
        "cache not float": (qkv, cache.astype(mx.int32), cache.astype(mx.int32), 0),
        "cache full": (qkv, cache, cache, 15),
    }
    for what, (x, k, v, offset) in cases.items():
        with pytest.raises(ValueError, match="cached_attention: ") as e:
            kernels.cached_attention(x, k, v, cos, sin, offset, 2, 1)
        assert "\n" not in str(e.value), f"{what}: the error is not one line: {e.value}"


# Inputs cached_attention refuses, as (qkv, H, H_kv, the RoPE's dims); the RoPE holds 16
# positions. The entry rejects them on either path (kernel, or the twin off the CPU) and
# leaves the cache as it was; "positions" are RoPE's own check.
BAD_CACHED = {
    "qkv width not (H + 2 H_kv) D": (mx.zeros((1, 2, 30)), 2, 1, 8),
    "an int32 qkv": (mx.zeros((1, 2, 32), mx.int32), 2, 1, 8),
    "a 2-D qkv": (mx.zeros((2, 32)), 2, 1, 8),
    "H not a multiple of H_kv": (mx.zeros((1, 2, 56)), 3, 2, 8),
    "no kv heads": (mx.zeros((1, 2, 32)), 2, 0, 8),
    "D not the RoPE's dims": (mx.zeros((1, 2, 64)), 2, 1, 8),
    "positions past the RoPE table": (mx.zeros((1, 20, 32)), 2, 1, 8),
}


def bad_cached_calls(impl) -> dict:
    """The functions that must reject BAD_CACHED's cases: each takes (cache, qkv, H, H_kv, dims)."""
    lk = impl.layer_kernels
    return {
        "cached_attention": lambda cache, qkv, H, H_kv, dims: lk.cached_attention(
            qkv, cache, lk.KernelRoPE(dims, 16), H, H_kv),
        "cached_attention_mlx": lambda cache, qkv, H, H_kv, dims: lk.cached_attention_mlx(
            qkv, cache, impl.rope.RoPE(dims, 16), H, H_kv),
        "check_cached_attention": lambda cache, qkv, H, H_kv, dims: lk.check_cached_attention(
            qkv, H, H_kv, impl.rope.RoPE(dims, 16)),
    }


@pytest.mark.parametrize("case", list(BAD_CACHED))
def test_cached_attention_and_twin_reject_the_same_inputs(impl, case):
    calls = bad_cached_calls(impl)
    if case.startswith("positions"):  # RoPE's own check (week 1's words), not the heads' check
        del calls["check_cached_attention"]
    caches = []

    def fresh():
        caches.append(impl.kv_cache.KVCache())
        return (caches[-1], *BAD_CACHED[case])

    pattern = None if case.startswith("positions") else "^cached_attention: "  # None: week 1's RoPE words it
    assert_rejected_alike(calls, fresh, pattern, case)
    # The caches the calls refused are as they were: the next good step appends to each of them.
    good = mx.zeros((1, 2, 4 * 8))  # H 2, H_kv 1, D 8
    for name, cache in zip(calls, caches, strict=True):
        if name == "check_cached_attention":
            continue
        assert cache.offset == 0, f"{name}, {case}: the refused call moved the cache's offset"
        mx.eval(calls[name](cache, good, 2, 1, 8))
        assert cache.offset == 2, f"{name}, {case}: a good step after the refused one did not append"


def test_cached_attention_and_twin_refuse_a_cache_of_other_heads(impl):
    # A cache filled with H_kv = 1, then a step of H_kv = 2: the KV cache's own error (2.1),
    # the same on the kernel path and the twin's, and the cache as it was.
    calls = bad_cached_calls(impl)
    del calls["check_cached_attention"]  # it sees qkv and the heads, not the cache
    caches = []

    def filled():
        caches.append(impl.kv_cache.KVCache())
        mx.eval(calls["cached_attention_mlx"](caches[-1], mx.zeros((1, 2, 4 * 8)), 2, 1, 8))
        return (caches[-1], mx.zeros((1, 1, 6 * 8)), 2, 2, 8)  # H 2, H_kv 2, D 8

    assert_rejected_alike(calls, filled, None, "a cache of other heads")  # 2.1 words it
    assert all(c.offset == 2 for c in caches), [c.offset for c in caches]


# -- memory: O(L * D), never an (L, S) score matrix -------------------------------------

# Two query heads over one kv head at L = S = 4096: one (L, S) fp32 score matrix is 64 MiB,
# and an implementation that makes one per head holds 128 MiB. The kernel's own extra
# (output 2 MiB, fp32 copies of k and v 2 MiB, per-thread tiles ~0.1 MiB) is O((L + S) * D).
N, D_MEM = 4096, 64
SCORES = N * N * 4


def test_peak_memory_is_far_below_the_scores(impl, fa):
    built_kernels(impl)  # the twin's memory is not the claim here
    check_peak_memory(impl, fa)


def check_peak_memory(impl, fa):
    """flash_attention's peak memory at L = S = 4096 vs one score matrix (and the week-1 attention's)."""
    # MLX's allocator counts the output and the kernel's workspace; mx.get_peak_memory
    # works on the CPU backend. The week-1 attention, which does make the scores, shows
    # that the meter would see them.
    rng = np.random.default_rng(4)
    q = uniform(rng, (1, 2, N, D_MEM), "float32")[0]
    k, v = (uniform(rng, (1, 1, N, D_MEM), "float32")[0] for _ in range(2))
    mx.eval(q, k, v)

    kernel = peak_extra(lambda: fa.flash_attention(q, k, v, mask="causal"))[0]
    week1 = peak_extra(lambda: impl.attention.scaled_dot_product_attention_grouped(q, k, v, mask="causal"))[0]
    assert week1 > SCORES, f"the meter missed the week-1 attention's scores: peak +{week1 / 2**20:.0f} MiB"
    assert kernel < SCORES / 8, (
        f"flash attention at L = S = {N}: peak +{kernel / 2**20:.1f} MiB, not far below one (L, S)"
        f" score matrix ({SCORES / 2**20:.0f} MiB); the week-1 attention peaked at +{week1 / 2**20:.0f} MiB")


RSS_PROBE = textwrap.dedent("""
    import os, resource, sys
    import {pkg}.native  # the kernels (and the BLAS fix) before mlx
    import mlx.core as mx
    from {pkg}.attention import scaled_dot_product_attention_grouped
    from {pkg}.flash_attention import flash_attention

    def peak_growth(fn, q, k, v):
        # Linux: reset the resident high-water mark (VmHWM) to the current RSS, then read
        # it back; elsewhere the growth of ru_maxrss (bytes on macOS), which can only
        # undercount, and the week-1 control below shows whether it saw anything.
        if os.path.exists("/proc/self/clear_refs"):
            open("/proc/self/clear_refs", "w").write("5")
            hwm = lambda: int(next(x for x in open("/proc/self/status") if x.startswith("VmHWM")).split()[1]) * 1024
        else:
            hwm = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        before = hwm()
        mx.eval(fn(q, k, v, mask="causal"))
        return hwm() - before

    small = [mx.ones((1, 2, 100, {D})), mx.ones((1, 1, 100, {D})), mx.ones((1, 1, 100, {D}))]
    mx.eval(flash_attention(*small, mask="causal"))  # threads and their tiles exist from here on
    q, k, v = mx.ones((1, 2, {N}, {D})), mx.ones((1, 1, {N}, {D})), mx.ones((1, 1, {N}, {D}))
    mx.eval(q, k, v)
    print(peak_growth(flash_attention, q, k, v), peak_growth(scaled_dot_product_attention_grouped, q, k, v))
""")


def test_resident_memory_growth_is_far_below_the_scores(impl):
    # Everything the process touches, MLX's allocator or not (the kernel's per-thread
    # tiles are std::vectors): the growth of the resident high-water mark over one call.
    built_kernels(impl)
    code = RSS_PROBE.format(pkg=impl.name, N=N, D=D_MEM)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"the RSS probe failed:\n{run.stderr}"
    kernel, week1 = (int(x) for x in run.stdout.split()[-2:])
    assert week1 > SCORES, f"the meter missed the week-1 attention's scores: resident set +{week1 / 2**20:.0f} MiB"
    assert kernel < SCORES / 8, (
        f"flash attention at L = S = {N}: resident set grew {kernel / 2**20:.1f} MiB over one call, not far"
        f" below one (L, S) score matrix ({SCORES / 2**20:.0f} MiB; the week-1 attention: +{week1 / 2**20:.0f} MiB)")


# --- the engine: the model on week 2's CPU kernels ---------------------------------------
#
# The loader's quantized engine (load_model(quantized=True)) runs the week-2 kernels together:
# 2.2's quantized matmul (weights kept quantized, RMSNorm/SwiGLU/residual fused into it) and its
# RMSNorm, RoPE and SwiGLU kernels, this topic's flash attention, and the decode step's
# cached_attention on 2.1's KV cache. Its checks are here, in the last of those topics.


MODEL_PROMPTS = ["The capital of France is", "def fibonacci(n):\n    if n < 2:"]


@pytest.fixture(scope="module")
def quantized_model(impl, default_model):
    return impl.loader.load_model(default_model, quantized=True)


@pytest.fixture(scope="module")
def dense_model(impl, default_model):
    return impl.loader.load_model(default_model, quantized=False)


@pytest.mark.parametrize("kind", ["qwen3-untied-head-dim", "gemma3"])
def test_tiny_qwen3_gemma3_on_the_kernels_match_the_dequantized_path(impl, tmp_path, kind):
    """Qwen3's q/k norms (its layers then skip the fused path) and Gemma 3's sliding window (a mask
    array to flash attention), from a Q8_0 GGUF: the week-2 loader vs the dequantized week-1 model,
    whole prefill and cached decode past the tiny window of 8."""
    from reference.tiny_models import tiny_folder, tiny_gguf

    ref, _ = tiny_folder(tmp_path, kind, seed=13, **({"query_pre_attn_scalar": 32} if "gemma" in kind else {}))
    path = tiny_gguf(ref, tmp_path / f"{kind}.gguf", qtype="Q8_0")
    kernels, dense = (impl.loader.load_model(path, quantized=q).model for q in (True, False))
    ids = np.random.default_rng(3).integers(0, 320, size=(1, 20))
    full = dense(mx.array(ids))
    # The same weight values and fp32 accumulation: summation order and the online softmax only.
    assert_close(kernels(mx.array(ids)), full, MODEL_FP32, f"{kind}: kernels vs dequantized")
    cache = impl.kv_cache.make_cache(kernels)
    parts = [kernels(mx.array(ids[:, :4]), cache=cache)] + [kernels(mx.array(ids[:, i:i + 1]), cache=cache)
                                                            for i in range(4, 20)]
    assert_close(mx.concatenate(parts, axis=1), full, MODEL_FP32, f"{kind}: cached decode on the kernels")


@pytest.mark.parametrize("text", MODEL_PROMPTS)
def test_model_logits_match_the_dequantized_path(quantized_model, dense_model, text):
    ids = mx.array([quantized_model.tokenizer.encode(text)])
    # The same weight values (scale * q + bias in fp32) and fp32 accumulation on both paths;
    # only summation order differs (and flash attention's online softmax), so the week-1
    # model rung applies unchanged.
    assert_close(quantized_model.model(ids), dense_model.model(ids), MODEL_FP32,
                 f"quantized-kernel logits vs dequantized logits for {text!r}")


def test_model_greedy_tokens_match_transformers(impl, quantized_model, default_model):
    check_greedy_tokens(impl, quantized_model, default_model)


def check_greedy_tokens(impl, quantized_model, default_model):
    """The engine (KV cache, kernels) generates transformers' greedy tokens where the top-2 gap is clear."""
    from reference.models import hf_folder_from_gguf, transformers_model

    loaded, steps = quantized_model, 16
    ids = loaded.tokenizer.encode(loaded.chat_template.render([{"role": "user", "content": "Name three colors."}]))
    x = torch.tensor([ids])
    out = transformers_model(str(hf_folder_from_gguf(default_model))).generate(
        x, attention_mask=torch.ones_like(x), max_new_tokens=steps, do_sample=False, output_scores=True,
        return_dict_in_generate=True, pad_token_id=2, eos_token_id=None)
    want = out.sequences[0, len(ids):].tolist()
    gaps = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
    got = impl.generate.generate_step_cached(loaded.model, ids)  # KV cache + the kernels
    assert_greedy_tokens(got, want, gaps, "the engine on the kernels vs transformers")


@pytest.mark.parametrize("mode", ["fp32", "int8"])
def test_real_kquant_model_logits_match_the_dense_model(impl, coder_gguf, mode):
    """Qwen2.5-Coder-0.5B on week 2's kernels with its Q4_K and Q6_K tensors multiplied as stored
    (topic 2.2's kquant_matmul): in "fp32" mode (exact weights, x as given) its logits equal the dense
    week-1 model's within fp32 sums; in "int8" mode (x rounded to int8 per 256 values, llama.cpp's
    arithmetic) within a looser bound, with the same greedy token."""
    ids = mx.array([[151644, 872, 198, 7985, 264, 13027, 729, 429, 17431, 264, 1140, 151645, 198]])
    dense = impl.loader.load_model(coder_gguf, quantized=False).model(ids)[0, -1]
    got = impl.loader.load_model(coder_gguf, quantized=True, kquant=mode).model(ids)[0, -1]
    if mode == "fp32":
        assert_close(got, dense, MODEL_FP32, "fp32 mode vs the dense model, last position's logits")
    else:
        # int8 x moves each matmul input by up to max|x| / 254 of its 256 values (about 0.4% of
        # the block's largest value): through 24 layers the logits (~20) move by a few tenths.
        err = float(mx.abs(got - dense).max())
        assert err < 1.0, f"int8 mode moves the logits by {err:.3g} from the dense model's"
        assert int(mx.argmax(got)) == int(mx.argmax(dense)), "int8 mode changed the greedy token"


def test_the_engine_runs_on_the_layer_kernels(impl, quantized_model):
    model = quantized_model.model
    layer = model.layers[0]
    kinds = {type(layer.input_layernorm).__name__, type(model.norm).__name__, type(layer.self_attn.rope).__name__,
             type(layer).__name__}
    assert kinds == {"KernelRMSNorm", "KernelRoPE", "KernelTransformerBlock"}, f"the week-2 engine's classes: {kinds}"
    assert layer.self_attn.wqkv is not None and layer.mlp.w_gate_up is not None, "projections are not stacked"
    ops = _ops(model(mx.array([[1, 2, 3]])))
    for kernel in ("TinyLLMRMSNorm", "TinyLLMRoPE", "TinyLLMSwiGLU", "TinyLLMQuantizedMatmul", "TinyLLMFlashAttention"):
        assert kernel in ops, f"{kernel} is not in the model's graph"
    assert ops.count("TinyLLMQuantizedMatmul") == 4 * len(model.layers) + 1, (
        "expected 4 quantized matmuls a layer (qkv, o, gate_up, down) and the head")
    # With a KV cache, RoPE, the cache append and the attention are one node a layer.
    cache = impl.kv_cache.make_cache(model)
    ops = _ops(model(mx.array([[1, 2, 3]]), cache=cache))
    assert ops.count("TinyLLMCachedAttention") == len(model.layers), "the cached attention kernel is not used"
    assert "TinyLLMRoPE" not in ops and "SliceUpdate" not in ops, f"RoPE or a cache update outside it: {ops}"
    # ... and the norms, SwiGLU and residual adds ride in the matmuls (impl.fusion): 5 nodes a layer.
    per_layer = ops.count("TinyLLMQuantizedMatmul") + ops.count("TinyLLMCachedAttention") - 1  # - the head
    assert per_layer == 5 * len(model.layers), f"{per_layer / len(model.layers):.1f} kernel nodes a layer"
    assert ops.count("TinyLLMRMSNorm") == 1 and "TinyLLMSwiGLU" not in ops, f"unfused norms or SwiGLU: {ops}"


NO_KERNELS = """
import sys
sys.modules["tiny_llm_kernels"] = None  # as if the kernels had not built
from {pkg}.generate import generate_step_cached
from {pkg}.loader import load_model
loaded = load_model(quantized=True)  # the week-2 engine's classes, on their pure-MLX twins
ids = loaded.tokenizer.encode("The capital of France is")
steps = generate_step_cached(loaded.model, ids)
print(type(loaded.model.layers[0]).__name__, [next(steps) for _ in range(6)])
"""


def test_the_engine_without_kernels_runs_the_twins(impl, quantized_model):
    # Without the compiled kernels the same engine (stacked quantized weights, the kernel-backed
    # layer classes) falls back to every twin: fused_linear_mlx, cached_attention_mlx, ... and
    # still gives the kernels' greedy tokens wherever the top-2 logit gap is clear (the two paths'
    # logits differ by about 1e-4, MODEL_FP32).
    run = subprocess.run([sys.executable, "-c", NO_KERNELS.format(pkg=impl.name)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, f"the engine failed without kernels:\n{run.stderr[-2000:]}"
    assert "kernels not loaded" in run.stderr, "impl did not say that the kernels are missing"
    block, _, twin_tokens = run.stdout.strip().splitlines()[-1].partition(" ")
    assert block == "KernelTransformerBlock", f"without kernels the model's layers are {block}"
    ids = quantized_model.tokenizer.encode("The capital of France is")
    steps = impl.generate.generate_step_cached(quantized_model.model, ids)
    want = [next(steps) for _ in range(6)]
    logits = np.array(quantized_model.model(mx.array([ids + want[:-1]]))[0, len(ids) - 1:])  # (6, V)
    top2 = np.sort(logits, axis=-1)[:, -2:]
    assert_greedy_tokens(iter(json.loads(twin_tokens)), want, (top2[:, 1] - top2[:, 0]).tolist(),
                         "the engine without kernels vs with")


@pytest.mark.parametrize("text", MODEL_PROMPTS)
def test_cached_decode_on_the_kernels_matches_the_dequantized_path(impl, quantized_model, dense_model, text):
    # Prefill, then decode token by token through the KV cache: the fused cached-attention
    # kernel at every layer, against the week-1 model recomputing the whole sequence.

    ids = quantized_model.tokenizer.encode(text)
    extra = [28, 1024, 14, 2583, 30]  # any ids: teacher-forced decode steps
    cache = impl.kv_cache.make_cache(quantized_model.model)
    quantized_model.model(mx.array([ids]), cache=cache)
    for i, token in enumerate(extra):
        got = quantized_model.model(mx.array([[token]]), cache=cache)[:, -1]
        want = dense_model.model(mx.array([ids + extra[:i + 1]]))[:, -1]
        assert_close(got, want, MODEL_FP32, f"decode step {i} after {text!r}: cached kernels vs dense recompute")


def test_the_engine_prefill_computes_only_the_logits_it_keeps(impl, quantized_model):
    prompt = quantized_model.tokenizer.encode("The capital of France is")
    check_prefill_keeps_only_the_last_logits(impl, quantized_model.model, prompt)


@pytest.mark.parametrize("kv_dtype", ["auto", "float16"])
def test_the_chat_command_runs_the_engine(impl, default_model, kv_dtype):
    # Quantized weights on the kernels and a KV cache: week 2's single-stream engine (the batched
    # engine of 2.6 runs the same model and kernels under a scheduler).
    from spec.day_1_6_generate import CONVERSATIONS, assert_answer, transformers_answer

    messages = CONVERSATIONS["one_user"]
    r = run_chat(impl, "--single-stream", messages[0]["content"], "--max-tokens", "24", "--kv-cache-dtype", kv_dtype)
    assert r.returncode == 0, r.stderr[-2000:]
    stats = stats_lines(r.stderr)
    stored = "float32" if kv_dtype == "auto" else kv_dtype
    assert stats and f"KV cache {stored}" in stats[-1], f"the reply's stats line names another cache: {stats}"
    # An fp16 cache moves each logit by up to MODEL_FP16_KV.atol: compared while the gaps clear twice that.
    margin = {} if kv_dtype == "auto" else {"margin": FP16_KV_GREEDY_MARGIN}
    assert_answer(r.stdout.removesuffix("\n"), *transformers_answer(default_model, messages, **margin),
                  f"the chat command on the engine, KV cache {kv_dtype}")
