"""Tiny random-weight transformers models (Llama, Qwen2, Qwen3, Gemma 3 text; Mixtral, Qwen2-MoE and
Qwen3-MoE in TINY_MOE) saved as HF folders,
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
    # sliding windows of 8 (topic 3.9): Mistral's on every layer; Qwen2's from layer max_window_layers on
    "mistral-window": ("mistral", dict(initializer_range=0.1, sliding_window=8, num_hidden_layers=3)),
    "qwen2-window": ("qwen2", dict(initializer_range=0.1, use_sliding_window=True, sliding_window=8,
                                   max_window_layers=1, num_hidden_layers=3)),
    "gemma3-mqa-softcap": ("gemma3_text", GEMMA3 | dict(num_hidden_layers=3, final_logit_softcapping=3.0,
                                                         num_key_value_heads=1, rope_local_base_freq=100.0)),
}
# Mixture of experts (topic 3.3): 8 experts, top 2 (top 3 for Qwen3-MoE, renormalized), narrow experts.
# initializer_range 0.1: clear greedy gaps; the routers are redrawn wider (ROUTER_STD) so that no token's
# k-th and (k+1)-th expert scores tie within rounding (which would make the choice of expert arbitrary).
MOE = dict(initializer_range=0.1, num_experts_per_tok=2)
TINY_MOE = {
    "mixtral": ("mixtral", MOE | dict(num_local_experts=8, intermediate_size=64)),
    "qwen2-moe": ("qwen2_moe", MOE | dict(num_experts=8, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                                        tie_word_embeddings=False)),
    "qwen2-moe-sparse-step": ("qwen2_moe", MOE | dict(num_experts=6, moe_intermediate_size=32, num_hidden_layers=3,
                                                    shared_expert_intermediate_size=40, decoder_sparse_step=2,
                                                    mlp_only_layers=[2], norm_topk_prob=True)),
    "qwen3-moe": ("qwen3_moe", MOE | dict(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
                                        norm_topk_prob=True, head_dim=24)),
}
ROUTER_STD = 0.5
# Which of the architectures' weights start at a constant (biases at 0, Qwen3's norms at 1, Gemma's at 0):
# those are drawn at random too, so that they matter.
RANDOMIZED = {"llama": (".bias",), "mistral": (), "qwen2": (".bias",), "qwen3": (".bias", "norm.weight"),
              "gemma3_text": (".bias", "norm.weight"), "mixtral": (), "qwen2_moe": (".bias",),
              "qwen3_moe": (".bias", "norm.weight")}


def tiny_folder(tmp_path: Path, kind: str, seed: int, **overrides):
    """(transformers model, folder): a random-weight model of TINY[kind] (or TINY_MOE[kind]) saved as an HF folder.
    overrides: config fields (max_position_embeddings, num_hidden_layers, ...)."""
    import torch
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        MixtralConfig,
        MixtralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen2MoeConfig,
        Qwen2MoeForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    arch, extra = (TINY | TINY_MOE)[kind]
    cfg = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, rope_theta=50000.0,
               max_position_embeddings=128, rms_norm_eps=1e-6) | extra | overrides
    torch.manual_seed(seed)
    Config, Model = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
                     "qwen2": (Qwen2Config, Qwen2ForCausalLM),
                     "qwen3": (Qwen3Config, Qwen3ForCausalLM), "gemma3_text": (Gemma3TextConfig, Gemma3ForCausalLM),
                     "mixtral": (MixtralConfig, MixtralForCausalLM), "qwen2_moe": (Qwen2MoeConfig, Qwen2MoeForCausalLM),
                     "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM)}[arch]
    model = Model(Config(**cfg)).eval()
    with torch.no_grad():  # default init leaves biases at 0 and norms at 1 (Gemma's at 0); make them matter
        for name, p in model.named_parameters():
            if name.endswith(RANDOMIZED[arch]):
                p.normal_(0 if name.endswith(".bias") or arch == "gemma3_text" else 1, 0.5)
            elif name.endswith("mlp.gate.weight"):  # an MoE router
                p.normal_(0, ROUTER_STD)
    folder = tmp_path / f"{kind}-{seed}"
    model.save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf_folder_from_gguf() / f, folder / f)
    return model, folder


_GGUF_ARCH = {"qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3", "mixtral": "llama", "qwen2_moe": "qwen2moe",
              "qwen3_moe": "qwen3moe"}
_GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
               "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
               "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
               # MoE: the router, Qwen2-MoE's shared expert and its gate, the stacked experts (see _state_tensors)
               "mlp.gate": "ffn_gate_inp", "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
               "mlp.shared_expert.up_proj": "ffn_up_shexp", "mlp.shared_expert.down_proj": "ffn_down_shexp",
               "mlp.shared_expert_gate": "ffn_gate_inp_shexp", "mlp.experts.gate_exps": "ffn_gate_exps",
               "mlp.experts.up_exps": "ffn_up_exps", "mlp.experts.down_exps": "ffn_down_exps"}
_GGUF_GEMMA_NAMES = _GGUF_NAMES | {"post_attention_layernorm": "post_attention_norm",
                                   "pre_feedforward_layernorm": "ffn_norm",
                                   "post_feedforward_layernorm": "post_ffw_norm"}


def _llama_cpp_permute(w, n_heads: int):
    """convert_hf_to_gguf.py's Q/K row order for llama (and Mixtral): each head's rows as interleaved pairs."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _state_tensors(model):
    """(HF key, fp32 numpy) of a transformers model, its stacked experts (transformers 5 holds
    'mlp.experts.gate_up_proj' (X, 2I, E) and 'mlp.experts.down_proj') split into llama.cpp's
    ffn_{gate,up,down}_exps, under HF-like keys 'mlp.experts.{gate,up,down}_exps.weight'."""
    for key, t in model.state_dict().items():
        t = t.detach().float().numpy()
        if key.endswith("mlp.experts.gate_up_proj"):
            half = t.shape[1] // 2
            yield key.replace("gate_up_proj", "gate_exps.weight"), t[:, :half]
            yield key.replace("gate_up_proj", "up_exps.weight"), t[:, half:]
        elif key.endswith("mlp.experts.down_proj"):
            yield key.replace("down_proj", "down_exps.weight"), t
        else:
            yield key, t


