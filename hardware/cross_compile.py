"""Compile the C++ kernels for the platforms this machine is not: Apple silicon, ARM Linux, clang.

The kernels in kernels/src are written and tested on x86-64 Linux with GCC, but the project
promises macOS (Apple silicon, where the CPU ops run beside Metal) and any Linux
(docs/troubleshooting.md's mlx flavour). A stray x86 intrinsic outside the AVX files, or a
construct only GCC accepts, would show up there as a failed `pip install ./kernels`, and
nowhere here. This tool compiles every translation unit that kernels/CMakeLists.txt would
build for each target, without linking or running anything:

- `macos-arm64`: Apple silicon, against the macOS headers of the installed mlx version (from
  its mlx-metal wheel, with the flags its MLXConfig.cmake adds: -D_METAL_, metal_cpp, ...);
- `linux-arm64`: aarch64 Linux, against the installed mlx's headers, with the BLAS shim;
- `linux-x86_64-clang`: this platform with clang instead of GCC, the AVX2/AVX-512 files too.

The cross compiler is zig's bundled clang (the `ziglang` wheel), which carries the C and C++
standard headers of every target. Each file gets CMake's flags (C++20, -O3, -Wall), the
per-file COMPILE_OPTIONS read from CMakeLists.txt, and -Werror: a warning fails too. MLX,
nanobind and Python headers are -isystem, so only this project's code is held to that.

The first run downloads ziglang (about 100 MB, 410 MB unpacked) and the mlx-metal wheel (45
MB, only its include/ is kept) into the cache (default ~/.cache/tiny-llm/cross).

    python -m hardware.cross_compile [--target NAME ...] [--cache DIR] [--jobs N] [--self-test]

(from the repository root, in an environment with mlx and nanobind, e.g. .nox/_spec).
Prints `ok <target> <file> (<t>s)` or `FAIL <target> <file>` and the compiler's log per file;
exits 1 if any fails.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ZIG_VERSION = "0.17.1"
REPO = Path(__file__).resolve().parent.parent
KERNELS = REPO / "kernels"


@dataclass(frozen=True)
class Target:
    """One platform: zig's target triple, and what CMake would build there."""

    triple: str
    x86: bool  # CMake adds the *_avx2/*_avx512 files on x86-64 only
    macos: bool  # the macOS mlx headers and MLXConfig.cmake's flags; else Linux, with the BLAS shim


TARGETS = {
    "macos-arm64": Target("aarch64-macos", x86=False, macos=True),
    "linux-arm64": Target("aarch64-linux-gnu", x86=False, macos=False),
    "linux-x86_64-clang": Target("x86_64-linux-gnu", x86=True, macos=False),
}


def say(msg: str) -> None:
    """Print a progress message to stderr."""
    print(f"cross_compile: {msg}", file=sys.stderr, flush=True)


# --- the toolchain and the headers ---------------------------------------------------------


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    if subprocess.run(cmd, stdout=sys.stderr).returncode != 0:
        raise SystemExit(f"cross_compile: `{' '.join(cmd)}` failed (see above)")


def ensure_zig(cache: Path) -> Path:
    """The zig executable, installed from the ziglang wheel into `cache` once."""
    site = cache / f"ziglang-{ZIG_VERSION}"
    zig = site / "ziglang" / "zig"
    if not zig.exists():
        say(f"installing ziglang {ZIG_VERSION} into {site} (about 100 MB to download, once)")
        cache.mkdir(parents=True, exist_ok=True)
        # Renamed into place only when complete, so an interrupted install leaves nothing half-written.
        with tempfile.TemporaryDirectory(dir=cache, ignore_cleanup_errors=True) as tmp:
            staged = Path(tmp) / "site"
            _pip("install", "-q", "--no-deps", "--target", str(staged), f"ziglang=={ZIG_VERSION}")
            staged.rename(site)
    return zig


