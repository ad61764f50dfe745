"""The training benchmark (`nox -s bench -- --train`): training steps of impl's week-4 models
against PyTorch on the same model, weights and batches, in one run, reported as ratios.

A step is the forward, the backward, clipping by global norm and an AdamW update, in fp32 on
this machine's threads. The models are M1's (`nox -s train`'s shakespeare-char preset shapes:
width 128, 4 layers, context 64, batch 12, a 65-character vocabulary), the modern block (Llama's:
transformers' LlamaForCausalLM on the PyTorch side) and the classic one (GPT-2's). The limit
beside them: a step's arithmetic, about 6 x parameters x tokens plus attention, at the fp32
matmul rate measured here.

    python -m bench --train [--quick] [--steps N] [--out build/bench]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

SHAPE = dict(vocab_size=65, hidden_size=128, num_layers=4, num_heads=4, block_size=64)
BATCH = 12


def _intermediate(block: str) -> int:
    """GPT-2's 4 x width; about 8/3 x width for SwiGLU, a multiple of 16 (the train command's)."""
    E = SHAPE["hidden_size"]
    return 4 * E if block == "classic" else 8 * E // 3 // 16 * 16


def impl_steps(block: str, steps: int, batches) -> tuple[float, dict]:
    """Seconds per step of impl's model (after two warm-up steps) and its weights before training."""
    import impl  # noqa: F401  (the BLAS fix, before mlx)

    # isort: split
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    from impl.train.loop import accumulate
    from impl.train.model import ClassicLM, ModernLM, TrainConfig
    from impl.train.optim import AdamW, clip_grad_norm

    config = TrainConfig(intermediate_size=_intermediate(block), **SHAPE)
    model = (ClassicLM if block == "classic" else ModernLM)(config, seed=0)
    weights = {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}
    opt = AdamW(lr=1e-3, weight_decay=0.1)

    def step(i):
        x, y = batches[i]
        loss, grads, _ = accumulate(model, [(mx.array(x), mx.array(y))])
        grads, _ = clip_grad_norm(grads, 1.0)
        opt.update(model, grads)
        mx.eval(model.trainable_parameters(), opt.m, opt.v)

    step(0), step(1)
    t = time.perf_counter()
    for i in range(steps):
        step(i % len(batches))
    return (time.perf_counter() - t) / steps, weights


def torch_steps(block: str, steps: int, batches, weights: dict) -> float:
    """Seconds per step of transformers' GPT-2 or Llama holding the same weights, torch's AdamW."""
    import torch
    import torch.nn.functional as F

    from reference.train_models import hf_model

    model = hf_model("gpt2" if block == "classic" else "llama", weights, vocab_size=SHAPE["vocab_size"],
                     hidden_size=SHAPE["hidden_size"], intermediate_size=_intermediate(block),
                     num_layers=SHAPE["num_layers"], num_heads=SHAPE["num_heads"], block_size=SHAPE["block_size"],
                     norm_eps=1e-5).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)

    def step(i):
        x, y = (torch.from_numpy(a).long() for a in batches[i])
        logits = model(x).logits  # (B, L, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    step(0), step(1)
    t = time.perf_counter()
    for i in range(steps):
        step(i % len(batches))
    return (time.perf_counter() - t) / steps


def lora_steps(steps: int) -> tuple[float, float, int, int]:
    """(impl s/step, peft s/step, tokens a step, trainable parameters): M3's LoRA step on SmolLM2
    (r 8 on every projection, the 16 question-answer pairs as one padded batch), impl's on its dense
    fp32 base, peft's on transformers' LlamaForCausalLM from the same GGUF, torch's AdamW."""
    import impl  # noqa: F401

    # isort: split
    import mlx.core as mx
    import numpy as np
    import torch

    from impl.loader import default_model_path, load_model
    from impl.train.finetune import TARGETS, answer_loss_and_grad, load_pairs, qa_batch
    from impl.train.lora import LoRAConfig, add_lora
    from impl.train.optim import AdamW
    from impl.train.qlora import load_base
    from reference.lora_models import peft_model
    from reference.models import hf_folder_from_gguf

    path = default_model_path()
    loaded, model = load_model(path, quantized=False), load_base(path, quantized=False)
    ids, labels = qa_batch(loaded, load_pairs())
    adapters = add_lora(model, LoRAConfig(8, 16.0, TARGETS))
    opt = AdamW(lr=1e-3, weight_decay=0.0)

    def impl_step():
        _, grads = answer_loss_and_grad(model, adapters, ids, labels)
        opt.update(adapters, grads)
        mx.eval(adapters.trainable_parameters(), opt.m, opt.v)

    pm = peft_model(str(hf_folder_from_gguf(path)), 8, 16.0, list(TARGETS)).train()
    params = [p for p in pm.parameters() if p.requires_grad]
    topt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    x, y = (torch.from_numpy(np.array(a)).long() for a in (ids, labels))

    def torch_step():
        loss = pm(x, labels=y).loss
        topt.zero_grad()
        loss.backward()
        topt.step()

    times = []
    for step in (impl_step, torch_step):
        step()
        t = time.perf_counter()
        for _ in range(steps):
            step()
        times.append((time.perf_counter() - t) / steps)
    return times[0], times[1], int(ids.size), sum(p.numel() for p in params)


