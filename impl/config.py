"""The model configuration, with Hugging Face field names (topic 1.5)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")


@dataclass
class ModelArgs:
    """Llama / Qwen2 hyper-parameters; `from_dict` reads an HF config.json and ignores unknown keys."""

    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Llama: bias on q, k, v and o; Qwen2 always has q/k/v biases
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self):
        if self.model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported architecture {self.model_type!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        if self.mlp_bias:
            raise ValueError("mlp_bias=True is not supported (no Llama or Qwen2 checkpoint here uses it)")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, config: dict) -> ModelArgs:
        """Build from an HF config dict; `rope_parameters` (transformers 5) or `rope_theta` both work."""
        config = dict(config)
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise ValueError(f"RoPE scaling {rope.get('rope_type', rope.get('type'))!r} is not supported (week 3 adds it)")
        if "rope_theta" not in config and "rope_theta" in rope:
            config["rope_theta"] = rope["rope_theta"]
        fields = inspect.signature(cls).parameters
        return cls(**{k: v for k, v in config.items() if k in fields})
