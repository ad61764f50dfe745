"""LoRA (topic 4.7): low-rank adapters on chosen projections of a loaded model.

A projection y = x W^T (W: (out, in), frozen) gains a trainable detour through rank r:

    y = x W^T + (alpha / r) * (x A^T) B^T,     A: (r, in) random, B: (out, r) zero

so a fresh adapter changes nothing, and training moves only A and B: r * (in + out) numbers
where W holds in * out. Merging folds the detour into W (W + (alpha / r) B A: no cost at
inference); unmerging takes it out again.

The adapters live in their own mlx.nn.Module tree (`layers.0.self_attn.q_proj.lora_A`), beside
the model rather than in it: the model's projection is replaced by a `LoRAWeight`, which
`linear` multiplies like any weight (it has `matmul_t`, as week 2's QuantizedWeight does), so
impl's model is used as it is. Projections are named as in Hugging Face and peft (`q_proj`,
`gate_proj`, ...), and adapters are saved in peft's format (adapter_config.json and
adapter_model.safetensors), so they move between impl and peft both ways.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn
import numpy as np

from impl.basics import linear
from impl.train.loss import IGNORE_INDEX, causal_lm_loss, cross_entropy, value_and_grad_wrt

# peft's name of a projection -> (the block's part, the attribute that holds its weight in impl's model)
TARGETS = {
    "q_proj": ("self_attn", "wq"), "k_proj": ("self_attn", "wk"), "v_proj": ("self_attn", "wv"),
    "o_proj": ("self_attn", "wo"), "gate_proj": ("mlp", "w_gate"), "up_proj": ("mlp", "w_up"),
    "down_proj": ("mlp", "w_down"),
}
PEFT_PREFIX = "base_model.model.model."  # peft's key = PEFT_PREFIX + our name + ".weight"
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


@dataclass(frozen=True)
class LoRAConfig:
    """Rank r, alpha (the detour is scaled by alpha / r) and the projections to adapt (topic 4.7)."""

    r: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")

    @property
    def scale(self) -> float:
        """alpha / r, peft's `scaling` (topic 4.7)."""
        return self.alpha / self.r


class LoRA(mlx.nn.Module):
    """One adapter: lora_A (r, in), lora_B (out, r), and its scale alpha / r (topic 4.7)."""

    def __init__(self, in_features: int, out_features: int, r: int, scale: float, key: mx.array):
        """A uniform in +-1/sqrt(in) (peft's default, Kaiming-uniform with a = sqrt(5)), B zero (topic 4.7)."""
        super().__init__()
        bound = 1 / math.sqrt(in_features)
        self.lora_A = mx.random.uniform(-bound, bound, (r, in_features), key=key)
        self.lora_B = mx.zeros((out_features, r))
        self.scale = scale

    def __call__(self, x: mx.array) -> mx.array:
        """x (..., in) -> scale * (x A^T) B^T (..., out): through rank r, never forming B A (topic 4.7)."""
        return self.scale * linear(linear(x, self.lora_A), self.lora_B)  # (..., r) -> (..., out)

    def delta(self) -> mx.array:
        """scale * B A (out, in): what merging adds to the weight (topic 4.7)."""
        return self.scale * (self.lora_B @ self.lora_A)


