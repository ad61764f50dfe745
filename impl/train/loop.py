"""The training loop (topic 4.5): gradient accumulation over micro-batches (token-weighted),
mixed precision (bf16 compute, fp32 master weights), validation, checkpoints that resume bit for
bit, and a progress line with the loss and tokens/s."""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from impl.train.loss import cross_entropy_sum
from impl.train.optim import AdamW, clip_grad_norm, global_norm, warmup_cosine

Batch = tuple[mx.array, mx.array]  # inputs (N, L), targets (N, L): targets already shifted


def cast_weights(weights, dtype: mx.Dtype):
    """A copy of the weight tree with every floating array cast to dtype (integers are left as
    they are): the compute copy of mixed precision (topic 4.5)."""
    return tree_map(lambda w: w.astype(dtype) if mx.issubdtype(w.dtype, mx.floating) else w, weights)


def accumulate(model, micro_batches: Sequence[Batch], compute_dtype: mx.Dtype | None = None
               ) -> tuple[mx.array, dict, int]:
    """(mean loss, its gradient, counted tokens) over all the micro-batches' counted targets together:
    the gradients of the loss sums are added and divided by the total count once, so k micro-batches
    give what one batch of all their rows gives, however their padding differs. A mean of the
    micro-batches' means would weigh a token of a mostly padded micro-batch more.

    Mixed precision, compute_dtype=mx.bfloat16: the model's fp32 (master) weights are cast to bf16
    inside the differentiated function, so the forward and backward run in bf16 while the loss is
    taken in fp32 from the bf16 logits (cross_entropy_sum's log-softmax is fp32). The gradient
    with respect to the fp32 weights comes back through the cast, cast up to fp32, and is
    accumulated and scaled in fp32; the model holds its fp32 weights again afterwards, and no bf16
    copy outlives the call (topic 4.5)."""
    weights = model.trainable_parameters()

    def loss_sum(w, inputs, targets):
        model.update(w if compute_dtype is None else cast_weights(w, compute_dtype))
        total, count = cross_entropy_sum(model(inputs), targets)
        return total, count

    def fp32(g):  # a gradient as the master weight's dtype; a no-op without compute_dtype
        return g.astype(mx.float32) if mx.issubdtype(g.dtype, mx.floating) else g

    step = mx.value_and_grad(loss_sum)
    total, grads, count = mx.array(0.0), None, 0
    try:
        for inputs, targets in micro_batches:
            (s, n), g = step(weights, inputs, targets)
            if compute_dtype is not None:
                s, g = s.astype(mx.float32), tree_map(fp32, g)
            total, count = total + s, count + int(n.item())
            grads = g if grads is None else tree_map(mx.add, grads, g)
            mx.eval(total, grads)  # one micro-batch's activations at a time: the point of accumulating
    finally:
        model.update(weights)
    scale = 1.0 / max(count, 1)  # no counted token: loss and gradient 0, as cross_entropy defines
    return total * scale, tree_map(lambda g: g * scale, grads), count


def evaluate(model, batches: Sequence[Batch]) -> float:
    """The mean loss over every counted target of the batches, no gradient (topic 4.5)."""
    total, count = 0.0, 0
    for inputs, targets in batches:
        s, n = cross_entropy_sum(model(inputs), targets)
        total, count = total + s.item(), count + int(n.item())
    return total / count if count else 0.0


def checkpoint_path(folder: str | Path, step: int) -> Path:
    """folder/step_000012.safetensors: the checkpoint after `step` steps (topic 4.5)."""
    return Path(folder) / f"step_{step:06d}.safetensors"


