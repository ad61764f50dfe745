"""Topic 1.5, the model: config, embedding, transformer block, the full Llama/Qwen2/Qwen3/
Gemma 3 stacks, and weight loading from GGUF (dequantized) and from HF safetensors folders.

Checked against transformers (LlamaForCausalLM / Qwen2ForCausalLM / Qwen3ForCausalLM /
Gemma3ForCausalLM, fp32, the same weights) and mlx-lm: logits on the ladder's MODEL_FP32 rung,
greedy tokens identical while the reference's top-2 logit gap is clear. Qwen2 (q/k/v biases,
untied head), Qwen3 (q/k norms, head_dim != hidden / heads) and Gemma 3 (sliding windows, four
norms a layer) run on tiny random-weight configs with fixed seeds, since no such checkpoint
ships offline.
"""

from __future__ import annotations

import json
import sys

import mlx.core as mx
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from reference.models import hf_folder_from_gguf, mlx_lm_model, transformers_model
from reference.tiny_models import TINY, tiny_folder, tiny_gguf
from spec.ladder import FP32, MODEL_FP32, assert_close, assert_greedy_tokens

NAMES = {
    "config": ["ModelArgs"],
    "quantize": ["dequantize"],
    "model": ["Embedding", "TransformerBlock", "Model"],
    "loader": ["load_model", "LoadedModel"],
    "errors": ["TinyLLMError"],
    "gguf_reader": ["read_gguf_file"],
    "gguf_quants": ["dequantize", "to_affine"],
}

# Texts whose ids come from the reference tokenizer (transformers', built from the
# same GGUF), so this topic does not depend on topic 1.6's tokenizer.
PROMPTS = {
    "capital": "The capital of France is",
    "chat": [{"role": "user", "content": "Name three primary colors."}],
    "code": "def fibonacci(n):\n    if n < 2:",
}


@pytest.fixture(scope="session")
def prompt_ids(default_model):
    from reference.tokenizer import hf_tokenizer

    tok = hf_tokenizer(default_model)
    encode = lambda p: (tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False)  # noqa: E731
                        if isinstance(p, list) else p)
    return {name: tok.encode(encode(p), add_special_tokens=False) for name, p in PROMPTS.items()}


@pytest.mark.presence
def test_has_names(impl):
    missing = [f"{m}.{n}" for m, names in NAMES.items() for n in names if not hasattr(getattr(impl, m), n)]
    assert not missing, f"missing: {missing}"


# --- config ---------------------------------------------------------------------------


def test_config_from_hf_dicts(impl):
    llama = {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "intermediate_size": 1536,
             "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
             "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}, "tie_word_embeddings": True,
             "rms_norm_eps": 1e-5, "unknown_future_key": 1}
    a = impl.config.ModelArgs.from_dict(llama)
    assert (a.rope_theta, a.head_dim, a.num_key_value_heads, a.tie_word_embeddings) == (100000.0, 64, 3, True)
    qwen = {"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
            "num_attention_heads": 4, "vocab_size": 256, "rope_theta": 50000.0}
    b = impl.config.ModelArgs.from_dict(qwen)
    assert (b.rope_theta, b.num_key_value_heads, b.head_dim) == (50000.0, 4, 16), "defaults: kv heads = heads"


def test_config_rejects_unsupported_architecture(impl):
    with pytest.raises(ValueError, match="llama"):
        impl.config.ModelArgs.from_dict({"model_type": "gpt2", "hidden_size": 8, "num_hidden_layers": 1,
                                         "intermediate_size": 8, "num_attention_heads": 1, "vocab_size": 8})


# --- dequantization: the GGUF tensors arrive as MLX affine triples ---------------------


@given(data=st.data())
def test_dequantize_matches_mx(impl, data):
    bits = data.draw(st.sampled_from([4, 8]), label="bits")
    group = data.draw(st.sampled_from([32, 64, 128]), label="group_size")
    n = data.draw(st.integers(1, 8), label="rows")
    k = group * data.draw(st.integers(1, 4), label="groups per row")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    w = mx.random.normal((n, k), key=mx.random.key(seed))
    wq, scales, biases = mx.quantize(w, group_size=group, bits=bits)
    got = impl.quantize.dequantize(wq, scales, biases, group, bits, mx.float32)
    # Both compute scale * q + bias once in fp32 from the same inputs.
    assert_close(got, mx.dequantize(wq, scales, biases, group_size=group, bits=bits), FP32,
                 f"dequantize bits={bits} group={group} shape=({n},{k})")


