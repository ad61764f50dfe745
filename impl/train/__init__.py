"""Training an LLM from scratch (week 4): data, loss, a trainable model, the optimizer, the loop.

One small module per concern: `data` (4.1), `loss` (4.2), `layers` and `model` (4.3),
`optim` (4.4), `loop` (4.5), `bert` (4.6: masked-LM), `lora` and `qlora` (4.7: adapters on the
real model, its weights dense or quantized). The model reuses impl's own layers (linear, RoPE,
grouped attention, RMSNorm); its softmax, SiLU and GELU are `layers`' (C++ kernels with vjps).
It holds its weights in an mlx.nn.Module tree, so that `mx.value_and_grad` differentiates them.
"""