def installed_mlx_include() -> Path:
    """The include/ of the mlx installed here (found without importing it)."""
    spec = importlib.util.find_spec("mlx")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("cross_compile: mlx is not installed in this Python (the kernels compile against it)")
    return Path(next(iter(spec.submodule_search_locations))) / "include"


def ensure_macos_mlx_include(cache: Path) -> Path:
    """include/ of the macOS (Apple silicon) mlx-metal wheel of the installed mlx version, once."""
    version = importlib.metadata.version("mlx")
    root = cache / f"mlx-metal-{version}-macos-arm64"
    if not (root / "mlx" / "include").exists():
        say(f"downloading mlx-metal {version} for macOS arm64 (about 45 MB; only its include/ is kept)")
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            _pip("download", "-q", "--no-deps", "--only-binary=:all:", "--platform", "macosx_14_0_arm64",
                 "--dest", tmp, f"mlx-metal=={version}")
            wheel = next(Path(tmp).glob("mlx_metal-*.whl"))
            staged = Path(tmp) / "staged"
            with zipfile.ZipFile(wheel) as z:
                z.extractall(staged, [n for n in z.namelist() if n.startswith("mlx/include/")])
            staged.rename(root)
    return root / "mlx" / "include"


# --- what CMake builds, and with which flags -----------------------------------------------


def per_file_options(cmake: str) -> dict[str, list[str]]:
    """src/<file> -> the COMPILE_OPTIONS that CMakeLists.txt's set_source_files_properties give it."""
    options: dict[str, list[str]] = {}
    for args in re.findall(r"set_source_files_properties\(([^)]*)\)", cmake):
        files, _, props = args.partition("PROPERTIES")
        found = re.search(r'COMPILE_OPTIONS\s+"([^"]*)"', props)
        if found:
            for f in files.split():
                options.setdefault(f, []).extend(found.group(1).split(";"))
    return options


def sources(target: Target) -> list[Path]:
    """The files CMakeLists.txt compiles for `target`: every src/*.cpp, the AVX ones on x86-64
    only, src/blas_shim.cpp on Linux only."""
    files = [p for p in sorted((KERNELS / "src").glob("*.cpp")) if target.x86 or "_avx" not in p.name]
    return [p for p in files if p.name != "blas_shim.cpp"] if target.macos else files


def include_flags(target: Target, cache: Path) -> list[str]:
    """-isystem for MLX (for macOS: with MLXConfig.cmake's definitions), nanobind and Python."""
    import nanobind

    flags = []
    if target.macos:
        inc = ensure_macos_mlx_include(cache)
        # What the macOS MLXConfig.cmake puts in the mlx target's INTERFACE options and includes.
        flags += ["-D_METAL_", "-DACCELERATE_NEW_LAPACK"]
        dirs = [inc / "metal_cpp", inc, inc / "mlx" / "backend" / "metal" / "kernels" / "metal_3_1"]
    else:
        dirs = [installed_mlx_include()]
    dirs += [Path(nanobind.include_dir()), Path(sysconfig.get_paths()["include"])]
    for d in dirs:
        flags += ["-isystem", str(d)]
    return flags


def compile_command(zig: Path, target: Target, source: Path, includes: list[str], options: list[str],
                    out: Path) -> list[str]:
    """zig's clang on one file: CMake's language flags (C++20, -O3 -Wall), its per-file options, -Werror."""
    if source.name == "blas_shim.cpp":
        lang = ["c++", "-std=c++20", "-O2", "-Wall"]  # blas_shim's own target_compile_options
    else:
        lang = ["c++", "-std=c++20", "-O3", "-Wall"]
    # -Wno-unknown-warning-option: CMakeLists.txt names some GCC-only warnings (clang ignores them).
    return [str(zig), *lang, "-target", target.triple, "-fPIC", "-Werror", "-Wno-unknown-warning-option",
            *options, *includes, "-c", str(source), "-o", str(out)]