def main(argv: list[str] | None = None) -> int:
    """Run the training benchmark; write train.json and train.md."""
    p = argparse.ArgumentParser(prog="python -m bench --train", description="Training steps: impl against PyTorch.")
    p.add_argument("--quick", action="store_true", help="10 timed steps instead of 50")
    p.add_argument("--steps", type=int, help="timed steps per peer")
    p.add_argument("--out", default="build/bench", help="folder for train.json and train.md")
    args = p.parse_args(argv)
    steps = args.steps or (10 if args.quick else 50)
    if steps < 1:
        p.error(f"--steps must be at least 1, not {steps}")
    import numpy as np
    import torch

    torch.set_num_threads(torch.get_num_threads())  # every core, as MLX uses
    rng = np.random.default_rng(0)
    L = SHAPE["block_size"]
    batches = [(rng.integers(0, SHAPE["vocab_size"], (BATCH, L)), rng.integers(0, SHAPE["vocab_size"], (BATCH, L)))
               for _ in range(8)]
    rows, report = [], []
    gflops = _matmul_gflops()
    for block in ("modern", "classic"):
        print(f"bench: training, {block} block ...", file=sys.stderr, flush=True)
        impl_s, weights = impl_steps(block, steps, batches)
        torch_s = torch_steps(block, steps, batches, weights)
        params = sum(w.size for w in weights.values())
        flops = 6 * params * BATCH * L + 12 * SHAPE["num_layers"] * BATCH * L * L * SHAPE["hidden_size"]  # + attention
        limit = flops / (gflops * 1e9)
        tokens = BATCH * L
        report.append({"block": block, "parameters": params, "impl_s": impl_s, "torch_s": torch_s,
                       "limit_s": limit, "tokens_per_step": tokens})
        rows.append(f"| {block} | {params / 1e6:.2f}M | {tokens / impl_s:.0f} | {tokens / torch_s:.0f} |"
                    f" {torch_s / impl_s:.2f}x | {tokens / limit:.0f} | {limit / impl_s:.0%} |")
    lora_steps_n = max(2, steps // 10)
    print("bench: training, LoRA on SmolLM2 ...", file=sys.stderr, flush=True)
    impl_s, torch_s, tokens, trainable = lora_steps(lora_steps_n)
    report.append({"block": "lora-smollm2", "parameters": trainable, "impl_s": impl_s, "torch_s": torch_s,
                   "tokens_per_step": tokens})
    rows.append(f"| LoRA on SmolLM2-135M (r 8, every projection; {lora_steps_n} steps) | {trainable / 1e6:.2f}M"
                f" trainable | {tokens / impl_s:.0f} | {tokens / torch_s:.0f} | {torch_s / impl_s:.2f}x | - | - |")
    md = ["# Training benchmark", "",
          f"Batch {BATCH} x {L} tokens, fp32, {torch.get_num_threads()} threads; {steps} timed steps each;"
          f" fp32 matmul here: {gflops:.0f} GFLOPS.", "",
          "| block | parameters | impl tok/s | PyTorch tok/s | impl vs PyTorch | limit tok/s | impl of limit |",
          "| --- | --- | --- | --- | --- | --- | --- |", *rows]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.json").write_text(json.dumps({"steps": steps, "gflops": gflops, "rows": report}, indent=1))
    (out / "train.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


def _matmul_gflops() -> float:
    import impl  # noqa: F401

    # isort: split
    import mlx.core as mx

    a = mx.random.normal((1024, 1024))
    mx.eval(a @ a)
    best = 1e9
    for _ in range(5):
        t = time.perf_counter()
        mx.eval(a @ a)
        best = min(best, time.perf_counter() - t)
    return 2 * 1024**3 / best / 1e9
