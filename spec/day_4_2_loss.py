"""Topic 4.2: the language-modelling loss, against transformers and torch.

- `impl.train.loss.causal_lm_loss(logits, labels)`: labels = input ids with -100 where a token
  does not count; position t predicts labels[t + 1]; the mean of -log p over counted tokens.
  Against `LlamaForCausalLM(config)(input_ids, labels=labels).loss` on a tiny random config, the
  same logits fed to both.
- `impl.train.loss.cross_entropy(logits, targets, ignore_index)` (targets already shifted) and
  `cross_entropy_sum` -> (sum, count): against torch.nn.functional.cross_entropy (mean and sum),
  its gradient against torch autograd; logits in fp32, fp16 and bf16 (computed in fp32: the
  reference gets the same rounded values); logits up to 1e4 (a log-softmax that does not subtract
  the max overflows there), against fp64.
- No counted token at all: torch's mean is NaN (0 / 0); here the loss is 0 with count 0, and its
  gradient is 0, so a micro-batch of padding alone cannot poison a step.
- `perplexity(mean_loss)` = exp(mean_loss); `next_token_accuracy(logits, targets)`: argmax hits
  over counted targets, against numpy.
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

from spec.draw import DTYPES, draw_dtype, draw_rng
from spec.ladder import FP32, Tol, assert_close

NAMES = {"log_softmax", "cross_entropy_sum", "cross_entropy", "shift_labels", "causal_lm_loss", "perplexity",
         "next_token_accuracy"}


@pytest.mark.presence
def test_has_names(impl):
    missing = sorted(n for n in NAMES if not hasattr(impl.train.loss, n))
    assert not missing, f"impl.train.loss lacks {missing}"


@pytest.fixture
def loss(impl):  # Hypothesis probes a test's first argument: hand tests the module
    return impl.train.loss


def draw_case(data, rng, scale: float, dtype: str = "float32"):
    """logits (N, L, V) in dtype (and the same rounded values as fp32 torch), targets (N, L) with
    about a third of them -100, but at least one counted."""
    N, L = data.draw(st.integers(1, 3), label="batch"), data.draw(st.integers(1, 9), label="length")
    V = data.draw(st.integers(2, 50), label="vocab")
    x = mx.array(rng.normal(0, scale, (N, L, V)).astype(np.float32)).astype(DTYPES[dtype])
    targets = rng.integers(0, V, (N, L))
    targets[rng.random((N, L)) < 0.3] = -100
    targets[0, 0] = rng.integers(0, V)
    return x, torch.from_numpy(np.array(x.astype(mx.float32))), targets


@given(data=st.data())
def test_cross_entropy(loss, data):
    dtype, rng = draw_dtype(data), draw_rng(data)
    scale = data.draw(st.sampled_from([0.1, 1.0, 10.0]), label="logit scale")
    x, x32, targets = draw_case(data, rng, scale, dtype)
    V, t = x.shape[-1], torch.from_numpy(targets)
    what = f"logits {x.shape} {dtype} of scale {scale}"
    want = F.cross_entropy(x32.reshape(-1, V), t.reshape(-1), ignore_index=-100)
    got = loss.cross_entropy(x, mx.array(targets))
    assert got.dtype == mx.float32, f"the loss is fp32 whatever the logits' dtype, got {got.dtype}"
    assert_close(got, want, FP32, f"cross_entropy, {what}, vs torch (mean)")
    total, count = loss.cross_entropy_sum(x, mx.array(targets))
    assert int(count) == int((targets != -100).sum()), f"count {count}, targets {targets}"
    assert_close(total, F.cross_entropy(x32.reshape(-1, V), t.reshape(-1), reduction="sum"),
                 FP32, f"cross_entropy_sum, {what}, vs torch (sum)")


@given(data=st.data())
def test_cross_entropy_gradient(loss, data):
    rng = draw_rng(data)
    x, x32, targets = draw_case(data, rng, 2.0)
    x32.requires_grad_(True)
    F.cross_entropy(x32.reshape(-1, x.shape[-1]), torch.from_numpy(targets).reshape(-1)).backward()
    got = mx.grad(lambda z: loss.cross_entropy(z, mx.array(targets)))(x)
    assert_close(got, x32.grad, FP32, f"d loss / d logits {x.shape} vs torch autograd")


def tiny_llama(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("padding", ["none", "right", "scattered"])
def test_causal_lm_loss_vs_transformers(loss, padding):
    V, rng = 97, np.random.default_rng(4)
    model = tiny_llama(V)
    ids = torch.from_numpy(rng.integers(0, V, (3, 12)))
    labels = ids.clone()
    if padding == "right":  # the tail of each row is padding (its own length each)
        for i, n in enumerate((12, 7, 3)):
            labels[i, n:] = -100
    elif padding == "scattered":  # a prompt masked out, or any token a recipe does not train on
        labels[torch.from_numpy(rng.random((3, 12)) < 0.4)] = -100
    with torch.no_grad():
        out = model(ids, labels=labels)
    got = loss.causal_lm_loss(mx.array(out.logits.numpy()), mx.array(labels.numpy()))
    assert_close(got, out.loss, FP32, f"causal_lm_loss vs LlamaForCausalLM(labels=...).loss, padding {padding}")
    shifted = loss.cross_entropy(mx.array(out.logits[:, :-1].numpy()), mx.array(labels[:, 1:].numpy()))
    assert_close(shifted, out.loss, FP32, "cross_entropy on targets shifted by hand")


def test_large_logits_are_stable(loss):
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1e4, (4, 64)).astype(np.float32)  # exp(1e4) is inf in fp32 and fp64
    targets = rng.integers(0, 64, 4)
    logp = torch.log_softmax(torch.from_numpy(x).double(), -1)
    want = -logp[torch.arange(4), torch.from_numpy(targets)].mean()
    got = loss.cross_entropy(mx.array(x), mx.array(targets))
    assert np.isfinite(float(got)), f"cross_entropy of logits ~1e4 is {got}: log-softmax must subtract the max"
    # 1e4-sized logits carry fp32 ulps of 1e-3; the loss is a difference of them.
    assert abs(float(got) - float(want)) <= 1e-6 * 1e4, f"got {float(got)}, fp64 reference {float(want)}"
    assert_close(loss.log_softmax(mx.array(x)), logp, Tol(0.0, 1e-6, "fp32 ulps of 1e4-sized logits"),
                 "log_softmax of logits ~1e4 vs fp64")


def test_all_labels_ignored(loss):
    x = mx.array(np.random.default_rng(2).normal(size=(2, 5, 11)).astype(np.float32))
    targets = mx.full((2, 5), -100)
    assert math.isnan(F.cross_entropy(torch.from_numpy(np.array(x)).reshape(-1, 11), torch.full((10,), -100)).item()), \
        "the premise: torch's mean over no token is NaN"
    total, count = loss.cross_entropy_sum(x, targets)
    assert float(total) == 0.0 and int(count) == 0, f"(sum, count) over no token: ({total}, {count}), expected (0, 0)"
    value, grad = mx.value_and_grad(lambda z: loss.cross_entropy(z, targets))(x)
    assert float(value) == 0.0, f"the mean over no counted token is defined as 0, got {value}"
    assert (np.array(grad) == 0).all(), "its gradient is 0 (not NaN)"
    assert loss.next_token_accuracy(x, targets) == 0.0


@given(data=st.data())
def test_perplexity_and_accuracy(loss, data):
    rng = draw_rng(data)
    x, _, targets = draw_case(data, rng, 3.0)
    mean = loss.cross_entropy(x, mx.array(targets))
    assert loss.perplexity(mean) == pytest.approx(math.exp(float(mean)), rel=1e-6)
    counted = targets != -100
    want = ((np.array(x).argmax(-1) == targets) & counted).sum() / counted.sum()
    assert loss.next_token_accuracy(x, mx.array(targets)) == pytest.approx(want), "accuracy over counted targets"


def test_perplexity_of_uniform_is_vocab_size(loss):
    V = 37
    mean = loss.cross_entropy(mx.zeros((2, 3, V)), mx.array([[0, 5, 9], [1, 2, 36]]))
    assert loss.perplexity(mean) == pytest.approx(V, rel=1e-5), "uniform logits: perplexity = vocab size"
