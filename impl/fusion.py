"""Kernel fusion (topic 2.2; week 2's engine): a decoder layer in 5 MLX graph nodes.

At batch-1 decode each node costs MLX about 5 us of scheduling here, as much as a small
matmul's arithmetic. So the quantized-matmul kernel also runs, in the same node, what comes
right before or after it in the layer (a prologue and an epilogue, as GPU GEMM libraries do):

    qkv     = matmul(x, W_qkv, norm=input_layernorm)            RMSNorm fused
    a       = cached_attention(qkv, cache, rope)                 RoPE + cache append + attention
    h       = matmul(a, W_o, residual=x)                         + residual fused
    gate_up = matmul(h, W_gate_up, norm=post_attention_layernorm)
    out     = matmul(gate_up, W_down, swiglu=True, residual=h)   SwiGLU and + residual fused

`fused_linear_mlx` is the readable twin of each fused matmul; `KernelTransformerBlock` falls
back to the week-1 block (impl.model.TransformerBlock) whenever a piece is missing.
"""

from __future__ import annotations

import mlx.core as mx

from impl.basics import linear
from impl.kquant_weight import KQuantWeight
from impl.kv_cache import KVCache
from impl.layer_kernels import _kernel, cached_attention, swiglu, swiglu_mlx
from impl.model import TransformerBlock
from impl.norm import RMSNorm
from impl.quantize import matmul_precision
from impl.quantized_weight import QuantizedWeight
from impl.rope import RoPE


def fused_linear_mlx(x: mx.array, w, norm: RMSNorm | None = None, swiglu: bool = False,
                     residual: mx.array | None = None) -> mx.array:
    """The pure-MLX twin of `fused_linear`: [norm(x) | swiglu(x) | x] @ w.T (+ residual, which has
    the output's shape and dtype, as the kernel requires)."""
    if norm is not None:
        x = norm(x)  # (..., K)
    if swiglu:
        x = swiglu_mlx(x)  # (..., 2K) -> (..., K)
    y = linear(x, w)  # (..., N)
    if residual is None:
        return y
    if residual.shape != y.shape or residual.dtype != y.dtype:  # the kernel adds in place: no broadcast, no promotion
        want, got = (str(a.dtype).removeprefix("mlx.core.") for a in (y, residual))
        raise ValueError(f"quantized_matmul: residual must be {y.shape} {want} (the output's),"
                         f" got {residual.shape} {got}")
    return y + residual


def fused_linear(x: mx.array, w: QuantizedWeight | KQuantWeight, norm: RMSNorm | None = None, swiglu: bool = False,
                 residual: mx.array | None = None) -> mx.array:
    """x @ w.T with, in the same node, the RMSNorm `norm` or SwiGLU applied to x first and the
    residual (the output's shape and dtype) added after: the quantized-matmul kernel's fused
    prologue and epilogue; else the twin."""
    fused = dict(norm_weight=None if norm is None else norm.weight, eps=1e-5 if norm is None else norm.eps,
                 swiglu=swiglu, residual=residual)
    if isinstance(w, KQuantWeight) and (kernel := _kernel("kquant_matmul")) is not None and not (norm is not None and swiglu):
        return kernel(x, list(w.parts), list(w.types), x_int8=w.x_int8, **fused)  # a GGUF's blocks (impl.kquant)
    kernel = _kernel("quantized_matmul")
    if kernel is None or not isinstance(w, QuantizedWeight) or (norm is not None and swiglu):
        return fused_linear_mlx(x, w, norm, swiglu, residual)
    packed = w.int8_packed()
    return kernel(x, w.w_q, w.scales, w.biases, w.group_size, w.bits,
                  norm_weight=None if norm is None else norm.weight, eps=1e-5 if norm is None else norm.eps,
                  swiglu=swiglu, residual=residual, precision=matmul_precision(x, w.precision),
                  **({"int8_packed": packed} if packed is not None else {}))


class KernelTransformerBlock(TransformerBlock):
    """A decoder layer as 5 nodes with a KVCache (see the module docstring); the twin otherwise."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        attn, mlp = self.self_attn, self.mlp
        mlp.swiglu = swiglu  # the unfused path too: silu(gate) * up on the kernel
        # What the fused path needs of the weights, decided once (the decode loop calls this block 30
        # times a token): stacked quantized q/k/v and gate/up, no o bias, no q/k norm (Qwen3), a RoPE with tables.
        kinds = (QuantizedWeight, KQuantWeight)
        self.fusable = (isinstance(attn.wqkv, kinds) and isinstance(getattr(mlp, "w_gate_up", None), kinds)
                        and attn.bo is None and attn.q_norm is None and isinstance(attn.rope, RoPE))

    def __call__(self, x: mx.array, mask: mx.array | str | None = "causal", offset: int = 0,
                 cache=None) -> mx.array:
        """x: (N, L, E) -> (N, L, E)."""
        attn, mlp = self.self_attn, self.mlp
        L = x.shape[1]
        causal = mask == "causal" if isinstance(mask, str) else (mask is None and L == 1)  # L = 1: the same
        batched = hasattr(cache, "attend")  # the engine's batched caches (topic 2.6): positions are theirs
        if not (self.fusable and (causal or batched) and (batched or type(cache) is KVCache)) or attn.window:
            # a sliding window (Mistral, Qwen2's, topic 3.9): the twin, whose attention masks it
            return super().__call__(x, mask, offset, cache)
        qkv = fused_linear(x, attn.wqkv, norm=self.input_layernorm)  # (N, L, (H + 2 H_kv) D)
        if attn.bqkv is not None:  # Qwen2's q/k/v biases
            qkv = qkv + attn.bqkv
        if batched:
            a = cache.attend(qkv, attn.rope, attn.num_heads, attn.num_kv_heads)  # (1, T, H D)
        else:
            a = cached_attention(qkv, cache, attn.rope, attn.num_heads, attn.num_kv_heads)  # (N, L, H D)
        h = fused_linear(a, attn.wo, residual=x)  # (N, L, E): x + attention
        gate_up = fused_linear(h, mlp.w_gate_up, norm=self.post_attention_layernorm)  # (N, L, 2I)
        return fused_linear(gate_up, mlp.w_down, swiglu=True, residual=h)  # (N, L, E): h + MLP
