"""RMSNorm, RoPE, SwiGLU and the attention between the projections on C++ CPU kernels
(topic 2.2; week 2's engine): drop-in subclasses of impl.norm.RMSNorm and impl.rope.RoPE,
which stay their readable pure-MLX twins; `swiglu` for the
stacked gate/up projection (twin `swiglu_mlx`); `cached_attention` for RoPE, the KV-cache
append and flash attention in one step (twin `cached_attention_mlx`). impl.fusion builds
a whole decoder layer from these and the quantized matmul.

Each kernel is one node in MLX's graph where its twin is ~8 (RMSNorm), ~14 (RoPE),
5 (SwiGLU) or ~16 (cached attention) array ops; at batch-1 decode those per-op
dispatches (about 5 us each here), not the arithmetic, are the cost. Without the
kernels (or off the CPU) the twins run.
"""

from __future__ import annotations

import numbers

import mlx.core as mx

from impl.flash_attention import flash_attention, flash_attention_mlx
from impl.kv_cache import KVCache
from impl.mlp import _swiglu
from impl.native import kernels
from impl.norm import RMSNorm
from impl.quantize import FLOATS
from impl.rope import RoPE


def _kernel(name: str):
    """The compiled kernel `name`, when built and MLX computes on the CPU; else None."""
    fn = getattr(kernels, name, None)
    return fn if fn is not None and mx.default_device() == mx.cpu else None


def check_rms_norm(x: mx.array, weight: mx.array) -> None:
    """tiny_llm_kernels.rms_norm's checks: x (..., D) and weight (D,), float32, float16 or bfloat16."""
    if x.ndim < 1 or x.dtype not in FLOATS:
        raise ValueError("rms_norm: x must be float32, float16 or bfloat16 with shape (..., D)")
    if weight.ndim != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight must be (D,) with D = x.shape[-1] = {x.shape[-1]}")
    if weight.dtype not in FLOATS:
        raise ValueError("rms_norm: weight must be float32, float16 or bfloat16")


def check_rope(x: mx.array, dims: int) -> None:
    """tiny_llm_kernels.rope's checks on x: (N, L, H, D) float32, float16 or bfloat16, D even and
    D = dims (the kernel words the last as a mismatch with its tables)."""
    if x.ndim != 4 or x.dtype not in FLOATS or x.shape[3] % 2:
        raise ValueError(f"rope: x must be (N, L, H, D) float32, float16 or bfloat16 with D even, got {x.shape}")
    if x.shape[3] != dims:
        raise ValueError(f"rope: x's last axis is {x.shape[3]}, this RoPE's dims are {dims}")


def check_swiglu(gate_up: mx.array) -> None:
    """tiny_llm_kernels.swiglu's checks: (..., 2I) float32, float16 or bfloat16."""
    if gate_up.ndim < 1 or gate_up.dtype not in FLOATS:
        raise ValueError("swiglu: x must be float32, float16 or bfloat16 with shape (..., 2I)")
    if gate_up.shape[-1] % 2:
        raise ValueError(f"swiglu: the last axis holds gate then up: its size must be even, got {gate_up.shape[-1]}")


class KernelRMSNorm(RMSNorm):
    """RMSNorm on tiny_llm_kernels.rms_norm; the twin (checked as the kernel checks) without it."""

    def __call__(self, x: mx.array) -> mx.array:
        """x: (..., dim) -> (..., dim) in x's dtype."""
        rms_norm = _kernel("rms_norm")
        if rms_norm:
            return rms_norm(x, self.weight, self.eps)
        check_rms_norm(x, self.weight)
        return super().__call__(x)


class KernelRoPE(RoPE):
    """RoPE on tiny_llm_kernels.rope for one start position (int offset); the twin for the rest."""

    def __call__(self, x: mx.array, offset: int | slice | list[int] | mx.array | None = None) -> mx.array:
        """x: (N, L, H, D) -> same shape, rotated by the positions `offset` names."""
        check_rope(x, self.dims)  # on both paths: the kernel would word a dims mismatch as one of its tables
        rope = _kernel("rope")
        start = 0 if offset is None else offset
        if rope is None or not isinstance(start, numbers.Integral) or self.dynamic:  # slices, per-sequence
            # offsets, dynamic NTK scaling (tables of the sequence's length): the twin
            return super().__call__(x, offset)
        self._check(int(start) + x.shape[1] - 1, first=int(start))
        return rope(x, self.cos, self.sin, int(start), self.traditional)


