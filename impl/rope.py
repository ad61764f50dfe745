"""Rotary position embedding (topic 1.2), in both layouts.

traditional=True rotates interleaved pairs (x0, x1), (x2, x3), ... (the RoFormer
paper, llama.cpp); traditional=False rotates the half-split pairs
(x_i, x_{i + D/2}) (Hugging Face Llama and Qwen2).

RoPE scaling (topic 3.9) stretches a model's positions past the context it was trained on, by
changing the frequencies (and for YaRN the magnitude of cos/sin): `rope_frequencies` computes
them as transformers does for each `rope_type` of a config's `rope_parameters` (`rope_scaling`).
"""

from __future__ import annotations

import math
import numbers

import mlx.core as mx

SCALINGS = ("default", "linear", "dynamic", "yarn", "llama3")


def rope_frequencies(dims: int, base: float, scaling: dict | None = None,
                     seq_len: int | None = None) -> tuple[mx.array, float]:
    """RoPE scaling (topic 3.9): the (D/2,) inverse frequencies and the factor cos and sin are
    multiplied by, for a config's rope_parameters `scaling` (None or rope_type "default": plain RoPE).

    - linear (position interpolation): every frequency / factor, so position p turns as p / factor;
    - dynamic (NTK-aware, dynamic): the base grows with the sequence once it passes the original
      context: base * (factor * seq_len / original - (factor - 1)) ** (D / (D - 2));
    - yarn: the high frequencies (many turns over the original context) kept, the low ones divided
      by factor, a linear ramp between (beta_fast, beta_slow turns); cos/sin scaled by
      0.1 ln(factor) + 1, which sharpens the attention the interpolation flattened;
    - llama3: Llama 3.1's: wavelengths above original / low_freq_factor divided by factor, below
      original / high_freq_factor kept, a smooth blend between.
    `scaling` carries `factor` and `original_max_position_embeddings` (the trained context; the
    config's max_position_embeddings for dynamic), as in transformers' rope_parameters."""
    scaling = scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in SCALINGS:
        raise ValueError(f"RoPE scaling {kind!r} is not supported; supported: {', '.join(SCALINGS)}")
    exponents = mx.arange(0, dims, 2, dtype=mx.float32) / dims  # (D/2,)
    if kind == "dynamic":
        original = scaling["original_max_position_embeddings"]
        seq_len = max(seq_len or original, original)
        base = base * ((scaling["factor"] * seq_len / original) - (scaling["factor"] - 1)) ** (dims / (dims - 2))
    inv_freq = 1.0 / (base ** exponents)
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "yarn":
        return _yarn(inv_freq, dims, base, scaling)
    if kind == "llama3":
        return _llama3(inv_freq, scaling), 1.0
    return inv_freq, 1.0


