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


@pytest.mark.parametrize("args, expect", [
    (("--preset", "gpt-5"), "unknown preset 'gpt-5'; known: shakespeare-char"),
    (("--steps", "0"), "--steps must be at least 1"),
])
def test_bad_flags_are_one_line_errors(tmp_path, args, expect):
    r = train(*args, "--out", str(tmp_path))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and expect in lines[-1], r.stderr
    assert not any(tmp_path.iterdir()), "a refused run wrote something"
