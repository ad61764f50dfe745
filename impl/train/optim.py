"""The optimizer and its schedule (topic 4.4): AdamW, clipping by global norm, warmup then cosine
decay. Weights and gradients are trees (nested dicts and lists of arrays), as
model.trainable_parameters() and loss_and_grad give them."""

from __future__ import annotations

import math

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from impl.native import kernels


class AdamW:
    """Adam with decoupled weight decay (Loshchilov and Hutter), as torch.optim.AdamW computes it:

        w <- w * (1 - lr * weight_decay)                  # decay, apart from the gradient's moments
        m <- b1 m + (1 - b1) g,  v <- b2 v + (1 - b2) g^2
        w <- w - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

    t counts steps from 1; the two (1 - b^t) undo the moments' start at zero (topic 4.4)."""

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        """The step's hyperparameters; the moments start at zero on the first step (topic 4.4)."""
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.t, self.m, self.v = 0, None, None

    use_kernel = True  # the fused C++ step when built (False: the array ops below, its twin)

    def step(self, weights, grads, lr: float | None = None):
        """The weights after one step on `grads` (same tree), at `lr` (default self.lr); on the CPU with
        float32 weights, one tiny_llm_kernels.adamw node for the whole tree, bit for bit the array
        ops' result (topic 4.4)."""
        lr = self.lr if lr is None else lr
        b1, b2 = self.betas
        if self.m is None:
            self.m, self.v = tree_map(mx.zeros_like, weights), tree_map(mx.zeros_like, weights)
        self.t += 1
        step_size = lr / (1 - b1 ** self.t)
        root_c2 = math.sqrt(1 - b2 ** self.t)
        fused = self._fused(weights, grads, lr, step_size, root_c2)
        if fused is not None:
            return fused
        self.m = tree_map(lambda m, g: b1 * m + (1 - b1) * g, self.m, grads)
        self.v = tree_map(lambda v, g: b2 * v + (1 - b2) * mx.square(g), self.v, grads)

        def update(w, m, v):
            w = w * (1 - lr * self.weight_decay)
            return w - step_size * m / (mx.sqrt(v) / root_c2 + self.eps)

        return tree_map(update, weights, self.m, self.v)

    def _fused(self, weights, grads, lr: float, step_size: float, root_c2: float):
        """step()'s result from the kernel, which takes the twin's constants as the twin rounds them
        (a Python float meets a float32 array as float32), or None where it does not apply."""
        kernel = getattr(kernels, "adamw", None)
        if not self.use_kernel or kernel is None or mx.default_device() != mx.cpu:
            return None
        flat = [tree_flatten(t) for t in (weights, grads, self.m, self.v)]
        keys = [k for k, _ in flat[0]]
        if any([k for k, _ in f] != keys for f in flat[1:]):
            return None  # trees of different shapes: the array ops say where
        arrays = [[a for _, a in f] for f in flat]
        if any(a.dtype != mx.float32 for part in arrays for a in part):
            return None
        b1, b2 = self.betas
        out = kernel(*arrays, b1=b1, c1=1 - b1, b2=b2, c2=1 - b2, decay=1 - lr * self.weight_decay,
                     step_size=step_size, root_c2=root_c2, eps=self.eps)
        n = len(keys)
        self.m = tree_unflatten(list(zip(keys, out[n:2 * n], strict=True)))
        self.v = tree_unflatten(list(zip(keys, out[2 * n:], strict=True)))
        return tree_unflatten(list(zip(keys, out[:n], strict=True)))

    def update(self, model, grads, lr: float | None = None) -> None:
        """One step on the model's own weights (topic 4.4)."""
        model.update(self.step(model.trainable_parameters(), grads, lr))


def global_norm(grads) -> mx.array:
    """sqrt of the sum of every gradient element's square, over the whole tree, in fp32 (topic 4.4)."""
    return mx.sqrt(sum(mx.sum(mx.square(g.astype(mx.float32))) for _, g in tree_flatten(grads)))


def clip_grad_norm(grads, max_norm: float) -> tuple[object, mx.array]:
    """(grads scaled so their global norm is at most max_norm, the norm before): the scale is
    min(1, max_norm / (norm + 1e-6)), torch.nn.utils.clip_grad_norm_'s, so the direction is kept
    and a small gradient is left as it is (topic 4.4)."""
    norm = global_norm(grads)
    scale = mx.minimum(max_norm / (norm + 1e-6), 1.0)
    return tree_map(lambda g: g * scale.astype(g.dtype), grads), norm


def warmup_cosine(step: int, max_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """The learning rate of step `step` (from 0): linear warmup, max_lr * (step + 1) / warmup_steps,
    reaching max_lr at step warmup_steps - 1; then cosine decay from max_lr at step warmup_steps to
    min_lr at step total_steps; min_lr after that (topic 4.4)."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps)  # 0 -> 1
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (max_lr - min_lr)
