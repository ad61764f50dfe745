"""Gemma 3 text (topic 1.5): Llama's stack with an embedding scaled by sqrt(E), RMSNorms that
multiply by (1 + weight), q/k RMSNorm per head, a GELU-tanh gated MLP, a norm after attention and
after the MLP as well as before (4 per layer), queries scaled by query_pre_attn_scalar ** -0.5, and
sliding-window attention with its own RoPE base on the local layers (5 local : 1 global).

Weights keep Hugging Face's names and values (the norms' raw `weight`, not 1 + weight).
"""

from __future__ import annotations

import math

import mlx.core as mx

from impl.attention import Attention
from impl.basics import linear
from impl.config import ModelArgs
from impl.model import Embedding, Model
from impl.norm import RMSNorm
from impl.rope import RoPE


def gelu_tanh(x: mx.array) -> mx.array:
    """0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))): torch's gelu(approximate='tanh')."""
    return 0.5 * x * (1 + mx.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)))


class GemmaRMSNorm(RMSNorm):
    """y = x / sqrt(mean(x^2) + eps) * (1 + weight), all in fp32, then cast to x's dtype (as HF does)."""

    def __init__(self, dim: int, weight: mx.array, eps: float = 1e-6):
        super().__init__(dim, 1.0 + weight.astype(mx.float32), eps)

    def __call__(self, x: mx.array) -> mx.array:
        """x: (..., dim) -> (..., dim) in x's dtype."""
        x32 = x.astype(mx.float32)
        return (x32 * mx.rsqrt(mx.mean(x32 * x32, axis=-1, keepdims=True) + self.eps) * self.weight).astype(x.dtype)


class ScaledEmbedding(Embedding):
    """Gemma's embedding: rows times sqrt(E), the factor rounded to the rows' dtype first (as HF does)."""

    def __call__(self, ids: mx.array) -> mx.array:
        """ids: (N, L) int -> (N, L, E)."""
        h = super().__call__(ids)
        return h * mx.array(math.sqrt(self.dim), dtype=h.dtype)


class GemmaMLP:
    """down(gelu_tanh(gate(x)) * up(x)); gate/up: (I, E), down: (E, I)."""

    def __init__(self, w_gate: mx.array, w_up: mx.array, w_down: mx.array):
        self.w_gate, self.w_up, self.w_down = w_gate, w_up, w_down

    def __call__(self, x: mx.array) -> mx.array:
        """x: (..., E) -> (..., E)."""
        return linear(gelu_tanh(linear(x, self.w_gate)) * linear(x, self.w_up), self.w_down)  # (..., I) -> (..., E)


class GemmaBlock:
    """h = x + post_attn_norm(attn(input_norm(x))); out = h + post_ffw_norm(mlp(pre_ffw_norm(h)))."""

    def __init__(self, args: ModelArgs, weights: dict[str, mx.array], layer: int, rope: RoPE, sdpa=None):
        prefix = f"model.layers.{layer}"
        w = lambda name: weights[f"{prefix}.{name}"]  # noqa: E731
        opt = lambda name: weights.get(f"{prefix}.{name}")  # noqa: E731
        norm = lambda name, dim=args.hidden_size: GemmaRMSNorm(dim, w(f"{name}.weight"), args.rms_norm_eps)  # noqa: E731
        self.self_attn = Attention(
            args, w("self_attn.q_proj.weight"), w("self_attn.k_proj.weight"), w("self_attn.v_proj.weight"),
            w("self_attn.o_proj.weight"), opt("self_attn.q_proj.bias"), opt("self_attn.k_proj.bias"),
            opt("self_attn.v_proj.bias"), opt("self_attn.o_proj.bias"), rope=rope, sdpa=sdpa,
            q_norm=norm("self_attn.q_norm", args.head_dim), k_norm=norm("self_attn.k_norm", args.head_dim),
            window=args.window(layer), scale=args.query_pre_attn_scalar ** -0.5,
        )
        self.mlp = GemmaMLP(w("mlp.gate_proj.weight"), w("mlp.up_proj.weight"), w("mlp.down_proj.weight"))
        self.input_layernorm = norm("input_layernorm")
        self.post_attention_layernorm = norm("post_attention_layernorm")
        self.pre_feedforward_layernorm = norm("pre_feedforward_layernorm")
        self.post_feedforward_layernorm = norm("post_feedforward_layernorm")

    def __call__(self, x: mx.array, mask: mx.array | str | None = "causal", offset: int = 0,
                 cache=None) -> mx.array:
        """x: (N, L, E) -> (N, L, E)."""
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), mask, offset, cache))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class GemmaModel(Model):
    """Gemma 3 text: scaled embedding, N Gemma blocks (local or global), final norm, tied head."""

    def __init__(self, args: ModelArgs, weights: dict[str, mx.array], sdpa=None, **_kernels):
        """sdpa: the attention function of every layer (week 1's grouped SDPA by default; flash attention
        takes the sliding window as a mask array). _kernels: Model's norm, rope and block, which
        Gemma's (1 + weight) norms and its block do not take."""
        self.args = args
        self.embed_tokens = ScaledEmbedding(args.vocab_size, args.hidden_size, weights["model.embed_tokens.weight"])
        ropes = {base: RoPE(args.head_dim, args.max_position_embeddings, base, traditional=False)
                 for base in {args.rope_base(i) for i in range(args.num_hidden_layers)}}
        self.layers = [GemmaBlock(args, weights, i, ropes[args.rope_base(i)], sdpa)
                       for i in range(args.num_hidden_layers)]
        self.norm = GemmaRMSNorm(args.hidden_size, weights["model.norm.weight"], args.rms_norm_eps)
        self.lm_head = None if args.tie_word_embeddings else weights["lm_head.weight"]

    def head(self, h: mx.array) -> mx.array:
        """As Model's: h (..., E) -> logits (..., V), capped by final_logit_softcapping if set."""
        logits = super().head(h)
        cap = self.args.final_logit_softcapping
        return logits if cap is None else mx.tanh(logits / cap) * cap
