"""Flash attention (2.4): softmax(q @ k^T * scale + mask) @ v one key block at a time,
with an online softmax, so the (L, S) scores are never needed all at once.

`flash_attention` runs the C++ kernel (kernels/src/flash_attention*.cpp) on the CPU
and the Metal/CUDA one (topic 2.5, kernels/tiny_llm_kernels/gpu_src) on a GPU when
they are built, and the twin otherwise. `flash_attention_mlx` is the readable pure-MLX twin:
the algorithm, block by block; as one lazy MLX graph it may still hold many blocks at
a time, so only the kernel is held to O(L * D) memory.
Semantics are those of attention.scaled_dot_product_attention_grouped (1.3): query
head h reads kv head h // (H / H_kv); mask is None, "causal" (lower-right aligned),
or an array broadcastable to (B, H, L, S), additive or boolean (True = may attend);
a query row that sees no key outputs 0. fp32 inside; the output has query's dtype.
Twin and kernels take the same inputs (`check_inputs`): any other is a one-line ValueError,
whichever of them runs.
"""

from __future__ import annotations

import math

import mlx.core as mx

from impl.native import gpu_kernel, gpu_works, kernels


def check_inputs(query: mx.array, key: mx.array, value: mx.array, mask: mx.array | str | None) -> None:
    """One-line ValueErrors for what neither the twin nor the kernels compute: q (..., H, L, D),
    k and v (..., H_kv, S, D) of one shape, the same leading axes, H a multiple of H_kv, D >= 1,
    one float dtype."""
    shapes = f"q {query.shape}, k {key.shape}, v {value.shape}"
    if query.ndim < 3 or key.ndim != query.ndim or value.shape != key.shape:
        raise ValueError(f"flash_attention: {shapes}: need q (..., H, L, D) and k, v (..., H_kv, S, D) of one shape")
    *batch, H, _, D = query.shape
    *kv_batch, H_kv, _, kv_D = key.shape
    if kv_batch != batch or kv_D != D or D == 0 or H_kv == 0 or H % H_kv:
        raise ValueError(f"flash_attention: {shapes}: need the same leading axes and D >= 1,"
                         " and H a multiple of H_kv")
    if not query.dtype == key.dtype == value.dtype or query.dtype not in (mx.float32, mx.float16, mx.bfloat16):
        dtypes = ", ".join(str(a.dtype).removeprefix("mlx.core.") for a in (query, key, value))
        raise ValueError(f"flash_attention: q, k, v must share one dtype, float32, float16 or bfloat16; got {dtypes}")
    if isinstance(mask, str) and mask != "causal":
        raise ValueError(f"flash_attention: mask must be None, 'causal' or an array, not {mask!r}")


def flash_attention_mlx(
    query: mx.array, key: mx.array, value: mx.array,
    scale: float | None = None, mask: mx.array | str | None = None, block_size: int = 64,
) -> mx.array:
    """Grouped-query attention one key block at a time (online softmax); q (B, H, L, D), k/v (B, H_kv, S, D)."""
    check_inputs(query, key, value, mask)
    *batch, H, L, D = query.shape
    H_kv, S = key.shape[-3], key.shape[-2]
    causal = isinstance(mask, str)  # "causal": check_inputs allows no other string
    n_rep = H // H_kv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    # The n_rep query heads that read one kv head become one axis, as in 1.3; fp32 throughout.
    q = (query.astype(mx.float32) * scale).reshape(*batch, H_kv, n_rep, L, D)
    if isinstance(mask, mx.array):  # (B, H, L, S) -> (B, H_kv, n_rep, L, S), a view
        if mask.dtype == mx.bool_:  # True = may attend
            mask = mx.where(mask, 0.0, -mx.inf)
        mask = mx.broadcast_to(mask, (*batch, H, L, S)).reshape(*batch, H_kv, n_rep, L, S)

    m = mx.full((*batch, H_kv, n_rep, L, 1), -mx.inf)  # running max of each query row's scores
    l = mx.zeros((*batch, H_kv, n_rep, L, 1))  # running sum of exp(score - m)
    acc = mx.zeros((*batch, H_kv, n_rep, L, D))  # running sum of exp(score - m) * v
    for s0 in range(0, S, block_size):
        s1 = min(s0 + block_size, S)
        k = key[..., None, s0:s1, :].astype(mx.float32)  # (B, H_kv, 1, Bc, D)
        v = value[..., None, s0:s1, :].astype(mx.float32)  # (B, H_kv, 1, Bc, D)
        scores = q @ k.swapaxes(-1, -2)  # (B, H_kv, n_rep, L, Bc)
        if causal:  # lower-right aligned: query i sees keys j <= i + S - L
            i, j = mx.arange(L)[:, None], mx.arange(s0, s1)[None, :]
            scores = mx.where(j > i + (S - L), -mx.inf, scores)
        elif mask is not None:
            scores = scores + mask[..., s0:s1].astype(mx.float32)
        m_new = mx.maximum(m, scores.max(axis=-1, keepdims=True))
        # A row that has seen only -inf so far keeps m = -inf: shift by 0 there, so its
        # weights are exp(-inf) = 0 rather than exp(-inf - -inf) = NaN.
        shift = mx.where(m_new == -mx.inf, 0.0, m_new)
        p = mx.exp(scores - shift)  # (B, H_kv, n_rep, L, Bc)
        alpha = mx.exp(m - shift)  # rescales what earlier blocks summed against the old max
        l = l * alpha + p.sum(axis=-1, keepdims=True)
        acc = acc * alpha + p @ v
        m = m_new
    # l = 0: the row saw no key (causal with L > S, an all -inf mask row): 0, as torch gives.
    # (A NaN score makes l NaN, and the row NaN, as softmax would.)
    out = mx.where(l == 0, 0.0, acc / mx.where(l == 0, 1.0, l))
    return out.reshape(*batch, H, L, D).astype(query.dtype)


def flash_attention(
    query: mx.array, key: mx.array, value: mx.array,
    scale: float | None = None, mask: mx.array | str | None = None,
) -> mx.array:
    """The C++ (CPU) or Metal/CUDA (GPU) flash attention kernel when built, else the twin;
    q (..., H, L, D), k/v (..., H_kv, S, D)."""
    cpu = mx.default_device() == mx.cpu and hasattr(kernels, "flash_attention")
    gpu = None if cpu else gpu_kernel("flash_attention")
    if gpu is not None:
        variant = (query.dtype, query.shape[-1], "array" if isinstance(mask, mx.array) else mask)
        gpu = gpu if gpu_works("flash_attention", variant) else None
    if not (cpu or gpu):
        return flash_attention_mlx(query, key, value, scale=scale, mask=mask)  # it checks its inputs
    check_inputs(query, key, value, mask)  # before the reshape below, which would garble the kernels' messages
    kernel = kernels.flash_attention if cpu else gpu
    if query.ndim == 4:
        return kernel(query, key, value, scale=scale, mask=mask)
    # The kernels take one batch axis: (..., H, L, D) -> (B, H, L, D), and back.
    *batch, H, L, D = query.shape
    B = math.prod(batch)
    if isinstance(mask, mx.array) and mask.ndim > 2:  # (..., H or 1, L or 1, S or 1): its leading axes to B
        tail = mask.shape[-3:]
        mask = mx.broadcast_to(mask, (*batch, *tail)).reshape(B, *tail)
    q, k, v = (a.reshape(B, *a.shape[-3:]) for a in (query, key, value))
    return kernel(q, k, v, scale=scale, mask=mask).reshape(*batch, H, L, D)
