"""Topic 4.7: LoRA and QLoRA on the real model (SmolLM2-135M-Instruct), against peft.

- `impl.train.lora.add_lora(model, LoRAConfig(r, alpha, target_modules), seed)` adapts impl's
  model in place and returns the `Adapters` (A random, B zero, scale alpha / r): a fresh adapter
  leaves the logits unchanged, bit for bit; with B nonzero the logits equal peft's
  (get_peft_model on transformers' LlamaForCausalLM from the same weights, its A and B set to
  ours); one adapted projection alone equals torch's x W^T + s (x A^T) B^T.
- `merge` / `unmerge`: the merged weights equal peft's merge_and_unload, the merged model computes
  what the adapted one did, and unmerge gives the base weights back (peft's own 1e-4).
- `save_adapters` / `load_adapters`: peft's format (adapter_config.json, adapter_model.safetensors,
  peft's key names); what impl saves, PeftModel.from_pretrained reads and computes the same with;
  what peft saves, impl reads.
- `loss_and_grad(model, adapters, inputs, labels=None)`: the causal-LM loss (labels default to the
  inputs; -100 counts for nothing, as M3's prompts and padding) and the gradient of every A and B
  against torch autograd through peft on the same batch and labels; a few steps of AdamW (topic 4.4) on a
  tiny text lower the loss and change only A and B (every base weight bit-identical).
- QLoRA, `impl.train.qlora`: `quantized_matmul_dx(dy, w_q, scales, biases)`, the x-gradient of
  y = x W^T (dy @ W), against mx.quantized_matmul(transpose=False) and torch on the dequantized
  weight; on the CPU it is the C++ kernel tiny_llm_kernels.quantized_matmul_dx, held to its twin
  `quantized_matmul_dx_mlx`, torch (float64) and MLX within 1e-5 of each sum's magnitude on the
  model's shapes and Hypothesis' small ones, with the twin's one-line errors; `quantized_matmul_trainable` differentiates through week 2's kernel to x as a dense
  matmul does; `load_base(path, quantized)` gives the quantized model and its dense twin (the
  same triples dequantized), whose adapters' gradients agree; the quantized weights never change.

Prerequisites: 4.4 (AdamW; the loss of 4.2 through it) and 2.2 (QLoRA runs through week 2's
quantized matmul); the model itself is 1.5's, which 2.2 requires.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference.lora_models import (
    base_model,
    load_peft,
    lora_grads,
    lora_state,
    peft_model,
    set_lora,
)
from reference.models import hf_folder_from_gguf
from spec.ladder import FP32, MODEL_FP32, Tol, assert_close

NAMES = {"lora": ("LoRAConfig", "LoRA", "LoRAWeight", "Adapters", "add_lora", "merge", "unmerge", "loss_and_grad",
                  "peft_state", "save_adapters", "load_adapters"),
         "qlora": ("quantized_matmul_dx", "quantized_matmul_trainable", "TrainableQuantizedWeight", "load_base")}
TARGETS = ("q_proj", "v_proj", "down_proj")  # attention and MLP, square and not: (576, 576), (192, 576), (576, 1536)
R, ALPHA = 8, 16.0
# peft's own tolerance for merged against unmerged (its tests' atol): here for a weight after
# merge and unmerge (W + d - d rounds twice, |W| < 1). The logits of the merged model go through
# 30 layers, so they are held to MODEL_FP32 (measured: 1.1e-4 off, logits ~20).
PEFT_MERGE = Tol(atol=1e-4, rtol=0.0, reason="peft's merge tests: merged == unmerged within 1e-4")
# Adapter gradients, as a fraction of each tensor's largest element (an absolute bound would mean
# nothing across tensors whose scales differ by 100x). Against torch through peft: every element
# sums over 32 tokens what flowed back through up to 30 layers, from a forward that is itself only
# on topic 1.5's rung (logits within MODEL_FP32 of transformers'). Measured: torch fp32 is within
# 3.2e-5 of torch fp64, impl within 7.3e-4 (its loss 7e-5 off: the forward's difference, carried
# back), so 2e-3.
LORA_GRAD = 2e-3
# The quantized model against its dense twin: the same weights, only the kernel's fp32 sums over K
# run in another order than the dense matmul's. Measured worst: 1.4e-5 of the scale, so 1e-4.
QLORA_GRAD = 1e-4
TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
        "the slings and arrows of outrageous fortune.")


@pytest.mark.presence
def test_has_names(impl):
    missing = [f"{m}.{n}" for m, names in NAMES.items() for n in names if not hasattr(getattr(impl.train, m), n)]
    assert not missing, f"impl.train lacks {missing}"


@pytest.fixture(scope="module")
def folder() -> str:
    return str(hf_folder_from_gguf())


@pytest.fixture
def model(impl, folder):
    """impl's dense model on exactly transformers' weights (the HF folder), fresh for each test."""
    return impl.loader.load_model(folder).model


def ids_of(n: int, length: int, seed: int = 0) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(0, 49152, (n, length)), dtype=mx.int32)


def randomize_b(adapters, seed: int = 1, std: float = 0.02) -> None:
    """Nonzero B, so that each adapter changes what its projection computes."""
    rng = np.random.default_rng(seed)
    for _, _, a in adapters.named():
        a.lora_B = mx.array(rng.normal(0, std, a.lora_B.shape).astype(np.float32))


def as_numpy(state: dict) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in state.items()}


def peft_logits(pm, ids: mx.array) -> np.ndarray:
    with torch.no_grad():
        return pm(torch.from_numpy(np.array(ids)).long()).logits.numpy()


def assert_same_state(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    """The same keys and, bit for bit, the same arrays: a saved adapter is copied, not computed."""
    assert got.keys() == want.keys(), f"keys differ: {sorted(got.keys() ^ want.keys())[:6]}"
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], k)


def worst_relative(got: dict, want: dict) -> float:
    return max(float(np.abs(got[k] - want[k]).max() / (np.abs(want[k]).max() + 1e-30)) for k in want)


# -- the adapter and its forward --------------------------------------------------------------


def test_fresh_adapter_changes_nothing(impl, model):
    ids = ids_of(2, 12)
    before = np.array(model(ids))
    adapters = impl.train.lora.add_lora(model, impl.train.lora.LoRAConfig(R, ALPHA, TARGETS), seed=0)
    n_layers = len(model.layers)
    assert len(list(adapters.named())) == n_layers * len(TARGETS)
    for _, _, a in adapters.named():
        assert not np.any(np.array(a.lora_B)), "B must start at zero"
        assert np.any(np.array(a.lora_A)), "A must start random"
    np.testing.assert_array_equal(np.array(model(ids)), before, "a fresh adapter must change nothing")


def test_adapter_count_and_shapes(impl, model):
    adapters = impl.train.lora.add_lora(model, impl.train.lora.LoRAConfig(4, 8.0, ("k_proj", "up_proj")))
    shapes = {k: v.shape for k, v in impl.train.lora.peft_state(adapters).items()}
    assert shapes["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"] == (4, 576)
    assert shapes["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"] == (192, 4)
    assert shapes["base_model.model.model.layers.29.mlp.up_proj.lora_A.weight"] == (4, 576)
    assert shapes["base_model.model.model.layers.29.mlp.up_proj.lora_B.weight"] == (1536, 4)
    assert len(shapes) == 30 * 2 * 2


def test_bad_adapters_are_one_line_errors_and_change_nothing(impl, model):
    ids = ids_of(1, 8)
    before = np.array(model(ids))
    L = impl.train.lora
    for config, expect in ((L.LoRAConfig(0, 8.0, ("q_proj",)), "rank r must be at least 1"),
                           (L.LoRAConfig(4, 8.0, ("q_proj", "nope_proj")), "unknown target modules ['nope_proj']")):
        with pytest.raises(ValueError) as e:
            L.add_lora(model, config)
        assert expect in str(e.value) and "\n" not in str(e.value), str(e.value)
    np.testing.assert_array_equal(np.array(model(ids)), before, "a refused adapter changed the model")


def test_one_projection_matches_torch(impl):
    lora = impl.train.lora
    rng = np.random.default_rng(3)
    w, x = rng.normal(0, 0.05, (48, 64)).astype(np.float32), rng.normal(0, 1, (2, 5, 64)).astype(np.float32)
    adapter = lora.LoRA(64, 48, 4, ALPHA / 4, mx.random.key(0))
    adapter.lora_B = mx.array(rng.normal(0, 0.1, (48, 4)).astype(np.float32))
    got = impl.basics.linear(mx.array(x), lora.LoRAWeight(mx.array(w), adapter))
    a, b = (torch.from_numpy(np.array(t)) for t in (adapter.lora_A, adapter.lora_B))
    tx = torch.from_numpy(x)
    want = tx @ torch.from_numpy(w).T + (ALPHA / 4) * (tx @ a.T) @ b.T
    assert_close(got, want.numpy(), FP32, "x W^T + (alpha / r) (x A^T) B^T")
    bound = 1 / math.sqrt(64)  # peft's default A: Kaiming-uniform with a = sqrt(5), U(-1/sqrt(in), 1/sqrt(in))
    assert np.abs(np.array(adapter.lora_A)).max() <= bound


def test_forward_matches_peft(impl, model, folder):
    lora = impl.train.lora
    adapters = lora.add_lora(model, lora.LoRAConfig(R, ALPHA, TARGETS), seed=0)
    randomize_b(adapters)
    pm = peft_model(folder, R, ALPHA, list(TARGETS))
    set_lora(pm, as_numpy(lora.peft_state(adapters)))
    ids = ids_of(2, 12)
    with torch.no_grad():
        base = base_model(folder)(torch.from_numpy(np.array(ids)).long()).logits.numpy()
    want = peft_logits(pm, ids)
    assert np.abs(want - base).max() > 100 * MODEL_FP32.atol, "premise: the adapters must change the logits"
    assert_close(model(ids), want, MODEL_FP32, "logits with adapters vs peft")


def test_merge_and_unmerge(impl, model, folder):
    lora = impl.train.lora
    adapters = lora.add_lora(model, lora.LoRAConfig(R, ALPHA, TARGETS), seed=0)
    randomize_b(adapters)
    ids = ids_of(1, 10)
    adapted = np.array(model(ids))
    base_q = np.array(model.layers[3].self_attn.wq.base)
    lora.merge(model, adapters)
    assert isinstance(model.layers[3].self_attn.wq, mx.array), "merged: a plain weight"
    assert_close(model(ids), adapted, MODEL_FP32, "merged vs adapted logits")
    pm = peft_model(folder, R, ALPHA, list(TARGETS))
    set_lora(pm, as_numpy(lora.peft_state(adapters)))
    merged = pm.merge_and_unload().state_dict()
    for i, part, name, attr in ((3, "self_attn", "q_proj", "wq"), (17, "mlp", "down_proj", "w_down")):
        got = getattr(getattr(model.layers[i], part), attr)
        assert_close(got, merged[f"model.layers.{i}.{part}.{name}.weight"].numpy(), FP32, f"merged layer {i} {name}")
    lora.unmerge(model, adapters)
    assert_close(model.layers[3].self_attn.wq.base, base_q, PEFT_MERGE, "unmerged weight vs the base")
    assert_close(model(ids), adapted, MODEL_FP32, "unmerged vs adapted logits")


# -- peft's format, both ways ------------------------------------------------------------------


def test_saved_adapters_load_in_peft(impl, model, folder, tmp_path):
    lora = impl.train.lora
    adapters = lora.add_lora(model, lora.LoRAConfig(R, ALPHA, TARGETS), seed=0)
    randomize_b(adapters)
    lora.save_adapters(tmp_path, adapters)
    assert {p.name for p in tmp_path.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    pm = load_peft(folder, str(tmp_path))
    assert pm.peft_config["default"].r == R and pm.peft_config["default"].lora_alpha == ALPHA
    ids = ids_of(1, 10)
    assert_same_state(lora_state(pm), as_numpy(lora.peft_state(adapters)))
    assert_close(model(ids), peft_logits(pm, ids), MODEL_FP32, "impl's adapters in peft: logits")


def test_peft_adapters_load_in_impl(impl, folder, tmp_path):
    pm = peft_model(folder, 4, 32.0, ["k_proj", "o_proj", "up_proj"])
    rng = np.random.default_rng(5)
    set_lora(pm, {k: rng.normal(0, 0.05, v.shape).astype(np.float32) for k, v in lora_state(pm).items()})
    pm.save_pretrained(str(tmp_path))
    model = impl.loader.load_model(folder).model
    adapters = impl.train.lora.load_adapters(tmp_path, model)
    assert adapters.config.r == 4 and adapters.config.alpha == 32.0
    assert sorted(adapters.config.target_modules) == ["k_proj", "o_proj", "up_proj"]
    assert_same_state(as_numpy(impl.train.lora.peft_state(adapters)), lora_state(pm))
    ids = ids_of(1, 10)
    assert_close(model(ids), peft_logits(pm, ids), MODEL_FP32, "peft's adapters in impl: logits")


# -- gradients and training ---------------------------------------------------------------------


def test_gradients_match_peft(impl, model, folder):
    lora = impl.train.lora
    adapters = lora.add_lora(model, lora.LoRAConfig(R, ALPHA, TARGETS), seed=0)
    randomize_b(adapters)  # with B = 0 every A's gradient is 0: nothing to compare
    ids = ids_of(2, 16, seed=7)
    loss, grads = lora.loss_and_grad(model, adapters, ids)
    pm = peft_model(folder, R, ALPHA, list(TARGETS))
    set_lora(pm, as_numpy(lora.peft_state(adapters)))
    tids = torch.from_numpy(np.array(ids)).long()
    want_loss = pm(input_ids=tids, labels=tids).loss
    want_loss.backward()
    assert_close(loss, want_loss.detach().numpy(), Tol(1e-4, 0, "a mean of 30 tokens' losses, logits to 1e-3"),
                 "loss")
    adapters.update(grads)  # peft_state names the gradient tree as it names the weights
    got, want = as_numpy(lora.peft_state(adapters)), lora_grads(pm)
    assert got.keys() == want.keys()
    print(f"adapter gradients: worst |diff| / max |grad| = {worst_relative(got, want):.2g}",
          f"({max(want, key=lambda k: worst_relative({k: got[k]}, {k: want[k]}))})")
    for k in want:
        scale = np.abs(want[k]).max()
        assert scale > 0, f"premise: {k}'s gradient is nonzero"
        assert_close(got[k], want[k], Tol(LORA_GRAD * scale, 0.0, f"{LORA_GRAD} of the largest: 30 layers back"), k)


def test_masked_gradients_match_peft(impl, model, folder):
    """M3's case: labels -100 on each row's prompt and padding; only the rest counts, in the loss
    and in every gradient."""
    lora = impl.train.lora
    adapters = lora.add_lora(model, lora.LoRAConfig(R, ALPHA, TARGETS), seed=0)
    randomize_b(adapters)
    ids = ids_of(2, 16, seed=11)
    labels = np.array(ids)
    labels[0, :9], labels[1, :5], labels[1, 13:] = -100, -100, -100  # prompts, then padding
    loss, grads = lora.loss_and_grad(model, adapters, ids, mx.array(labels))
    pm = peft_model(folder, R, ALPHA, list(TARGETS))
    set_lora(pm, as_numpy(lora.peft_state(adapters)))
    want_loss = pm(input_ids=torch.from_numpy(np.array(ids)).long(), labels=torch.from_numpy(labels).long()).loss
    want_loss.backward()
    assert_close(loss, want_loss.detach().numpy(), Tol(1e-4, 0, "a mean of 15 tokens' losses, logits to 1e-3"),
                 "loss")
    adapters.update(grads)
    got, want = as_numpy(lora.peft_state(adapters)), lora_grads(pm)
    print(f"masked adapter gradients: worst |diff| / max |grad| = {worst_relative(got, want):.2g}")
    for k in want:
        scale = np.abs(want[k]).max()
        assert scale > 0, f"premise: {k}'s gradient is nonzero"
        assert_close(got[k], want[k], Tol(LORA_GRAD * scale, 0.0, f"{LORA_GRAD} of the largest: 30 layers back"), k)


def tiny_batch(folder: str) -> mx.array:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(folder)(TEXT)["input_ids"]
    return mx.array([ids[:16], ids[8:24]], dtype=mx.int32)


def base_arrays(model) -> dict[str, np.ndarray]:
    """Every base weight of the model, as numpy (a LoRAWeight's base, a QuantizedWeight's triple)."""
    out = {}
    for i, layer in enumerate(model.layers):
        for part, attrs in (("self_attn", ("wq", "wk", "wv", "wo")), ("mlp", ("w_gate", "w_up", "w_down"))):
            for attr in attrs:
                w = getattr(getattr(layer, part), attr)
                w = getattr(w, "base", w)
                for field in ("w_q", "scales", "biases") if hasattr(w, "w_q") else ("",):
                    out[f"{i}.{attr}.{field}"] = np.array(getattr(w, field) if field else w)
    return out


def train_steps(impl, model, adapters, batch: mx.array, steps: int) -> list[float]:
    opt = impl.train.optim.AdamW(lr=2e-3, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss, grads = impl.train.lora.loss_and_grad(model, adapters, batch)
        opt.update(adapters, grads)
        mx.eval(adapters.parameters())
        losses.append(loss.item())
    return losses


def test_training_moves_only_the_adapters(impl, model, folder):
    lora = impl.train.lora
    adapters = lora.add_lora(model, lora.LoRAConfig(R, ALPHA, TARGETS), seed=0)
    before, start = base_arrays(model), as_numpy(lora.peft_state(adapters))
    losses = train_steps(impl, model, adapters, tiny_batch(folder), 4)
    print(f"LoRA losses: {losses}")
    assert losses[-1] < losses[0] - 0.1, f"the loss should go down: {losses}"
    after = base_arrays(model)
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], f"base weight {k} changed")
    moved = as_numpy(lora.peft_state(adapters))
    assert all(np.any(moved[k] != start[k]) for k in start), "every A and B should move"


# -- QLoRA: through the quantized weights ------------------------------------------------------------


def quantized_triple(seed: int, N: int, K: int, bits: int = 4, group_size: int = 32):
    w = mx.array(np.random.default_rng(seed).normal(0, 0.05, (N, K)).astype(np.float32))
    return mx.quantize(w, group_size=group_size, bits=bits)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_matmul_dx(impl, bits):
    w_q, scales, biases = quantized_triple(11, 96, 128, bits)
    dy = mx.array(np.random.default_rng(12).normal(0, 1, (2, 3, 96)).astype(np.float32))
    got = impl.train.qlora.quantized_matmul_dx(dy, w_q, scales, biases, 32, bits)
    want = mx.quantized_matmul(dy, w_q, scales, biases, transpose=False, group_size=32, bits=bits)
    assert_close(got, want, FP32, "dy @ W vs mx.quantized_matmul(transpose=False)")
    dense = torch.from_numpy(np.array(mx.dequantize(w_q, scales, biases, group_size=32, bits=bits)))
    assert_close(got, (torch.from_numpy(np.array(dy)) @ dense).numpy(), FP32, "dy @ W vs torch")


def test_quantized_matmul_trainable_gradient(impl):
    qlora = impl.train.qlora
    w_q, scales, biases = quantized_triple(13, 64, 96)
    dense = impl.quantize.dequantize(w_q, scales, biases, 32, 4)
    x = mx.array(np.random.default_rng(14).normal(0, 1, (2, 5, 96)).astype(np.float32))
    probe = mx.array(np.random.default_rng(15).normal(0, 1, (2, 5, 64)).astype(np.float32))
    y = qlora.quantized_matmul_trainable(x, w_q, scales, biases, 32, 4)
    assert_close(y, x @ dense.T, FP32, "forward")
    got = mx.grad(lambda x: mx.sum(qlora.quantized_matmul_trainable(x, w_q, scales, biases, 32, 4) * probe))(x)
    want = mx.grad(lambda x: mx.sum((x @ dense.T) * probe))(x)
    assert_close(got, want, FP32, "x-gradient through the quantized matmul vs the dense one")


# -- QLoRA's x-gradient kernel: tiny_llm_kernels.quantized_matmul_dx --------------------------------

# dx[m, k] = sum_n dy[m, n] W[n, k] sums N products: the kernel in order n = 0 .. N - 1, the twin's
# sgemm in its own blocks, torch here in float64. Each fp32 order is off the exact sum by about
# sqrt(N) 2^-24 (worst case N 2^-24) of the sum's magnitude sum_n |dy[m, n] W[n, k]|, not of |dx|,
# which may cancel to ~0: so the bound is relative to that magnitude. 1e-5 of it covers N = 1536
# (sqrt(N) 2^-24 = 2.3e-6) 4x over. Measured worst on the cases below: 3.6e-7.
SUM_FP32 = 1e-5
# (N, K): q/o, gate/up, down, k/v; 576 = 4.5 x 128, so groups of 128 run on K = 1536 only.
DX_SHAPES = [(576, 576), (1536, 576), (576, 1536), (192, 576)]


def dx_kernel(impl):
    """tiny_llm_kernels.quantized_matmul_dx; a failure, not a skip, when the kernels are not built."""
    kernels = impl.native.kernels
    assert kernels is not None and hasattr(kernels, "quantized_matmul_dx"), (
        f"tiny_llm_kernels has no quantized_matmul_dx ({getattr(kernels, 'ext_error', 'not built')}): rebuild:"
        " pip install --no-build-isolation ./kernels")
    return kernels.quantized_matmul_dx


def assert_sum_close(got, want, dy, dense, what: str, rel: float = SUM_FP32) -> None:
    """|got - want| <= rel * (|dy| @ |W|) elementwise: rel of the sum's magnitude (see SUM_FP32)."""
    g, w = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert g.shape == w.shape, f"{what}: shape {g.shape} != {w.shape}"
    mag = np.abs(np.asarray(dy, np.float64)) @ np.abs(np.asarray(dense, np.float64))
    ratio = np.abs(g - w) / np.maximum(mag, np.finfo(np.float32).tiny)
    assert ratio.max() <= rel, f"{what}: off by {ratio.max():.3g} of the sum's magnitude (bound {rel})"


