"""The course's topics: ids, titles, prerequisites and what each is checked against.

One table, read by the specification (to tag results) and by tools/progress.py
(to render PROGRESS.md). Topic ids are stable: learners' trackers and PROGRESS.md key on them.

A topic's prerequisites are what its specification uses: tests/test_topic_order.py checks
that each topic's spec passes with only the topic and its prerequisites written. Some go
beyond the course outline's table, because the code does:
- 1.3 needs 1.2: its attention layer (q/k/v/o projections) applies RoPE;
- 1.4 needs 1.1: the MLP's projections are 1.1's `linear`;
- 2.4 needs 2.1 and 2.2: the decode step's attention (cached_attention) appends to the KV
  cache and applies 2.2's RoPE kernel, and the engine's checks (all of week 2's kernels in
  the model) are this topic's, the last of the CPU kernels;
- 2.5 needs 2.3 as well: the model on the GPU kernels is checked there, as 2.4 checks the
  CPU engine (test_topic_order checks the CPU topics; the GPU ones follow the same rule);
- 2.6 needs 1.7 and 2.4: a request's SamplingParams are checked and sampled by 1.7's sampler,
  and the serving engine runs the week-2 model (2.4's kernels, 2.2's fused projections);
- 3.1 needs 2.7: the engine prefills in chunks by default, and the paged specs run it so;
- 3.4 needs 1.7, 2.4 and 3.2 (2.4 brings 2.1, the cache it rewinds): rejection sampling draws from 1.7's
  filtered distribution, the real draft/target pair runs quantized on week 2's kernels, and the
  engine speculates on the paged cache, with its prefix cache and kernel (3.2 brings 3.1, 2.7, 2.6);
- 3.3 needs 2.6 besides 1.5: its spec runs a tiny MoE model in the engine (batched == alone), on
  topic 2.6's own contiguous cache and whole prefills;
- 3.9 needs 2.4 besides 2.1: its attention-sink check reads a text one token at a time with the
  default model's 4-bit weights, which run on week 2's kernels (2.2's matmul, 2.4's attention),
  a third of the fp32 model's time a token;
- 4.2 does not need 4.1: its checks feed logits and labels straight in, no tokenizer or windows;
- 4.3 needs week 1's layers (1.1-1.4: linear, RoPE, grouped attention, RMSNorm, the SwiGLU MLP), of
  which its trainable models are built, and 4.2's loss, which it differentiates;
- 4.7 needs 2.2 besides 4.4: QLoRA trains through week 2's quantized matmul (and the real model of
  1.5, which 2.2 requires); 4.4's AdamW steps the adapters.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topic:
    id: str
    title: str
    prerequisites: tuple[str, ...]
    checked_against: str
    spec_file: str | None = None  # None: not specified yet
    needs_gpu: bool = False


TOPICS: tuple[Topic, ...] = (
    Topic("1.1", "attention, multi-head attention", (), "PyTorch SDPA, mx.fast", "day_1_1_attention.py"),
    Topic("1.2", "RoPE (traditional and half-split; offsets)", (), "transformers RoPE, mx.fast.rope", "day_1_2_rope.py"),
    Topic("1.3", "grouped/multi-query attention, causal masks", ("1.1", "1.2"), "PyTorch SDPA (GQA), mx.fast", "day_1_3_gqa.py"),
    Topic("1.4", "RMSNorm, SiLU, SwiGLU MLP", ("1.1",), "PyTorch, mx.fast.rms_norm, transformers' LlamaMLP", "day_1_4_norm_mlp.py"),
    Topic("1.5", "the model: config, embedding, block, weight loading", ("1.1", "1.2", "1.3", "1.4"), "transformers Llama/Qwen2/Qwen3/Gemma 3, the gguf package's dequantization, mlx-lm", "day_1_5_model.py"),
    Topic("1.6", "generating a response: tokenizer, chat template, decode loop", ("1.5",), "HF tokenizers, transformers generate", "day_1_6_generate.py"),
    Topic("1.7", "sampling: greedy, temperature, top-k, top-p, min-p", ("1.6",), "exact masks, chi-squared test", "day_1_7_sampling.py"),
    Topic("2.1", "KV cache", ("1.6",), "invariances: cached == uncached (an fp16 cache within fp16), rewind", "day_2_1_kv_cache.py"),
    Topic("2.2", "quantized matmul, CPU kernel (C++)", ("1.5",), "mx.quantized_matmul, torch, pure-MLX twin", "day_2_2_quantized_matmul.py"),
    Topic("2.3", "quantized matmul, GPU kernels (Metal, CUDA)", ("2.2",), "mx.quantized_matmul, torch, pure-MLX twin", "day_2_3_quantized_matmul_gpu.py", needs_gpu=True),
    Topic("2.4", "flash attention, CPU kernel (C++)", ("1.3", "2.1", "2.2"), "mx.fast SDPA, torch SDPA, pure-MLX twin; transformers on the engine", "day_2_4_flash_attention.py"),
    Topic("2.5", "flash attention, GPU kernels (Metal, CUDA)", ("2.3", "2.4"), "mx.fast SDPA, torch SDPA, pure-MLX twin; transformers on the model", "day_2_5_flash_attention_gpu.py", needs_gpu=True),
    Topic("2.6", "continuous batching", ("1.7", "2.4"), "invariances: batched == alone (bitwise on the kernels), seeded sampling in any batch; transformers greedy on 32 mixed requests", "day_2_6_continuous_batching.py"),
    Topic("2.7", "chunked prefill", ("2.6",), "invariances: chunked == whole prefill for every chunk size; decode never stalled by a long prompt", "day_2_7_chunked_prefill.py"),
    Topic("3.1", "paged KV cache and block manager", ("2.7",), "invariances: paged == contiguous for every block size, preempted == never preempted; block manager by a Hypothesis state machine", "day_3_1_paged_kv_cache.py"),
    Topic("3.2", "paged attention kernel, prefix caching", ("3.1",), "paged kernel == twin == torch SDPA; prefix-cache hit == miss", "day_3_2_paged_attention.py"),
    Topic("3.3", "mixture of experts", ("1.5", "2.6"), "torch softmax/topk, pure-MLX twins, mlx-lm SwitchGLU, mx.gather_qmm; transformers Mixtral/Qwen2-MoE/Qwen3-MoE (HF folders and GGUF); engine batched == alone", "day_3_3_moe.py"),
    Topic("3.4", "speculative decoding (draft model, n-gram)", ("1.7", "2.4", "3.2"), "n-gram drafts by brute force; rejection sampling analytically (== p) and by a chi-squared test; invariances on tiny pairs: speculative greedy == target greedy, rewound caches == fresh prefill; in the engine: n-gram and draft-model speculation == the engine without it; Qwen2.5-Coder 0.5B drafting for the 1.5B (single-stream and in the engine)", "day_3_4_speculative.py"),
    Topic("3.5", "prefill-decode separation", ("3.1",), ""),
    Topic("3.6", "parallelism: tensor parallel over mlx.distributed", ("1.5",), ""),
    Topic("3.7", "tool calling and agents", ("1.7",), ""),
    Topic("3.8", "RAG pipeline", ("1.7",), ""),
    Topic("3.9", "long context: sliding window, attention sinks, RoPE scaling", ("2.1", "2.4"), "transformers Gemma 3 (tiny; 270M past its 512-token window), Mistral and Qwen2 sliding windows, Llama/Qwen2 rotary embeddings with linear, dynamic, YaRN and Llama 3 scaling; invariances: rolling cache == full cache with the window mask, sink cache == fresh forward over what it holds; StreamingLLM's perplexity result on the default model", "day_3_9_long_context.py"),
    Topic("4.1", "training data: byte/char tokenizer, windows, shifted targets", (), "Python's UTF-8 codec, numpy sliding windows (exact)", "day_4_1_data.py"),
    Topic("4.2", "causal cross-entropy, perplexity, accuracy", (), "transformers' causal-LM loss (LlamaForCausalLM), torch cross_entropy and autograd", "day_4_2_loss.py"),
    Topic("4.3", "backpropagation: classic and modern blocks, every gradient vs torch", ("1.1", "1.2", "1.3", "1.4", "4.2"), "torch autograd through transformers' GPT2LMHeadModel and LlamaForCausalLM, same weights", "day_4_3_backprop.py"),
    Topic("4.4", "AdamW, gradient clipping, warmup + cosine schedule", ("4.3",), "torch.optim.AdamW, clip_grad_norm_, LinearLR/CosineAnnealingLR/LambdaLR; ten training steps of transformers' GPT-2 and Llama", "day_4_4_optimizer.py"),
    Topic("4.5", "the training loop: accumulation, checkpoint/resume, validation", ("4.1", "4.4"), "invariances: k micro-batches == one batch (token-weighted), resumed == uninterrupted (bit for bit), validation == evaluate; a tiny model learns a text", "day_4_5_loop.py"),
    Topic("4.6", "BERT-style masked-LM: 15% / 80-10-10 masking, a bidirectional encoder", ("4.3",), "transformers' DataCollatorForLanguageModeling (chi-squared on the outcome counts); BertForMaskedLM on tiny random configs: logits and every gradient by torch autograd; all-MiniLM-L6-v2's sentence embeddings vs sentence-transformers", "day_4_6_bert.py"),
    Topic("4.7", "LoRA and QLoRA on the real model", ("2.2", "4.4"), "peft LoRA on transformers' LlamaForCausalLM (same weights): logits, merge/unmerge, saved adapters both ways, torch autograd gradients; QLoRA vs its dense twin and mx.quantized_matmul(transpose=False)", "day_4_7_lora.py"),
)

BY_ID = {t.id: t for t in TOPICS}


def week_of(topic_id: str) -> int:
    return int(topic_id.split(".")[0])


def topic_of_file(filename: str) -> str | None:
    """'day_1_3_gqa.py' -> '1.3'."""
    for t in TOPICS:
        if t.spec_file and filename.endswith(t.spec_file):
            return t.id
    return None
