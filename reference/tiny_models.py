"""Tiny random-weight transformers models (Llama, Qwen2, Qwen3, Gemma 3 text) saved as HF folders,
for the specification's checks on the paths no real checkpoint here exercises and on the engine.
Fixed seeds; the SmolLM2 tokenizer files are copied beside the weights."""

from __future__ import annotations

import shutil
from pathlib import Path

from reference.models import hf_folder_from_gguf

# Gemma 3: window 8 on 5 of every 6 layers (so a 24-token sequence sees it), local base 10k,
# global base 1M, head_dim 32 != hidden / heads, queries scaled by 24 ** -0.5 (not head_dim's).
# initializer_range 0.1 (not 0.02): logits wide enough that greedy decoding has clear top-2 gaps.
GEMMA3 = dict(initializer_range=0.1, num_hidden_layers=7, sliding_window=8, sliding_window_pattern=6, head_dim=32, rope_theta=1e6,
              rope_local_base_freq=10000.0, query_pre_attn_scalar=24, tie_word_embeddings=True)

TINY = {
    "llama-tied": ("llama", dict(tie_word_embeddings=True)),
    "llama-untied-bias": ("llama", dict(tie_word_embeddings=False, attention_bias=True)),
    "llama-mqa": ("llama", dict(tie_word_embeddings=False, num_key_value_heads=1)),
    "qwen2-untied": ("qwen2", dict(tie_word_embeddings=False)),
    "qwen2-tied": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen3-tied": ("qwen3", dict(initializer_range=0.1, tie_word_embeddings=True)),
    "qwen3-untied-head-dim": ("qwen3", dict(initializer_range=0.1, tie_word_embeddings=False, head_dim=24)),  # != 64 / 4
    "qwen3-mqa": ("qwen3", dict(initializer_range=0.1, tie_word_embeddings=False, num_key_value_heads=1,
                                num_attention_heads=8)),
    "gemma3": ("gemma3_text", GEMMA3),
    "gemma3-mqa-softcap": ("gemma3_text", GEMMA3 | dict(num_hidden_layers=3, final_logit_softcapping=3.0,
                                                         num_key_value_heads=1, rope_local_base_freq=100.0)),
}
# Which of the architectures' weights start at a constant (biases at 0, Qwen3's norms at 1, Gemma's at 0):
# those are drawn at random too, so that they matter.
RANDOMIZED = {"llama": (".bias",), "qwen2": (".bias",), "qwen3": (".bias", "norm.weight"),
              "gemma3_text": (".bias", "norm.weight")}


def tiny_folder(tmp_path: Path, kind: str, seed: int, **overrides):
    """(transformers model, folder): a random-weight model of TINY[kind] saved as an HF folder.
    overrides: config fields (max_position_embeddings, num_hidden_layers, ...)."""
    import torch
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    arch, extra = TINY[kind]
    cfg = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, rope_theta=50000.0,
               max_position_embeddings=128, rms_norm_eps=1e-6) | extra | overrides
    torch.manual_seed(seed)
    Config, Model = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
                     "qwen3": (Qwen3Config, Qwen3ForCausalLM), "gemma3_text": (Gemma3TextConfig, Gemma3ForCausalLM)}[arch]
    model = Model(Config(**cfg)).eval()
    with torch.no_grad():  # default init leaves biases at 0 and norms at 1 (Gemma's at 0); make them matter
        for name, p in model.named_parameters():
            if name.endswith(RANDOMIZED[arch]):
                p.normal_(0 if name.endswith(".bias") or arch == "gemma3_text" else 1, 0.5)
    folder = tmp_path / f"{kind}-{seed}"
    model.save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf_folder_from_gguf() / f, folder / f)
    return model, folder


_GGUF_ARCH = {"qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3"}
_GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
               "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
               "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_GGUF_GEMMA_NAMES = _GGUF_NAMES | {"post_attention_layernorm": "post_attention_norm",
                                   "pre_feedforward_layernorm": "ffn_norm",
                                   "post_feedforward_layernorm": "post_ffw_norm"}


def tiny_gguf(model, path: Path, qtype: str = "F32") -> Path:
    """A tiny transformers model (Qwen2, Qwen3 or Gemma 3; their Q/K rows are not permuted) written as
    a GGUF by the gguf package, with llama.cpp's names, metadata and conventions (Gemma's norms
    stored as 1 + weight, as convert_hf_to_gguf.py writes them). qtype: of the matrices ("Q8_0":
    quantized by gguf's own quantizer); vectors stay F32."""
    import gguf
    from gguf.quants import quantize

    c = model.config
    arch = _GGUF_ARCH[c.model_type]
    names = _GGUF_GEMMA_NAMES if arch == "gemma3" else _GGUF_NAMES
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_dimension_count(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    rope = c.rope_parameters["full_attention"] if arch == "gemma3" else c.rope_parameters
    w.add_rope_freq_base(rope["rope_theta"])
    if arch == "gemma3":
        w.add_sliding_window(c.sliding_window)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(c.vocab_size)])
    for key, t in model.state_dict().items():
        if key == "lm_head.weight" and c.tie_word_embeddings:
            continue
        t = t.detach().float().numpy()
        if arch == "gemma3" and key.endswith("norm.weight"):
            t = t + 1
        if key.startswith("model.layers."):
            _, _, layer, rest = key.split(".", 3)
            base, suffix = rest.rsplit(".", 1)
            name = f"blk.{layer}.{names[base]}.{suffix}"
        else:
            name = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                    "lm_head.weight": "output.weight"}[key]
        if qtype != "F32" and t.ndim == 2:
            kind = gguf.GGMLQuantizationType[qtype]
            w.add_tensor(name, quantize(t, kind), raw_dtype=kind)
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
