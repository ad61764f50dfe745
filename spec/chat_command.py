"""The chat command (`python -m PKG.cli`) run in a subprocess, as a user runs it.

Each topic runs it with only what that topic and its prerequisites provide: week 1's model
and decode loop (WEEK1) for 1.6 and 1.7, the single-stream KV cache on week 1's model for 2.1,
week 2's single-stream engine (quantized weights on the kernels, the KV cache) for 2.4, and the
batched engine (no flags) from 2.6 on.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time

WEEK1 = ("--dequantize", "--no-kv-cache")  # fp32 weights, the week-1 model, a decode loop that recomputes
# What a stats line says was generated: the prefill makes the first token, decode steps the rest.
GENERATED = re.compile(r"(\d+) tokens? generated \(1 by the prefill, (?:none decoded|(\d+) decoded at [\d.]+ tok/s)\)")


def run_chat(impl, *args: str, input: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m {impl}.cli ARGS`, its output captured."""
    return subprocess.run([sys.executable, "-m", f"{impl.name}.cli", *args], input=input, capture_output=True,
                          text=True, timeout=timeout)


def interrupt_chat(impl, *args: str, prompt: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """The interactive chat asked `prompt`, sent SIGINT (Ctrl-C) once its reply has begun, then EOF (Ctrl-D)."""
    # SIGINT restored to its default: a runner that ignores it would pass that on, and then Python
    # would not turn it into KeyboardInterrupt.
    p = subprocess.Popen([sys.executable, "-m", f"{impl.name}.cli", *args], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    p.stdin.write(prompt.encode() + b"\n")
    p.stdin.flush()
    seen, deadline = b"", time.monotonic() + timeout
    while len(seen) <= len(">>> ") and time.monotonic() < deadline:  # the prompt, then the reply's first text
        if select.select([p.stdout], [], [], 1)[0]:
            chunk = os.read(p.stdout.fileno(), 4096)
            if not chunk:
                break
            seen += chunk
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=timeout)  # closes stdin: EOF at the next prompt
    return subprocess.CompletedProcess(p.args, p.returncode, (seen + out).decode(), err.decode())


def stats_lines(stderr: str) -> list[str]:
    """The `[prefill ...]` line each reply ends with."""
    return [line for line in stderr.splitlines() if line.startswith("[prefill")]


def assert_one_line_error(r: subprocess.CompletedProcess, message: str) -> None:
    """Exit code 2 and one `error: ...` line naming `message`, after progress lines only."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert lines and message in lines[-1] and lines[-1].startswith("error:"), r.stderr
    assert all(line.startswith("[loaded ") for line in lines[:-1]), r.stderr  # progress, then the one error
