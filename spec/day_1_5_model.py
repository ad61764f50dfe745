"""Topic 1.5, the model: config, embedding, transformer block, the full Llama/Qwen2
stack, and weight loading from GGUF (dequantized) and from HF safetensors folders.

Checked against transformers (LlamaForCausalLM / Qwen2ForCausalLM, fp32, the
same weights) and mlx-lm: logits on the ladder's MODEL_FP32 rung, greedy tokens
identical while the reference's top-2 logit gap is clear. Qwen2 (q/k/v biases,
untied head) runs on tiny random-weight configs with fixed seeds, since no
Qwen2 checkpoint ships offline.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from reference.models import hf_folder_from_gguf, mlx_lm_model, transformers_model
from reference.tiny_models import TINY, tiny_folder
from spec.ladder import FP32, MODEL_FP32, assert_close, assert_greedy_tokens

NAMES = {
    "config": ["ModelArgs"],
    "quantize": ["dequantize"],
    "model": ["Embedding", "TransformerBlock", "Model"],
    "loader": ["load_model", "LoadedModel"],
    "errors": ["TinyLLMError"],
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


def _gguf(path, arch="llama", file_type=3):
    """A GGUF with one tensor and, of a model's metadata, only its block count."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_file_type(file_type)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


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
    elif case == "quantization":
        _gguf(path, file_type=15)  # Q4_K_M
    elif case == "metadata":
        _gguf(path)
    with pytest.raises(impl.errors.TinyLLMError) as e:
        impl.loader.load_model(path)
    msg = str(e.value)
    assert expect in msg and "\n" not in msg, f"{case}: {msg!r}"
