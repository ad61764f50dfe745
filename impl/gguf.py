"""Reading a GGUF file into Hugging Face-named weights and a ModelArgs (topic 1.5).

mx.load parses GGUF natively: F32/F16/BF16 tensors come back as arrays and
Q4_0/Q4_1/Q8_0 tensors as MLX affine triples (weight, scales, biases; group
size 32). Files with other types (k-quants, Q5_0) are read by impl.gguf_reader
and decoded by impl.gguf_quants into the same triples where that is exact. Q6_K
has none: for the kernels it is requantized to the nearest 8-bit triple (impl.gguf_quants
bounds the error), for a dense model it is dequantized exactly. With the k-quant kernel
(impl.kquant), Q4_K and Q6_K tensors instead stay in the file's blocks, one KQuantWeight each. This module renames them,
restores Hugging Face's Q/K row order and reads the hyper-parameters from the metadata.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from impl.config import ModelArgs
from impl.errors import TinyLLMError
from impl.gguf_quants import GROUP, REQUANTIZED, dequantize, to_affine, to_affine_8bit
from impl.gguf_reader import GGUFTensor, read_gguf_file
from impl.kquant import BLOCK_BYTES as KQUANT_TYPES
from impl.kquant_weight import KQuantWeight

GGUF_GROUP_SIZE = GROUP
# The tensor types mx.load reads (as arrays or affine triples); files with others go through gguf_quants.
MX_LOAD_TYPES = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0"}

# GGUF architecture -> HF model_type
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text",
                 "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}  # Mixtral's GGUFs say llama, with experts
# Whether an architecture renormalizes its top-k router weights when the file does not say (llama.cpp's).
EXPERT_WEIGHTS_NORM = {"llama": True, "qwen2moe": False, "qwen3moe": True}

_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_q_norm": "self_attn.q_norm",  # Qwen3, Gemma 3
    "attn_k_norm": "self_attn.k_norm",
    # Mixture of experts (topic 3.3): the router, the experts stacked (X, out, in), Qwen2-MoE's shared expert
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
# Gemma 3 has a norm before and after attention and the MLP: llama.cpp's ffn_norm is HF's pre-MLP norm.
_GEMMA_NAMES = _NAMES | {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}


def hf_name(gguf_name: str, model_type: str = "llama") -> str:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight' (also .scales/.biases)."""
    names = _GEMMA_NAMES if model_type == "gemma3_text" else _NAMES
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{names[parts[2]]}.{'.'.join(parts[3:])}"
    return f"{names[parts[0]]}.{'.'.join(parts[1:])}"


def _meta(meta: dict, key: str, default=None):
    v = meta.get(key, default)
    return v.item() if isinstance(v, mx.array) else v


def read_gguf(path: str | Path, requantize: bool = True, kquant: str = "affine") -> tuple[dict, dict]:
    """(tensors, metadata) with one-line errors for missing, truncated or corrupt files and
    unsupported tensor types: mx.load where it reads every tensor type, else numpy's decoding.
    requantize=False gives Q6_K tensors as exact dense fp32 (for a model that dequantizes anyway).
    kquant "int8" or "fp32" (impl.kquant's modes) keeps 2-D Q4_K and Q6_K tensors as the file's blocks,
    a KQuantWeight each; "affine" maps them onto triples as above."""
    path = Path(path)
    tensors, meta = read_gguf_file(path)  # checks the header, the types and that every tensor is there
    if any(t.type not in MX_LOAD_TYPES for t in tensors.values()):
        return _decoded(tensors, requantize, kquant), meta
    try:
        return mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError) as e:
        raise TinyLLMError(f"cannot read {path}: {str(e).removeprefix('[load_gguf] ')}") from None


_MADV_DONTNEED = 4  # Linux


def _drop_pages(a: np.ndarray) -> None:
    """Let the kernel drop the resident pages of `a`, a view of the read-only memory-mapped GGUF
    (madvise MADV_DONTNEED; they are read from the file again if touched). Without it every copied
    tensor's bytes stayed resident twice: the 1.5B's peak memory was 2.7 GB for 1.1 GB of weights."""
    if sys.platform != "linux" or not isinstance(a, np.memmap) or a.nbytes == 0:
        return
    addr = a.ctypes.data
    start = addr - addr % mmap.PAGESIZE  # the pages it touches: any neighbour's bytes sharing one are read again if used
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(addr + a.nbytes - start), _MADV_DONTNEED)


def _decoded(tensors: dict[str, GGUFTensor], requantize: bool, kquant: str = "affine") -> dict:
    """GGUF tensors as mx.load names them: an affine triple 'x.weight', 'x.scales', 'x.biases'
    where exact, the nearest 8-bit triple for Q6_K if `requantize` (its 16-value groups are not the
    kernel's), else one dense float32 'x.weight'; with kquant "int8"/"fp32", a 2-D Q4_K or Q6_K
    tensor is one KQuantWeight 'x.weight' holding the file's bytes."""
    out = {}
    for name, t in tensors.items():
        if kquant != "affine" and t.type in KQUANT_TYPES and len(t.shape) == 2:
            rows = mx.array(np.ascontiguousarray(t.data).reshape(t.shape[0], -1))  # (N, K / 256 * block bytes)
            out[name] = KQuantWeight((rows,), (t.type,), x_int8=kquant == "int8")
            _drop_pages(t.data)  # copied: the mapped file's pages need not stay in memory beside it
            continue
        triple = to_affine_8bit(t.data, t.type) if requantize and t.type in REQUANTIZED else to_affine(t.data, t.type)
        if triple is None:
            out[name] = mx.array(dequantize(t.data, t.type, t.shape))
            continue
        lead = tuple(t.shape[:-1])  # (N,), or (X, N) for stacked experts (topic 3.3): the triple's rows
        w_q, scales, biases = (mx.array(a).reshape(*lead, -1) for a in triple[:3])
        base = name.removesuffix(".weight")
        out[name], out[f"{base}.scales"], out[f"{base}.biases"] = w_q, scales, biases
    return out


