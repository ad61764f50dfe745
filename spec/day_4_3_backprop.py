"""Topic 4.3: backpropagation, every gradient of two small models against torch autograd.

llm.c's discipline: the same weights and batch go through the implementation and through
transformers; the loss, the logits and the gradient of every weight are compared, and a failure
lists each tensor outside tolerance with its worst element.

- `impl.train.model.ClassicLM(TrainConfig)`: GPT-2's block (learned positions, LayerNorm, multi-head
  attention with biases, GELU (tanh) MLP, head tied to the token embedding), against
  transformers' GPT2LMHeadModel.
- `impl.train.model.ModernLM(TrainConfig)`: Llama's block (RMSNorm, half-split RoPE, grouped-query
  attention, SwiGLU MLP, untied head), against transformers' LlamaForCausalLM.
- `impl.train.model.loss_and_grad(model, inputs, targets)`: (loss, gradient tree), by mx.value_and_grad.
  Against `model(ids, labels=labels).loss.backward()`: labels are the ids with some -100, and the
  targets given here are the labels shifted by one with -100 for the last position, the same loss.
- `impl.train.layers.layer_norm`, `gelu`: against torch.nn.functional in fp64 (values and gradients).

Every weight is drawn at random (norms around 1, biases around 0, not their initial constants), so
that each one matters. Hypothesis draws the batch, the length, the heads and (Llama) the KV heads.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from mlx.utils import tree_flatten, tree_unflatten

from reference.train_models import flat_from_hf, grads, hf_model
from spec.draw import draw_rng
from spec.ladder import FP32, GRAD_FP32, MODEL_FP32, Tol, assert_close

NAMES = {"model": ("TrainConfig", "ClassicLM", "ModernLM", "loss_and_grad"), "layers": ("layer_norm", "gelu")}
ARCH = {"ClassicLM": "gpt2", "ModernLM": "llama"}
EMBEDDINGS = {"wte", "wpe", "embed"}


@pytest.mark.presence
def test_has_names(impl):
    missing = [f"train.{m}.{n}" for m, names in NAMES.items() for n in names
               if not hasattr(getattr(impl.train, m), n)]
    assert not missing, f"impl lacks {missing}"


@pytest.fixture
def train(impl):  # Hypothesis probes a test's first argument: hand tests the package
    return impl.train


# -- the classic block's own layers -----------------------------------------------------------


@given(data=st.data())
def test_layer_norm_and_gelu(train, data):
    rng = draw_rng(data)
    E = data.draw(st.integers(2, 48), label="dim")  # one element: x - mean is rounding noise / sqrt(eps)
    # Rows of standard deviation 0.5-3 about means of up to 3: a near-constant row's gradient is
    # ill-conditioned in fp32 whatever computes it (x - mean loses the digits that matter).
    z = rng.normal(0, 1, (2, 5, E))
    z = (z - z.mean(-1, keepdims=True)) / z.std(-1, keepdims=True)
    x = (z * rng.uniform(0.5, 3, (2, 5, 1)) + rng.uniform(-3, 3, (2, 5, 1))).astype(np.float32)
    w, b = rng.normal(1, 0.5, E).astype(np.float32), rng.normal(0, 0.5, E).astype(np.float32)
    # fp64: where a row's variance is small the gradient is a near-cancellation, and torch's fp32
    # LayerNorm is then further from the exact value than an fp32 two-pass one (measured: 0.3%).
    xt, wt, bt = (torch.from_numpy(a).double().requires_grad_(True) for a in (x, w, b))
    want = F.gelu(F.layer_norm(xt, (E,), wt, bt, 1e-5), approximate="tanh")
    up = rng.normal(size=want.shape).astype(np.float32)  # a random upstream gradient
    (want * torch.from_numpy(up).double()).sum().backward()

    def f(x, w, b):
        return (train.layers.gelu(train.layers.layer_norm(x, w, b, 1e-5)) * mx.array(up)).sum()

    got = train.layers.gelu(train.layers.layer_norm(mx.array(x), mx.array(w), mx.array(b), 1e-5))
    assert_close(got, want, FP32, f"gelu(layer_norm(x)) x (2, 5, {E}) vs torch fp64")
    for g, t, name in zip(mx.grad(f, argnums=(0, 1, 2))(mx.array(x), mx.array(w), mx.array(b)), (xt, wt, bt),
                          ("x", "weight", "bias"), strict=True):
        assert_close(g, t.grad, GRAD_FP32, f"d/d{name} of gelu(layer_norm(x)) vs torch autograd in fp64")


# -- every gradient of a model --------------------------------------------------------------------


def random_weights(model, rng) -> dict[str, np.ndarray]:
    """Every weight drawn at random, set in the model; returns them by name."""
    out = {}
    for name, p in tree_flatten(model.trainable_parameters()):
        leaf = name.rsplit(".", 1)[-1]
        if p.ndim == 2:  # embeddings N(0, 1); projections (out, in) N(0, 1 / in): outputs of unit variance
            a = rng.normal(0, 1.0 if leaf in EMBEDDINGS else 1 / math.sqrt(p.shape[1]), p.shape)
        elif leaf.startswith("b") or leaf.endswith("_b"):  # biases
            a = rng.normal(0, 0.3, p.shape)
        else:  # norm weights
            a = rng.normal(1, 0.3, p.shape)
        out[name] = a.astype(np.float32)
    model.update(tree_unflatten([(n, mx.array(a)) for n, a in out.items()]))
    return out


def check_every_tensor(got: dict[str, np.ndarray], want: dict[str, np.ndarray], tol: Tol, what: str,
                       show: bool = True) -> None:
    """Compare each tensor; fail listing every one outside tol, the worst first; print the table (show)."""
    assert got.keys() == want.keys(), f"{what}: names differ: {sorted(got.keys() ^ want.keys())}"
    failures, rows = [], []
    for name in want:
        rows.append((float(np.abs(got[name] - want[name]).max()), name))
        try:
            assert_close(got[name], want[name], tol, f"{what} {name} {want[name].shape}")
        except AssertionError as e:
            failures.append((rows[-1][0], str(e)))
    if show:
        print(f"{what}: max |diff| per tensor: " + ", ".join(f"{n} {d:.2g}" for d, n in sorted(rows, reverse=True)))
    assert not failures, f"{len(failures)} of {len(want)} tensors differ:\n" + "\n".join(
        m for _, m in sorted(failures, reverse=True))


def config_fields(c) -> dict:
    return dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                num_layers=c.num_layers, num_heads=c.num_heads, num_kv_heads=c.num_kv_heads,
                block_size=c.block_size, norm_eps=c.norm_eps, rope_theta=c.rope_theta)


def batch(rng, N: int, L: int, V: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids (N, L); labels: the ids with about a quarter -100 (at least one counted after the shift);
    targets (N, L): the labels shifted by one, -100 at the last position: the same loss."""
    ids = rng.integers(0, V, (N, L))
    labels = np.where(rng.random((N, L)) < 0.25, -100, ids)
    labels[0, 1] = ids[0, 1]
    targets = np.concatenate([labels[:, 1:], np.full((N, 1), -100)], axis=1)
    return ids, labels, targets


