"""Tiny random-weight transformers models (Llama and Qwen2) saved as HF folders, for the
specification's checks on the Qwen2 paths and on the engine: no real Qwen2 checkpoint
ships offline. Fixed seeds; the SmolLM2 tokenizer files are copied beside the weights."""

from __future__ import annotations

import shutil
from pathlib import Path

from reference.models import hf_folder_from_gguf

TINY = {
    "llama-tied": ("llama", dict(tie_word_embeddings=True)),
    "llama-untied-bias": ("llama", dict(tie_word_embeddings=False, attention_bias=True)),
    "llama-mqa": ("llama", dict(tie_word_embeddings=False, num_key_value_heads=1)),
    "qwen2-untied": ("qwen2", dict(tie_word_embeddings=False)),
    "qwen2-tied": ("qwen2", dict(tie_word_embeddings=True)),
}


def tiny_folder(tmp_path: Path, kind: str, seed: int, **overrides):
    """(transformers model, folder): a random-weight model of TINY[kind] saved as an HF folder.
    overrides: config fields (max_position_embeddings, num_hidden_layers, ...)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    arch, extra = TINY[kind]
    cfg = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, rope_theta=50000.0,
               max_position_embeddings=128, rms_norm_eps=1e-6) | extra | overrides
    torch.manual_seed(seed)
    Config, Model = (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    model = Model(Config(**cfg)).eval()
    with torch.no_grad():  # default init leaves biases at 0; make them matter
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
    folder = tmp_path / f"{kind}-{seed}"
    model.save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf_folder_from_gguf() / f, folder / f)
    return model, folder