def _yarn(inv_freq: mx.array, dims: int, base: float, scaling: dict) -> tuple[mx.array, float]:
    factor, original = scaling["factor"], scaling["original_max_position_embeddings"]
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale = lambda m: 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0  # noqa: E731
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = mscale(m) / mscale(m_all) if m and m_all else mscale(1)

    def dim_of(turns: float) -> float:  # the pair index that turns `turns` times over the original context
        return dims * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(scaling.get("beta_fast") or 32), dim_of(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dims - 1)
    ramp = mx.clip((mx.arange(dims // 2, dtype=mx.float32) - low) / ((high - low) or 0.001), 0, 1)  # 0: keep
    return inv_freq / factor * ramp + inv_freq * (1 - ramp), float(attention_factor)


def _llama3(inv_freq: mx.array, scaling: dict) -> mx.array:
    factor, original = scaling["factor"], scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = mx.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return mx.where(medium, blended, scaled)


class RoPE:
    """Precomputed cos/sin tables for positions [0, seq_len), applied to (N, L, H, D) inputs."""

    def __init__(self, dims: int, seq_len: int, base: float = 10000.0, traditional: bool = False,
                 scaling: dict | None = None):
        """scaling: a config's rope_parameters with a rope_type, which topic 3.9 adds (rope_frequencies)."""
        assert dims % 2 == 0, "RoPE needs an even number of dims"
        self.dims, self.seq_len, self.traditional = dims, seq_len, traditional
        self.base, self.scaling = base, scaling
        self.cos, self.sin = self._angles(mx.arange(seq_len), seq_len=None)
        # dynamic NTK: past the original context the frequencies depend on the sequence's length
        self.dynamic = bool(scaling) and scaling.get("rope_type", scaling.get("type")) == "dynamic"

    def _angles(self, positions: mx.array, seq_len: int | None) -> tuple[mx.array, mx.array]:
        """cos, sin (..., D/2) of `positions`, for a sequence of seq_len (dynamic scaling only)."""
        if self.scaling:  # topic 3.9's
            inv_freq, mscale = rope_frequencies(self.dims, self.base, self.scaling, seq_len)  # (D/2,)
        else:  # plain RoPE: pair i turns at base ** (-2i / D)
            inv_freq, mscale = 1.0 / (self.base ** (mx.arange(0, self.dims, 2, dtype=mx.float32) / self.dims)), 1.0
        angles = positions.astype(mx.float32)[..., None] * inv_freq  # (..., D/2)
        return mx.cos(angles) * mscale, mx.sin(angles) * mscale

    def _tables(self, L: int, offset) -> tuple[mx.array, mx.array]:
        """cos, sin for the L positions given by offset: (L, D/2) or, per sequence, (N, L, D/2)."""
        if offset is None:
            offset = 0
        if isinstance(offset, mx.array) and offset.ndim == 0:
            offset = int(offset.item())
        if isinstance(offset, numbers.Integral):  # the common case: a slice of the tables, no gather
            offset = slice(int(offset), int(offset) + L)
        if isinstance(offset, slice):
            start, stop = offset.start or 0, offset.stop
            assert stop - start == L, f"offset {offset} covers {stop - start} positions, input has {L}"
            self._check(stop - 1, first=start)
            if self.dynamic and stop > self.scaling["original_max_position_embeddings"]:
                return self._angles(mx.arange(start, stop), seq_len=stop)  # as transformers: for this length
            return self.cos[start:stop], self.sin[start:stop]
        starts = offset if isinstance(offset, mx.array) else mx.array(offset)  # one start per sequence
        values = starts.tolist()  # one read of the N starts
        self._check(max(values) + L - 1, first=min(values))
        pos = starts[:, None] + mx.arange(L)[None, :]  # (N, L)
        if self.dynamic and max(values) + L > self.scaling["original_max_position_embeddings"]:
            return self._angles(pos, seq_len=max(values) + L)
        return self.cos[pos], self.sin[pos]

    def _check(self, last: int, first: int = 0) -> None:
        """Positions first..last must lie in the table [0, seq_len)."""
        if first < 0:
            raise ValueError(f"position {first} is before the RoPE table (positions start at 0)")
        if last >= self.seq_len and not self.dynamic:  # dynamic scaling computes what it needs
            raise ValueError(f"position {last} is past the RoPE table of {self.seq_len}")

    def __call__(self, x: mx.array, offset: int | slice | list[int] | mx.array | None = None) -> mx.array:
        """x: (N, L, H, D) -> same shape, rotated by the positions `offset` names."""
        N, L, H, D = x.shape
        cos, sin = self._tables(L, offset)
        rows = cos.shape[0] if cos.ndim == 3 else 1  # per sequence, or one table for all
        cos = cos.reshape(rows, L, 1, D // 2)  # (1 or N, L, 1, D/2), broadcast over heads
        sin = sin.reshape(rows, L, 1, D // 2)
        if self.traditional:
            x = x.reshape(N, L, H, D // 2, 2)
            x1, x2 = x[..., 0], x[..., 1]
        else:
            x1, x2 = x[..., : D // 2], x[..., D // 2:]
        # (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos), each pair by its own angle
        y1 = x1 * cos - x2 * sin
        y2 = x1 * sin + x2 * cos
        y = mx.stack([y1, y2], axis=-1) if self.traditional else mx.concatenate([y1, y2], axis=-1)
        return y.reshape(N, L, H, D).astype(x.dtype)
