"""The model configuration, with Hugging Face field names (topic 1.5; the mixture-of-experts fields:
topic 3.3)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "mixtral", "qwen2_moe", "qwen3_moe")
MOE_ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe")
SLIDING, FULL = "sliding_attention", "full_attention"  # HF's layer_types


@dataclass
class ModelArgs:
    """Llama / Qwen2 / Qwen3 / Gemma 3 (and Mixtral / Qwen2-MoE / Qwen3-MoE) hyper-parameters;
    `from_dict` reads an HF config.json and ignores unknown keys."""

    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None  # Qwen3 and Gemma 3 give it; it may differ from hidden_size // heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0  # Gemma 3: the global (full-attention) layers' base
    rope_scaling: dict | None = None  # rope_parameters with a rope_type other than "default" (topic 3.9)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Llama: bias on q, k, v and o; Qwen2 always has q/k/v biases
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # Gemma 3 (and sliding windows in general)
    sliding_window: int | None = None  # a local layer's query sees itself and the sliding_window - 1 keys before it
    layer_types: list[str] | None = None  # per layer: "sliding_attention" or "full_attention"
    sliding_window_pattern: int | None = None  # older Gemma 3 configs: every n-th layer is global
    rope_local_base_freq: float | None = None  # the RoPE base of the sliding (local) layers
    query_pre_attn_scalar: float | None = None  # attention scale query_pre_attn_scalar ** -0.5
    attn_logit_softcapping: float | None = None  # Gemma 2's; transformers' Gemma 3 ignores it: refused
    final_logit_softcapping: float | None = None  # logits -> tanh(logits / c) * c
    hidden_activation: str | None = None  # Gemma's gate activation
    use_sliding_window: bool = False  # Qwen2/Qwen3's switch: layers max_window_layers.. slide (topic 3.9)
    max_window_layers: int = 28
    # Mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE)
    num_experts: int | None = None  # Qwen's name; Mixtral's is num_local_experts
    num_local_experts: int | None = None
    num_experts_per_tok: int = 2  # top-k
    moe_intermediate_size: int | None = None  # an expert's hidden size (Mixtral: intermediate_size)
    shared_expert_intermediate_size: int | None = None  # Qwen2-MoE's always-on expert; None or 0: none
    norm_topk_prob: bool | None = None  # renormalize the top-k probabilities to sum 1 (Mixtral: always)
    decoder_sparse_step: int = 1  # every n-th layer is sparse (Qwen)
    mlp_only_layers: list[int] | None = None  # these layers keep a dense MLP (Qwen)

    def __post_init__(self):
        if self.model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported architecture {self.model_type!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        if self.mlp_bias:
            raise ValueError("mlp_bias=True is not supported (no Llama or Qwen checkpoint here uses it)")
        if self.use_sliding_window and self.model_type not in ("qwen2", "qwen3"):
            raise ValueError(f"use_sliding_window=True is not supported for {self.model_type}")
        self._check_experts()
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        gemma = self.model_type == "gemma3_text"
        if self.model_type in ("qwen2", "qwen3") and not self.use_sliding_window:
            self.sliding_window = None  # as transformers: the window is off unless switched on
        if self.layer_types is None:  # Gemma 3: 5 local layers, then a global one; Mistral: all local (topic 3.9)
            self.layer_types = [self._layer_type(i) for i in range(self.num_hidden_layers)]
        if len(self.layer_types) != self.num_hidden_layers or not set(self.layer_types) <= {SLIDING, FULL}:
            raise ValueError(f"layer_types must name {SLIDING!r} or {FULL!r} for each of the"
                             f" {self.num_hidden_layers} layers, got {self.layer_types}")
        if SLIDING in self.layer_types and (not self.sliding_window or self.model_type in MOE_ARCHITECTURES):
            raise ValueError(f"sliding-window layers are supported for gemma3_text, mistral, qwen2 and qwen3 with a"
                             f" sliding_window, not {self.model_type} with sliding_window={self.sliding_window}")
        if gemma and self.rope_scaling:
            raise ValueError(f"RoPE scaling {self.rope_scaling.get('rope_type')!r} is not supported for Gemma 3")
        if gemma and self.attn_logit_softcapping is not None:
            raise ValueError("attn_logit_softcapping is not supported (Gemma 3 sets none; transformers' Gemma 3"
                             " ignores it)")
        if gemma:
            self.query_pre_attn_scalar = self.query_pre_attn_scalar or self.head_dim
            self.rope_local_base_freq = self.rope_local_base_freq or 10000.0
            act = self.hidden_activation or "gelu_pytorch_tanh"
            if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
                raise ValueError(f"hidden_activation {act!r} is not supported (Gemma 3 uses gelu_pytorch_tanh)")

    def _layer_type(self, i: int) -> str:
        """transformers' layer type of layer i when the config names none."""
        if self.model_type == "gemma3_text":
            return SLIDING if (i + 1) % (self.sliding_window_pattern or 6) else FULL
        if self.model_type == "mistral" or self.use_sliding_window:  # Qwen: the layers from max_window_layers on
            return SLIDING if self.sliding_window and (self.model_type == "mistral" or i >= self.max_window_layers) else FULL
        return FULL

    def _check_experts(self) -> None:
        if self.model_type not in MOE_ARCHITECTURES:
            return
        self.num_experts = self.num_experts or self.num_local_experts
        if not self.num_experts or not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"{self.model_type} needs num_experts >= num_experts_per_tok >= 1, got"
                             f" {self.num_experts} and {self.num_experts_per_tok}")
        if self.model_type == "mixtral" and self.sliding_window:
            raise ValueError("mixtral with a sliding_window is not supported (Mixtral 8x7B sets none)")
        if self.model_type == "mixtral":  # Mixtral's experts are intermediate_size wide; it always renormalizes
            self.moe_intermediate_size, self.norm_topk_prob = self.intermediate_size, True
        self.moe_intermediate_size = self.moe_intermediate_size or self.intermediate_size
        self.norm_topk_prob = bool(self.norm_topk_prob)  # transformers' default for Qwen: False
        self.mlp_only_layers = list(self.mlp_only_layers or [])

    def is_moe_layer(self, layer: int) -> bool:
        """Whether layer `layer` has a sparse MoE block (else a dense MLP), as transformers decides (topic 3.3)."""
        return (self.model_type in MOE_ARCHITECTURES and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)

    def window(self, layer: int) -> int | None:
        """Layer `layer`'s sliding window; None for a global (full-attention) layer."""
        return self.sliding_window if self.layer_types[layer] == SLIDING else None

    def rope_base(self, layer: int) -> float:
        """Layer `layer`'s RoPE base: Gemma 3's local layers have their own."""
        return self.rope_local_base_freq if self.window(layer) and self.rope_local_base_freq else self.rope_theta

    @classmethod
    def from_dict(cls, config: dict) -> ModelArgs:
        """Build from an HF config dict; `rope_parameters` (transformers 5: per layer type for
        Gemma 3) or `rope_theta` both work."""
        config = dict(config)
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        if FULL in rope or SLIDING in rope:  # {"full_attention": {...}, "sliding_attention": {...}}
            local = rope.get(SLIDING) or {}
            if "rope_local_base_freq" not in config and "rope_theta" in local:
                config["rope_local_base_freq"] = local["rope_theta"]
            _check_rope_type(local)
            rope = rope.get(FULL) or {}
            _check_rope_type(rope)
        if "rope_theta" not in config and "rope_theta" in rope:
            config["rope_theta"] = rope["rope_theta"]
        config["rope_scaling"] = _rope_scaling(rope, config.get("max_position_embeddings"))
        fields = inspect.signature(cls).parameters
        return cls(**{k: v for k, v in config.items() if k in fields})


def _check_rope_type(rope: dict) -> None:
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ValueError(f"RoPE scaling {rope.get('rope_type', rope.get('type'))!r} is not supported for Gemma 3")


def _rope_scaling(rope: dict, max_position_embeddings: int | None) -> dict | None:
    """A config's rope_parameters when they scale RoPE (topic 3.9), as impl.rope reads them: the
    rope_type checked, and dynamic's original context (transformers: max_position_embeddings)."""
    from impl.rope import SCALINGS

    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in ("default", None):
        return None
    if kind not in SCALINGS:
        raise ValueError(f"RoPE scaling {kind!r} is not supported; supported: {', '.join(SCALINGS)}")
    rope = dict(rope, rope_type=kind)
    if kind == "dynamic":
        rope["original_max_position_embeddings"] = max_position_embeddings or 4096  # transformers: always this
    elif "original_max_position_embeddings" not in rope and kind != "linear":
        raise ValueError(f"RoPE scaling {kind!r} needs original_max_position_embeddings in rope_parameters")
    return rope
