"""Drawing inputs for the specification: dtypes, seeded generators, arrays given to the
implementation together with the same (rounded) values as fp32 torch tensors."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import torch
from hypothesis import strategies as st

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def draw_dtype(data) -> str:
    return data.draw(st.sampled_from(sorted(DTYPES)), label="dtype")


def draw_rng(data) -> np.random.Generator:
    return np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))


def uniform(rng, shape, dtype: str, scale: float = 1.0) -> tuple[mx.array, torch.Tensor]:
    """U(-scale, scale) in `dtype` for the implementation, and the same rounded values as fp32 torch."""
    x = mx.array(rng.uniform(-scale, scale, shape).astype(np.float32)).astype(DTYPES[dtype])
    return x, torch.from_numpy(np.array(x.astype(mx.float32)))


def additive_mask(rng, shape, dtype: str) -> tuple[mx.array, torch.Tensor]:
    """-inf at random places, finite values in [-2, 0] elsewhere, never a whole row -inf."""
    m = rng.uniform(-2, 0, shape).astype(np.float32)
    m[rng.random(shape) < 0.3] = -np.inf
    keep = rng.integers(0, shape[-1], shape[:-1])  # one key per query stays visible
    np.put_along_axis(m, keep[..., None], 0.0, axis=-1)
    x = mx.array(m).astype(DTYPES[dtype])
    return x, torch.from_numpy(np.array(x.astype(mx.float32)))
