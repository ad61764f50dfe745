"""The SwiGLU feed-forward block of Llama and Qwen2 (topic 1.4)."""

from __future__ import annotations

import mlx.core as mx

from impl.basics import linear, silu


def _swiglu(gate_up: mx.array) -> mx.array:
    """(..., 2I) = [gate | up] -> silu(gate) * up (..., I): the activation of stacked gate/up rows."""
    hidden = gate_up.shape[-1] // 2
    return silu(gate_up[..., :hidden]) * gate_up[..., hidden:]


class MLP:
    """down(silu(gate(x)) * up(x)); gate/up: (I, E), down: (E, I)."""

    def __init__(self, dim: int, hidden_dim: int, w_gate: mx.array | None, w_up: mx.array | None,
                 w_down: mx.array, w_gate_up=None):
        """w_gate_up: the rows of w_gate then w_up stacked (2I, E), in place of the two (week 2)."""
        self.dim, self.hidden_dim = dim, hidden_dim
        self.w_gate, self.w_up, self.w_down, self.w_gate_up = w_gate, w_up, w_down, w_gate_up
        self.swiglu = _swiglu  # for w_gate_up; week 2's impl.fusion swaps in the C++ kernel
        self.act = silu  # for w_gate and w_up apart
        self.silu_mul = None  # silu(gate) * up as one function: week 4's (Q)LoRA sets its kernel-backed one

    def __call__(self, x: mx.array) -> mx.array:
        """x: (..., E) -> (..., E)."""
        if self.w_gate_up is not None:  # one matmul for both, then silu(gate) * up
            return linear(self.swiglu(linear(x, self.w_gate_up)), self.w_down)  # (..., 2I) -> (..., I) -> (..., E)
        gate, up = linear(x, self.w_gate), linear(x, self.w_up)  # (..., I) each
        h = self.silu_mul(gate, up) if self.silu_mul is not None else self.act(gate) * up
        return linear(h, self.w_down)  # (..., I) -> (..., E)