# --- GGUF block formats: k-quants and friends, decoded with numpy -----------------------
# A GGUF's tensors that mx.load cannot read (Q5_0, the k-quants) are decoded by impl.gguf_quants,
# checked bit for bit against the gguf package's dequantize (llama.cpp's arithmetic in numpy).

# type: (values, bytes) per block and the byte ranges of its fp16 scale fields
BLOCKS = {"Q4_0": (32, 18, [0]), "Q4_1": (32, 20, [0, 2]), "Q5_0": (32, 22, [0]), "Q5_1": (32, 24, [0, 2]),
          "Q8_0": (32, 34, [0]), "Q4_K": (256, 144, [0, 2]), "Q5_K": (256, 176, [0, 2]), "Q6_K": (256, 210, [208])}
# Exact as MLX affine triples, group 32 (Q6_K's groups of 16 are not: impl requantizes it to 8 bits).
AFFINE = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 8, "Q5_1": 8, "Q8_0": 8, "Q4_K": 4, "Q5_K": 8}
# fp16 extremes: the largest, the smallest subnormal and normal, negatives, zero and -0.
F16_EXTREMES = np.array([65504.0, -65504.0, 2**-24, 2**-14, -1.5, 0.0, -0.0, 1.0], dtype=np.float16)


def random_blocks(qtype: str, n: int, seed: int, fill: int | None = None, scale=None) -> np.ndarray:
    """(n, block bytes) uint8: random (or `fill`) bytes, with finite fp16 scales (random, or `scale`)."""
    _, nbytes, f16_at = BLOCKS[qtype]
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 256, (n, nbytes), dtype=np.uint8) if fill is None else np.full((n, nbytes), fill, np.uint8)
    for at in f16_at:
        d = rng.standard_normal(n).astype(np.float16) if scale is None else np.full(n, scale, np.float16)
        b[:, at:at + 2] = d.view(np.uint8).reshape(n, 2)
    return b


def crafted_blocks(qtype: str) -> np.ndarray:
    """Every fp16 extreme as every scale field, with the other bytes all 0x00, all 0xFF (all-zero and
    all-max quants; the k-quants' 6-bit scales and mins 0 or 63, Q6_K's int8 scales -1) or 0x80
    (Q6_K's scale -128, Q8_0's -128)."""
    return np.concatenate([random_blocks(qtype, 1, 0, fill, s) for fill in (0x00, 0xFF, 0x80, 0x7F)
                           for s in F16_EXTREMES])


def gguf_reference(blocks: np.ndarray, qtype: str) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    return dequantize(blocks, GGMLQuantizationType[qtype]).reshape(blocks.shape[0], -1)


def assert_bits_equal(got: np.ndarray, want: np.ndarray, what: str) -> None:
    got = np.asarray(got, np.float32)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    same = (got == want) | (np.isnan(got) & np.isnan(want))
    if not same.all():
        i = np.argwhere(~same)[0]
        raise AssertionError(f"{what}: {(~same).sum()} of {same.size} values differ; first at {i.tolist()}:"
                             f" {got[tuple(i)]!r} != {want[tuple(i)]!r}")


