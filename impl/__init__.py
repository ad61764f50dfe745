"""tiny-llm spec: the implementation, small MLX modules built from array ops.

Week 1: basics, attention, rope, norm, mlp, config, model, quantize, gguf,
loader, tokenizer, chat_template, sampler, generate, cli.
"""

from impl import native  # noqa: F401  (loads the BLAS fix and kernels before mlx)
