"""The language-modelling loss (topic 4.2): causal cross-entropy with an ignore index, perplexity
and next-token accuracy, computed in fp32 whatever the logits' dtype."""

from __future__ import annotations

import math
from collections.abc import Callable

import mlx.core as mx

IGNORE_INDEX = -100  # transformers' and torch's: a label that counts for nothing


def log_softmax(x: mx.array, axis: int = -1) -> mx.array:
    """x - logsumexp(x) in fp32; the max is subtracted first, so logits of 1e4 do not overflow
    exp (topic 4.2)."""
    x = x.astype(mx.float32)
    shifted = x - mx.stop_gradient(mx.max(x, axis=axis, keepdims=True))  # cancels in the ratio: no gradient needed
    return shifted - mx.log(mx.sum(mx.exp(shifted), axis=axis, keepdims=True))


def cross_entropy_sum(logits: mx.array, targets: mx.array,
                      ignore_index: int = IGNORE_INDEX) -> tuple[mx.array, mx.array]:
    """(sum of -log p(target), number of counted targets) over the positions whose target is not
    ignore_index; logits (..., V), targets (...). The pieces of a token-weighted mean, which
    micro-batches add up (topic 4.2)."""
    counted = targets != ignore_index  # (...)
    safe = mx.where(counted, targets, 0).astype(mx.int32)  # an ignored -100 must still index something
    logp = mx.take_along_axis(log_softmax(logits), safe[..., None], axis=-1)[..., 0]  # (...)
    return -mx.sum(mx.where(counted, logp, 0.0)), mx.sum(counted)


def cross_entropy(logits: mx.array, targets: mx.array, ignore_index: int = IGNORE_INDEX) -> mx.array:
    """Mean of -log p(target) over the counted targets (targets already shifted: targets[t] follows
    input t). With no target counted the loss is 0, not torch's NaN, and so is its gradient: a batch
    of padding alone teaches nothing, and must not poison the step (topic 4.2)."""
    total, count = cross_entropy_sum(logits, targets, ignore_index)
    return total / mx.maximum(count, 1).astype(mx.float32)


def shift_labels(logits: mx.array, labels: mx.array) -> tuple[mx.array, mx.array]:
    """Hugging Face's convention, labels = input ids: position t predicts labels[t + 1].
    logits (N, L, V), labels (N, L) -> logits (N, L - 1, V), targets (N, L - 1) (topic 4.2)."""
    return logits[:, :-1], labels[:, 1:]


def causal_lm_loss(logits: mx.array, labels: mx.array, ignore_index: int = IGNORE_INDEX) -> mx.array:
    """transformers' causal-LM loss: the labels shifted by one, then cross_entropy (topic 4.2)."""
    return cross_entropy(*shift_labels(logits, labels), ignore_index)


def perplexity(mean_loss: float | mx.array) -> float:
    """exp(mean cross-entropy in nats): the number of equally likely tokens the model hesitates
    between (topic 4.2)."""
    return math.exp(float(mean_loss))


def next_token_accuracy(logits: mx.array, targets: mx.array, ignore_index: int = IGNORE_INDEX) -> float:
    """The fraction of counted targets that are the logits' argmax (targets already shifted); 0.0 with
    none counted, like the loss (topic 4.2)."""
    counted = targets != ignore_index
    hits = mx.sum((mx.argmax(logits, axis=-1) == targets) & counted).item()
    count = mx.sum(counted).item()
    return hits / count if count else 0.0


def value_and_grad_wrt(module, loss: Callable[[], mx.array]) -> tuple[mx.array, dict]:
    """(loss(), its gradient with respect to every trainable weight of `module`, a tree shaped like
    module.trainable_parameters()); loss() calls the module, which holds its own arrays again
    afterwards (topic 4.3)."""
    weights = module.trainable_parameters()

    def loss_of(w):
        module.update(w)  # the module computes with the weights being differentiated
        return loss()

    try:
        return mx.value_and_grad(loss_of)(weights)
    finally:
        module.update(weights)  # the arrays themselves, not the copies the transform traced
