"""Topic 1.3: grouped-query and multi-query attention, causal masks, the attention layer.

- `impl.attention.causal_mask(L, S, dtype)`: the (L, S) additive mask (0 or -inf)
  for L queries that are the last L of S positions: query i sees keys
  j <= i + S - L (the lower-right alignment of torch.nn.attention.bias.
  causal_lower_right and of mx.fast's "causal"; torch's is_causal=True is the
  upper-left one and differs when L != S). Checked exactly against torch.tril.
- `impl.attention.scaled_dot_product_attention_grouped(q, k, v, scale, mask)`:
  q (..., H, L, D), k/v (..., H_kv, S, D); query head h reads kv head h // (H / H_kv)
  (GQA; MQA when H_kv = 1). mask: None, "causal" or an additive array
  broadcastable to (..., H, L, S). Checked against F.scaled_dot_product_attention
  with enable_gqa=True and mx.fast.scaled_dot_product_attention.
- Fully masked rows (a query that may see no key: causal with L > S, or an
  all -inf mask row) follow torch's F.scaled_dot_product_attention: the output
  row is 0. torch.softmax alone gives NaN there, and mx.fast gives NaN (additive
  -inf) or an average of all values ("causal"); a NaN row is the one to avoid,
  because in a padded batch it becomes the next layer's keys and values, and
  NaN + -inf is NaN: it would poison every other row that masks it out.
- `impl.attention.Attention(args, wq, wk, wv, wo, bq, bk, bv, bo)(x, mask, offset)`:
  the Llama/Qwen2 attention layer (projections with optional biases, half-split
  RoPE from position `offset`, grouped heads, output projection). Checked against
  transformers' LlamaAttention (with and without attention_bias) and
  Qwen2Attention (q/k/v biases) holding the same random weights. Without a KV
  cache, `offset` moves queries and keys alike and RoPE scores depend only on
  position differences, so the output does not change with it (checked as an
  invariant); the offset itself becomes visible with a cache (topic 2.1). `args` carries
  Hugging Face field names (see impl/config.py, topic 1.5); a plain namespace
  stands in for it here so this topic does not depend on 1.5.

float32, float16 and bfloat16; low-precision inputs are compared with a float32
reference computed from the same rounded values.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from transformers import LlamaConfig, Qwen2Config
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2RotaryEmbedding

from spec.draw import DTYPES, additive_mask, draw_dtype, draw_rng, uniform
from spec.ladder import BY_DTYPE, FP32, assert_close

NAMES = ("causal_mask", "scaled_dot_product_attention_grouped", "Attention")
MASKS = [None, "causal", "L S", "per head", "full"]


@pytest.mark.presence
def test_has_names(impl):
    missing = [n for n in NAMES if not hasattr(impl.attention, n)]
    assert not missing, f"impl.attention lacks {missing}"


# Hypothesis probes a test's first argument for attributes, which the `impl`
# fixture would take for a missing module: hand tests the module instead.
@pytest.fixture
def attention(impl):
    return impl.attention


# -- drawing inputs -------------------------------------------------------------


def lower_right_allowed(L: int, S: int) -> np.ndarray:
    """(L, S) bool, True where query i may see key j: what causal_lower_right(L, S) materializes."""
    return torch.ones(L, S, dtype=torch.bool).tril(diagonal=S - L).numpy()


def check_dtype(got, dtype, what):
    assert got.dtype == DTYPES[dtype], f"{what}: output dtype {got.dtype}, expected {dtype} (the input's)"


# -- the causal mask: exact -------------------------------------------------------------


@given(L=st.integers(1, 12), S=st.integers(1, 12), dtype=st.sampled_from(sorted(DTYPES)))
def test_causal_mask(attention, L, S, dtype):
    got = attention.causal_mask(L, S, DTYPES[dtype])
    assert got.shape == (L, S), f"causal_mask({L}, {S}) has shape {got.shape}"
    assert got.dtype == DTYPES[dtype], f"causal_mask dtype {got.dtype}, expected {dtype}"
    want = np.where(lower_right_allowed(L, S), 0.0, -np.inf)
    got = np.array(got.astype(mx.float32))
    assert np.array_equal(got, want), f"causal_mask({L}, {S}):\n{got}\nexpected\n{want}"


def test_causal_mask_default_dtype(attention):
    got = attention.causal_mask(2, 3)
    assert got.dtype == mx.float32, f"default dtype {got.dtype}, expected float32"
    assert np.array(got).tolist() == [[0, 0, -math.inf], [0, 0, 0]], f"causal_mask(2, 3) = {got}"


# -- grouped attention ------------------------------------------------------------------


def fast_sdpa(q, k, v, scale, mask) -> mx.array:
    """mx.fast's attention in fp32 on (..., heads, n, D): it wants (B, heads, n, D) and an explicit scale."""
    def as_4d(x):  # leading axes folded into one; an (L, S) mask broadcasts as it is
        return x.astype(mx.float32).reshape(-1, *x.shape[-3:]) if x.ndim >= 3 else x.astype(mx.float32)

    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    mask = as_4d(mask) if isinstance(mask, mx.array) else mask
    return mx.fast.scaled_dot_product_attention(as_4d(q), as_4d(k), as_4d(v), scale=scale, mask=mask).reshape(q.shape)


