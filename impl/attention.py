"""Scaled dot-product attention, multi-head (1.1) and grouped-query (1.3) forms, masks
(causal, sliding window), and the attention layer of a Llama/Qwen2/Qwen3/Gemma 3 block."""

from __future__ import annotations

import math

import mlx.core as mx

from impl.basics import linear, softmax


def scaled_dot_product_attention_simple(
    query: mx.array, key: mx.array, value: mx.array,
    scale: float | None = None, mask: mx.array | None = None,
) -> mx.array:
    """softmax(q @ k^T * scale + mask) @ v over the last two axes; q: (..., L, D), k, v: (..., S, D)."""
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = (query @ key.swapaxes(-1, -2)) * scale  # (..., L, S)
    if mask is not None:
        scores = scores + mask
    return softmax(scores, axis=-1) @ value  # (..., L, D)


class MultiHeadAttention:
    """Multi-head self-attention with H heads of size E // H, projections (E, E) without bias."""

    def __init__(self, hidden_size: int, num_heads: int,
                 wq: mx.array, wk: mx.array, wv: mx.array, wo: mx.array):
        assert hidden_size % num_heads == 0, "hidden_size must be divisible by num_heads"
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.head_dim = hidden_size // num_heads
        self.wq, self.wk, self.wv, self.wo = wq, wk, wv, wo

    def __call__(self, query: mx.array, key: mx.array, value: mx.array,
                 mask: mx.array | None = None) -> mx.array:
        """query: (N, L, E), key/value: (N, S, E) -> (N, L, E)."""
        N, L, _ = query.shape
        S = key.shape[1]

        def heads(x, w, n):  # (N, n, E) -> (N, H, n, D)
            return linear(x, w).reshape(N, n, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)

        q, k, v = heads(query, self.wq, L), heads(key, self.wk, S), heads(value, self.wv, S)
        out = scaled_dot_product_attention_simple(q, k, v, mask=mask)  # (N, H, L, D)
        return linear(out.transpose(0, 2, 1, 3).reshape(N, L, self.hidden_size), self.wo)


def causal_mask(L: int, S: int, dtype: mx.Dtype = mx.float32) -> mx.array:
    """(L, S) additive mask: query i (the last L of S positions) sees keys j <= i + S - L."""
    i = mx.arange(L)[:, None]
    j = mx.arange(S)[None, :]
    return mx.where(j > i + (S - L), mx.array(-mx.inf, dtype=dtype), mx.array(0, dtype=dtype))


def sliding_window_mask(L: int, S: int, window: int, dtype: mx.Dtype = mx.float32) -> mx.array:
    """(L, S) additive mask: query i (the last L of S positions, at position p = i + S - L) sees
    keys p - window < j <= p: itself and the window - 1 before it (Gemma's, transformers' window)."""
    p = mx.arange(L)[:, None] + (S - L)
    j = mx.arange(S)[None, :]
    return mx.where((j > p) | (j <= p - window), mx.array(-mx.inf, dtype=dtype), mx.array(0, dtype=dtype))


def scaled_dot_product_attention_grouped(
    query: mx.array, key: mx.array, value: mx.array,
    scale: float | None = None, mask: mx.array | str | None = None, softmax_fn=None,
) -> mx.array:
    """Attention where H query heads share H_kv key/value heads.

    query: (..., H, L, D), key/value: (..., H_kv, S, D), H % H_kv == 0.
    mask: None, "causal", or an additive array broadcastable to (..., H, L, S).
    softmax_fn: a softmax over the last axis in place of `softmax` (week 4's, which has a kernel).
    """
    *batch, H, L, D = query.shape
    H_kv, S = key.shape[-3], key.shape[-2]
    assert H % H_kv == 0, f"{H} query heads are not a multiple of {H_kv} key/value heads"
    n_rep = H // H_kv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    # Fold the query heads that share a kv head into one axis instead of copying k and v.
    q = query.reshape(*batch, H_kv, n_rep, L, D)
    k = key[..., None, :, :].swapaxes(-1, -2)  # (..., H_kv, 1, D, S)
    v = value[..., None, :, :]  # (..., H_kv, 1, S, D)
    scores = (q @ k) * scale  # (..., H_kv, n_rep, L, S)
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"mask must be None, 'causal' or an array, not {mask!r}")
        mask = causal_mask(L, S, scores.dtype)
    if mask is not None:  # broadcastable to (..., H, L, S): split H like the query heads
        scores = scores + mx.broadcast_to(mask, (*batch, H, L, S)).reshape(scores.shape)
    scores = scores.astype(mx.float32)
    probs = softmax(scores, axis=-1) if softmax_fn is None else softmax_fn(scores)
    # A query that sees no key (L > S under a causal mask, a padded row) attends to
    # nothing: 0, as torch gives, rather than softmax's NaN, which would spread.
    probs = mx.where(mx.max(scores, axis=-1, keepdims=True) == -mx.inf, 0.0, probs)
    out = probs.astype(value.dtype) @ v  # (..., H_kv, n_rep, L, D)
    return out.reshape(*batch, H, L, D)


