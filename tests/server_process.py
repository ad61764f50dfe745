"""A real server process on loopback for the server's tests: started on a free port, waited for
(GET /health), stopped with SIGTERM, and its exit checked (code 0, no traceback)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 120  # seconds: loading the model is a few seconds on a quiet machine, far more under load


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m impl.server` with the given flags, as a context manager; `.url` while it runs."""

    def __init__(self, *flags: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.flags = ["--port", str(self.port), *flags]
        self.stderr_path = None
        self.proc: subprocess.Popen | None = None

    def start(self) -> ServerProcess:
        import tempfile

        self.log = tempfile.NamedTemporaryFile("w+", prefix="tiny-llm-server-", suffix=".log", delete=False)  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "impl.server", *self.flags], cwd=ROOT,
                                     stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.proc.kill()
        raise RuntimeError(f"the server did not answer /health within {START_TIMEOUT} s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then wait; returns the exit code (killed after `timeout`: -9)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return -9

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        Path(self.log.name).unlink(missing_ok=True)


def checked_server(*flags: str):
    """A pytest fixture's body: a server for the module, then its exit on SIGTERM checked
    (code 0, no traceback)."""
    proc = ServerProcess(*flags).start()
    yield proc
    rc = proc.stop()
    out = proc.output()
    assert rc == 0 and "Traceback" not in out, f"the server exited with {rc}:\n{out[-3000:]}"
