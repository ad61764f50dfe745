"""transformers' GPT-2 and Llama holding given weights, for the training topics' gradient checks.

The weights come as a flat dict of numpy arrays under the names of the specification's trainable
models (`layers.0.wq`, ...); `hf_model` builds the transformers model with them, `flat_from_hf`
reads any per-parameter tensors of it (its weights, or their .grad) back under those names. GPT-2
stores its projections as Conv1D, (in, out), and q, k, v as one c_attn; Llama's are (out, in).
Dropout is off; attention is transformers' eager path.
"""

from __future__ import annotations

import numpy as np
import torch

# ours -> (transformers' name, which third of c_attn's columns or None, transposed)
_GPT2_LAYER = {
    "ln1_w": ("ln_1.weight", None, False), "ln1_b": ("ln_1.bias", None, False),
    "wq": ("attn.c_attn.weight", 0, True), "wk": ("attn.c_attn.weight", 1, True), "wv": ("attn.c_attn.weight", 2, True),
    "bq": ("attn.c_attn.bias", 0, False), "bk": ("attn.c_attn.bias", 1, False), "bv": ("attn.c_attn.bias", 2, False),
    "wo": ("attn.c_proj.weight", None, True), "bo": ("attn.c_proj.bias", None, False),
    "ln2_w": ("ln_2.weight", None, False), "ln2_b": ("ln_2.bias", None, False),
    "w_fc": ("mlp.c_fc.weight", None, True), "b_fc": ("mlp.c_fc.bias", None, False),
    "w_proj": ("mlp.c_proj.weight", None, True), "b_proj": ("mlp.c_proj.bias", None, False),
}
_GPT2_TOP = {"wte": "transformer.wte.weight", "wpe": "transformer.wpe.weight",
             "ln_f_w": "transformer.ln_f.weight", "ln_f_b": "transformer.ln_f.bias"}
_LLAMA_LAYER = {
    "attn_norm": "input_layernorm.weight", "mlp_norm": "post_attention_layernorm.weight",
    "wq": "self_attn.q_proj.weight", "wk": "self_attn.k_proj.weight", "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight", "w_gate": "mlp.gate_proj.weight", "w_up": "mlp.up_proj.weight",
    "w_down": "mlp.down_proj.weight",
}
_LLAMA_TOP = {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight", "lm_head": "lm_head.weight"}


def _names(arch: str, num_layers: int) -> dict[str, tuple[str, int | None, bool]]:
    """ours -> (transformers' name, third, transposed) for every weight of the model."""
    if arch == "gpt2":
        out = {k: (v, None, False) for k, v in _GPT2_TOP.items()}
        for i in range(num_layers):
            out |= {f"layers.{i}.{k}": (f"transformer.h.{i}.{n}", third, t) for k, (n, third, t) in _GPT2_LAYER.items()}
        return out
    out = {k: (v, None, False) for k, v in _LLAMA_TOP.items()}
    for i in range(num_layers):
        out |= {f"layers.{i}.{k}": (f"model.layers.{i}.{n}", None, False) for k, n in _LLAMA_LAYER.items()}
    return out


def _view(t: torch.Tensor, third: int | None, transposed: bool) -> torch.Tensor:
    if third is not None:
        n = t.shape[-1] // 3
        t = t[..., third * n:(third + 1) * n]
    return t.T if transposed else t


def hf_model(arch: str, weights: dict[str, np.ndarray], *, vocab_size: int, hidden_size: int,
             intermediate_size: int, num_layers: int, num_heads: int, num_kv_heads: int | None = None,
             block_size: int, norm_eps: float, rope_theta: float = 10000.0):
    """GPT2LMHeadModel (arch "gpt2": tied head, gelu_new) or LlamaForCausalLM (arch "llama":
    untied head) in fp32 holding `weights`; every weight of it is set."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if arch == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_positions=block_size, n_embd=hidden_size, n_layer=num_layers,
                            n_head=num_heads, n_inner=intermediate_size, activation_function="gelu_new",
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=norm_eps,
                            tie_word_embeddings=True, bos_token_id=None, eos_token_id=None)
        model = GPT2LMHeadModel._from_config(config, attn_implementation="eager")
    else:
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                             num_hidden_layers=num_layers, num_attention_heads=num_heads,
                             num_key_value_heads=num_kv_heads or num_heads, max_position_embeddings=block_size,
                             rms_norm_eps=norm_eps, rope_theta=rope_theta, tie_word_embeddings=False,
                             attention_bias=False, mlp_bias=False)
        model = LlamaForCausalLM._from_config(config, attn_implementation="eager")
    model = model.float().eval()
    params = dict(model.named_parameters())
    names = _names(arch, num_layers)
    assert names.keys() == weights.keys(), f"weights {sorted(weights.keys() ^ names.keys())} unmatched"
    seen = set()
    with torch.no_grad():
        for ours, (theirs, third, transposed) in names.items():
            _view(params[theirs], third, transposed).copy_(torch.from_numpy(np.asarray(weights[ours], np.float32)))
            seen.add(theirs)
    unset = set(params) - seen - ({"lm_head.weight"} if arch == "gpt2" else set())  # GPT-2's head is wte
    assert not unset, f"weights of {arch} left at their initial values: {sorted(unset)}"
    return model


def flat_from_hf(arch: str, model, tensors: dict[str, torch.Tensor] | None = None) -> dict[str, np.ndarray]:
    """{our name: array} of the model's weights, or of `tensors` keyed by the model's parameter names
    (e.g. {n: p.grad for n, p in model.named_parameters()})."""
    tensors = dict(model.named_parameters()) if tensors is None else tensors
    names = _names(arch, model.config.num_hidden_layers if arch == "llama" else model.config.n_layer)
    return {ours: _view(tensors[theirs], third, t).detach().float().numpy().copy()
            for ours, (theirs, third, t) in names.items()}


def grads(arch: str, model) -> dict[str, np.ndarray]:
    """{our name: gradient} after a backward pass."""
    return flat_from_hf(arch, model, {n: p.grad for n, p in model.named_parameters()})
