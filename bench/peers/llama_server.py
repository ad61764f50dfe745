"""llama.cpp's `llama-server` as a serving peer: built from the llama.cpp that the
llama-cpp-python sdist vendors, run on the GGUF on 127.0.0.1, and sent the workload's
requests concurrently as token-id prompts.

The build (`ensure_binary`) takes about 7 minutes on 2 cores, once: `pip download` of the
sdist at the version the bench environment has, then CMake/Ninja (the bench environment's)
with GGML_NATIVE on, the server only, static, without the web UI (its prebuilt assets would
be downloaded). The binary is kept in `.nox/_llama_server/<version>/llama-server`.

The client streams each request (`/completion`, `stream: true`) from its own thread: TTFT is
the first token's arrival, TPOT the rest's mean gap. KV-cache use is read from `/slots` while
the run goes on, where the server gives it.
"""

from __future__ import annotations

import http.client
import importlib.metadata
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".nox" / "_llama_server"
HOST = "127.0.0.1"  # loopback only


def _tool(name: str) -> str:
    """cmake/ninja from the bench environment (pip's), else the PATH's."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not found (the bench environment installs it: nox -s bench)")
    return found


def ensure_binary(log=print) -> Path:
    """The llama-server binary for the installed llama-cpp-python's llama.cpp, built once."""
    version = importlib.metadata.version("llama_cpp_python")
    binary = CACHE / version / "llama-server"
    if binary.is_file():
        return binary
    log(f"building llama-server from llama-cpp-python {version}'s sdist (once, about 7 minutes on 2 cores)"
        f" -> {binary}")
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=CACHE, prefix=".build-"))
    try:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={version}", "-d", str(work)], check=True)
        sdist = next(work.glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name]
            kwargs = {"filter": "data"} if sys.version_info >= (3, 12) else {}
            tar.extractall(work, members=members, **kwargs)
        source = next(work.glob("llama_cpp_python-*/vendor/llama.cpp"))
        build = work / "build"
        cmake = _tool("cmake")
        subprocess.run([cmake, "-S", str(source), "-B", str(build), "-G", "Ninja",
                        f"-DCMAKE_MAKE_PROGRAM={_tool('ninja')}", "-DCMAKE_BUILD_TYPE=Release",
                        "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_CURL=OFF",
                        "-DLLAMA_OPENSSL=OFF", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                        "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF"],
                       check=True, stdout=subprocess.DEVNULL)
        subprocess.run([cmake, "--build", str(build), "--target", "llama-server", "-j", str(os.cpu_count() or 1)],
                       check=True, stdout=subprocess.DEVNULL)
        binary.parent.mkdir(parents=True, exist_ok=True)
        tmp = binary.with_suffix(".tmp")
        shutil.copy2(build / "bin" / "llama-server", tmp)
        tmp.rename(binary)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return binary


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _get(port: int, path: str, timeout: float = 5.0):
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def _vm_hwm_mb(pid: int) -> float | None:
    """A process's peak resident memory (VmHWM), MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _stream_one(port: int, ids: list[int], n: int, start: float, timeout: float) -> dict:
    """One streamed /completion: the arrival time of each token's chunk."""
    body = json.dumps({"prompt": ids, "n_predict": n, "ignore_eos": True, "temperature": 0, "top_k": 1,
                       "cache_prompt": False, "stream": True, "return_tokens": True})
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    times, tokens = [], []
    try:
        conn.request("POST", "/completion", body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            raise RuntimeError(f"/completion answered {r.status}: {r.read()[:200]!r}")
        for raw in r:
            line = raw.strip()
            if not line.startswith(b"data: "):
                continue
            chunk = json.loads(line[6:])
            got = chunk.get("tokens") or ([] if chunk.get("stop") else [None])
            now = time.perf_counter()
            for t in got:
                times.append(now)
                tokens.append(t)
            if chunk.get("stop"):
                break
    finally:
        conn.close()
    return {"start": start, "times": times, "tokens": tokens}


def context_size(n_parallel: int, ctx_per_slot: int) -> int:
    """-c for `n_parallel` slots of `ctx_per_slot` positions each: -c is shared by the slots (each
    gets n_ctx / np), and is at least 49152."""
    return max(49152, n_parallel * ctx_per_slot)


def start(binary: Path, n_parallel: int, n_ctx: int, threads: int,
          timeout: float = 120.0) -> tuple[subprocess.Popen, int]:
    """llama-server on the GGUF on a free loopback port, `-np n_parallel -c n_ctx -t threads`;
    returns once it answers /health (the process and its port), or raises (the process stopped)."""
    from reference.models import default_model_path

    port = _free_port()
    cmd = [str(binary), "-m", str(default_model_path()), "--host", HOST, "--port", str(port),
           "-np", str(n_parallel), "-c", str(n_ctx), "-t", str(threads), "-tb", str(threads),
           "--no-webui", "--slots", "--log-disable"]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + timeout
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"llama-server exited ({server.returncode}): "
                                   f"{(server.stderr.read().strip().splitlines() or ['no output'])[-1]}")
            try:
                if _get(port, "/health", 2)[0] == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"llama-server did not answer /health in {timeout:.0f} s")
            time.sleep(0.2)
    except BaseException:
        stop_server(server)
        raise
    return server, port


