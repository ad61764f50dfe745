"""Two small trainable language models (topic 4.3), their weights in an mlx.nn.Module tree so that
`mx.value_and_grad` differentiates every one:

- `ClassicLM`, GPT-2's block: learned positional embeddings, LayerNorm, multi-head attention with
  biases, a GELU MLP, the output head tied to the token embedding;
- `ModernLM`, Llama's block: RoPE, RMSNorm, grouped-query attention, the SwiGLU MLP, an untied head.

The layers are built around the current weights on each call, so a gradient step changes what they
compute: week 1's linear, and impl.train.layers' attention, RMSNorm, RoPE, LayerNorm, GELU and
SwiGLU product, whose kernels (with their backward passes) made a step about 1.5x faster. Weight
names follow the attributes (`layers.0.wq`); reference/train_models.py maps them to transformers'
GPT-2 and Llama.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn

from impl.basics import linear
from impl.rope import RoPE
from impl.train.layers import TrainRMSNorm, TrainRoPE, causal_attention, gelu, layer_norm, silu_mul
from impl.train.loss import cross_entropy, value_and_grad_wrt


@dataclass(frozen=True)
class TrainConfig:
    """The shape of a model to train (topic 4.3)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None = None  # ModernLM: grouped-query heads (default: num_heads)
    block_size: int = 64  # the longest sequence: ClassicLM's positional table, ModernLM's RoPE table
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        """hidden_size // num_heads (topic 4.3)."""
        return self.hidden_size // self.num_heads


def _normal(key: mx.array, shape: tuple[int, ...], std: float) -> mx.array:
    return mx.random.normal(shape, key=key) * std


def _attend(q: mx.array, k: mx.array, v: mx.array) -> mx.array:
    """q (N, L, H, D), k/v (N, L, H_kv, D) -> (N, L, H * D): causal attention over the heads."""
    N, L, H, D = q.shape
    out = causal_attention(*(t.transpose(0, 2, 1, 3) for t in (q, k, v)))
    return out.transpose(0, 2, 1, 3).reshape(N, L, H * D)  # (N, H, L, D) -> (N, L, H * D)


class ClassicBlock(mlx.nn.Module):
    """x + attn(ln1(x)), then h + mlp(ln2(h)); the MLP is proj(gelu(fc(.))) (topic 4.3)."""

    def __init__(self, c: TrainConfig, key: mx.array):
        """Projections N(0, init_std) drawn from `key`, biases 0, LayerNorms 1 and 0 (topic 4.3)."""
        super().__init__()
        E, I, std = c.hidden_size, c.intermediate_size, c.init_std
        keys = mx.random.split(key, 6)
        self.c = c
        self.ln1_w, self.ln1_b, self.ln2_w, self.ln2_b = mx.ones((E,)), mx.zeros((E,)), mx.ones((E,)), mx.zeros((E,))
        self.wq, self.wk, self.wv, self.wo = (_normal(k, (E, E), std) for k in keys[:4])
        self.bq, self.bk, self.bv, self.bo = (mx.zeros((E,)) for _ in range(4))
        self.w_fc, self.b_fc = _normal(keys[4], (I, E), std), mx.zeros((I,))
        self.w_proj, self.b_proj = _normal(keys[5], (E, I), std), mx.zeros((E,))

    def __call__(self, x: mx.array) -> mx.array:
        """x: (N, L, E) -> (N, L, E) (topic 4.3)."""
        N, L, E = x.shape
        H, D = self.c.num_heads, self.c.head_dim
        a = layer_norm(x, self.ln1_w, self.ln1_b, self.c.norm_eps)
        q, k, v = (linear(a, w, b).reshape(N, L, H, D) for w, b in
                   ((self.wq, self.bq), (self.wk, self.bk), (self.wv, self.bv)))
        h = x + linear(_attend(q, k, v), self.wo, self.bo)
        m = layer_norm(h, self.ln2_w, self.ln2_b, self.c.norm_eps)
        return h + linear(gelu(linear(m, self.w_fc, self.b_fc)), self.w_proj, self.b_proj)


