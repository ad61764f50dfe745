"""The training command (`nox -s train`, impl/train/cli.py): a short run end to end, and its bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "impl.train", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_a_short_run_writes_its_history_chart_and_checkpoint(tmp_path):
    r = train("--preset", "shakespeare-char-quick", "--steps", "30", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    run = json.loads((tmp_path / "history-modern.json").read_text())
    losses = [h["loss"] for h in run["history"]]
    assert len(losses) == 30 and losses[-1] < losses[0], f"30 steps, the loss {losses[0]:.3f} -> {losses[-1]:.3f}"
    assert run["summary"]["val_loss"] > 0 and run["summary"]["sample"].startswith("\nROMEO\n")
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert (tmp_path / "modern" / "step_000030.safetensors").is_file()
    assert "validation loss" in r.stdout and "sample:" in r.stdout


def test_bf16_runs_in_mixed_precision(tmp_path):
    """--bf16: topic 4.5's mixed precision through run(); the checkpoint's weights stay fp32."""
    r = train("--preset", "shakespeare-char-quick", "--steps", "5", "--bf16", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    run = json.loads((tmp_path / "history-modern.json").read_text())
    assert run["summary"]["compute"] == "bfloat16" and len(run["history"]) == 5
    from safetensors.numpy import load_file

    weights = load_file(tmp_path / "modern" / "step_000005.safetensors")
    assert weights and {str(v.dtype) for v in weights.values()} == {"float32"}


@pytest.mark.parametrize("args, expect", [
    (("--preset", "gpt-5"), "unknown preset 'gpt-5'; known: shakespeare-char"),
    (("--steps", "0"), "--steps must be at least 1"),
    (("--preset", "smollm2-lora-qa", "--bf16"), "--bf16 is for the from-scratch presets"),
])
def test_bad_flags_are_one_line_errors(tmp_path, args, expect):
    r = train(*args, "--out", str(tmp_path))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and expect in lines[-1], r.stderr
    assert not any(tmp_path.iterdir()), "a refused run wrote something"


def test_lora_on_the_real_model_learns_the_pairs_and_chat_uses_the_adapter(tmp_path):
    """M3: SmolLM2 taught the shipped question-answer pairs with LoRA; the answer loss falls at least
    5x, at least 14 of 16 greedy answers are exactly right, the merged model answers the same, and
    the chat command with --adapter gives a learned answer."""
    r = train("--preset", "smollm2-lora-qa", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((tmp_path / "lora-qa.json").read_text())
    first, last = s["losses"][0], s["losses"][-1]
    assert first >= 5 * last, f"the answer loss went from {first:.3f} to {last:.4f}"
    assert s["right"] >= 14, f"{s['right']} of 16 answers right: {s['after']}"
    assert s["merged_same"], "the merged model answers differently from the adapter"
    pair = next(p for p, a in zip(s["pairs"], s["after"], strict=True) if a == p["answer"])
    chat = subprocess.run([sys.executable, "-m", "impl.cli", "--adapter", str(tmp_path / "adapter"), "--max-tokens",
                           "16", pair["question"]], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert chat.returncode == 0 and chat.stdout.strip() == pair["answer"], (chat.stdout, chat.stderr[-1000:])


def test_chat_with_a_missing_adapter_is_one_line(tmp_path):
    chat = subprocess.run([sys.executable, "-m", "impl.cli", "--adapter", str(tmp_path), "hi"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert chat.returncode == 2 and "is not a LoRA adapter folder" in chat.stderr.strip().splitlines()[-1], chat.stderr
