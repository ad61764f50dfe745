"""RMSNorm (topic 1.4)."""

from __future__ import annotations

import mlx.core as mx


class RMSNorm:
    """y = x / sqrt(mean(x^2) + eps) * weight, accumulated in fp32 whatever the input dtype."""

    def __init__(self, dim: int, weight: mx.array, eps: float = 1e-5):
        self.dim, self.weight, self.eps = dim, weight, eps

    def __call__(self, x: mx.array) -> mx.array:
        """x: (..., dim) -> (..., dim) in x's dtype."""
        # fp16 squares overflow past 256 and lose the small terms of the mean: use fp32.
        x32 = x.astype(mx.float32)
        rms = mx.rsqrt(mx.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * rms).astype(x.dtype) * self.weight.astype(x.dtype)
