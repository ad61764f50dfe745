"""The chat command (`python -m PKG.cli`) run in a subprocess, as a user runs it.

Each topic runs it with only what that topic and its prerequisites provide: week 1's model
and decode loop (WEEK1) for 1.6 and 1.7, the KV cache on week 1's model for 2.1, and the
whole engine (no flags: quantized weights on the kernels, the KV cache) from 2.4 on.
"""

from __future__ import annotations

import subprocess
import sys

WEEK1 = ("--dequantize", "--no-kv-cache")  # fp32 weights, the week-1 model, a decode loop that recomputes


def run_chat(impl, *args: str, input: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m {impl}.cli ARGS`, its output captured."""
    return subprocess.run([sys.executable, "-m", f"{impl.name}.cli", *args], input=input, capture_output=True,
                          text=True, timeout=timeout)


def stats_lines(stderr: str) -> list[str]:
    """The `[prefill ...]` line each reply ends with."""
    return [line for line in stderr.splitlines() if line.startswith("[prefill")]


def assert_one_line_error(r: subprocess.CompletedProcess, message: str) -> None:
    """Exit code 2 and one `error: ...` line naming `message`, after progress lines only."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert lines and message in lines[-1] and lines[-1].startswith("error:"), r.stderr
    assert all(line.startswith("[loaded ") for line in lines[:-1]), r.stderr  # progress, then the one error
