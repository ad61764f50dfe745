"""Topic 4.4: the optimizer and its schedule, step by step against torch.

- `impl.train.optim.AdamW(lr, betas, eps, weight_decay).step(weights, grads, lr)`: against
  torch.optim.AdamW fed the same gradients, every weight compared after each of ten steps
  (Hypothesis draws the hyperparameters and the gradients' scale, down to 1e-9 where eps matters).
  On the CPU the step is one C++ node for the whole tree (tiny_llm_kernels.adamw); with
  `AdamW.use_kernel = False` it is the array ops, the kernel's twin, and the two give the same
  weights and moments bit for bit, over trees of any shapes and views.
- `clip_grad_norm(grads, max_norm)` -> (clipped, norm) and `global_norm`: against
  torch.nn.utils.clip_grad_norm_, gradients below and above the threshold.
- `warmup_cosine(step, max_lr, min_lr, warmup_steps, total_steps)`: against torch's own schedulers
  (LinearLR warmup then CosineAnnealingLR, chained by SequentialLR) at every step of the run, and
  after it (min_lr) against the formula in a LambdaLR.
- Ten training steps of each small model of 4.3 (loss_and_grad, clip, schedule, AdamW) against the
  same ten steps of transformers' GPT-2 and Llama with torch.optim.AdamW, clip_grad_norm_ and a
  LambdaLR: the loss before each step and every weight after it.
"""

from __future__ import annotations

import math
import warnings

import mlx.core as mx
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from mlx.utils import tree_flatten, tree_unflatten

from reference.train_models import flat_from_hf, hf_model
from spec.day_4_3_backprop import (
    ARCH,
    assert_kernel_built,
    batch,
    check_every_tensor,
    config_fields,
    random_weights,
)
from spec.draw import draw_rng
from spec.ladder import FP32, GRAD_FP32, Tol, assert_close

NAMES = {"AdamW", "global_norm", "clip_grad_norm", "warmup_cosine"}


@pytest.mark.presence
def test_has_names(impl):
    missing = sorted(n for n in NAMES if not hasattr(impl.train.optim, n))
    assert not missing, f"impl.train.optim lacks {missing}"


@pytest.fixture
def optim(impl):  # Hypothesis probes a test's first argument: hand tests the module
    return impl.train.optim


def draw_tree(rng, scale: float) -> dict[str, np.ndarray]:
    return {"w": rng.normal(0, scale, (5, 7)).astype(np.float32), "layers.0.b": rng.normal(0, scale, 3).astype(np.float32),
            "layers.1.b": rng.normal(0, scale, 3).astype(np.float32)}


def as_mlx(flat: dict[str, np.ndarray]):
    return tree_unflatten([(k, mx.array(v)) for k, v in flat.items()])


def as_numpy(tree) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(tree)}


# -- AdamW on given gradients -----------------------------------------------------------------


@given(data=st.data())
def test_adamw_matches_torch(optim, data):
    rng = draw_rng(data)
    b1 = data.draw(st.sampled_from([0.9, 0.8, 0.0]), label="beta1")
    b2 = data.draw(st.sampled_from([0.999, 0.95]), label="beta2")
    eps = data.draw(st.sampled_from([1e-8, 1e-6]), label="eps")
    wd = data.draw(st.sampled_from([0.0, 0.01, 0.1]), label="weight_decay")
    gscale = data.draw(st.sampled_from([1e-9, 1e-3, 1.0, 100.0]), label="gradient scale")
    weights = draw_tree(rng, 1.0)
    params = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in weights.items()}
    ref = torch.optim.AdamW(params.values(), lr=1e-2, betas=(b1, b2), eps=eps, weight_decay=wd)
    opt, w = optim.AdamW(lr=1e-2, betas=(b1, b2), eps=eps, weight_decay=wd), as_mlx(weights)
    for step in range(10):
        lr = 1e-2 * (1 + step) / 10  # a different rate each step, given to step()
        grads = draw_tree(rng, gscale)
        for k, p in params.items():
            p.grad = torch.from_numpy(grads[k])
        for group in ref.param_groups:
            group["lr"] = lr
        ref.step()
        w = optim.AdamW.step(opt, w, as_mlx(grads), lr=lr)
        got = as_numpy(w)
        for k, p in params.items():
            assert_close(got[k], p, FP32, f"AdamW step {step + 1} ({b1}, {b2}, eps {eps}, wd {wd},"
                                          f" gradients ~{gscale}): {k}")


@pytest.mark.presence
def test_adamw_kernel_is_built(impl):
    assert_kernel_built(impl, "adamw")