class ClassicLM(mlx.nn.Module):
    """GPT-2: token + learned position embeddings, blocks, a final LayerNorm, the head tied to
    the token embedding (topic 4.3)."""

    def __init__(self, c: TrainConfig, seed: int = 0):
        """Weights N(0, init_std) from `seed`, biases 0, LayerNorms 1 and 0 (topic 4.3)."""
        super().__init__()
        keys = mx.random.split(mx.random.key(seed), c.num_layers + 2)
        self.c = c
        self.wte = _normal(keys[0], (c.vocab_size, c.hidden_size), c.init_std)
        self.wpe = _normal(keys[1], (c.block_size, c.hidden_size), c.init_std)
        self.layers = [ClassicBlock(c, keys[2 + i]) for i in range(c.num_layers)]
        self.ln_f_w, self.ln_f_b = mx.ones((c.hidden_size,)), mx.zeros((c.hidden_size,))

    def __call__(self, ids: mx.array) -> mx.array:
        """ids: (N, L) -> logits (N, L, V) (topic 4.3)."""
        L = ids.shape[1]
        if L > self.c.block_size:
            raise ValueError(f"{L} tokens exceed the block size {self.c.block_size} (the positional table)")
        x = self.wte[ids] + self.wpe[:L]  # (N, L, E)
        for layer in self.layers:
            x = layer(x)
        return linear(layer_norm(x, self.ln_f_w, self.ln_f_b, self.c.norm_eps), self.wte)  # tied head


class ModernBlock(mlx.nn.Module):
    """x + attn(norm(x)) with RoPE and grouped-query heads, then h + swiglu(norm(h)) (topic 4.3)."""

    def __init__(self, c: TrainConfig, key: mx.array):
        """Projections N(0, init_std) drawn from `key`, RMSNorm weights 1 (topic 4.3)."""
        super().__init__()
        E, I, D, std = c.hidden_size, c.intermediate_size, c.head_dim, c.init_std
        H_kv = c.num_kv_heads or c.num_heads
        keys = mx.random.split(key, 7)
        self.c = c
        self.attn_norm, self.mlp_norm = mx.ones((E,)), mx.ones((E,))
        self.wq, self.wo = _normal(keys[0], (c.num_heads * D, E), std), _normal(keys[1], (E, c.num_heads * D), std)
        self.wk, self.wv = _normal(keys[2], (H_kv * D, E), std), _normal(keys[3], (H_kv * D, E), std)
        self.w_gate, self.w_up = _normal(keys[4], (I, E), std), _normal(keys[5], (I, E), std)
        self.w_down = _normal(keys[6], (E, I), std)

    def __call__(self, x: mx.array, rope: RoPE) -> mx.array:
        """x: (N, L, E) -> (N, L, E); positions from 0 (topic 4.3)."""
        N, L, E = x.shape
        H, D = self.c.num_heads, self.c.head_dim
        H_kv = self.c.num_kv_heads or H
        a = TrainRMSNorm(E, self.attn_norm, self.c.norm_eps)(x)
        q = rope(linear(a, self.wq).reshape(N, L, H, D))
        k = rope(linear(a, self.wk).reshape(N, L, H_kv, D))
        v = linear(a, self.wv).reshape(N, L, H_kv, D)
        h = x + linear(_attend(q, k, v), self.wo)
        m = TrainRMSNorm(E, self.mlp_norm, self.c.norm_eps)(h)
        return h + linear(silu_mul(linear(m, self.w_gate), linear(m, self.w_up)), self.w_down)  # SwiGLU


class ModernLM(mlx.nn.Module):
    """Llama: a token embedding, blocks with RoPE (half-split, Hugging Face's layout), a final
    RMSNorm, an untied output head (topic 4.3)."""

    def __init__(self, c: TrainConfig, seed: int = 0):
        """Weights N(0, init_std) from `seed`, RMSNorm weights 1, RoPE's tables (topic 4.3)."""
        super().__init__()
        keys = mx.random.split(mx.random.key(seed), c.num_layers + 2)
        self.c = c
        self.embed = _normal(keys[0], (c.vocab_size, c.hidden_size), c.init_std)
        self.layers = [ModernBlock(c, keys[2 + i]) for i in range(c.num_layers)]
        self.norm = mx.ones((c.hidden_size,))
        self.lm_head = _normal(keys[1], (c.vocab_size, c.hidden_size), c.init_std)
        self.rope = TrainRoPE(c.head_dim, c.block_size, c.rope_theta, traditional=False)  # tables, not weights

    def __call__(self, ids: mx.array) -> mx.array:
        """ids: (N, L) -> logits (N, L, V) (topic 4.3)."""
        x = self.embed[ids]  # (N, L, E)
        for layer in self.layers:
            x = layer(x, self.rope)
        return linear(TrainRMSNorm(self.c.hidden_size, self.norm, self.c.norm_eps)(x), self.lm_head)


def loss_and_grad(model: mlx.nn.Module, inputs: mx.array, targets: mx.array) -> tuple[mx.array, dict]:
    """(mean cross-entropy of model(inputs) against targets, its gradient with respect to every
    trainable weight, as a tree shaped like model.trainable_parameters()) (topic 4.3)."""
    return value_and_grad_wrt(model, lambda: cross_entropy(model(inputs), targets))