@given(data=st.data())
def test_sdpa_grouped(attention, data):
    dtype, rng = draw_dtype(data), draw_rng(data)
    batch = tuple(data.draw(st.lists(st.integers(1, 2), max_size=2), label="batch dims"))
    H_kv = data.draw(st.integers(1, 3), label="kv heads")  # 1: multi-query attention
    H = H_kv * data.draw(st.integers(1, 4), label="query heads per kv head")
    D = data.draw(st.sampled_from([1, 4, 8, 16, 32]), label="D")
    mask_kind = data.draw(st.sampled_from(MASKS), label="mask")
    L = data.draw(st.integers(1, 8), label="L")
    # causal needs S >= L here: fewer keys than queries leaves rows that see nothing (tested below).
    S = data.draw(st.integers(L if mask_kind == "causal" else 1, 8), label="S")
    scale = data.draw(st.none() | st.floats(0.05, 1.0), label="scale")
    q, q32 = uniform(rng, (*batch, H, L, D), dtype)
    (k, k32), (v, v32) = (uniform(rng, (*batch, H_kv, S, D), dtype) for _ in range(2))
    mask_shape = {"L S": (L, S), "per head": (H, L, S), "full": (*batch, H, L, S)}.get(mask_kind)
    mask, mask32 = additive_mask(rng, mask_shape, dtype) if mask_shape else (mask_kind, None)
    if mask_kind == "causal":
        mask32 = torch.from_numpy(lower_right_allowed(L, S))  # bool: True = may attend

    got = attention.scaled_dot_product_attention_grouped(q, k, v, scale=scale, mask=mask)
    check_dtype(got, dtype, "sdpa grouped")
    tol = BY_DTYPE[dtype]
    what = f"q {q.shape}, k {k.shape}, mask {mask_kind}, scale={scale}"
    want = F.scaled_dot_product_attention(q32, k32, v32, attn_mask=mask32, scale=scale, enable_gqa=True)
    assert_close(got, want, tol, f"grouped sdpa vs torch (enable_gqa), {what}")
    assert_close(got, fast_sdpa(q, k, v, scale, mask), tol, f"grouped sdpa vs mx.fast, {what}")