def stop_server(server: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 20 s."""
    server.terminate()
    try:
        server.wait(20)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def run(workload: dict, threads: int, timeout: float = 1800.0) -> dict:
    """Start llama-server, send every request at once (one client thread each), stop it."""
    binary = ensure_binary(log=lambda m: print(f"bench: {m}", file=sys.stderr, flush=True))
    prompts, max_tokens = workload["prompts"], workload["max_tokens"]
    n = len(prompts)
    ctx_per_slot = max(len(p) + m for p, m in zip(prompts, max_tokens, strict=True))
    n_ctx = context_size(n, ctx_per_slot)
    server, port = start(binary, n, n_ctx, threads)
    try:
        for warm in workload["warmup_prompts"]:  # not timed (the first request pays for page faults)
            _stream_one(port, warm, workload["warmup_max_tokens"], time.perf_counter(), 120)

        results: list[dict | Exception] = [None] * n  # type: ignore[list-item]
        used_peak = {"tokens": 0}
        stop = threading.Event()

        def poll_slots():
            while not stop.wait(0.5):
                try:
                    status, data = _get(port, "/slots", 2)
                    if status == 200:
                        slots = json.loads(data)
                        # a busy slot holds its prompt and what it has decoded so far
                        used = sum(int(s.get("n_prompt_tokens") or 0)
                                   + sum(int(t.get("n_decoded") or 0) for t in s.get("next_token") or [])
                                   for s in slots if s.get("is_processing"))
                        used_peak["tokens"] = max(used_peak["tokens"], used)
                except (OSError, ValueError):
                    pass

        def client(i):
            try:
                results[i] = _stream_one(port, prompts[i], max_tokens[i], time.perf_counter(), timeout)
            except Exception as e:  # noqa: BLE001  (reported as the peer's error)
                results[i] = e

        poller = threading.Thread(target=poll_slots, daemon=True)
        workers = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n)]
        t0 = time.perf_counter()
        poller.start()
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout)
        wall = time.perf_counter() - t0
        stop.set()
        errors = [r for r in results if not isinstance(r, dict)]
        if errors:
            raise RuntimeError(f"{len(errors)} of {n} requests failed: {errors[0]}")
        peak = _vm_hwm_mb(server.pid)
    finally:
        stop_server(server)
    per_request = []
    for r, want in zip(results, max_tokens, strict=True):
        times = r["times"]
        if len(times) != want:
            raise RuntimeError(f"a request asked for {want} tokens and got {len(times)}")
        per_request.append({"ttft": times[0] - r["start"],
                            "tpot": (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 0.0,
                            "output_tokens": len(times)})
    return {"wall_s": wall, "requests": per_request, "peak_rss_mb": peak,
            "kv_tokens_used_peak": used_peak["tokens"] or None, "kv_tokens_total": n_ctx,
            "note": f"llama.cpp {importlib.metadata.version('llama_cpp_python')} (llama-cpp-python's),"
                    f" -np {n} -c {n_ctx} -t {threads}, GGUF Q4_1, streamed /completion"}


if __name__ == "__main__":  # build only: python -m bench.peers.llama_server
    print(ensure_binary())