def save_checkpoint(path: str | Path, model, optimizer: AdamW, step: int) -> None:
    """The weights, AdamW's moments, step count and hyperparameters, and the training step, in one
    safetensors file: fp32 stored as it is, so a resumed run is the uninterrupted one (topic 4.5)."""
    arrays = {f"model.{k}": v for k, v in tree_flatten(model.trainable_parameters())}
    if optimizer.m is not None:
        arrays |= {f"adam_m.{k}": v for k, v in tree_flatten(optimizer.m)}
        arrays |= {f"adam_v.{k}": v for k, v in tree_flatten(optimizer.v)}
    meta = {"step": str(step), "adam_t": str(optimizer.t), "lr": repr(optimizer.lr),
            "betas": f"{optimizer.betas[0]!r},{optimizer.betas[1]!r}", "eps": repr(optimizer.eps),
            "weight_decay": repr(optimizer.weight_decay)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.partial.safetensors")
    mx.save_safetensors(str(tmp), arrays, metadata=meta)
    os.replace(tmp, path)  # the checkpoint appears whole or not at all


def load_checkpoint(path: str | Path, model, optimizer: AdamW) -> int:
    """Restore what save_checkpoint wrote into model and optimizer; returns the step to resume at.
    A checkpoint of another model (other weight names or shapes) is a one-line ValueError, and
    nothing is changed (topic 4.5)."""
    arrays, meta = mx.load(str(path), return_metadata=True)
    want = {f"model.{k}": v.shape for k, v in tree_flatten(model.trainable_parameters())}
    have = {k: v.shape for k, v in arrays.items() if k.startswith("model.")}
    if have != want:
        odd = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
        raise ValueError(f"{path} is a checkpoint of another model: {odd[0].removeprefix('model.')} is"
                         f" {have.get(odd[0])} there and {want.get(odd[0])} here ({len(odd)} weights differ)")

    def part(prefix: str):
        return tree_unflatten([(k[len(prefix):], v) for k, v in arrays.items() if k.startswith(prefix)])

    model.update(part("model."))
    optimizer.t = int(meta["adam_t"])
    optimizer.m, optimizer.v = (part("adam_m."), part("adam_v.")) if optimizer.t else (None, None)
    optimizer.lr, optimizer.eps = float(meta["lr"]), float(meta["eps"])
    optimizer.betas = tuple(float(b) for b in meta["betas"].split(","))
    optimizer.weight_decay = float(meta["weight_decay"])
    return int(meta["step"])


def progress_line(step: int, steps: int, loss: float, tokens_per_s: float, lr: float,
                  val_loss: float | None = None, width: int = 20) -> str:
    """'step 12/100 [##..................] loss 2.3456 | lr 1.00e-03 | 5123 tok/s' (topic 4.5)."""
    done = width * step // max(steps, 1)
    val = f" | val {val_loss:.4f}" if val_loss is not None else ""
    return (f"step {step}/{steps} [{'#' * done}{'.' * (width - done)}] loss {loss:.4f}{val}"
            f" | lr {lr:.2e} | {tokens_per_s:.0f} tok/s")


def train(model, optimizer: AdamW, batches_at: Callable[[int], Sequence[Batch]], steps: int, *,
          max_lr: float, min_lr: float = 0.0, warmup_steps: int = 0, clip: float | None = 1.0,
          val_batches: Sequence[Batch] = (), eval_every: int = 0, start_step: int = 0,
          checkpoint_dir: str | Path | None = None, checkpoint_every: int = 0, out=sys.stderr,
          compute_dtype: mx.Dtype | None = None) -> list[dict]:
    """Steps start_step .. steps - 1: the micro-batches batches_at(step) accumulated, clipped, an
    AdamW step at warmup_cosine's rate. After every eval_every-th step (counting from 1) the
    validation loss; after every checkpoint_every-th, checkpoint_dir/step_<n>.safetensors, from
    which load_checkpoint and start_step=n resume. The progress line is rewritten in place on
    `out`. compute_dtype=mx.bfloat16 is mixed precision (see accumulate): bf16 forward and
    backward, while clipping, AdamW, its moments and the checkpoints stay fp32, so a resumed
    mixed-precision run is the uninterrupted one bit for bit too. Validation runs on the fp32
    weights. Returns one record per step: step, loss, lr, grad_norm, tokens, val_loss (or None).
    A loss that is not finite stops it with a FloatingPointError naming the step, before that step
    changes anything (topic 4.5)."""
    history, shown = [], 0
    for step in range(start_step, steps):
        start = time.perf_counter()
        loss, grads, tokens = accumulate(model, batches_at(step), compute_dtype)
        if not math.isfinite(loss.item()):  # before the update: the weights and checkpoints stay good
            out.write("\n")
            raise FloatingPointError(f"the loss is {loss.item()} at step {step + 1}; the weights are those after"
                                     f" step {step}" + (f" (checkpoints in {checkpoint_dir})" if checkpoint_dir else ""))
        grads, norm = clip_grad_norm(grads, clip) if clip is not None else (grads, global_norm(grads))
        lr = warmup_cosine(step, max_lr, min_lr, warmup_steps, steps)
        optimizer.update(model, grads, lr=lr)
        mx.eval(model.trainable_parameters(), optimizer.m, optimizer.v)
        val = evaluate(model, val_batches) if eval_every and (step + 1) % eval_every == 0 and val_batches else None
        if checkpoint_dir is not None and checkpoint_every and (step + 1) % checkpoint_every == 0:
            save_checkpoint(checkpoint_path(checkpoint_dir, step + 1), model, optimizer, step + 1)
        record = {"step": step + 1, "loss": loss.item(), "lr": lr, "grad_norm": norm.item(), "tokens": tokens,
                  "val_loss": val}
        history.append(record)
        speed = tokens / max(time.perf_counter() - start, 1e-9)
        line = progress_line(step + 1, steps, record["loss"], speed, lr, val)
        out.write("\r" + line.ljust(shown))  # spaces over what a longer line left
        shown = len(line)
        out.flush()
    out.write("\n")
    return history