@given(data=st.data())
def test_adamw_kernel_equals_its_twin(optim, data):
    """The fused step and the array ops: the same fp32 operations in the same order, so the same bits."""
    rng = draw_rng(data)
    b1, b2 = data.draw(st.sampled_from([(0.9, 0.999), (0.8, 0.95), (0.0, 0.99)]), label="betas")
    eps = data.draw(st.sampled_from([1e-8, 1e-6]), label="eps")
    wd = data.draw(st.sampled_from([0.0, 0.1]), label="weight_decay")
    gscale = data.draw(st.sampled_from([1e-9, 1e-3, 1.0, 100.0]), label="gradient scale")
    shapes = {"embed": (65, 16), "layers.0.w": (100_003,), "layers.1.w": (3, 5), "bias": (1,)}  # 100_003: two pieces
    weights = {k: rng.normal(0, 1, s).astype(np.float32) for k, s in shapes.items()}
    grads = [{k: rng.normal(0, gscale, s).astype(np.float32) for k, s in shapes.items()} for _ in range(4)]
    result = {}
    for use_kernel in (True, False):
        opt = optim.AdamW(lr=1e-2, betas=(b1, b2), eps=eps, weight_decay=wd)
        opt.use_kernel = use_kernel
        w = as_mlx(weights)
        for step, g in enumerate(grads):
            g = as_mlx(g)
            g["layers"][1]["w"] = mx.array(np.ascontiguousarray(np.array(g["layers"][1]["w"]).T)).T  # a view
            w = opt.step(w, g, lr=1e-2 * (step + 1))
        result[use_kernel] = {**as_numpy(w), **{f"m.{k}": v for k, v in as_numpy(opt.m).items()},
                              **{f"v.{k}": v for k, v in as_numpy(opt.v).items()}}
    for k, want in result[False].items():
        np.testing.assert_array_equal(result[True][k], want, f"kernel vs twin after 4 steps: {k}")


def test_adamw_kernel_bad_input_is_a_one_line_error(impl):
    k = impl.native.kernels
    w = [mx.zeros((3,))]
    consts = dict(b1=0.9, c1=0.1, b2=0.99, c2=0.01, decay=1.0, step_size=0.1, root_c2=0.1, eps=1e-8)
    with pytest.raises(ValueError, match="^adamw: weights, grads, m and v must be lists of one length, got 1, 0, 1 and 1$"):
        k.adamw(w, [], w, w, **consts)
    with pytest.raises(ValueError, match=r"^adamw: weight 0 is \(3,\) but its gradient or moments are \(4,\)$"):
        k.adamw(w, [mx.zeros((4,))], w, w, **consts)
    with pytest.raises(ValueError, match="^adamw: weight 0: every array must be float32$"):
        k.adamw([mx.zeros((3,), mx.float16)], w, w, w, **consts)


def test_adamw_first_step_is_lr_sized(optim):
    """Bias correction: the first step moves each weight by lr (times sign(g)), not lr * (1 - b1)."""
    w = {"w": mx.zeros((4,))}
    g = {"w": mx.array([1e-3, -2.0, 5.0, -7e-4])}
    out = optim.AdamW(lr=0.1, weight_decay=0.0).step(w, g)
    assert_close(out["w"], -0.1 * np.sign(np.array(g["w"])), Tol(1e-6, 1e-4, "eps / |g| of the first step"),
                 "AdamW's first step from zero moments")


# -- clipping by the global norm ---------------------------------------------------------------


@given(data=st.data())
def test_clip_grad_norm(optim, data):
    rng = draw_rng(data)
    scale = data.draw(st.sampled_from([1e-3, 0.1, 1.0, 10.0]), label="gradient scale")
    max_norm = data.draw(st.sampled_from([0.5, 1.0, 5.0]), label="max_norm")
    grads = draw_tree(rng, scale)
    params = {k: torch.nn.Parameter(torch.zeros(v.shape)) for k, v in grads.items()}
    for k, p in params.items():
        p.grad = torch.from_numpy(grads[k].copy())
    want_norm = torch.nn.utils.clip_grad_norm_(params.values(), max_norm)
    clipped, norm = optim.clip_grad_norm(as_mlx(grads), max_norm)
    what = f"clip_grad_norm to {max_norm}, gradients ~{scale} (norm {float(want_norm):.3g})"
    assert_close(norm, want_norm, FP32, f"{what}: the norm returned")
    assert_close(optim.global_norm(as_mlx(grads)), want_norm, FP32, "global_norm")
    got = as_numpy(clipped)
    for k, p in params.items():
        assert_close(got[k], p.grad, FP32, f"{what}: {k}")


# -- the schedule -------------------------------------------------------------------------------


@pytest.mark.parametrize("warmup,total", [(2, 10), (5, 40), (10, 11), (3, 100)])
def test_warmup_cosine_vs_torch_schedulers(optim, warmup, total):
    max_lr, min_lr = 3e-3, 3e-4
    p = torch.nn.Parameter(torch.zeros(1))
    sgd = torch.optim.SGD([p], lr=max_lr)
    sched = torch.optim.lr_scheduler.SequentialLR(sgd, [
        torch.optim.lr_scheduler.LinearLR(sgd, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup - 1),
        torch.optim.lr_scheduler.CosineAnnealingLR(sgd, T_max=total - warmup, eta_min=min_lr)], milestones=[warmup])
    for step in range(total + 1):
        want = sgd.param_groups[0]["lr"]
        got = optim.warmup_cosine(step, max_lr, min_lr, warmup, total)
        assert got == pytest.approx(want, rel=1e-6, abs=1e-12), f"step {step} of {warmup} warmup, {total} total"
        with warnings.catch_warnings():  # SequentialLR's own deprecation notes, not ours
            warnings.simplefilter("ignore")
            sgd.step()
            sched.step()
    assert optim.warmup_cosine(warmup - 1, max_lr, min_lr, warmup, total) == pytest.approx(max_lr)


