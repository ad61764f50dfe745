"""The tolerance ladder of the project's design, each rung with its reason, and the one
comparison helper every spec file uses.

On failure the helper prints what llm.c prints: the max absolute and relative
difference, where it is, and the first elements of both tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tol:
    atol: float
    rtol: float
    reason: str


# fp32 op vs fp32 op: the two differ only in summation order and in libm's
# exp/sin/cos, a few ulps (1 ulp at 1.0 is 1.2e-7) compounded over sums of
# up to a few hundred terms.
FP32 = Tol(atol=1e-5, rtol=1e-5, reason="fp32 vs fp32: summation order and libm ulps")

# fp16 has a 10-bit mantissa: one rounding of the output alone is 2^-11 = 4.9e-4
# relative, and inputs/intermediates are rounded too (softmax, a sum over K).
FP16 = Tol(atol=1e-2, rtol=1e-2, reason="fp16: 10-bit mantissa, ~5e-4 per rounding, several roundings")

# bf16 keeps 7 mantissa bits: one rounding is 2^-8 = 3.9e-3 relative.
BF16 = Tol(atol=5e-2, rtol=5e-2, reason="bf16: 7-bit mantissa, ~4e-3 per rounding, several roundings")

# The whole model in fp32 against transformers fp32 on the same weights: 30
# layers of fp32 error (each ~1e-6 relative) reach logits of magnitude ~20.
MODEL_FP32 = Tol(atol=1e-3, rtol=0.0, reason="30 fp32 layers, logits ~20 in magnitude")

# The fp32 model with an fp16 KV cache: keys and values are rounded once (2^-11 = 4.9e-4
# relative) as they enter the cache, everything else is fp32. If that relative error reached
# the logits (~20) undamped it would be 20 * 4.9e-4 = 1e-2; twice that allows for the 30 layers
# not cancelling. (Measured on the default model: 8.3e-3.)
MODEL_FP16_KV = Tol(atol=2e-2, rtol=0.0, reason="fp32 model, K/V rounded once to fp16; logits ~20")

# fp32 gradients of a small model against torch autograd (topics 4.3, 4.4): each element is a sum
# over the batch's tokens of products carried a few layers forward and back, in another order than
# torch's. Measured worst: 6.7e-6 (CI profile), on GPT-2's tied embedding, where two such sums add.
GRAD_FP32 = Tol(atol=1e-5, rtol=1e-4, reason="fp32 gradients: sums over the batch's tokens, another order")

# Greedy tokens are compared only while the reference's top-2 logit gap is
# above this: a gap smaller than a few times MODEL_FP32.atol can flip on
# rounding alone, which says nothing about correctness.
GREEDY_MARGIN = 1e-2
# An fp16 KV cache moves each logit by up to MODEL_FP16_KV.atol, so a top-2 gap by up to twice
# that: only gaps above it say anything about the tokens.
FP16_KV_GREEDY_MARGIN = 2 * MODEL_FP16_KV.atol
# ... and at least this many must be compared, or a greedy check would pass having checked
# (almost) nothing. On the default model every prompt the spec uses has a clear gap at every
# step it compares (measured: 12 of 12, 16 of 16, 8 of 8), so this only fires on a change
# of model or prompt, which should then pick prompts that still check something.
MIN_GREEDY_TOKENS = 4

BY_DTYPE = {"float32": FP32, "float16": FP16, "bfloat16": BF16}


def to_numpy(x) -> np.ndarray:
    """mx.array, torch.Tensor or array-like -> float64 numpy, for comparing."""
    if hasattr(x, "detach"):  # torch
        return x.detach().float().cpu().numpy().astype(np.float64)
    mod = type(x).__module__
    if mod.startswith("mlx"):
        import mlx.core as mx

        return np.array(x.astype(mx.float32)).astype(np.float64)
    return np.asarray(x, dtype=np.float64)


def assert_close(actual, expected, tol: Tol, what: str = "") -> None:
    """Assert |actual - expected| <= atol + rtol * |expected| elementwise."""
    a, e = to_numpy(actual), to_numpy(expected)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != expected {e.shape}"
    nan_a, nan_e = np.isnan(a), np.isnan(e)
    assert (nan_a == nan_e).all(), f"{what}: NaN at {np.argwhere(nan_a != nan_e)[:5].tolist()}"
    a, e = np.where(nan_a, 0, a), np.where(nan_e, 0, e)
    diff = np.abs(a - e)
    bound = tol.atol + tol.rtol * np.abs(e)
    bad = diff > bound
    if bad.any():
        i = np.unravel_index(np.argmax(diff - bound), diff.shape)
        rel = diff / np.maximum(np.abs(e), 1e-30)
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.size} elements outside atol={tol.atol} rtol={tol.rtol}"
            f" ({tol.reason}); max abs diff {diff.max():.3g}, max rel diff {rel.max():.3g},"
            f" worst at {tuple(int(j) for j in i)}: got {a[i]:.7g}, expected {e[i]:.7g};"
            f" first got {a.ravel()[:4]}, first expected {e.ravel()[:4]}"
        )


def assert_greedy_tokens(tokens, want: list[int], gaps: list[float], what: str = "",
                         margin: float = GREEDY_MARGIN) -> int:
    """Compare the token iterator `tokens` with the reference's greedy tokens `want` while the
    reference's top-2 logit gap stays >= margin (a nearer tie may flip on rounding alone; a
    path whose logits may move by t each needs margin >= 2 t). Returns how many tokens were
    compared: at least MIN_GREEDY_TOKENS (or all of `want`)."""
    for i, (w, gap) in enumerate(zip(want, gaps, strict=True)):
        if gap < margin:
            print(f"{what}: compared {i} tokens; step {i} has top-2 gap {gap:.2e} < {margin}")
            assert i >= MIN_GREEDY_TOKENS, f"{what}: only {i} tokens had a clear top-2 gap: a vacuous check"
            return i
        token = next(tokens)
        assert token == w, f"{what}: step {i}: got token {token}, the reference {w} (its top-2 gap {gap:.3g})"
    print(f"{what}: all {len(want)} greedy tokens identical")
    return len(want)