def check_dx(impl, dy: mx.array, w_q, scales, biases, group_size: int, bits: int) -> None:
    """kernel == twin == torch (float64, rounded to fp32) == mx.quantized_matmul(transpose=False)."""
    qlora = impl.train.qlora
    got = dx_kernel(impl)(dy, w_q, scales, biases, group_size, bits)
    assert got.dtype == dy.dtype and got.shape == (*dy.shape[:-1], w_q.shape[1] * 32 // bits)
    s32, b32 = scales.astype(mx.float32), biases.astype(mx.float32)  # exact: the kernel reads them so
    dense = np.array(mx.dequantize(w_q, s32, b32, group_size=group_size, bits=bits))
    dy64 = np.array(dy.astype(mx.float32), np.float64)
    torch_dx = (torch.from_numpy(dy64) @ torch.from_numpy(dense.astype(np.float64))).float().numpy()
    got = np.array(got.astype(mx.float32))
    twin = np.array(qlora.quantized_matmul_dx_mlx(dy, w_q, scales, biases, group_size, bits).astype(mx.float32))
    ref = np.array(mx.quantized_matmul(dy.astype(mx.float32), w_q, s32, b32, transpose=False, group_size=group_size,
                                       bits=bits).astype(mx.float32))
    if dy.dtype == mx.float32:
        assert_sum_close(got, twin, dy64, dense, "kernel vs twin")
        assert_sum_close(got, torch_dx, dy64, dense, "kernel vs torch (float64)")
        assert_sum_close(got, ref, dy64, dense, "kernel vs mx.quantized_matmul(transpose=False)")
    else:  # each fp32 sum rounded once to dy's dtype: half an ulp each, on top of the sums' own order
        # difference (SUM_FP32 of the magnitude); in fp16's subnormal range (below 6.1e-5) an ulp is
        # 2^-24 whatever the value, so a relative bound alone fails there (found by Hypothesis:
        # -4.947e-05 vs -4.953e-05, one subnormal ulp apart).
        rounding, subnormal = (2.0 ** -10, 2.0 ** -24) if dy.dtype == mx.float16 else (2.0 ** -7, 0.0)
        mag = np.abs(dy64) @ np.abs(dense.astype(np.float64))
        bound = rounding * np.abs(twin) + SUM_FP32 * mag + subnormal
        worst = float(np.max(np.abs(got.astype(np.float64) - twin) - bound))
        assert worst <= 0, f"kernel vs twin ({dy.dtype}): {worst:.3g} past the bound of one rounding each"


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("M", [1, 7, 64])
@pytest.mark.parametrize("N, K, group_size", [(N, K, g) for N, K in DX_SHAPES for g in (32, 64, 128) if K % g == 0])
def test_quantized_matmul_dx_kernel_model_shapes(impl, bits, M, N, K, group_size):
    w_q, scales, biases = quantized_triple(21, N, K, bits, group_size)
    dy = mx.array(np.random.default_rng(22).normal(0, 1, (M, N)).astype(np.float32))
    check_dx(impl, dy, w_q, scales, biases, group_size, bits)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_quantized_matmul_dx_kernel_small_shapes(impl, data):
    bits, group_size = data.draw(st.sampled_from([4, 8])), data.draw(st.sampled_from([32, 64, 128]))
    N, groups = data.draw(st.integers(1, 40)), data.draw(st.integers(1, 4))
    lead = tuple(data.draw(st.lists(st.integers(1, 4), max_size=2)))  # leading batch dims, flattened by the op
    sdtype = data.draw(st.sampled_from([mx.float32, mx.float16, mx.bfloat16]))
    dtype = data.draw(st.sampled_from([mx.float32, mx.float32, mx.float16, mx.bfloat16]))
    seed = data.draw(st.integers(0, 2**31 - 1))
    w_q, scales, biases = quantized_triple(seed, N, groups * group_size, bits, group_size)
    dy = mx.array(np.random.default_rng(seed + 1).normal(0, 1, (*lead, N)).astype(np.float32)).astype(dtype)
    check_dx(impl, dy, w_q, scales.astype(sdtype), biases.astype(sdtype), group_size, bits)


def bad_dx_inputs():
    w_q, scales, biases = quantized_triple(31, 8, 64, 4, 32)  # N = 8, K = 64
    dy = mx.zeros((3, 8))
    return {
        "bits": ((dy, w_q, scales, biases, 32, 3), "bits must be 4 or 8"),
        "group_size": ((dy, w_q, scales, biases, 16, 4), "group_size must be 32, 64 or 128"),
        "w_q dtype": ((dy, w_q.astype(mx.int32), scales, biases, 32, 4), "w_q must be a 2-D uint32"),
        "dy dtype": ((dy.astype(mx.int32), w_q, scales, biases, 32, 4), "dy must be float32"),
        "dy's N": ((mx.zeros((3, 9)), w_q, scales, biases, 32, 4), "dy has N = 9"),
        "K vs group": ((dy, w_q, scales, biases, 128, 4), "K = 64 must be a positive multiple"),
        "scales shape": ((dy, w_q, scales[:, :1], biases, 32, 4), "scales and biases must be (8, 2)"),
        "scales dtype": ((dy, w_q, scales.astype(mx.int32), biases, 32, 4), "scales and biases must be float"),
    }


@pytest.mark.parametrize("case", list(bad_dx_inputs()))
def test_quantized_matmul_dx_bad_inputs_are_one_line_errors(impl, case):
    args, words = bad_dx_inputs()[case]
    calls = {"kernel": dx_kernel(impl), "twin": impl.train.qlora.quantized_matmul_dx_mlx}
    messages = {}
    for name, fn in calls.items():
        with pytest.raises(ValueError) as e:
            mx.eval(fn(*args))
        messages[name] = str(e.value)
        assert "\n" not in messages[name] and messages[name].startswith("quantized_matmul_dx: "), messages[name]
        assert words in messages[name], f"{name}: {messages[name]!r} lacks {words!r}"
    assert messages["kernel"] == messages["twin"], messages


def test_quantized_matmul_dx_gradients_kernel_path_equal_twin_path(impl, monkeypatch):
    """mx.grad through quantized_matmul_trainable: the kernel's x-gradient (on the CPU) and the twin's."""
    qlora = impl.train.qlora
    dx_kernel(impl)
    w_q, scales, biases = quantized_triple(41, 1536, 576, 4, 32)
    x = mx.array(np.random.default_rng(42).normal(0, 1, (2, 5, 576)).astype(np.float32))
    probe = mx.array(np.random.default_rng(43).normal(0, 1, (2, 5, 1536)).astype(np.float32))

    def grad():
        return mx.grad(lambda x: mx.sum(qlora.quantized_matmul_trainable(x, w_q, scales, biases, 32, 4) * probe))(x)

    with mx.stream(mx.cpu):
        kernel = grad()
        monkeypatch.setattr(qlora, "_dx_kernel", None)
        twin = grad()
    dense = np.array(mx.dequantize(w_q, scales, biases, group_size=32, bits=4))
    assert_sum_close(np.array(kernel).reshape(-1, 576), np.array(twin).reshape(-1, 576), np.array(probe).reshape(-1, 1536),
                     dense, "kernel path vs twin path")


def test_qlora_gradients_match_the_dense_twin(impl, default_model):
    qlora, lora = impl.train.qlora, impl.train.lora
    ids = ids_of(1, 12, seed=9)
    grads = {}
    for quantized in (True, False):
        model = qlora.load_base(default_model, quantized=quantized)
        held = model.layers[0].mlp.w_gate
        assert isinstance(held, impl.quantized_weight.QuantizedWeight) == quantized, f"quantized={quantized}: {type(held)}"
        adapters = lora.add_lora(model, lora.LoRAConfig(R, ALPHA, TARGETS), seed=0)
        randomize_b(adapters)
        loss, g = lora.loss_and_grad(model, adapters, ids)
        adapters.update(g)
        grads[quantized] = (loss.item(), as_numpy(lora.peft_state(adapters)))
    assert abs(grads[True][0] - grads[False][0]) < 1e-4, f"losses {grads[True][0]} vs {grads[False][0]}"
    got, want = grads[True][1], grads[False][1]
    print(f"QLoRA gradients: worst |diff| / max |grad| = {worst_relative(got, want):.2g}")
    for k in want:
        scale = np.abs(want[k]).max()
        assert scale > 0, f"premise: {k}'s gradient is nonzero"
        assert_close(got[k], want[k], Tol(QLORA_GRAD * scale, 0.0, f"{QLORA_GRAD} of the largest: summation order"), k)


def test_qlora_training_leaves_the_quantized_weights(impl, default_model, folder):
    qlora, lora = impl.train.qlora, impl.train.lora
    model = qlora.load_base(default_model, quantized=True)
    assert isinstance(model.layers[0].self_attn.wq, impl.quantized_weight.QuantizedWeight)
    adapters = lora.add_lora(model, lora.LoRAConfig(R, ALPHA, TARGETS), seed=0)
    before = base_arrays(model)
    losses = train_steps(impl, model, adapters, tiny_batch(folder), 3)
    print(f"QLoRA losses: {losses}")
    assert losses[-1] < losses[0] - 0.05, f"the loss should go down: {losses}"
    after = base_arrays(model)
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], f"quantized weight {k} changed")