def swiglu_mlx(gate_up: mx.array) -> mx.array:
    """(..., 2I) = [gate | up] -> silu(gate) * up (..., I); the pure-MLX twin (week 1's, in impl.mlp),
    which first raises check_swiglu's errors, as the kernel does."""
    check_swiglu(gate_up)
    return _swiglu(gate_up)


def swiglu(gate_up: mx.array) -> mx.array:
    """(..., 2I) = [gate | up] -> silu(gate) * up (..., I): the C++ kernel when built, else the twin."""
    kernel = _kernel("swiglu")
    return kernel(gate_up) if kernel else swiglu_mlx(gate_up)


def check_cached_attention(qkv: mx.array, n_heads: int, n_kv_heads: int, rope: RoPE) -> None:
    """tiny_llm_kernels.cached_attention's checks on qkv and the heads: qkv (N, L, (H + 2 H_kv) D)
    float32, float16 or bfloat16, H a positive multiple of H_kv, D even and D = rope.dims (the
    kernel words the last as a mismatch with its tables). About 0.3 us: cheap enough for every step."""
    if qkv.ndim != 3 or qkv.dtype not in FLOATS:
        raise ValueError(f"cached_attention: qkv must be (N, L, (H + 2 H_kv) D) float32, float16 or bfloat16,"
                         f" got {qkv.shape}")
    if n_heads <= 0 or n_kv_heads <= 0 or n_heads % n_kv_heads:
        raise ValueError(f"cached_attention: n_heads must be a positive multiple of n_kv_heads, got {n_heads}"
                         f" and {n_kv_heads}")
    heads, width = n_heads + 2 * n_kv_heads, qkv.shape[2]
    if width % heads or (width // heads) % 2:
        raise ValueError(f"cached_attention: qkv's last axis ({width}) must be (H + 2 H_kv) * D = {heads} * D"
                         " with D even")
    if width // heads != rope.dims:
        raise ValueError(f"cached_attention: qkv's heads have D = {width // heads}, this RoPE's dims are {rope.dims}")


def cached_attention_mlx(qkv: mx.array, cache: KVCache, rope: RoPE, n_heads: int, n_kv_heads: int,
                         scale: float | None = None, attend=flash_attention_mlx) -> mx.array:
    """The pure-MLX twin of `cached_attention`: qkv (N, L, (H + 2 H_kv) D) -> (N, L, H D);
    `attend` is the attention after the cache append (the flash twin by default)."""
    check_cached_attention(qkv, n_heads, n_kv_heads, rope)
    N, L, width = qkv.shape
    H, H_kv = n_heads, n_kv_heads
    D = width // (H + 2 * H_kv)
    heads = qkv.reshape(N, L, H + 2 * H_kv, D)
    q, k, v = heads[:, :, :H], heads[:, :, H:H + H_kv], heads[:, :, H + H_kv:]  # (N, L, heads, D)
    q, k = rope(q, cache.offset), rope(k, cache.offset)
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))  # (N, heads, L, D)
    k, v = cache.update_and_fetch(k, v)  # (N, H_kv, offset + L, D)
    if k.dtype != q.dtype:  # a cache that stores another dtype (KVCache(mx.float16))
        k, v = k.astype(q.dtype), v.astype(q.dtype)
    out = attend(q, k, v, scale=scale, mask="causal")  # (N, H, L, D)
    return out.transpose(0, 2, 1, 3).reshape(N, L, H * D)


def cached_attention(qkv: mx.array, cache: KVCache, rope: RoPE, n_heads: int, n_kv_heads: int,
                     scale: float | None = None) -> mx.array:
    """RoPE at the cache's offset, append k and v to the cache, causal attention over every cached
    position: qkv (N, L, (H + 2 H_kv) D) -> (N, L, H D), one kernel node when built, else the twin."""
    kernel = _kernel("cached_attention")
    if kernel is None:  # off the CPU: still the GPU's flash attention kernel when there is one
        return cached_attention_mlx(qkv, cache, rope, n_heads, n_kv_heads, scale, attend=flash_attention)
    check_cached_attention(qkv, n_heads, n_kv_heads, rope)  # before the cache grows for it
    N, L, width = qkv.shape
    D = width // (n_heads + 2 * n_kv_heads)
    rope._check(cache.offset + L - 1)
    cache.reserve(N, n_kv_heads, L, D, qkv.dtype)
    # The old buffers go into the graph and nowhere else, so the kernel may write into them.
    out, cache.keys, cache.values = kernel(qkv, cache.keys, cache.values, rope.cos, rope.sin, cache.offset,
                                           n_heads, n_kv_heads, scale=scale, traditional=rope.traditional)
    cache.offset += L
    return out

