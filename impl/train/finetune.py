"""LoRA fine-tuning of a chat model on question-answer pairs (topic 4.7's milestone, M3).

Each pair becomes the model's own chat prompt for the question followed by the answer and the
end-of-turn token; only the answer's tokens (and that end token) count in the loss, the prompt's
labels are -100. The batch is every pair, padded at the end (padding's labels are -100 too, and
causal attention never lets a real token see it). The base weights stay as they are; AdamW moves
the adapters alone.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx

from impl.train.lora import loss_and_grad
from impl.train.loss import IGNORE_INDEX
from impl.train.optim import AdamW, warmup_cosine

QA_PAIRS = Path(__file__).parent / "data" / "lora_qa.json"


def load_pairs(path: str | Path = QA_PAIRS) -> list[dict]:
    """[{"question": ..., "answer": ...}] from a JSON file (topic 4.7)."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def prompt_ids(loaded, question: str) -> list[int]:
    """The chat prompt of one user question, ready for the assistant's answer (topic 4.7)."""
    return loaded.tokenizer.encode(loaded.chat_template.render([{"role": "user", "content": question}],
                                                               add_generation_prompt=True))


def qa_batch(loaded, pairs: list[dict]) -> tuple[mx.array, mx.array]:
    """(ids (n, L), labels (n, L)): prompt + answer + end of turn, padded at the end; labels -100 on
    the prompt and the padding (topic 4.7)."""
    eos = loaded.tokenizer.eos_token_id
    rows = []
    for p in pairs:
        prompt = prompt_ids(loaded, p["question"])
        answer = loaded.tokenizer.encode(p["answer"]) + [eos]
        rows.append((prompt + answer, [IGNORE_INDEX] * len(prompt) + answer))
    L = max(len(ids) for ids, _ in rows)
    ids = [r + [eos] * (L - len(r)) for r, _ in rows]
    labels = [lab + [IGNORE_INDEX] * (L - len(lab)) for _, lab in rows]
    return mx.array(ids), mx.array(labels)


def answer_loss_and_grad(model, adapters, ids: mx.array, labels: mx.array) -> tuple[mx.array, dict]:
    """The mean loss over the answers' tokens and its gradient for every adapter weight (topic 4.7)."""
    return loss_and_grad(model, adapters, ids, labels)


def finetune(model, adapters, ids: mx.array, labels: mx.array, steps: int, max_lr: float = 2e-3,
             warmup_steps: int = 5, log: Callable[[str], None] | None = None) -> list[float]:
    """`steps` AdamW steps on the adapters over the whole batch; returns the loss before each step
    (topic 4.7)."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    optimizer, losses = AdamW(weight_decay=0.0), []
    for step in range(steps):
        start = time.perf_counter()
        loss, grads = answer_loss_and_grad(model, adapters, ids, labels)
        optimizer.update(adapters, grads, lr=warmup_cosine(step, max_lr, max_lr / 10, warmup_steps, steps))
        mx.eval(adapters.trainable_parameters(), optimizer.m, optimizer.v)
        losses.append(loss.item())
        log(f"step {step + 1}/{steps} answer loss {losses[-1]:.4f} ({time.perf_counter() - start:.1f} s)")
    return losses


def greedy_answer(model, loaded, question: str, max_tokens: int = 24) -> str:
    """The model's greedy answer, up to its end-of-turn token (topic 4.7)."""
    ids = prompt_ids(loaded, question)
    out = []
    for _ in range(max_tokens):  # the whole sequence each step: a few short answers, no cache needed
        token = int(mx.argmax(model(mx.array([ids + out]))[0, -1]).item())
        if token == loaded.tokenizer.eos_token_id:
            break
        out.append(token)
    return loaded.tokenizer.decode(out).strip()


TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def run_lora_qa(out: Path, steps: int = 20, seed: int = 0, log=sys.stderr) -> dict:
    """M3: LoRA (r 8, alpha 16, every projection) on the default model, taught the shipped
    question-answer pairs; the adapter saved in peft's format to out/adapter. Returns the summary:
    losses, answers before and after, how many are exactly right, and whether the merged model
    answers as the adapter does (topic 4.7)."""
    from impl.loader import default_model_path, load_model
    from impl.train.lora import LoRAConfig, add_lora, merge, save_adapters
    from impl.train.qlora import load_base

    path = default_model_path()
    loaded = load_model(path, quantized=False)  # the tokenizer and chat template
    model = load_base(path, quantized=False)  # q/k/v and gate/up apart, dense fp32
    pairs = load_pairs()
    ids, labels = qa_batch(loaded, pairs)
    before = [greedy_answer(model, loaded, p["question"], max_tokens=8) for p in pairs]  # a glimpse
    adapters = add_lora(model, LoRAConfig(r=8, alpha=16.0, target_modules=TARGETS), seed=seed)
    print(f"[LoRA on {path.name}: {sum(v.size for _, v in _leaves(adapters)) / 1e6:.2f}M trainable of"
          f" {len(pairs)} pairs, {int((labels != IGNORE_INDEX).sum().item())} answer tokens]", file=log)
    losses = finetune(model, adapters, ids, labels, steps, log=lambda line: print(line, file=log, flush=True))
    after = [greedy_answer(model, loaded, p["question"]) for p in pairs]
    save_adapters(out / "adapter", adapters)
    merge(model, adapters)
    merged = [greedy_answer(model, loaded, p["question"]) for p in pairs]
    right = sum(a == p["answer"] for a, p in zip(after, pairs, strict=True))
    return {"losses": losses, "pairs": pairs, "before": before, "after": after, "right": right,
            "merged_same": merged == after, "adapter": str(out / "adapter")}


def _leaves(module):
    from mlx.utils import tree_flatten

    return tree_flatten(module.trainable_parameters())