def check_gradients(train, kind: str, N: int, L: int, H: int, H_kv: int | None, seed: int) -> None:
    rng = np.random.default_rng(seed)
    c = train.model.TrainConfig(vocab_size=61, hidden_size=8 * H, intermediate_size=40, num_layers=2, num_heads=H,
                                num_kv_heads=H_kv, block_size=16, rope_theta=500.0)
    model = getattr(train.model, kind)(c, seed=seed)
    weights = random_weights(model, rng)
    arch, what = ARCH[kind], f"{kind} N={N} L={L} heads {H}/{H_kv or H}"
    ref = hf_model(arch, weights, **config_fields(c))
    ids, labels, targets = batch(rng, N, L, c.vocab_size)
    out = ref(torch.from_numpy(ids), labels=torch.from_numpy(labels))
    out.loss.backward()

    assert_close(model(mx.array(ids)), out.logits, MODEL_FP32, f"{what}: logits vs transformers")
    loss, g = train.model.loss_and_grad(model, mx.array(ids), mx.array(targets))
    assert_close(loss, out.loss, FP32, f"{what}: loss vs transformers' (labels=...)")
    got = {n: np.array(a) for n, a in tree_flatten(g)}
    check_every_tensor(got, grads(arch, ref), GRAD_FP32, f"{what}: gradient of")
    # loss_and_grad leaves the model's weights as they were
    check_every_tensor({n: np.array(a) for n, a in tree_flatten(model.trainable_parameters())},
                       flat_from_hf(arch, ref), Tol(0.0, 0.0, "untouched"), f"{what}: weight after loss_and_grad", show=False)


@given(data=st.data())
def test_classic_gradients(train, data):
    N, L = data.draw(st.integers(1, 3), label="batch"), data.draw(st.integers(2, 16), label="length")
    H = data.draw(st.sampled_from([1, 2, 4]), label="heads")
    check_gradients(train, "ClassicLM", N, L, H, None, data.draw(st.integers(0, 2**16), label="seed"))


@given(data=st.data())
def test_modern_gradients(train, data):
    N, L = data.draw(st.integers(1, 3), label="batch"), data.draw(st.integers(2, 16), label="length")
    H = data.draw(st.sampled_from([2, 4]), label="heads")
    H_kv = data.draw(st.sampled_from([h for h in (1, 2, 4) if H % h == 0]), label="kv heads")
    check_gradients(train, "ModernLM", N, L, H, H_kv, data.draw(st.integers(0, 2**16), label="seed"))


@pytest.mark.presence  # it checks the spec's comparison, not the implementation: no start on the topic
def test_a_wrong_gradient_is_caught():
    """The check bites: a gradient off by one part in a thousand in one weight fails it."""
    rng = np.random.default_rng(0)
    got = {"a": rng.normal(size=(4, 4)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)}
    want = {k: v.copy() for k, v in got.items()}
    got["b"][2] *= 1.001
    with pytest.raises(AssertionError, match="1 of 2 tensors differ"):
        check_every_tensor(got, want, GRAD_FP32, "a planted error:")
