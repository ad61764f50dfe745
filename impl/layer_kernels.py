"""RMSNorm, RoPE and SwiGLU on C++ CPU kernels (topic 2.2; week 2's engine): drop-in
subclasses of impl.norm.RMSNorm and impl.rope.RoPE, which stay their readable pure-MLX
twins, and `swiglu` for the stacked gate/up projection, with its twin `swiglu_mlx`.

Each kernel is one node in MLX's graph where its twin is ~8 (RMSNorm), ~14 (RoPE)
or 5 (SwiGLU) array ops; at batch-1 decode those per-op dispatches, not the
arithmetic, are the cost. Without the kernels (or off the CPU) the twins run.
"""

from __future__ import annotations

import numbers

import mlx.core as mx

from impl.basics import silu
from impl.native import kernels
from impl.norm import RMSNorm
from impl.rope import RoPE


def _kernel(name: str):
    """The compiled kernel `name`, when built and MLX computes on the CPU; else None."""
    fn = getattr(kernels, name, None)
    return fn if fn is not None and mx.default_device() == mx.cpu else None


class KernelRMSNorm(RMSNorm):
    """RMSNorm on tiny_llm_kernels.rms_norm; same contract as the twin."""

    def __call__(self, x: mx.array) -> mx.array:
        """x: (..., dim) -> (..., dim) in x's dtype."""
        rms_norm = _kernel("rms_norm")
        return rms_norm(x, self.weight, self.eps) if rms_norm else super().__call__(x)


class KernelRoPE(RoPE):
    """RoPE on tiny_llm_kernels.rope for one start position (int offset); the twin for the rest."""

    def __call__(self, x: mx.array, offset: int | slice | list[int] | mx.array | None = None) -> mx.array:
        """x: (N, L, H, D) -> same shape, rotated by the positions `offset` names."""
        rope = _kernel("rope")
        start = 0 if offset is None else offset
        if rope is None or not isinstance(start, numbers.Integral):  # slices, per-sequence offsets: the twin
            return super().__call__(x, offset)
        self._check(int(start) + x.shape[1] - 1)
        return rope(x, self.cos, self.sin, int(start), self.traditional)


def swiglu_mlx(gate_up: mx.array) -> mx.array:
    """(..., 2I) = [gate | up] -> silu(gate) * up (..., I); the pure-MLX twin."""
    hidden = gate_up.shape[-1] // 2
    return silu(gate_up[..., :hidden]) * gate_up[..., hidden:]


def swiglu(gate_up: mx.array) -> mx.array:
    """(..., 2I) = [gate | up] -> silu(gate) * up (..., I): the C++ kernel when built, else the twin."""
    kernel = _kernel("swiglu")
    return kernel(gate_up) if kernel else swiglu_mlx(gate_up)