class LoRAWeight:
    """What an adapted projection holds in place of its weight: the frozen base (a dense array or a
    QuantizedWeight) and its adapter; `linear` multiplies it through `matmul_t` (topic 4.7)."""

    def __init__(self, base, adapter: LoRA):
        self.base, self.adapter = base, adapter

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of the base weight (topic 4.7)."""
        return tuple(self.base.shape)

    def matmul_t(self, x: mx.array) -> mx.array:
        """x (..., in) -> x W^T + scale * (x A^T) B^T (..., out) (topic 4.7)."""
        return linear(x, self.base) + self.adapter(x)


class Adapters(mlx.nn.Module):
    """Every adapter of a model: `layers[i][part][target]` is a LoRA (names as in Hugging Face),
    so trainable_parameters() is the tree to differentiate and to step (topic 4.7)."""

    def __init__(self, config: LoRAConfig, layers: list[dict]):
        super().__init__()
        self.config, self.layers, self.merged = config, layers, False

    def named(self):
        """(layer index, target, its LoRA) for every adapter, in layer order (topic 4.7)."""
        for i, parts in enumerate(self.layers):
            for target in self.config.target_modules:
                part, _ = TARGETS[target]
                yield i, target, parts[part][target]


def _slot(model, i: int, target: str) -> tuple[object, str]:
    part, attr = TARGETS[target]
    return getattr(model.layers[i], part), attr


def add_lora(model, config: LoRAConfig, seed: int = 0) -> Adapters:
    """Adapt config.target_modules of every layer of `model` (impl's Model, with separate q/k/v and
    gate/up projections) in place; returns the adapters, each A drawn from `seed`, each B zero, so
    the model computes exactly what it did (topic 4.7)."""
    if config.r < 1:
        raise ValueError(f"the LoRA rank r must be at least 1, not {config.r}")
    unknown = sorted(set(config.target_modules) - set(TARGETS))
    if unknown:
        raise ValueError(f"unknown target modules {unknown}; LoRA adapts {sorted(TARGETS)}")
    keys = iter(mx.random.split(mx.random.key(seed), len(model.layers) * len(config.target_modules)))
    layers = []
    for i in range(len(model.layers)):
        parts: dict[str, dict[str, LoRA]] = {}
        for target in config.target_modules:
            owner, attr = _slot(model, i, target)
            base = getattr(owner, attr)
            if base is None:
                raise ValueError(f"layer {i} has no separate {target} (fused projections): load the model unfused")
            out_features, in_features = base.shape
            adapter = LoRA(in_features, out_features, config.r, config.scale, next(keys))
            parts.setdefault(TARGETS[target][0], {})[target] = adapter
            setattr(owner, attr, LoRAWeight(base, adapter))
        layers.append(parts)
    return Adapters(config, layers)


def merge(model, adapters: Adapters) -> None:
    """Fold every adapter into its (dense) base weight: W <- W + scale * B A; the model then computes
    with plain weights, as fast as before (topic 4.7)."""
    assert not adapters.merged, "already merged"
    for i, target, adapter in adapters.named():
        owner, attr = _slot(model, i, target)
        setattr(owner, attr, getattr(owner, attr).base + adapter.delta())
    adapters.merged = True


def unmerge(model, adapters: Adapters) -> None:
    """Undo merge: W <- W - scale * B A, the adapter back beside it (topic 4.7)."""
    assert adapters.merged, "not merged"
    for i, target, adapter in adapters.named():
        owner, attr = _slot(model, i, target)
        setattr(owner, attr, LoRAWeight(getattr(owner, attr) - adapter.delta(), adapter))
    adapters.merged = False


def counted_loss(model, inputs: mx.array, labels: mx.array | None = None) -> mx.array:
    """causal_lm_loss(model(inputs), labels) (labels default: inputs; -100 counts for nothing), with
    the output head run only at the positions whose next label counts. Rows are independent after
    the last block, so the loss and its gradient are the same; what is skipped is the head and the
    softmax over the vocabulary at every prompt and padding position (M3's batch: 666 of 752
    positions, a third of a step; topic 4.7)."""
    labels = inputs if labels is None else labels
    targets = labels[:, 1:].reshape(-1)  # (N * (L - 1)): position t predicts labels[t + 1]
    rows = np.flatnonzero(np.array(targets) != IGNORE_INDEX)
    if rows.size == 0:  # nothing counted: the loss is 0 (cross_entropy's rule), by the plain path
        return causal_lm_loss(model(inputs), labels)
    rows = mx.array(rows, mx.int32)
    h = model.hidden_states(inputs)[:, :-1]  # (N, L - 1, E)
    h = h.reshape(-1, h.shape[-1])[rows]  # (K, E): the counted positions
    return cross_entropy(model.head(h), targets[rows])  # head: (K, V)


def loss_and_grad(model, adapters: Adapters, inputs: mx.array,
                  labels: mx.array | None = None) -> tuple[mx.array, dict]:
    """(causal-LM loss of model(inputs) with labels (default: inputs; -100 ignored), its gradient
    with respect to every A and B, a tree shaped like adapters.trainable_parameters()); the base
    weights are constants of the function, so they get none (topic 4.7)."""
    return value_and_grad_wrt(adapters, lambda: counted_loss(model, inputs, labels))


def peft_state(adapters: Adapters) -> dict[str, mx.array]:
    """The adapters under peft's key names: 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'
    (topic 4.7)."""
    out = {}
    for i, target, adapter in adapters.named():
        name = _peft_name(i, target)
        out[f"{name}.lora_A.weight"], out[f"{name}.lora_B.weight"] = adapter.lora_A, adapter.lora_B
    return out


def _peft_name(i: int, target: str) -> str:
    return f"{PEFT_PREFIX}layers.{i}.{TARGETS[target][0]}.{target}"


def save_adapters(folder: str | Path, adapters: Adapters) -> None:
    """Write adapter_config.json and adapter_model.safetensors as peft writes them, so that peft's
    PeftModel.from_pretrained reads them (topic 4.7)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    c = adapters.config
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": c.r, "lora_alpha": c.alpha,
              "target_modules": list(c.target_modules), "lora_dropout": 0.0, "bias": "none",
              "fan_in_fan_out": False, "use_rslora": False, "init_lora_weights": True,
              "inference_mode": True, "base_model_name_or_path": None}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    mx.save_safetensors(str(folder / WEIGHTS_FILE), peft_state(adapters), metadata={"format": "pt"})