def schedule_formula(step: int, max_lr: float, min_lr: float, warmup: int, total: int) -> float:
    if step < warmup:
        return max_lr * (step + 1) / warmup
    t = min(step - warmup, total - warmup) / (total - warmup)
    return min_lr + (max_lr - min_lr) * (1 + math.cos(math.pi * t)) / 2


@given(warmup=st.integers(0, 20), extra=st.integers(1, 50), after=st.integers(0, 30))
def test_warmup_cosine_vs_lambda_lr(optim, warmup, extra, after):
    max_lr, min_lr, total = 1e-3, 1e-5, warmup + extra
    p = torch.nn.Parameter(torch.zeros(1))
    sgd = torch.optim.SGD([p], lr=max_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(sgd, lambda s: schedule_formula(s, max_lr, min_lr, warmup, total) / max_lr)
    for step in range(total + after + 1):
        got = optim.warmup_cosine(step, max_lr, min_lr, warmup, total)
        assert got == pytest.approx(sched.get_last_lr()[0], rel=1e-9), f"step {step}, warmup {warmup}, total {total}"
        sgd.step()
        sched.step()
    assert optim.warmup_cosine(total + after, max_lr, min_lr, warmup, total) == pytest.approx(min_lr), "min_lr after"


# -- ten steps of training ----------------------------------------------------------------------


STEPS, MAX_LR, MIN_LR, WARMUP, CLIP, WD, BETAS = 10, 1e-2, 1e-3, 3, 1.0, 0.1, (0.9, 0.95)
# Adam divides each gradient by its own running RMS, so a gradient that is rounding noise on both
# sides (GPT-2's key bias: softmax ignores a shift shared by every key, so its gradient is 0 in exact
# arithmetic) moves by up to lr per step in directions that need not agree: compared within that.
NOISE_ONLY = {"bk"}


@pytest.mark.parametrize("kind", ["ClassicLM", "ModernLM"])
def test_ten_training_steps_match_torch(impl, kind):
    train, rng = impl.train, np.random.default_rng(7)
    c = train.model.TrainConfig(vocab_size=61, hidden_size=32, intermediate_size=40, num_layers=2, num_heads=4,
                                num_kv_heads=2 if kind == "ModernLM" else None, block_size=16, rope_theta=500.0)
    model = getattr(train.model, kind)(c, seed=1)
    arch = ARCH[kind]
    ref = hf_model(arch, random_weights(model, rng), **config_fields(c))
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=MAX_LR, betas=BETAS, eps=1e-8, weight_decay=WD)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(
        ref_opt, lambda s: schedule_formula(s, MAX_LR, MIN_LR, WARMUP, STEPS) / MAX_LR)
    opt = train.optim.AdamW(lr=MAX_LR, betas=BETAS, eps=1e-8, weight_decay=WD)
    for step in range(STEPS):
        ids, labels, targets = batch(rng, 2, 12, c.vocab_size)
        ref_opt.zero_grad()
        out = ref(torch.from_numpy(ids), labels=torch.from_numpy(labels))
        out.loss.backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)
        ref_opt.step()
        ref_sched.step()

        what = f"{kind}, step {step + 1}"
        loss, grads = train.model.loss_and_grad(model, mx.array(ids), mx.array(targets))
        grads, norm = train.optim.clip_grad_norm(grads, CLIP)
        flat = dict(tree_flatten(grads))
        premise = [n for n in flat if n.rsplit(".", 1)[-1] in NOISE_ONLY and float(mx.abs(flat[n]).max()) > 1e-6]
        assert not premise, f"{what}: gradients of {premise} are not rounding noise: they are not 0 in exact arithmetic"
        opt.update(model, grads, lr=train.optim.warmup_cosine(step, MAX_LR, MIN_LR, WARMUP, STEPS))
        assert_close(loss, out.loss, FP32, f"{what}: the loss before the step")
        assert_close(norm, ref_norm, GRAD_FP32, f"{what}: the gradient's global norm")
        got = {n: np.array(w) for n, w in tree_flatten(model.trainable_parameters())}
        want = flat_from_hf(arch, ref)
        noisy = {n for n in got if n.rsplit(".", 1)[-1] in NOISE_ONLY}
        check_every_tensor({n: got[n] for n in got.keys() - noisy}, {n: want[n] for n in want.keys() - noisy},
                           GRAD_FP32, f"{what}: weight", show=step == STEPS - 1)
        lr_sum = sum(schedule_formula(s, MAX_LR, MIN_LR, WARMUP, STEPS) for s in range(step + 1))
        for n in noisy:
            if step == STEPS - 1:
                print(f"{what}: {n} max |diff| {np.abs(got[n] - want[n]).max():.2g}")
            assert_close(got[n], want[n], Tol(2 * lr_sum, 0.0, "noise-only gradients: up to lr a step each side"),
                         f"{what}: {n}")