@pytest.mark.parametrize("H_kv", [1, 2, 4], ids=["MQA", "GQA", "MHA"])
def test_query_head_h_reads_kv_head_h_div_group(attention, H_kv):
    # Every value of kv head g is the constant g: attention averages, so query
    # head h must return h // (H / H_kv) whatever its weights.
    H, L, S, D = 4, 3, 5, 8
    rng = np.random.default_rng(0)
    q, k = uniform(rng, (2, H, L, D), "float32")[0], uniform(rng, (2, H_kv, S, D), "float32")[0]
    v = mx.broadcast_to(mx.arange(H_kv, dtype=mx.float32)[:, None, None], (2, H_kv, S, D))
    got = attention.scaled_dot_product_attention_grouped(q, k, v)
    want = np.broadcast_to((np.arange(H) // (H // H_kv))[:, None, None], (2, H, L, D))
    assert_close(got, want, FP32, f"query heads reading kv heads, H={H}, H_kv={H_kv}")


def test_unknown_mask_string_is_an_error(attention):
    q = mx.zeros((1, 2, 3, 4))
    with pytest.raises(ValueError):
        attention.scaled_dot_product_attention_grouped(q, q, q, mask="upper")


# -- rows that see no key: torch's F.scaled_dot_product_attention gives 0 ----------------


def causal_L_gt_S():
    # 5 queries over 3 keys, lower-right aligned: queries 0 and 1 come before every key.
    return 5, 3, "causal", torch.from_numpy(lower_right_allowed(5, 3))


def all_inf_row():
    m = np.zeros((1, 4, 5, 3), np.float32)
    m[0, 2, 1, :] = -np.inf  # query 1 of head 2 sees nothing
    return 5, 3, mx.array(m), torch.from_numpy(m)


@pytest.mark.parametrize("case", [causal_L_gt_S, all_inf_row], ids=["causal L>S", "additive all -inf row"])
def test_fully_masked_rows_are_zero(attention, case):
    L, S, mask, mask32 = case()
    rng = np.random.default_rng(0)
    q, q32 = uniform(rng, (1, 4, L, 8), "float32")
    (k, k32), (v, v32) = (uniform(rng, (1, 2, S, 8), "float32") for _ in range(2))
    want = F.scaled_dot_product_attention(q32, k32, v32, attn_mask=mask32, enable_gqa=True)
    got = attention.scaled_dot_product_attention_grouped(q, k, v, mask=mask)
    assert_close(got, want, FP32, "rows that see no key: torch's SDPA gives 0 there, not NaN")


# -- the attention layer against transformers -------------------------------------------------


def hf_attention(arch: str, E, H, H_kv, D, base, max_pos, bias: bool):
    """transformers' attention layer and its rotary embedding, eager (plain torch ops)."""
    if arch == "qwen2":  # q/k/v biases always, none on o
        config = Qwen2Config(hidden_size=E, num_attention_heads=H, num_key_value_heads=H_kv, head_dim=D,
                             rope_theta=base, max_position_embeddings=max_pos, attn_implementation="eager")
        return Qwen2Attention(config, layer_idx=0).eval(), Qwen2RotaryEmbedding(config)
    config = LlamaConfig(hidden_size=E, num_attention_heads=H, num_key_value_heads=H_kv, head_dim=D,
                         rope_theta=base, max_position_embeddings=max_pos, attention_bias=bias,
                         attn_implementation="eager")
    return LlamaAttention(config, layer_idx=0).eval(), LlamaRotaryEmbedding(config)


@given(data=st.data())
def test_attention_layer(attention, data):
    dtype, rng = draw_dtype(data), draw_rng(data)
    arch = data.draw(st.sampled_from(["llama", "llama+bias", "qwen2"]), label="architecture")
    H_kv = data.draw(st.integers(1, 3), label="kv heads")
    H = H_kv * data.draw(st.integers(1, 3), label="query heads per kv head")
    D = data.draw(st.sampled_from([4, 8, 16]), label="head_dim")
    # hidden_size need not be heads * head_dim (transformers wants a multiple of the heads)
    E = H * data.draw(st.sampled_from([D, 1, 3, 6]), label="hidden_size / heads")
    N, L = data.draw(st.integers(1, 2), label="N"), data.draw(st.integers(1, 6), label="L")
    max_pos = 64
    offset = data.draw(st.integers(0, max_pos - L), label="offset")
    causal = data.draw(st.booleans(), label="causal")
    base = data.draw(st.sampled_from([10000.0, 100000.0]), label="rope_theta")

    torch.manual_seed(0)
    ref, rotary = hf_attention(arch.split("+")[0], E, H, H_kv, D, base, max_pos, bias=arch == "llama+bias")
    weights = {}  # HF parameter name -> (mx in dtype, fp32 torch of the same rounded values)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            fan_in = p.shape[-1] if p.ndim == 2 else 1
            weights[name] = uniform(rng, tuple(p.shape), dtype, 1 / math.sqrt(fan_in))
            p.copy_(weights[name][1])
    x, x32 = uniform(rng, (N, L, E), dtype)

    args = SimpleNamespace(  # ModelArgs' fields, as Hugging Face names them
        model_type=arch.split("+")[0], hidden_size=E, num_attention_heads=H, num_key_value_heads=H_kv,
        head_dim=D, rope_theta=base, max_position_embeddings=max_pos, attention_bias=arch == "llama+bias",
        rms_norm_eps=1e-6, intermediate_size=4 * E, num_hidden_layers=1, vocab_size=32)

    def param(name):  # the implementation's copy of an HF parameter; None where the layer has none
        return weights[name][0] if name in weights else None

    layer = attention.Attention(
        args, *(param(f"{p}_proj.weight") for p in "qkvo"),
        bq=param("q_proj.bias"), bk=param("k_proj.bias"), bv=param("v_proj.bias"), bo=param("o_proj.bias"))
    got = layer(x, mask="causal" if causal else None, offset=offset)
    check_dtype(got, dtype, "Attention")

    positions = torch.arange(offset, offset + L).expand(N, L)
    cos, sin = rotary(x32, positions)
    hf_mask = torch.full((L, L), -math.inf).triu(1)[None, None] if causal else None
    with torch.no_grad():
        want, _ = ref(x32, position_embeddings=(cos, sin), attention_mask=hf_mask)
    what = f"E={E} H={H} H_kv={H_kv} D={D} L={L} offset={offset} causal={causal}"
    assert_close(got, want, BY_DTYPE[dtype], f"Attention vs transformers {arch}, {what}")


def small_layer(attention, seed=3):
    """A fp32 Llama attention layer: E=16, 4 query heads, 2 kv heads of 4 dims, positions < 64."""
    rng = np.random.default_rng(seed)
    args = SimpleNamespace(model_type="llama", hidden_size=16, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=4, rope_theta=10000.0, max_position_embeddings=64, attention_bias=False,
                           rms_norm_eps=1e-6, intermediate_size=32, num_hidden_layers=1, vocab_size=32)
    ws = [uniform(rng, shape, "float32", 0.25)[0] for shape in ((16, 16), (8, 16), (8, 16), (16, 16))]
    return attention.Attention(args, *ws), uniform(rng, (1, 5, 16), "float32")[0]


@pytest.mark.parametrize("offset", [1, 7, 59])
def test_attention_output_does_not_depend_on_offset(attention, offset):
    # RoPE rotates q at position m and k at n so that q.k depends on m - n only:
    # shifting every position by `offset` leaves the scores, and the output, alone.
    layer, x = small_layer(attention)
    assert_close(layer(x, offset=offset), layer(x, offset=0), FP32, f"Attention at offset {offset} vs 0")


def test_attention_mask_defaults_to_causal(attention):
    layer, x = small_layer(attention)
    assert_close(layer(x), layer(x, mask="causal", offset=0), FP32, "Attention(x) vs mask='causal', offset=0")
    # and causal means causal: the first position's output ignores the rest of the sequence
    assert_close(layer(x)[:, :1], layer(x[:, :1]), FP32, "position 0 with and without later positions")
