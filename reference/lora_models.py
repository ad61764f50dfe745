"""peft's LoRA on transformers' model, for topic 4.7's checks.

`peft_model` wraps a freshly loaded LlamaForCausalLM (never the cached one of reference.models:
peft changes the model it wraps) in peft's LoRA, dropout off. Adapters go in and out under peft's
saved key names ('base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'), as
adapter_model.safetensors holds them.
"""

from __future__ import annotations

import numpy as np
import torch

INSTALL_HINT = "pip install --no-deps peft==0.21.2 (the `reference` dependency group)"


def _peft():
    try:
        import peft
    except ImportError as e:
        raise RuntimeError(f"peft is not installed ({e}); install it with: {INSTALL_HINT}") from None
    return peft


def base_model(folder: str):
    """transformers' model in fp32, eval mode, a fresh copy from the HF folder."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def peft_model(folder: str, r: int, alpha: float, targets: list[str]):
    """get_peft_model(LlamaForCausalLM, LoraConfig(r, lora_alpha, target_modules, lora_dropout=0))."""
    peft = _peft()
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0)
    return peft.get_peft_model(base_model(folder), config).eval()


def load_peft(folder: str, adapter_folder: str):
    """PeftModel.from_pretrained on a fresh base model: what a peft user does with saved adapters."""
    return _peft().PeftModel.from_pretrained(base_model(folder), adapter_folder).eval()


def set_lora(model, state: dict[str, np.ndarray]) -> None:
    """Load adapters given under peft's saved key names; every one of the model's must be given."""
    peft = _peft()
    result = peft.set_peft_model_state_dict(model, {k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    missing = [k for k in result.missing_keys if "lora_" in k]
    assert not missing and not result.unexpected_keys, (missing, result.unexpected_keys)


def lora_state(model) -> dict[str, np.ndarray]:
    """The adapters under peft's saved key names (get_peft_model_state_dict)."""
    peft = _peft()
    return {k: v.detach().numpy().copy() for k, v in peft.get_peft_model_state_dict(model).items()}


def lora_grads(model) -> dict[str, np.ndarray]:
    """The .grad of every adapter weight after a backward, under peft's saved key names."""
    out = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            out[name.replace(".default", "")] = p.grad.detach().numpy().copy()
    return out