class Attention:
    """Llama/Qwen2/Qwen3/Gemma 3 self-attention: q/k/v/o projections (optional biases), optional
    per-head q/k RMSNorm (Qwen3, Gemma 3), RoPE, grouped-query heads, an optional sliding window."""

    def __init__(self, args, wq: mx.array | None, wk: mx.array | None, wv: mx.array | None, wo: mx.array,
                 bq: mx.array | None = None, bk: mx.array | None = None, bv: mx.array | None = None,
                 bo: mx.array | None = None, rope=None, sdpa=None, wqkv=None, bqkv: mx.array | None = None,
                 q_norm=None, k_norm=None, window: int | None = None, scale: float | None = None):
        """wqkv/bqkv: the rows of wq, wk, wv (and their biases) stacked, in place of the three (week 2).
        q_norm/k_norm: RMSNorms over each head's D, after the projections, before RoPE.
        window: each query sees itself and the window - 1 keys before it (Gemma 3's local layers).
        scale: of the scores (default D ** -0.5)."""
        from impl.rope import RoPE

        self.num_heads, self.num_kv_heads = args.num_attention_heads, args.num_key_value_heads
        self.head_dim = args.head_dim
        self.wq, self.wk, self.wv, self.wo = wq, wk, wv, wo
        self.bq, self.bk, self.bv, self.bo = bq, bk, bv, bo
        self.wqkv, self.bqkv = wqkv, bqkv
        self.q_norm, self.k_norm = q_norm, k_norm
        self.window, self.scale = window, scale
        # Hugging Face row order: half-split RoPE (GGUF's permuted Q/K rows are undone on load).
        self.rope = rope or RoPE(self.head_dim, args.max_position_embeddings, args.rope_theta, traditional=False,
                                 scaling=getattr(args, "rope_scaling", None))
        # The attention kernel: week 1's grouped SDPA, or flash attention (week 2) with the same contract.
        self.sdpa = sdpa or scaled_dot_product_attention_grouped

    def __call__(self, x: mx.array, mask: mx.array | str | None = "causal", offset: int = 0,
                 cache=None) -> mx.array:
        """x: (N, L, E) -> (N, L, E); positions start at `offset`, or at cache.offset with a KV cache."""
        N, L, _ = x.shape
        H, D = self.num_heads, self.head_dim
        q, k, v = self._project(x)
        if hasattr(cache, "attend"):  # the engine's batched caches (topic 2.6): RoPE, append and attention are theirs
            qkv = mx.concatenate([q, k, v], axis=2).reshape(N, L, -1)  # (N, L, (H + 2 H_kv) D)
            out = cache.attend(qkv, self.rope, H, self.num_kv_heads, self.scale, self.window)  # (N, L, H D)
            return linear(out, self.wo, self.bo)
        if cache is not None:
            offset = cache.offset
        q = self.rope(q, offset)
        if not getattr(cache, "rotates_keys", False):  # a SinkKVCache rotates keys by their place in it (topic 3.9)
            k = self.rope(k, offset)
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))  # (N, heads, L, D)
        if cache is not None:  # attend over every cached position too: k, v (N, H_kv, offset + L, D)
            k, v = cache.update_and_fetch(k, v)
            if k.dtype != q.dtype:  # a cache that stores another dtype (KVCache(mx.float16))
                k, v = k.astype(q.dtype), v.astype(q.dtype)
        if self.window is not None:  # causal within the window; None (one new token) is causal too
            window = sliding_window_mask(L, k.shape[2], self.window, q.dtype)  # (L, S)
            mask = window if mask is None or isinstance(mask, str) else mask + window
        out = self.sdpa(q, k, v, scale=self.scale, mask=mask)  # (N, H, L, D)
        return linear(out.transpose(0, 2, 1, 3).reshape(N, L, H * D), self.wo, self.bo)

    def _project(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """x: (N, L, E) -> q (N, L, H, D), k and v (N, L, H_kv, D), q and k normed if this layer norms them."""
        N, L, _ = x.shape
        H, H_kv, D = self.num_heads, self.num_kv_heads, self.head_dim
        if self.wqkv is not None:  # one matmul, then views of its heads: q's H, k's H_kv, v's H_kv
            qkv = linear(x, self.wqkv, self.bqkv).reshape(N, L, H + 2 * H_kv, D)
            q, k, v = qkv[:, :, :H], qkv[:, :, H:H + H_kv], qkv[:, :, H + H_kv:]
        else:
            q, k, v = (linear(x, self.wq, self.bq).reshape(N, L, H, D), linear(x, self.wk, self.bk).reshape(N, L, H_kv, D),
                       linear(x, self.wv, self.bv).reshape(N, L, H_kv, D))
        if self.q_norm is not None:  # Qwen3, Gemma 3: RMSNorm over each head's D
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v
