"""The SwiGLU feed-forward block of Llama and Qwen2 (topic 1.4)."""

from __future__ import annotations

import mlx.core as mx

from impl.basics import linear, silu


class MLP:
    """down(silu(gate(x)) * up(x)); gate/up: (I, E), down: (E, I)."""

    def __init__(self, dim: int, hidden_dim: int, w_gate: mx.array, w_up: mx.array, w_down: mx.array):
        self.dim, self.hidden_dim = dim, hidden_dim
        self.w_gate, self.w_up, self.w_down = w_gate, w_up, w_down

    def __call__(self, x: mx.array) -> mx.array:
        """x: (..., E) -> (..., E)."""
        return linear(silu(linear(x, self.w_gate)) * linear(x, self.w_up), self.w_down)  # (..., I) -> (..., E)
