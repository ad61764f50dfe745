"""What the specs measure memory with: MLX's allocator, which counts every array and a kernel's
workspace (mx.get_peak_memory works on the CPU backend too)."""

from __future__ import annotations

import mlx.core as mx


def peak_extra(compute) -> tuple[int, mx.array]:
    """Bytes MLX's peak memory rose above what was live before `compute()` ran and was evaluated,
    and what it returned."""
    mx.synchronize()
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    out = compute()
    mx.eval(out)
    return mx.get_peak_memory() - base, out
