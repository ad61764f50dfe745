"""A loaded model with its quantized weights requantized to a smaller layout (week 2's formats, for
topic 3.4): a draft model only proposes tokens that the target then checks, so it can trade a little
accuracy for speed, as llama.cpp users pick a Q4 file for the draft.

`requantized(model)` returns a new model whose QuantizedWeights and KQuantWeights (the file's blocks)
are MLX affine `bits`-bit triples with groups of `group_size`, multiplied at `precision`; everything
else (norms, biases, RoPE, dense weights) is shared with the model given, which is left as it was.
Measured on the Qwen2.5-Coder 0.5B (Q5_0/Q8_0 as 8-bit triples, Q4_K/Q6_K blocks; docs/speculative.md):
one decode pass 23 ms with int8 matmuls, 12.5 ms as 4-bit triples in groups of 128.
"""

from __future__ import annotations

import copy

import mlx.core as mx

from impl.kquant_weight import KQuantWeight
from impl.loader import dequantized
from impl.quantize import PRECISIONS
from impl.quantized_weight import QuantizedWeight

# Named layouts: draft_quantization in impl.engine's SpeculativeConfig and the chat command's flag.
LAYOUTS = {"4bit": (4, 128)}  # (bits, group size); None: the draft as loaded
GROUP_SIZES = (32, 64, 128)  # MLX's affine group sizes


def requantize_weight(w: QuantizedWeight | KQuantWeight, bits: int = 4, group_size: int = 128,
                      precision: str | None = "int8") -> QuantizedWeight:
    """w's values as `bits`-bit affine triples in groups of `group_size` (the largest of MLX's group sizes
    up to it that divides K, where it does not), multiplied at `precision`."""
    K = w.shape[1]
    gs = next((g for g in sorted(GROUP_SIZES, reverse=True) if g <= group_size and K % g == 0), None)
    if gs is None:
        raise ValueError(f"cannot requantize a weight of K = {K}: no group size of {GROUP_SIZES} up to"
                         f" {group_size} divides it")
    w_q, scales, biases = mx.quantize(dequantized(w), group_size=gs, bits=bits)  # (N, K bits / 32), (N, K / gs) x 2
    mx.eval(w_q, scales, biases)
    return QuantizedWeight(w_q, scales, biases, gs, bits, precision)


def requantized(model, bits: int = 4, group_size: int = 128, precision: str | None = "int8"):
    """A copy of `model` (an impl Model) with every quantized weight requantized (requantize_weight);
    weights shared by two modules (a tied head) stay shared. A model with no quantized weight (loaded
    dense) comes back unchanged: it has nothing to requantize."""
    if bits not in (2, 3, 4, 5, 6, 8):
        raise ValueError(f"bits must be one of MLX's affine widths 2, 3, 4, 5, 6, 8, got {bits!r}")
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)} or None, got {precision!r}")
    memo: dict[int, object] = {}

    def rebuilt(obj):
        if id(obj) in memo:
            return memo[id(obj)]
        if isinstance(obj, (QuantizedWeight, KQuantWeight)):
            new = requantize_weight(obj, bits, group_size, precision)
        elif isinstance(obj, list):
            new = [rebuilt(v) for v in obj]
        elif type(obj).__module__.startswith("impl.") and hasattr(obj, "__dict__") and not isinstance(obj, type):
            new = memo[id(obj)] = copy.copy(obj)  # a module: its attributes rebuilt, arrays and the rest shared
            for name, v in vars(obj).items():
                setattr(new, name, rebuilt(v))
        else:
            new = obj
        memo[id(obj)] = new
        return new

    return rebuilt(model)