def tiny_gguf(model, path: Path, qtype: str = "F32") -> Path:
    """A tiny transformers model (Qwen2, Qwen3, Gemma 3, Mixtral, Qwen2-MoE or Qwen3-MoE) written as
    a GGUF by the gguf package, with llama.cpp's names, metadata and conventions (Gemma's norms
    stored as 1 + weight, as convert_hf_to_gguf.py writes them; Mixtral as llama with experts, its Q/K
    rows permuted; the experts stacked (X, out, in); Qwen2-MoE's shared-expert gate a vector). qtype:
    of the matrices ("Q8_0": quantized by gguf's own quantizer); vectors and routers stay F32."""
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
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads  # Mixtral's: None; Qwen2-MoE's: none
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    rope = c.rope_parameters["full_attention"] if arch == "gemma3" else c.rope_parameters
    w.add_rope_freq_base(rope["rope_theta"])
    if arch == "gemma3":
        w.add_sliding_window(c.sliding_window)
    moe = c.model_type in ("mixtral", "qwen2_moe", "qwen3_moe")
    if moe:
        w.add_expert_count(getattr(c, "num_experts", None) or c.num_local_experts)
        w.add_expert_used_count(c.num_experts_per_tok)
        if c.model_type != "mixtral":
            w.add_expert_feed_forward_length(c.moe_intermediate_size)
            w.add_expert_weights_norm(c.norm_topk_prob)
        if c.model_type == "qwen2_moe":
            w.add_expert_shared_feed_forward_length(c.shared_expert_intermediate_size)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(c.vocab_size)])
    for key, t in _state_tensors(model):
        if key == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if c.model_type == "mixtral" and key.endswith(("q_proj.weight", "k_proj.weight")):
            t = _llama_cpp_permute(t, c.num_attention_heads if "q_proj" in key else c.num_key_value_heads)
        if key.endswith("shared_expert_gate.weight"):
            t = t.reshape(-1)  # llama.cpp's ffn_gate_inp_shexp is a vector
        if arch == "gemma3" and key.endswith("norm.weight"):
            t = t + 1
        if key.startswith("model.layers."):
            _, _, layer, rest = key.split(".", 3)
            base, suffix = rest.rsplit(".", 1)
            name = f"blk.{layer}.{names[base]}.{suffix}"
        else:
            name = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                    "lm_head.weight": "output.weight"}[key]
        if qtype != "F32" and t.ndim >= 2 and not name.endswith("ffn_gate_inp.weight"):
            kind = gguf.GGMLQuantizationType[qtype]
            w.add_tensor(name, quantize(t, kind), raw_dtype=kind)
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