def args_from_metadata(meta: dict, tensor_names) -> ModelArgs:
    """ModelArgs from GGUF metadata (llama, qwen2, qwen3 or gemma3)."""
    arch = _meta(meta, "general.architecture")
    if arch not in ARCHITECTURES:
        raise TinyLLMError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}")
    a = lambda key, default=None: _meta(meta, f"{arch}.{key}", default)  # noqa: E731
    required = [f"{arch}.{k}" for k in ("embedding_length", "block_count", "feed_forward_length",
                                         "attention.head_count")] + ["tokenizer.ggml.tokens"]
    if missing := [k for k in required if k not in meta]:
        raise TinyLLMError(f"the GGUF metadata lacks {', '.join(missing)}")
    heads = a("attention.head_count")
    gemma = {}
    if arch == "gemma3":  # llama.cpp's: a window on 5 of 6 layers, local base 10k, scale head_dim ** -0.5
        gemma = dict(sliding_window=a("attention.sliding_window"), sliding_window_pattern=6,
                     rope_local_base_freq=10000.0)
    experts = {}
    if a("expert_count"):  # a mixture of experts (topic 3.3); llama with experts is Mixtral
        experts = dict(num_experts=a("expert_count"), num_experts_per_tok=a("expert_used_count"),
                       moe_intermediate_size=a("expert_feed_forward_length"),
                       shared_expert_intermediate_size=a("expert_shared_feed_forward_length"),
                       norm_topk_prob=bool(a("expert_weights_norm", EXPERT_WEIGHTS_NORM.get(arch, False))))
    model_type = "mixtral" if arch == "llama" and experts else ARCHITECTURES[arch]
    return ModelArgs(
        model_type=model_type,
        hidden_size=a("embedding_length"),
        num_hidden_layers=a("block_count"),
        intermediate_size=a("feed_forward_length"),
        num_attention_heads=heads,
        num_key_value_heads=a("attention.head_count_kv", heads),
        head_dim=a("attention.key_length") or a("rope.dimension_count"),
        vocab_size=a("vocab_size") or len(meta["tokenizer.ggml.tokens"]),
        rms_norm_eps=a("attention.layer_norm_rms_epsilon", 1e-6),
        rope_theta=a("rope.freq_base", 10000.0),
        max_position_embeddings=a("context_length", 4096),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias=arch == "llama" and "blk.0.attn_q.bias" in tensor_names,
        bos_token_id=_meta(meta, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_meta(meta, "tokenizer.ggml.eos_token_id"),
        **gemma,
        **experts,
    )


def unpermute_rows(w: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's Q/K row permutation (interleaved RoPE pairs) back to HF's half-split order.

    Rows of each head are stored as (D/2, 2) pairs; HF wants (2, D/2). Works on packed
    quantized rows, scales and biases alike: only whole rows move.
    """
    rows = w.shape[0]
    rest = w.shape[1:]
    w = w.reshape(n_heads, rows // n_heads // 2, 2, *rest)  # (H, D/2, 2, ...)
    return w.swapaxes(1, 2).reshape(rows, *rest)  # (H, 2, D/2, ...) -> (H*D, ...)


def gguf_weights(tensors: dict, args: ModelArgs) -> dict:
    """GGUF tensors -> HF-named tensors in HF row order; quantized triples stay as
    '<name>.weight', '<name>.scales', '<name>.biases'."""
    out = {}
    for name, t in tensors.items():
        key = hf_name(name, args.model_type)
        # llama.cpp permutes Q/K rows for its interleaved RoPE, for llama (and Mixtral) only (qwen2 uses NEOX).
        if args.model_type in ("llama", "mixtral") and (".q_proj." in key or ".k_proj." in key):
            heads = args.num_attention_heads if ".q_proj." in key else args.num_key_value_heads
            t = t.map_rows(lambda w, h=heads: unpermute_rows(w, h)) if isinstance(t, KQuantWeight) else unpermute_rows(t, heads)
        if args.model_type == "gemma3_text" and key.endswith("norm.weight"):
            t = t - 1  # llama.cpp stores Gemma's norms as 1 + weight; HF's (and GemmaRMSNorm's) is the weight
        if key.endswith("shared_expert_gate.weight") and t.ndim == 1:
            t = t[None]  # llama.cpp keeps Qwen2-MoE's shared-expert gate as a vector (E,); HF's is (1, E)
        out[key] = t
    return out


def quantization_bits(w_q: mx.array, scales: mx.array, group_size: int = GGUF_GROUP_SIZE) -> int:
    """Bits per value of an affine triple: 32 * packed words per row / values per row."""
    return 32 * w_q.shape[-1] // (scales.shape[-1] * group_size)
