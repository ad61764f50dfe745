"""Mixture of experts (topic 3.3): the sparse MoE block of Mixtral, Qwen2-MoE and Qwen3-MoE.

A router (one linear layer, (X, E) for X experts) scores every expert for each token; the token
goes to its top-k experts (SwiGLU MLPs) and their outputs are summed, weighted by the router's
probabilities. All three take the softmax over all X experts, then the top k; Mixtral (always)
and Qwen with `norm_topk_prob` renormalize those k to sum 1, which equals a softmax over the k
chosen logits alone (softmax after top-k). Qwen2-MoE adds a shared expert that every token goes
through, scaled by sigmoid(x . w_shared_gate).

`experts_grouped` runs each expert once, on the rows routed to it (the token-expert pairs
sorted by expert, then scatter-added back); `experts_dense_mlx` is its readable twin, each
token's k experts gathered and applied to that token alone. Quantized experts go through
`gather_quantized_matmul` (each row times its expert's quantized weights: the C++ kernel when
built, as mx.gather_qmm computes it), one call per projection for all the sorted rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from impl.basics import linear, silu, softmax
from impl.config import ModelArgs
from impl.mlp import MLP
from impl.native import kernels
from impl.quantize import FLOATS, check_bits_and_group_size, check_scales_and_biases, dequantize
from impl.quantized_weight import QuantizedWeight

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
MIXTRAL_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}  # Mixtral's checkpoints name them so


def top_k_experts(probs: mx.array, k: int) -> mx.array:
    """probs (T, X) -> indices (T, k) of each row's k largest, largest first; a tie goes to the
    lower expert index (topic 3.3)."""
    experts = mx.arange(probs.shape[-1])
    chosen = []
    for _ in range(k):
        best = mx.argmax(probs, axis=-1)  # (T,): argmax returns the first of equal maxima
        chosen.append(best)
        probs = mx.where(experts == best[:, None], -mx.inf, probs)  # out of the next rounds
    return mx.stack(chosen, axis=-1).astype(mx.uint32)  # (T, k)


def route(logits: mx.array, top_k: int, norm_topk_prob: bool) -> tuple[mx.array, mx.array]:
    """Router logits (T, X) -> (weights (T, k) in the logits' dtype, expert indices (T, k)):
    softmax over all X in fp32, the top k, renormalized to sum 1 when norm_topk_prob (topic 3.3)."""
    probs = softmax(logits.astype(mx.float32), axis=-1)  # (T, X)
    indices = top_k_experts(probs, top_k)  # (T, k)
    weights = mx.take_along_axis(probs, indices, axis=-1)  # (T, k)
    if norm_topk_prob:
        weights = weights / mx.sum(weights, axis=-1, keepdims=True)
    return weights.astype(logits.dtype), indices


@dataclass
class Experts:
    """X SwiGLU experts, each projection stacked over experts (GGUF's and mlx-lm's layout):
    gate, up (X, I, E) and down (X, E, I), dense arrays or QuantizedWeights holding 3-D triples
    (topic 3.3)."""

    gate: mx.array | QuantizedWeight
    up: mx.array | QuantizedWeight
    down: mx.array | QuantizedWeight

    @property
    def num_experts(self) -> int:
        """X."""
        return (self.gate.w_q if isinstance(self.gate, QuantizedWeight) else self.gate).shape[0]

    def expert(self, e: int) -> tuple:
        """Expert e's (gate, up, down): 2-D weights that `linear` takes."""
        return tuple(_slice(w, e) for w in (self.gate, self.up, self.down))

    def dense(self, dtype: mx.Dtype = mx.float32) -> tuple[mx.array, mx.array, mx.array]:
        """(gate, up, down) as dense stacked arrays (quantized ones dequantized)."""
        return tuple(_dense(w, dtype) for w in (self.gate, self.up, self.down))


def _slice(w, e: int):
    return w.take(e) if isinstance(w, QuantizedWeight) else w[e]


def _dense(w, dtype: mx.Dtype) -> mx.array:
    if not isinstance(w, QuantizedWeight):
        return w.astype(dtype)
    return dequantize(w.w_q, w.scales, w.biases, w.group_size, w.bits, dtype)  # (X, N, K)


def swiglu_expert(x: mx.array, gate, up, down) -> mx.array:
    """One expert on its rows: down(silu(gate(x)) * up(x)); x (n, E) -> (n, E) (topic 3.3)."""
    return linear(silu(linear(x, gate)) * linear(x, up), down)


def check_gather_quantized_matmul(x: mx.array, w_q: mx.array, scales: mx.array, biases: mx.array,
                                  indices: mx.array, group_size: int, bits: int) -> None:
    """One-line ValueErrors, the kernel's words, for what neither the twin nor the kernel computes: 4 or
    8 bits, groups of 32, 64 or 128, w_q (X, N, K * bits / 32) uint32, x (M, K) float, scales and biases
    (X, N, K / group_size) float, indices (M,) uint32 (topic 3.3)."""
    def fail(what: str):
        raise ValueError(f"gather_quantized_matmul: {what}")

    def _name(dtype: mx.Dtype) -> str:
        return str(dtype).removeprefix("mlx.core.")

    check_bits_and_group_size("gather_quantized_matmul", group_size, bits)
    if w_q.ndim != 3 or w_q.dtype != mx.uint32:
        fail(f"w_q must be a 3-D uint32 array (X, N, K * bits / 32), got {w_q.shape} {_name(w_q.dtype)}")
    if x.ndim != 2 or x.dtype not in FLOATS:
        fail(f"x must be float32, float16 or bfloat16 with shape (M, K), got {x.shape} {_name(x.dtype)}")
    K = w_q.shape[2] * 32 // bits
    if x.shape[1] != K:
        fail(f"x has K = {x.shape[1]} but w_q {w_q.shape} holds {K} {bits}-bit values per row")
    check_scales_and_biases("gather_quantized_matmul", w_q, scales, biases, group_size, bits)
    if indices.ndim != 1 or indices.shape[0] != x.shape[0] or indices.dtype != mx.uint32:
        fail(f"indices must be a uint32 (M,) = ({x.shape[0]},) array, got {indices.shape} {_name(indices.dtype)}")


def gather_quantized_matmul_mlx(x: mx.array, w_q: mx.array, scales: mx.array, biases: mx.array,
                                indices: mx.array, group_size: int = 64, bits: int = 4) -> mx.array:
    """Row m of x times expert indices[m]'s quantized weights: x (M, K), w_q (X, N, K * bits / 32),
    scales/biases (X, N, K / group_size), indices (M,) -> (M, N) in x's dtype, fp32 accumulation; a
    row whose index is >= X (routed to no expert) is 0. The pure-MLX twin of the kernel (topic 3.3)."""
    check_gather_quantized_matmul(x, w_q, scales, biases, indices, group_size, bits)
    X = w_q.shape[0]
    safe = mx.minimum(indices, X - 1)  # (M,): a valid expert to gather for every row
    w = dequantize(w_q[safe], scales[safe], biases[safe], group_size, bits, mx.float32)  # (M, N, K)
    y = (x.astype(mx.float32)[:, None, :] @ w.swapaxes(-1, -2))[:, 0]  # (M, N)
    return mx.where((indices < X)[:, None], y, 0.0).astype(x.dtype)


def gather_quantized_matmul(x: mx.array, w_q: mx.array, scales: mx.array, biases: mx.array,
                            indices: mx.array, group_size: int = 64, bits: int = 4) -> mx.array:
    """As gather_quantized_matmul_mlx, on the C++ kernel when it is built and MLX computes on the CPU;
    rows sorted by expert make one quantized matmul per expert there (topic 3.3)."""
    kernel = getattr(kernels, "gather_quantized_matmul", None)
    if kernel is not None and mx.default_device() == mx.cpu:
        return kernel(x, w_q, scales, biases, indices, group_size, bits)
    return gather_quantized_matmul_mlx(x, w_q, scales, biases, indices, group_size, bits)


def _gathered(x: mx.array, w: QuantizedWeight, ids: mx.array) -> mx.array:
    return gather_quantized_matmul(x, w.w_q, w.scales, w.biases, ids, w.group_size, w.bits)


def experts_grouped(x: mx.array, weights: mx.array, indices: mx.array, experts: Experts) -> mx.array:
    """sum_j weights[t, j] * expert_{indices[t, j]}(x[t]) for each token t: x (T, E), weights and
    indices (T, k) -> (T, E). Each expert runs once, on the rows routed to it: the T k token-expert
    pairs sorted by expert, one matmul chain per expert hit, then scatter-added back to their tokens.
    An index >= X (transformers' "no expert") adds nothing (topic 3.3)."""
    T, k = indices.shape
    flat = indices.reshape(-1).astype(mx.uint32)  # (T k,): pair p is token p // k's j-th choice
    order = mx.argsort(flat)  # (T k,): pairs grouped by expert
    tokens = order // k  # (T k,): each sorted pair's token
    rows = x[tokens]  # (T k, E)
    if all(isinstance(w, QuantizedWeight) for w in (experts.gate, experts.up, experts.down)):
        # One gathered kernel call per projection, no host sync. (A GGUF may keep some projections
        # dense, e.g. Q6_K ones: those experts take the loop below, which runs either kind.)
        ids = flat[order]  # (T k,) sorted: one run of rows per expert
        y = _gathered(silu(_gathered(rows, experts.gate, ids)) * _gathered(rows, experts.up, ids), experts.down, ids)
    else:
        # Rows per expert, on the host (a sync): the group sizes are the bounds of the slices below.
        counts = mx.sum(flat[:, None] == mx.arange(experts.num_experts), axis=0).tolist()
        outs, start = [], 0
        for e, n in enumerate(counts):
            if n:  # an expert no token chose costs nothing
                outs.append(swiglu_expert(rows[start:start + n], *experts.expert(e)))  # (n, E)
                start += n
        outs.append(mx.zeros((T * k - start, x.shape[-1]), x.dtype))  # pairs routed to no expert (index >= X)
        y = mx.concatenate(outs)  # (T k, E)
    y = y * weights.reshape(-1)[order][:, None]  # (T k, E), each row weighted
    return mx.zeros_like(x).at[tokens].add(y.astype(x.dtype))  # (T, E): the k rows of a token summed


def experts_dense_mlx(x: mx.array, weights: mx.array, indices: mx.array, experts: Experts) -> mx.array:
    """The readable twin of `experts_grouped`: each token's k experts' weights gathered
    ((T, k, I, E), ...) and applied to that token alone, then the weighted sum over k (topic 3.3)."""
    gate, up, down = experts.dense(mx.float32)
    X = gate.shape[0]
    weights = mx.where(indices < X, weights, 0)  # an index >= X: no expert, nothing added
    indices = mx.minimum(indices, X - 1)  # (T, k), valid for the gather
    xt = x.astype(mx.float32)[:, None, None, :]  # (T, 1, 1, E)
    g = xt @ gate[indices].swapaxes(-1, -2)  # (T, k, 1, I)
    u = xt @ up[indices].swapaxes(-1, -2)  # (T, k, 1, I)
    y = (silu(g) * u) @ down[indices].swapaxes(-1, -2)  # (T, k, 1, E)
    return mx.sum(y[:, :, 0] * weights[..., None].astype(mx.float32), axis=1).astype(x.dtype)  # (T, E)


class SparseMoeBlock:
    """The MoE feed-forward block in place of a dense MLP (topic 3.3): route each token to its
    top-k experts, sum their outputs weighted; Qwen2-MoE's shared expert added, sigmoid-gated."""

    def __init__(self, args: ModelArgs, w_router: mx.array, experts: Experts, shared_expert: MLP | None = None,
                 w_shared_gate: mx.array | None = None):
        """w_router (X, E); shared_expert and w_shared_gate (1, E): Qwen2-MoE's, or None."""
        self.top_k, self.norm_topk_prob = args.num_experts_per_tok, args.norm_topk_prob
        self.w_router, self.experts = w_router, experts
        self.shared_expert, self.w_shared_gate = shared_expert, w_shared_gate
        self.compute = experts_grouped  # the experts' computation: experts_dense_mlx is its twin

    @classmethod
    def from_weights(cls, args: ModelArgs, weights: dict, prefix: str) -> SparseMoeBlock:
        """From HF names under `prefix` (model.layers.3.mlp): gate.weight, experts.{gate,up,down}_proj.weight
        stacked (see stack_experts), shared_expert.*, shared_expert_gate.weight."""
        w = lambda name: weights[f"{prefix}.{name}.weight"]  # noqa: E731
        experts = Experts(*(w(f"experts.{p}") for p in PROJECTIONS))
        shared = None
        if f"{prefix}.shared_expert_gate.weight" in weights:
            g, u, d = (w(f"shared_expert.{p}") for p in PROJECTIONS)
            shared = MLP(args.hidden_size, args.shared_expert_intermediate_size, g, u, d)
        return cls(args, w("gate"), experts, shared, w("shared_expert_gate") if shared else None)

    def __call__(self, x: mx.array) -> mx.array:
        """x: (..., E) -> (..., E)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (T, E): tokens are routed independently
        weights, indices = route(linear(x, self.w_router), self.top_k, self.norm_topk_prob)  # (T, k) each
        y = self.compute(x, weights, indices, self.experts)  # (T, E)
        if self.shared_expert is not None:
            y = y + mx.sigmoid(linear(x, self.w_shared_gate)) * self.shared_expert(x)  # (T, 1) * (T, E)
        return y.reshape(shape)


def stack_experts(weights: dict, num_layers: int) -> dict:
    """Per-expert HF tensors -> one stacked tensor per projection (topic 3.3): Mixtral's
    'block_sparse_moe.experts.3.w1.weight' and Qwen's 'mlp.experts.3.gate_proj.weight' become
    'mlp.experts.gate_proj.weight' (X, I, E) (w1: gate, w3: up, w2: down), Mixtral's router
    'block_sparse_moe.gate' becomes 'mlp.gate'. transformers' in-memory form
    ('mlp.experts.gate_up_proj' (X, 2I, E), 'mlp.experts.down_proj' (X, E, I)) is split the same way."""
    for old in [k for k in weights if ".block_sparse_moe." in k]:
        weights[old.replace(".block_sparse_moe.", ".mlp.")] = weights.pop(old)
    for i in range(num_layers):
        p = f"model.layers.{i}.mlp.experts"
        if f"{p}.gate_up_proj" in weights:
            gate_up = weights.pop(f"{p}.gate_up_proj")
            half = gate_up.shape[1] // 2
            weights[f"{p}.gate_proj.weight"], weights[f"{p}.up_proj.weight"] = gate_up[:, :half], gate_up[:, half:]
            weights[f"{p}.down_proj.weight"] = weights.pop(f"{p}.down_proj")
            continue
        for short, name in [*MIXTRAL_NAMES.items(), *((n, n) for n in PROJECTIONS)]:
            parts, e = [], 0
            while (key := f"{p}.{e}.{short}.weight") in weights:
                parts.append(weights.pop(key))
                e += 1
            if parts:
                weights[f"{p}.{name}.weight"] = mx.stack(parts)  # (X, out, in)
    return weights