def load_adapters(folder: str | Path, model) -> Adapters:
    """Read what save_adapters (or peft's save_pretrained) wrote and adapt `model` with it; plain
    LoRA only: no rsLoRA, DoRA, biases or per-module ranks (topic 4.7)."""
    folder = Path(folder)
    c = json.loads((folder / CONFIG_FILE).read_text())
    if c.get("peft_type") != "LORA" or c.get("use_rslora") or c.get("use_dora") or c.get("bias", "none") != "none" \
            or c.get("rank_pattern") or c.get("alpha_pattern"):
        raise ValueError(f"{folder / CONFIG_FILE}: only plain LoRA adapters are read")
    targets = c["target_modules"]
    targets = [targets] if isinstance(targets, str) else sorted(targets)  # peft writes its set as a list
    config = LoRAConfig(c["r"], c["lora_alpha"], tuple(targets))
    adapters = add_lora(model, config)
    state = mx.load(str(folder / WEIGHTS_FILE))
    for name, value in peft_state(adapters).items():
        if name not in state or state[name].shape != value.shape:
            raise ValueError(f"{folder / WEIGHTS_FILE}: {name} is missing or not {value.shape}")
    for i, target, adapter in adapters.named():
        name = _peft_name(i, target)
        adapter.lora_A = state[f"{name}.lora_A.weight"].astype(mx.float32)
        adapter.lora_B = state[f"{name}.lora_B.weight"].astype(mx.float32)
    return adapters


def merged_model(gguf: str | Path, adapter_folder: str | Path):
    """The GGUF's model, dense fp32, with the saved adapters (peft's format) merged into its weights:
    what the chat command's --adapter runs (topic 4.7)."""
    from impl.train.qlora import load_base

    folder = Path(adapter_folder)
    missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE) if not (folder / f).is_file()]
    if missing:
        raise ValueError(f"{folder} is not a LoRA adapter folder: it lacks {', '.join(missing)}")
    model = load_base(gguf, quantized=False)
    merge(model, load_adapters(folder, model))
    return model