def quantized_by_gguf(qtype: str, seed: int) -> np.ndarray | None:
    """Blocks written by the gguf package's own quantizer (the types it quantizes), from values with
    zeros, a wide range and one huge outlier per row."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((4, 256)) * np.exp(rng.uniform(-8, 8, (4, 1)))).astype(np.float32)
    x[1] = 0.0
    x[2, 7] = 6e4
    try:
        q = quantize(x, GGMLQuantizationType[qtype])
    except NotImplementedError:
        return None  # k-quants: gguf only dequantizes them; their blocks are packed by hand above
    return q.reshape(-1, BLOCKS[qtype][1])


@pytest.mark.parametrize("qtype", list(BLOCKS))
def test_gguf_blocks_decode_like_llama_cpp(impl, qtype):
    cases = {"random": random_blocks(qtype, 64, seed=1), "crafted": crafted_blocks(qtype)}
    if (q := quantized_by_gguf(qtype, seed=2)) is not None:
        cases["gguf.quantize"] = q
    for name, blocks in cases.items():
        rows = blocks.reshape(2 if name != "crafted" else 1, -1)  # several blocks a row, too
        got = impl.gguf_quants.dequantize(rows, qtype, (rows.shape[0], rows.shape[1] // BLOCKS[qtype][1]
                                                         * BLOCKS[qtype][0]))
        assert_bits_equal(got, gguf_reference(blocks, qtype).reshape(got.shape), f"{qtype} {name}")


@pytest.mark.parametrize("qtype", list(BLOCKS))
def test_gguf_blocks_map_exactly_to_affine_triples(impl, qtype):
    """scales * q + biases of the triple (impl.quantize.dequantize, in fp32) == llama.cpp's values."""
    blocks = np.concatenate([random_blocks(qtype, 16, seed=3), crafted_blocks(qtype)])
    rows = blocks.reshape(blocks.shape[0] * BLOCKS[qtype][0] // 256, -1)  # rows of 256 values
    triple = impl.gguf_quants.to_affine(rows, qtype)
    if qtype not in AFFINE:
        assert triple is None, f"{qtype} has no exact affine triple with the kernel's group sizes"
        return
    w_q, scales, biases, bits = triple
    assert (bits, w_q.dtype, w_q.shape) == (AFFINE[qtype], np.uint32, (rows.shape[0], 256 * bits // 32))
    got = impl.quantize.dequantize(mx.array(w_q), mx.array(scales), mx.array(biases), 32, bits, mx.float32)
    assert_bits_equal(np.array(got), gguf_reference(blocks, qtype).reshape(rows.shape[0], 256),
                      f"{qtype} as a {bits}-bit triple")



def test_q6_k_requantizes_to_8_bits_within_half_a_step(impl):
    """Q6_K has no exact triple (16-value sub-blocks): impl.gguf_quants.to_affine_8bit puts each group
    of 32 of llama.cpp's values on an 8-bit grid from its min to its max. Every value moves by at most
    half a grid step, scale / 2, plus fp32 rounding (of the scale and of scale * q + bias: 4 ulps of the
    group's largest magnitude). A sub-block's values d sc (q - 32) span [-32, 31] steps of |d sc|, or
    [-31, 32] for a negative sc, so a group's range is at most 64 of the coarser sub-block's steps and
    the grid's step at most 64/255 of it: the requantization moves a value by at most 32/255 (about
    an eighth) of Q6_K's own step, a quarter of its rounding error."""
    blocks = np.concatenate([random_blocks("Q6_K", 16, seed=4), crafted_blocks("Q6_K")])
    rows = blocks.reshape(-1, 2 * 210)  # rows of 512 values, two blocks a row
    w_q, scales, biases, bits = impl.gguf_quants.to_affine_8bit(rows, "Q6_K", rows_at_once=3)  # slices
    assert (bits, w_q.dtype, w_q.shape, scales.shape) == (8, np.uint32, (rows.shape[0], 128), (rows.shape[0], 16))
    got = np.array(impl.quantize.dequantize(mx.array(w_q), mx.array(scales), mx.array(biases), 32, 8, mx.float32))
    want = gguf_reference(blocks, "Q6_K").reshape(got.shape)
    g = want.reshape(rows.shape[0], 16, 32)
    ulp = np.spacing(np.abs(g).max(axis=-1, keepdims=True).astype(np.float32))
    bound = scales[..., None] / 2 + 4 * ulp  # (rows, 16, 1)
    err = np.abs(got.reshape(g.shape) - g)
    assert (err <= bound).all(), f"Q6_K requantized: error {err.max()} over the bound at {np.argwhere(err > bound)[0]}"
    sub = np.abs(_q6_k_steps(blocks)).reshape(rows.shape[0], 16, 2).max(axis=-1)  # coarser sub-block's step
    assert (scales <= sub * np.float32(64 / 255) * (1 + 2**-20)).all(), "an 8-bit step over 64/255 of Q6_K's"


def _q6_k_steps(blocks: np.ndarray) -> np.ndarray:
    """(n, 210) Q6_K blocks -> (n, 16) their sub-blocks' steps d * sc, read from llama.cpp's layout."""
    d = blocks[:, 208:210].copy().view(np.float16).astype(np.float32)
    return d * blocks[:, 192:208].view(np.int8).astype(np.float32)

METADATA = {  # one key per GGUF value type, arrays of numbers and of strings
    "t.u8": ("uint8", 200), "t.i8": ("int8", -100), "t.u16": ("uint16", 60000), "t.i16": ("int16", -30000),
    "t.u32": ("uint32", 4_000_000_000), "t.i32": ("int32", -2_000_000_000), "t.f32": ("float32", 0.5),
    "t.u64": ("uint64", 2**63 + 5), "t.i64": ("int64", -(2**62)), "t.f64": ("float64", 1e-300),
    "t.bool": ("bool", True), "t.str": ("string", "héllo 世界"),
    "t.ints": ("array", [3, -1, 4]), "t.strs": ("array", ["a", "", "ü b"]),
}


def write_tiny_gguf(path, tensors: dict[str, tuple[str, np.ndarray]], align: int | None = None):
    """A GGUF written by the gguf package: METADATA and raw blocks of the given types."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    if align:
        w.add_custom_alignment(align)
    for key, (kind, value) in METADATA.items():
        getattr(w, f"add_{kind}")(key, value)
    for name, (qtype, raw) in tensors.items():
        w.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType[qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("align", [None, 64])
def test_gguf_reader_reads_what_the_gguf_package_writes(impl, tmp_path, align):
    raw = {qtype: random_blocks(qtype, 8, seed=4).reshape(2, -1) for qtype in BLOCKS}
    raw["F32"] = np.arange(12, dtype=np.float32).reshape(3, 4)
    path = write_tiny_gguf(tmp_path / "tiny.gguf", {f"t_{k}.weight": (k, v) for k, v in raw.items()}, align)
    tensors, meta = impl.gguf_reader.read_gguf_file(path)
    for key, (kind, value) in METADATA.items():
        got = meta[key]
        got = got.tolist() if hasattr(got, "tolist") else got
        assert got == value and (kind != "float32" or isinstance(got, float)), f"{key}: {got!r} != {value!r}"
    assert meta["general.architecture"] == "llama"
    for qtype, blocks in raw.items():
        t = tensors[f"t_{qtype}.weight"]
        want = (blocks if qtype == "F32" else gguf_reference(blocks.reshape(-1, BLOCKS[qtype][1]), qtype)
                .reshape(2, -1))
        assert (t.type, t.shape) == (qtype, want.shape), f"{qtype}: {t.type} {t.shape}"
        assert_bits_equal(impl.gguf_quants.dequantize(t.data, t.type, t.shape), want, f"{qtype} read back")


@pytest.mark.parametrize("case", ["header", "data", "type"])
def test_gguf_reader_errors_are_one_line(impl, tmp_path, case):
    raw = {"a.weight": ("Q2_K" if case == "type" else "Q4_K", np.zeros((2, 84 if case == "type" else 144), np.uint8))}
    path = write_tiny_gguf(tmp_path / "m.gguf", raw)
    size = path.stat().st_size
    if case != "type":
        path.write_bytes(path.read_bytes()[: 100 if case == "header" else size - 10])
    expect = {"header": "past the end", "data": "past the end", "type": "Q2_K, which impl does not read; supported: F32"}
    with pytest.raises(impl.errors.TinyLLMError) as e:
        impl.gguf_reader.read_gguf_file(path)
    assert expect[case] in str(e.value) and "\n" not in str(e.value), f"{case}: {e.value}"


# --- tiny random-weight models: Llama and Qwen2 paths against transformers --------------

@pytest.mark.parametrize("kind", sorted(TINY))
def test_tiny_model_logits_match_transformers(impl, tmp_path, kind):
    ref, folder = tiny_folder(tmp_path, kind, seed=7)
    loaded = impl.loader.load_model(folder)
    ids = np.random.default_rng(0).integers(0, 320, size=(2, 11))
    got = loaded.model(mx.array(ids))
    with torch.no_grad():
        want = ref(torch.tensor(ids)).logits
    # 2 layers of fp32 on logits of magnitude ~1: the fp32 rung applies.
    assert_close(got, want, FP32, f"{kind} logits")


def test_config_qwen3_and_gemma3(impl):
    qwen3 = {"model_type": "qwen3", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 96,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24, "vocab_size": 320,
             "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}, "use_sliding_window": False,
             "sliding_window": None, "layer_types": ["full_attention"] * 2}
    a = impl.config.ModelArgs.from_dict(qwen3)
    assert (a.head_dim, a.rope_theta, [a.window(i) for i in range(2)]) == (24, 1e6, [None, None])
    # Gemma 3 270M's config.json (older keys: rope_theta, rope_local_base_freq, the pattern) and the
    # transformers 5 form (rope_parameters per layer type, layer_types): the same layers.
    old = {"model_type": "gemma3_text", "hidden_size": 640, "num_hidden_layers": 18, "intermediate_size": 2048,
           "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256, "vocab_size": 262144,
           "rope_theta": 1e6, "rope_local_base_freq": 1e4, "rope_scaling": None, "sliding_window": 512,
           "sliding_window_pattern": 6, "query_pre_attn_scalar": 256, "hidden_activation": "gelu_pytorch_tanh"}
    new = {k: v for k, v in old.items() if not k.startswith(("rope", "sliding_window_"))} | {
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
        "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)]}
    for config in (old, new):
        g = impl.config.ModelArgs.from_dict(config)
        windows = [g.window(i) for i in range(18)]
        assert windows == [None if (i + 1) % 6 == 0 else 512 for i in range(18)], windows
        assert [g.rope_base(i) for i in (0, 5)] == [1e4, 1e6] and g.query_pre_attn_scalar == 256


# --- tiny random-weight Qwen3 and Gemma 3: logits and greedy tokens against transformers ---

NEW_ARCHS = sorted(k for k in TINY if k.startswith(("qwen3", "gemma3")))


def _tiny_reference_greedy(ref, ids: list[int], steps: int) -> tuple[list[int], list[float]]:
    x = torch.tensor([ids])
    out = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=steps, do_sample=False,
                       output_scores=True, return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    gaps = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
    return out.sequences[0, len(ids):].tolist(), gaps


def _week1_greedy(model, ids: list[int]):
    seq = list(ids)
    while True:  # the whole sequence through the model at every step, as week 1 does
        seq.append(int(mx.argmax(model(mx.array([seq]))[0, -1]).item()))
        yield seq[-1]


@pytest.mark.parametrize("kind", NEW_ARCHS)
def test_tiny_qwen3_gemma3_logits_and_greedy_match_transformers(impl, tmp_path, kind):
    """24 positions: three times Gemma's tiny window of 8, so the window decides what each local layer
    sees; greedy decoding then runs 12 more positions past it."""
    ref, folder = tiny_folder(tmp_path, kind, seed=11)
    loaded = impl.loader.load_model(folder)
    ids = np.random.default_rng(1).integers(0, 320, size=(2, 24))
    with torch.no_grad():
        want = ref(torch.tensor(ids)).logits
    assert_close(loaded.model(mx.array(ids)), want, MODEL_FP32, f"{kind} logits")
    want_tokens, gaps = _tiny_reference_greedy(ref, ids[0].tolist(), steps=12)
    assert_greedy_tokens(_week1_greedy(loaded.model, ids[0].tolist()), want_tokens, gaps, f"{kind} greedy tokens")


def test_gemma3_sliding_window_matters(impl, tmp_path):
    """The check above is not vacuous: the same weights with a window wider than the sequence give
    logits far from transformers' past the window, and equal ones within it."""
    ref, folder = tiny_folder(tmp_path, "gemma3", seed=11)
    config = json.loads((folder / "config.json").read_text())
    config["sliding_window"] = 1000
    (folder / "config.json").write_text(json.dumps(config))
    ids = np.random.default_rng(1).integers(0, 320, size=(1, 24))
    got = np.array(impl.loader.load_model(folder).model(mx.array(ids)))
    with torch.no_grad():
        want = ref(torch.tensor(ids)).logits.numpy()
    assert_close(got[:, :8], want[:, :8], MODEL_FP32, "within the window, no window is the same")
    assert np.abs(got[:, 8:] - want[:, 8:]).max() > 100 * MODEL_FP32.atol, "past the window the window must matter"


@pytest.mark.parametrize("kind", ["qwen3-untied-head-dim", "gemma3"])
def test_tiny_qwen3_gemma3_from_gguf(impl, tmp_path, kind):
    """The same tiny weights written as an F32 GGUF by the gguf package, with llama.cpp's names
    (blk.N.attn_q_norm, post_attention_norm, post_ffw_norm, ...) and metadata."""
    ref, _ = tiny_folder(tmp_path, kind, seed=13, **({"query_pre_attn_scalar": 32} if "gemma" in kind else {}))
    path = tiny_gguf(ref, tmp_path / f"{kind}.gguf")
    loaded = impl.loader.load_model(path, quantized=False)
    assert loaded.args.head_dim == ref.config.head_dim
    ids = np.random.default_rng(2).integers(0, 320, size=(1, 20))
    with torch.no_grad():
        want = ref(torch.tensor(ids)).logits
    assert_close(loaded.model(mx.array(ids)), want, MODEL_FP32, f"{kind} from GGUF")


def test_tiny_gemma3_gguf_convention_matches_transformers_gguf(tmp_path):
    """The GGUF writer's convention (norms stored as 1 + weight) is llama.cpp's as transformers reads it:
    transformers' own GGUF loading of the file gives back the original model's logits. (transformers
    reads no query scale from a GGUF and takes its default, 256; llama.cpp takes head_dim ** -0.5, which is
    Gemma 3 270M's too: this tiny model uses 256 so both readings agree.)"""
    from transformers import Gemma3ForCausalLM

    ref, _ = tiny_folder(tmp_path, "gemma3", seed=13, query_pre_attn_scalar=256)
    path = tiny_gguf(ref, tmp_path / "gemma3.gguf")
    back = Gemma3ForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.tensor(np.random.default_rng(2).integers(0, 320, size=(1, 20)))
    with torch.no_grad():
        assert_close(back(ids).logits, ref(ids).logits, MODEL_FP32, "transformers' GGUF reading vs the original")


# --- the real default model -------------------------------------------------------------


@pytest.fixture(scope="session")
def real(impl, default_model):
    return impl.loader.load_model(default_model, quantized=False)  # week 1: dequantized at load


@pytest.fixture(scope="session")
def hf_folder(default_model):
    return hf_folder_from_gguf(default_model)


def test_real_config_from_gguf(real, hf_folder):
    # Against transformers' own reading of the same GGUF (the config.json it wrote).
    a, want = real.args, json.loads((hf_folder / "config.json").read_text())
    names = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
             "num_key_value_heads", "head_dim", "rope_theta", "tie_word_embeddings", "vocab_size",
             "max_position_embeddings", "bos_token_id", "eos_token_id")
    got = {n: getattr(a, n) for n in names}
    assert got == {n: want[n] for n in names}, f"ModelArgs {got} vs transformers' config {want}"
    # The GGUF stores eps in fp32 (1e-5 reads back as 9.99999975e-06): equal to fp32 rounding.
    assert np.float32(a.rms_norm_eps) == np.float32(want["rms_norm_eps"]), (a.rms_norm_eps, want["rms_norm_eps"])


@pytest.mark.parametrize("prompt", sorted(PROMPTS))
def test_real_logits_match_transformers(real, hf_folder, prompt_ids, prompt):
    ids = prompt_ids[prompt]
    got = real.model(mx.array([ids]))
    with torch.no_grad():
        want = transformers_model(str(hf_folder))(torch.tensor([ids])).logits
    assert_close(got, want, MODEL_FP32, f"logits for {prompt!r}")


def test_real_logits_match_mlx_lm(real, hf_folder, prompt_ids):
    ids = prompt_ids["chat"]
    model, _ = mlx_lm_model(str(hf_folder))
    assert_close(real.model(mx.array([ids])), model(mx.array([ids])), MODEL_FP32, "logits vs mlx-lm")


def test_safetensors_folder_matches_gguf(impl, real, hf_folder, prompt_ids):
    """The same weights through the other loader: GGUF (dequantized here) vs transformers' dequantization."""
    folder = impl.loader.load_model(hf_folder)
    ids = mx.array([prompt_ids["code"]])
    assert_close(folder.model(ids), real.model(ids), MODEL_FP32, "HF-folder logits vs GGUF logits")


def _reference_greedy(model, ids: list[int], steps: int) -> tuple[list[int], list[float]]:
    """transformers' greedy tokens and, per step, the gap between its top-2 logits."""
    # An explicit attention mask: otherwise generate() infers one from pad_token_id, and
    # SmolLM2's pad id is <|im_end|>, which the chat prompt contains.
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=steps, do_sample=False,
                         output_scores=True, return_dict_in_generate=True, pad_token_id=2, eos_token_id=None)
    tokens = out.sequences[0, len(ids):].tolist()
    gaps = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
    return tokens, gaps


@pytest.mark.parametrize("prompt", sorted(PROMPTS))
def test_real_greedy_tokens_match_transformers(real, hf_folder, prompt_ids, prompt):
    steps = 12
    ids = prompt_ids[prompt]
    want, gaps = _reference_greedy(transformers_model(str(hf_folder)), ids, steps)

    def greedy():  # the whole sequence through the model at every step, as week 1 does
        seq = list(ids)
        while True:
            seq.append(int(mx.argmax(real.model(mx.array([seq]))[0, -1]).item()))
            yield seq[-1]

    assert_greedy_tokens(greedy(), want, gaps, f"{prompt}: greedy tokens vs transformers")


# --- bad model files: one-line errors ---------------------------------------------------


def _gguf(path, arch="llama"):
    """A GGUF with one tensor and, of a model's metadata, only its block count."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_file_type(3)  # Q4_1
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("case", ["unknown-name", "altered-part", "missing-part"])
def test_known_model_failures_are_one_line_and_leave_nothing_in_the_cache(impl, tmp_path, monkeypatch, case):
    """A known name is assembled from part packages into the cache (impl.model_files): an unknown
    name lists the known ones; parts that do not add up to the pinned sha256, or a part package
    the registry lacks, fail in one line, and the cache holds no file afterwards, whole or half."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("TINY_LLM_CACHE", str(cache))
    parts = tmp_path / "site"  # two installed part packages: found by find_spec, never imported
    for n, data in ((1, b"GGUF" + bytes(60)), (2, bytes(range(64)))):
        (parts / f"tiny_part{n}" / "data").mkdir(parents=True)
        (parts / f"tiny_part{n}" / "data" / f"part{n:02d}.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(parts))
    packages = ("tiny-part1==1.0", "tiny-part2==1.0")
    known = impl.model_files.KnownModel
    models = {"altered-part": known("tiny.gguf", packages, "0" * 64, 128),
              "missing-part": known("tiny.gguf", packages + ("tiny-llm-spec-no-such-part==0.0.1",), "0" * 64, 128)}
    monkeypatch.setitem(impl.model_files.KNOWN_MODELS, "tiny", models.get(case, models["altered-part"]))
    name, expect = ("gpt-9", "known: qwen2.5-coder-0.5b") if case == "unknown-name" else (
        "tiny", {"altered-part": "sha256", "missing-part": "cannot download tiny-llm-spec-no-such-part"}[case])
    with pytest.raises(impl.errors.TinyLLMError) as e:
        impl.model_files.known_model_path(name, log=lambda line: None)
    msg = str(e.value)
    assert expect in msg and "\n" not in msg, f"{case}: {msg!r}"
    left = sorted(p.name for p in cache.rglob("*")) if cache.exists() else []
    assert not left, f"{case}: the cache holds {left} after the failure"
    assert "tiny_part1" not in sys.modules, "a part package was imported"


@pytest.mark.parametrize("case", ["missing", "truncated", "not-gguf", "architecture", "quantization", "metadata"])
def test_bad_model_files_give_one_line_errors(impl, tmp_path, default_model, case):
    # A bad tokenizer is topic 1.6's (the loader reads it when first used): day_1_6_generate.py.
    path = tmp_path / "model.gguf"
    expect = {"missing": "not found", "truncated": "past the end", "not-gguf": "not a GGUF",
              "architecture": "supported: llama, qwen2", "quantization": "supported: F32",
              "metadata": "lacks llama.embedding_length"}[case]
    if case == "truncated":
        path.write_bytes(default_model.read_bytes()[: 40_000_000])
    elif case == "not-gguf":
        path.write_text(json.dumps({"hello": "world"}))
    elif case == "architecture":
        _gguf(path, arch="gpt2")
    elif case == "quantization":  # a tensor type impl does not decode
        write_tiny_gguf(path, {"token_embd.weight": ("Q2_K", np.zeros((4, 84), np.uint8))})
    elif case == "metadata":
        _gguf(path)
    with pytest.raises(impl.errors.TinyLLMError) as e:
        impl.loader.load_model(path)
    msg = str(e.value)
    assert expect in msg and "\n" not in msg, f"{case}: {msg!r}"


# --- a real Qwen2 checkpoint: Qwen2.5-Coder-0.5B-Instruct, k-quants --------------------
# Q5_0/Q8_0/Q4_K/Q6_K tensors, q/k/v biases, an untied head, rope theta 1e6: what the tiny
# random Qwen2 configs check, on real weights decoded by impl.gguf_quants. (The coder_gguf fixture,
# spec/conftest.py, fetches it once: 491 MB.)

def test_qwen_coder_logits_and_greedy_tokens_match_transformers(impl, coder_gguf):
    from reference.tokenizer import hf_tokenizer

    loaded = impl.loader.load_model(coder_gguf, quantized=False)  # week 1: dense fp32, the reference's weights
    ref = transformers_model(str(hf_folder_from_gguf(coder_gguf)))
    tok = hf_tokenizer(coder_gguf)
    chat = [{"role": "user", "content": "Write a Python function that reverses a list"}]
    ids = tok.encode(tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False), add_special_tokens=False)
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits
    assert_close(loaded.model(mx.array([ids])), want, MODEL_FP32, "Qwen2.5-Coder-0.5B logits")
    want_tokens, gaps = _reference_greedy(ref, ids, steps=8)

    def greedy():
        seq = list(ids)
        while True:
            seq.append(int(mx.argmax(loaded.model(mx.array([seq]))[0, -1]).item()))
            yield seq[-1]

    assert_greedy_tokens(greedy(), want_tokens, gaps, "Qwen2.5-Coder-0.5B greedy tokens vs transformers")


# --- a real Gemma 3 checkpoint: Gemma 3 270M (base), k-quants --------------------------
# 18 layers, 5 of every 6 with a sliding window of 512 (RoPE base 10k) and every 6th global (1M),
# q/k norms, pre- and post-norms, GELU-tanh, scaled embeddings, a tied head of 262,144 tokens.

def gemma_long_prompt(tok) -> list[int]:
    """<bos> and about 600 tokens of numbered lines, so the last queries of the local layers see
    only the 512 positions before them (the reference tokenizer's ids)."""
    text = "".join(f"Line {i}: the {w} walks to the {p} and counts {i * 7} stones.\n" for i, (w, p) in
                   enumerate(zip(["fox", "miller", "baker", "sailor", "weaver"] * 8,
                                 ["river", "market", "harbour", "mill", "tower", "field"] * 7, strict=False)))
    return [tok.bos_token_id] + tok.encode(text, add_special_tokens=False)


def test_gemma3_270m_logits_and_greedy_tokens_match_transformers(impl, gemma_gguf):
    """One forward each over the prompt and transformers' 6 greedy tokens (teacher forcing): the
    logits of the last 32 positions agree, and impl's argmax at each generated position is the
    reference's token while its top-2 gap is clear, which is impl's greedy decode token for token."""
    from reference.tokenizer import hf_tokenizer

    loaded = impl.loader.load_model(gemma_gguf, quantized=False)  # week 1: dense fp32, the reference's weights
    ref = transformers_model(str(hf_folder_from_gguf(gemma_gguf)))
    ids = gemma_long_prompt(hf_tokenizer(gemma_gguf))
    window = loaded.args.sliding_window
    assert len(ids) > window + 32, f"a prompt of {len(ids)} tokens does not pass the {window}-token window"
    steps = 6
    want_tokens, gaps = _reference_greedy(ref, ids, steps)
    seq = ids + want_tokens[:-1]  # position len(ids) - 1 + k predicts want_tokens[k]
    with torch.no_grad():
        want = ref(torch.tensor([seq]), logits_to_keep=32).logits  # (1, 32, V)
    got = loaded.model(mx.array([seq]), logits_to_keep=32)  # (1, 32, V)
    assert_close(got, want, MODEL_FP32, f"Gemma 3 270M logits of the last 32 positions of {len(seq)}")
    argmax = np.array(mx.argmax(got[0, -steps:], axis=-1)).tolist()
    assert_greedy_tokens(iter(argmax), want_tokens, gaps, "Gemma 3 270M greedy tokens vs transformers")