def compile_one(zig: Path, name: str, target: Target, source: Path, includes: list[str],
                options: list[str], out_dir: Path, cache: Path, log: bool = True) -> bool:
    """Compile `source` for `target`; print ok or FAIL (with the log if `log`); True if it compiled."""
    out = out_dir / f"{name}-{source.stem}.o"
    env = {**os.environ, "ZIG_GLOBAL_CACHE_DIR": str(cache / "zig-cache"),
           "ZIG_LOCAL_CACHE_DIR": str(cache / "zig-cache")}
    start = time.perf_counter()
    proc = subprocess.run(compile_command(zig, target, source, includes, options, out), env=env,
                          capture_output=True, text=True)
    label = f"{name} {source.relative_to(REPO) if source.is_relative_to(REPO) else source.name}"
    if proc.returncode == 0:
        say(f"ok {label} ({time.perf_counter() - start:.1f}s)")
        return True
    say(f"FAIL {label}" + (f"\n{proc.stderr.strip() or proc.stdout.strip()}" if log else ""))
    return False


def check(names: list[str], cache: Path, jobs: int, files: dict[str, list[Path]] | None = None,
          log: bool = True) -> dict:
    """Compile each target's files (default: what CMake builds there); {(target, file): compiled}."""
    zig = ensure_zig(cache)
    options = per_file_options((KERNELS / "CMakeLists.txt").read_text())
    work = []
    for name in names:
        target = TARGETS[name]
        includes = include_flags(target, cache)
        for source in (files or {}).get(name) or sources(target):
            work.append((name, target, source, includes, options.get(f"src/{source.name}", [])))
    with tempfile.TemporaryDirectory() as out_dir, ThreadPoolExecutor(max(1, jobs)) as pool:
        results = list(pool.map(lambda w: compile_one(zig, *w, Path(out_dir), cache, log), work))
    return {(w[0], w[2].name): ok for w, ok in zip(work, results, strict=True)}


# --- the self-test: the check must tell a portable file from an x86-only one ---------------

GOOD = "int tl_answer() { return 42; }\n"
X86_ONLY = "#include <immintrin.h>\nvoid tl_spin() { _mm_pause(); }\n"


def self_test(cache: Path, jobs: int) -> bool:
    """A portable file compiles for every target; an x86 intrinsic fails on the ARM ones."""
    with tempfile.TemporaryDirectory() as tmp:
        good, bad = Path(tmp) / "good.cpp", Path(tmp) / "x86_only.cpp"
        good.write_text(GOOD)
        bad.write_text(X86_ONLY)
        # log=False: the x86-only file's expected errors on ARM are not worth printing
        results = check(list(TARGETS), cache, jobs, {name: [good, bad] for name in TARGETS}, log=False)
    expected = {(name, f): f == "good.cpp" or TARGETS[name].x86 for name in TARGETS
                for f in ("good.cpp", "x86_only.cpp")}
    return results == expected


def main(argv: list[str] | None = None) -> int:
    """Compile the kernels for the chosen targets; 0 if every file compiles, 1 if any fails."""
    parser = argparse.ArgumentParser(prog="python -m hardware.cross_compile", description=__doc__.split("\n")[0])
    parser.add_argument("--target", action="append", choices=list(TARGETS),
                        help="a target to compile for (repeatable; default: all)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "tiny-llm" / "cross",
                        help="where zig and the macOS mlx headers are kept (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compilations")
    parser.add_argument("--self-test", action="store_true",
                        help="check that a portable file passes and an x86-only one fails on ARM")
    args = parser.parse_args(argv)
    cache = args.cache.expanduser().resolve()
    start = time.perf_counter()
    if args.self_test:
        passed = self_test(cache, args.jobs)
        say("self-test " + ("passed: the portable file compiled everywhere, the x86-only one failed on ARM"
                            if passed else "FAILED"))
        return 0 if passed else 1
    results = check(args.target or list(TARGETS), cache, args.jobs)
    failed = [f"{name} {f}" for (name, f), ok in results.items() if not ok]
    say(f"{len(results) - len(failed)} compiled, {len(failed)} failed, in {time.perf_counter() - start:.1f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
