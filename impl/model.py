"""The Llama / Qwen2 / Qwen3 model (topic 1.5): embedding, transformer block, the full stack.
Qwen3 is Qwen2 without q/k/v biases and with an RMSNorm on each q and k head; Gemma 3 is in
impl/gemma.py. Mixtral, Qwen2-MoE and Qwen3-MoE are Llama, Qwen2 and Qwen3 with a sparse MoE
block in place of the MLP (impl/moe.py, topic 3.3).

Weights come in a dict with Hugging Face parameter names (see impl/loader.py),
so loading is an identity map.
"""

from __future__ import annotations

import mlx.core as mx

from impl.attention import Attention
from impl.basics import linear
from impl.config import ModelArgs
from impl.mlp import MLP
from impl.moe import SparseMoeBlock
from impl.norm import RMSNorm
from impl.rope import RoPE


class Embedding:
    """Token embedding (V, E); `as_linear` reuses it as the output head when embeddings are tied."""

    def __init__(self, vocab_size: int, dim: int, weight: mx.array):
        self.vocab_size, self.dim, self.weight = vocab_size, dim, weight

    def __call__(self, ids: mx.array) -> mx.array:
        """ids: (N, L) int -> (N, L, E)."""
        if hasattr(self.weight, "rows"):  # QuantizedWeight: dequantize just these rows
            return self.weight.rows(ids)
        return self.weight[ids]

    def as_linear(self, x: mx.array) -> mx.array:
        """x: (N, L, E) -> logits (N, L, V)."""
        return linear(x, self.weight)


class TransformerBlock:
    """Pre-norm block: h = x + attn(norm(x)); out = h + mlp(norm(h))."""

    def __init__(self, args: ModelArgs, weights: dict[str, mx.array], prefix: str, rope: RoPE | None = None,
                 sdpa=None, norm=RMSNorm):
        w = lambda name: weights[f"{prefix}.{name}"]  # noqa: E731
        opt = lambda name: weights.get(f"{prefix}.{name}")  # noqa: E731  (biases: Qwen2; fused projections)
        qkv, gate_up = opt("self_attn.qkv_proj.weight"), opt("mlp.gate_up_proj.weight")
        unless = lambda fused, name: None if fused is not None else w(name)  # noqa: E731
        head_norm = lambda name: (None if opt(f"self_attn.{name}.weight") is None  # noqa: E731  (Qwen3: an RMSNorm
                                  else norm(args.head_dim, w(f"self_attn.{name}.weight"), args.rms_norm_eps))  # per head)
        self.self_attn = Attention(
            args, unless(qkv, "self_attn.q_proj.weight"), unless(qkv, "self_attn.k_proj.weight"),
            unless(qkv, "self_attn.v_proj.weight"), w("self_attn.o_proj.weight"),
            opt("self_attn.q_proj.bias"), opt("self_attn.k_proj.bias"), opt("self_attn.v_proj.bias"),
            opt("self_attn.o_proj.bias"), rope=rope, sdpa=sdpa, wqkv=qkv, bqkv=opt("self_attn.qkv_proj.bias"),
            q_norm=head_norm("q_norm"), k_norm=head_norm("k_norm"),
        )
        if opt("mlp.gate.weight") is not None:  # a router: a sparse MoE layer (topic 3.3)
            self.mlp = SparseMoeBlock.from_weights(args, weights, f"{prefix}.mlp")
        else:
            self.mlp = MLP(args.hidden_size, args.intermediate_size, unless(gate_up, "mlp.gate_proj.weight"),
                           unless(gate_up, "mlp.up_proj.weight"), w("mlp.down_proj.weight"), w_gate_up=gate_up)
        self.input_layernorm = norm(args.hidden_size, w("input_layernorm.weight"), args.rms_norm_eps)
        self.post_attention_layernorm = norm(args.hidden_size, w("post_attention_layernorm.weight"),
                                             args.rms_norm_eps)

    def __call__(self, x: mx.array, mask: mx.array | str | None = "causal", offset: int = 0,
                 cache=None) -> mx.array:
        """x: (N, L, E) -> (N, L, E)."""
        h = x + self.self_attn(self.input_layernorm(x), mask, offset, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Model:
    """Embedding, N transformer blocks, final norm, output head (tied or untied)."""

    def __init__(self, args: ModelArgs, weights: dict[str, mx.array], sdpa=None, norm=RMSNorm, rope=RoPE,
                 block=None):
        """sdpa: the attention function of every layer (default: week 1's grouped SDPA); norm, rope,
        block: the RMSNorm, RoPE and TransformerBlock classes (default: week 1's; week 2's engine
        passes the kernel-backed subclasses of impl.layer_kernels and impl.fusion)."""
        self.args = args
        self.embed_tokens = Embedding(args.vocab_size, args.hidden_size, weights["model.embed_tokens.weight"])
        rope = rope(args.head_dim, args.max_position_embeddings, args.rope_theta, traditional=False,
                    scaling=args.rope_scaling)
        block = block or TransformerBlock
        self.layers = [block(args, weights, f"model.layers.{i}", rope, sdpa, norm)
                       for i in range(args.num_hidden_layers)]
        for i, layer in enumerate(self.layers):  # Mistral's and Qwen's sliding windows (topic 3.9)
            layer.self_attn.window = args.window(i)
        self.norm = norm(args.hidden_size, weights["model.norm.weight"], args.rms_norm_eps)
        self.lm_head = None if args.tie_word_embeddings else weights["lm_head.weight"]

    def __call__(self, inputs: mx.array, offset: int = 0, cache: list | None = None,
                 logits_to_keep: int | mx.array = 0) -> mx.array:
        """inputs: (N, L) token ids -> logits (N, L, V); with a KV cache (one per layer) only new tokens go in.
        logits_to_keep > 0: logits of the last that many positions only, (N, logits_to_keep, V), as a
        prefill needs (the head over all 512 positions of a prompt is a quarter of its time); an
        array of K positions (transformers' form): those, (N, K, V), as a batched step needs."""
        h = self.hidden_states(inputs, offset, cache)  # (N, L, E)
        if isinstance(logits_to_keep, mx.array):
            h = h[:, logits_to_keep]  # (N, K, E)
        elif 0 < logits_to_keep < h.shape[1]:
            h = h[:, -logits_to_keep:]  # (N, logits_to_keep, E): rows are independent from here on
        return self.head(h)

    def hidden_states(self, inputs: mx.array, offset: int = 0, cache: list | None = None) -> mx.array:
        """inputs: (N, L) token ids -> the last block's output (N, L, E), before the final norm."""
        h = self.embed_tokens(inputs)  # (N, L, E)
        mask = "causal" if inputs.shape[1] > 1 else None  # one new token sees every cached one
        for layer, c in zip(self.layers, cache or [None] * len(self.layers), strict=True):
            h = layer(h, mask, offset, c)
        return h

    def head(self, h: mx.array) -> mx.array:
        """h: (..., E), the last block's output -> logits (..., V): the final norm, then the output
        head; each row on its own, so any subset of positions may go through it."""
        h = self.norm(h)
        return self.embed_tokens.as_linear(h) if self.lm_head is None else linear(h, self.lm_head)
