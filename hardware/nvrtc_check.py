"""Compile this project's CUDA kernels the way MLX would, without a GPU.

`mx.fast.cuda_kernel` kernels are only compiled when they first run, on a CUDA machine: MLX
wraps the kernel body into a full source file and hands it to NVRTC. A typo therefore shows
up only on a GPU. NVRTC itself needs no GPU and no driver, so this tool does the same
compilation here:

1. it fetches, once, into a cache folder (default ~/.cache/tiny-llm/nvrtc): the mlx-cuda-13
   wheel (for libmlx.so and MLX's include/ with CCCL and CUTLASS), nvidia-cuda-nvrtc and
   nvidia-cuda-runtime (cuda_fp16.h, cuda_bf16.h, cooperative_groups.h, ...), the packages
   that `pip install mlx[cuda13]` puts beside MLX;
2. it extracts MLX's JIT device headers (mlx/backend/cuda/device/utils.cuh and the rest),
   which are not files in the wheel but NUL-terminated strings in libmlx.so, found through
   the two parallel arrays MLX hands to nvrtcCreateProgram (g_include_names, g_headers);
3. for each kernel instance it rebuilds the source as MLX 0.32.4's `build_kernel`
   (mlx/backend/cuda/custom_kernel.cpp) does, and compiles it as `compile`
   (mlx/backend/cuda/jit_module.cpp) does: same in-memory headers, same name expression,
   same options (--device-as-default-execution-space, --gpu-architecture=sm_XY[a],
   --include-path= <mlx>/include, <mlx>/include/cccl, <site-packages>/nvidia/cu13/include).
   The version on GitHub differs from the 0.32.4 wheel here; what this tool does was read
   out of the wheel's libmlx.so (its strings and the code of those two functions).

The instances come from `tiny_llm_kernels.gpu.example_instances("cuda")`.

    .nox/_spec/bin/python -m hardware.nvrtc_check [--arch 90,80] [--cache DIR] [--only NAME] [--self-test]

(from the repository root, with any Python that has mlx: gpu.py imports it).

Prints `ok <kernel> <arch> (<n> bytes of cubin, <t>s)` or `FAIL <kernel> <arch>` and the
NVRTC log for each instance and architecture; exits 1 if any fails. Linux x86-64 only.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import os
import struct
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MLX_VERSION = "0.32.4"
WHEELS = (f"mlx-cuda-13=={MLX_VERSION}", "nvidia-cuda-nvrtc==13.*", "nvidia-cuda-runtime==13.*")
# What custom_kernel.cpp puts before the user's header (0.32.4 has no `#define inf` any more).
DEFAULT_HEADER = '\n#include "mlx/backend/cuda/device/utils.cuh"\n\n#include <cooperative_groups.h>\n\n'
# mlx dtype name -> (CUDA type in the kernel signature, name in the template hash).
DTYPES = {
    "bool": ("bool", "bool"),
    "int8": ("int8_t", "int8_t"),
    "int16": ("int16_t", "int16_t"),
    "int32": ("int32_t", "int32_t"),
    "int64": ("int64_t", "int64_t"),
    "uint8": ("uint8_t", "uint8_t"),
    "uint16": ("uint16_t", "uint16_t"),
    "uint32": ("uint32_t", "uint32_t"),
    "uint64": ("uint64_t", "uint64_t"),
    "float16": ("__half", "float16_t"),
    "bfloat16": ("__nv_bfloat16", "bfloat16_t"),
    "float32": ("float", "float"),
    "float64": ("double", "double"),
}
REPO = Path(__file__).resolve().parent.parent


def cuda_type(dtype) -> str:
    """The CUDA type MLX's dtype_to_cuda_type gives a dtype ("float16" or mx.float16)."""
    return DTYPES[dtype_name(dtype)][0]


def dtype_name(dtype) -> str:
    """The dtype's short name, for "float16" as for mx.float16 (str: "mlx.core.float16")."""
    name = str(dtype).rsplit(".", 1)[-1]
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}")
    return name


def say(msg: str) -> None:
    """Print a progress message to stderr."""
    print(f"nvrtc_check: {msg}", file=sys.stderr, flush=True)


# --- 1. the toolchain ---------------------------------------------------------------------


def ensure_toolchain(cache: Path) -> Path:
    """Download and unpack the wheels and MLX's JIT headers into `cache` once; return site/."""
    site = cache / "site"
    ready = cache / "READY"
    if ready.exists():
        return site
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    say(f"downloading {', '.join(WHEELS)} into {wheels} (about 150 MB, once)")
    platforms = [f"--platform=manylinux_2_{v}_x86_64" for v in (35, 17, 12)]  # the wheels' tags
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", *platforms]
    if subprocess.run([*pip, "--dest", str(wheels), *WHEELS], stdout=sys.stderr).returncode != 0:
        raise SystemExit(f"nvrtc_check: pip download failed (see above); nothing was unpacked in {cache}")
    for wheel in sorted(wheels.glob("*.whl")):
        say(f"unpacking {wheel.name}")
        with zipfile.ZipFile(wheel) as z:
            if wheel.name.startswith("mlx_cuda"):
                z.extractall(site, [n for n in z.namelist() if n.startswith("mlx/include/")])
                write_jit_headers(z.read("mlx/lib/libmlx.so"), cache / "mlx-jit-headers")
            else:
                z.extractall(site, [n for n in z.namelist() if n.startswith("nvidia/")])
    ready.write_text("\n".join(p.name for p in sorted(wheels.glob("*.whl"))) + "\n")
    for wheel in wheels.glob("*.whl"):  # everything needed is unpacked: keep the cache small
        wheel.unlink()
    return site


# --- 2. MLX's JIT headers, out of libmlx.so -------------------------------------------------


def write_jit_headers(lib: bytes, out: Path) -> None:
    """Write the headers libmlx.so hands NVRTC (g_include_names[i] -> g_headers[i]) under `out`."""
    names, headers = elf_string_arrays(lib, b"g_include_namesE", b"g_headersE")
    names = [name.decode() for name in names]
    if DEFAULT_HEADER.encode() + b"\0" not in lib:  # a guard against another MLX version
        raise SystemExit(f"nvrtc_check: libmlx.so lacks MLX {MLX_VERSION}'s default kernel header")
    for name, text in zip(names, headers, strict=True):
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text)
    (out / "ORDER").write_text("\n".join(names) + "\n")
    say(f"extracted {len(names)} MLX JIT headers into {out}")


def elf_string_arrays(lib: bytes, *symbols: bytes) -> list[list[bytes]]:
    """The C strings each `const char* X[]` in mlx::core::cu (by mangled-name suffix) points to."""
    if lib[:6] != b"\x7fELF\x02\x01":
        raise SystemExit("nvrtc_check: libmlx.so is not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", lib, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", lib, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", lib, shoff + i * shentsize) for i in range(shnum)]

    def offset(vaddr: int) -> int:  # virtual address -> file offset
        for _, kind, _, addr, off, size, *_ in sections:
            if kind != 8 and addr <= vaddr < addr + size:  # 8: SHT_NOBITS (.bss)
                return off + vaddr - addr
        raise ValueError(f"address {vaddr:#x} is in no section of libmlx.so")

    def cstring(off: int) -> bytes:
        return lib[off:lib.index(b"\0", off)]

    found = {}
    for _, kind, _, _, off, size, link, _, _, entsize in sections:
        if kind == 2:  # SHT_SYMTAB
            strtab = sections[link][4]
            for pos in range(off, off + size, entsize):
                name_off, _, _, _, value, sym_size = struct.unpack_from("<IBBHQQ", lib, pos)
                name = cstring(strtab + name_off)
                for suffix in symbols:
                    if name.startswith(b"_ZN3mlx4core2cu") and name.endswith(suffix):
                        found[suffix] = (value, sym_size)
    missing = [s for s in symbols if s not in found]
    if missing:
        raise SystemExit(f"nvrtc_check: libmlx.so has no symbol {missing} (not MLX {MLX_VERSION}?)")
    relocated = {}  # pointer slot -> target, from R_X86_64_RELATIVE relocations (type 8)
    for _, kind, _, _, off, size, *_ in sections:
        if kind == 4:  # SHT_RELA
            for pos in range(off, off + size, 24):
                slot, info, addend = struct.unpack_from("<QQq", lib, pos)
                if info & 0xFFFFFFFF == 8:
                    relocated[slot] = addend
    arrays = []
    for suffix in symbols:
        start, size = found[suffix]
        slots = range(start, start + size, 8)
        pointers = [relocated.get(s) or struct.unpack_from("<Q", lib, offset(s))[0] for s in slots]
        arrays.append([cstring(offset(p)) for p in pointers])
    return arrays


# --- 3. the kernel source, as MLX's build_kernel writes it ---------------------------------


def template_hash(template) -> str:
    """The suffix MLX appends to `custom_kernel_<name>` for these template arguments."""
    parts = []
    for _, value in template:
        if isinstance(value, bool):  # before int: a bool is an int in Python
            parts.append("_t" if value else "_f")
        elif isinstance(value, int):
            parts.append(f"_{value}")
        else:
            parts.append("_" + DTYPES[dtype_name(value)][1])
    return "".join(parts)


def kernel_name(inst) -> str:
    """The __global__ function's name: custom_kernel_<name><template hash>."""
    return f"custom_kernel_{inst.name}{template_hash(inst.template)}"


def kernel_source(inst) -> str:
    """The full translation unit MLX compiles for this instance."""
    if not inst.output_names:
        raise ValueError(f"{inst.name}: a kernel needs at least one output")
    params = []
    for name, dtype, ndim in zip(inst.input_names, inst.input_dtypes, inst.input_ndims, strict=True):
        params.append(f"    const {cuda_type(dtype)}* {name}")
        if ndim > 0:  # shape, strides and ndim only when the body mentions them
            for suffix, ctype in (("shape", "Shape"), ("strides", "Strides"), ("ndim", "int")):
                if f"{name}_{suffix}" in inst.source:
                    params.append(f"    const __grid_constant__ {ctype} {name}_{suffix}")
    for name, dtype in zip(inst.output_names, inst.output_dtypes, strict=True):
        params.append(f"    {cuda_type(dtype)}* {name}")
    constants = []
    for name, value in inst.template:
        if isinstance(value, bool):
            constants.append(f"  constexpr bool {name} = {'true' if value else 'false'};\n")
        elif isinstance(value, int):
            constants.append(f"  constexpr int {name} = {value};\n")
        else:
            constants.append(f"  using {name} = {cuda_type(value)};\n")
    return (DEFAULT_HEADER + inst.header
            + "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
            + f"__global__ void {kernel_name(inst)}(\n" + ",\n".join(params) + ") {\n"
            + "".join(constants) + ("\n" if constants else "")
            + inst.source + "\n}\n\n} // namespace mlx::core::cu\n")


def std_hash(text: str) -> int:
    """libstdc++'s std::hash<std::string> (64-bit _Hash_bytes, seed 0xc70f6907)."""
    data, mask, mul = text.encode(), (1 << 64) - 1, 0xC6A4A7935BD1E995
    h = 0xC70F6907 ^ (len(data) * mul & mask)
    body = len(data) & ~7
    for i in range(0, body, 8):  # 8-byte little-endian words, each mixed before it goes in
        k = int.from_bytes(data[i:i + 8], "little") * mul & mask
        h = (h ^ ((k ^ (k >> 47)) * mul & mask)) * mul & mask
    if len(data) > body:  # the last 1-7 bytes go in as they are
        h = (h ^ int.from_bytes(data[body:], "little")) * mul & mask
    h = (h ^ (h >> 47)) * mul & mask
    return h ^ (h >> 47)


# --- 4. NVRTC through ctypes -------------------------------------------------------------


def target(arch: str) -> str:
    """MLX's NVRTC target for compute capability `arch`: SASS, arch-specific from major 9 on."""
    return f"sm_{arch}a" if int(arch[:-1]) >= 9 else f"sm_{arch}"  # "90" -> sm_90a, "80" -> sm_80


class Nvrtc:
    """The few NVRTC calls MLX's jit_module.cpp makes, on the downloaded libnvrtc.so."""

    def __init__(self, site: Path, cache: Path):
        """Load libnvrtc (and its builtins) from `site`; read MLX's headers from `cache`."""
        lib_dir = site / "nvidia" / "cu13" / "lib"
        for builtins in sorted(lib_dir.glob("libnvrtc-builtins.so.*")):
            ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
        self.lib = ctypes.CDLL(str(lib_dir / "libnvrtc.so.13"))
        self.lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        headers = cache / "mlx-jit-headers"
        names = (headers / "ORDER").read_text().split()
        self.include_names = (ctypes.c_char_p * len(names))(*[n.encode() for n in names])
        self.headers = (ctypes.c_char_p * len(names))(*[(headers / n).read_bytes() for n in names])
        mlx_include = site / "mlx" / "include"  # MLX's own, CUTLASS/CuTe and its bundled CCCL
        self.include_paths = [mlx_include, mlx_include / "cccl", site / "nvidia" / "cu13" / "include"]
        major, minor = ctypes.c_int(), ctypes.c_int()
        self.check(self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)))
        self.version = f"{major.value}.{minor.value}"

    def check(self, status: int) -> None:
        """Raise on an NVRTC error status other than a compile error."""
        if status != 0:
            raise RuntimeError(self.lib.nvrtcGetErrorString(status).decode())

    def options(self, arch: str) -> list[str]:
        """MLX 0.32.4's options for a device of compute capability `arch` (e.g. "90")."""
        return (["--device-as-default-execution-space", f"--gpu-architecture={target(arch)}"]
                + [f"--include-path={p}" for p in self.include_paths])

    def compile(self, source: str, program: str, expression: str, arch: str) -> tuple[int, str]:
        """Compile; return (cubin size, "") on success or (0, NVRTC's log) on a compile error."""
        prog = ctypes.c_void_p()
        self.check(self.lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), program.encode(),
                                               len(self.headers), self.headers, self.include_names))
        try:
            self.check(self.lib.nvrtcAddNameExpression(prog, expression.encode()))
            opts = [o.encode() for o in self.options(arch)]
            status = self.lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
            if status != 6:  # 6: NVRTC_ERROR_COMPILATION, reported with the log below
                self.check(status)
            size = ctypes.c_size_t()
            self.check(self.lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)))
            log = ctypes.create_string_buffer(size.value + 1)
            self.check(self.lib.nvrtcGetProgramLog(prog, log))
            if status != 0:
                return 0, log.value.decode(errors="replace")
            lowered = ctypes.c_char_p()  # MLX looks the kernel up by this (mangled) name
            self.check(self.lib.nvrtcGetLoweredName(prog, expression.encode(), ctypes.byref(lowered)))
            self.check(self.lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)))
            return size.value, ""
        finally:
            self.check(self.lib.nvrtcDestroyProgram(ctypes.byref(prog)))


def write_source(inst, sources: Path) -> tuple[str, Path]:
    """Write the instance's source as MLX names it (<kernel>_<hash of source>.cu); return both."""
    source = kernel_source(inst)
    path = sources / f"{kernel_name(inst)}_{std_hash(source):x}.cu"
    path.write_text(source)
    return source, path


def check_instance(nvrtc: Nvrtc, inst, source: str, path: Path, arch: str) -> bool:
    """Compile one instance for one architecture, print its line; True if it compiled."""
    name = kernel_name(inst)
    start = time.perf_counter()
    size, log = nvrtc.compile(source, path.name, f"mlx::core::cu::{name}", arch)
    seconds = time.perf_counter() - start
    if size:
        print(f"ok {name} {target(arch)} ({size} bytes of cubin, {seconds:.2f}s)", flush=True)
        return True
    print(f"FAIL {name} {target(arch)} (source: {path})\n{log.rstrip()}", flush=True)
    return False


# --- 5. the instances ----------------------------------------------------------------------


def gpu_module():
    """tiny_llm_kernels.gpu, its gpu.py taken from this source tree (never an older installed copy)."""
    src = REPO / "kernels" / "tiny_llm_kernels"
    try:  # the installed package's __init__ (it has the built _ext), then gpu.py from src
        package = importlib.import_module("tiny_llm_kernels")
        if (src / "gpu.py").exists() and str(src) not in package.__path__:
            package.__path__.insert(0, str(src))
    except ImportError:  # not installed: the source tree alone
        sys.path.insert(0, str(src.parent))
    gpu = importlib.import_module("tiny_llm_kernels.gpu")
    say(f"instances from {gpu.__file__}")
    return gpu


def project_instances() -> list:
    """tiny_llm_kernels.gpu.example_instances("cuda")."""
    return list(gpu_module().example_instances("cuda"))


def self_test_instances() -> list:
    """A tiny kernel that must compile (every template kind, a shape, cg) and one that must not."""
    Instance = gpu_module().Instance
    good = Instance(
        name="nvrtc_check_exp", input_names=["inp"], output_names=["out"], header="",
        source=("  auto block = cg::this_thread_block();\n"
                "  unsigned int i = block.group_index().x * block.size() + block.thread_rank();\n"
                "  if (i < N * inp_shape[0] && FAST) {\n"
                "    out[i] = static_cast<T>(__expf(static_cast<float>(inp[i])));\n  }\n"),
        input_dtypes=["float16"], input_ndims=[1], output_dtypes=["float16"],
        template=[("T", "float16"), ("N", 4), ("FAST", True)])
    bad = Instance(name="nvrtc_check_syntax_error", input_names=["inp"], output_names=["out"],
                   header="", source="  out[0] = ;\n", input_dtypes=["float32"], input_ndims=[1],
                   output_dtypes=["float32"], template=[])
    return [good, bad]


def main(argv: list[str] | None = None) -> int:
    """Check every instance for every architecture; 0 if all compile, 1 if any fails."""
    parser = argparse.ArgumentParser(prog="python -m hardware.nvrtc_check", description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "tiny-llm" / "nvrtc",
                        help="where the toolchain is downloaded (default: %(default)s)")
    parser.add_argument("--arch", default="90,80",
                        help="compute capabilities, comma-separated (default: %(default)s: H100, A100)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compilations")
    parser.add_argument("--only", default="", metavar="TEXT",
                        help="check only the kernels whose MLX name contains TEXT")
    parser.add_argument("--self-test", action="store_true",
                        help="compile a built-in kernel (must pass) and a broken one (must fail)")
    args = parser.parse_args(argv)
    archs = [a.strip().removeprefix("sm_").rstrip("a") for a in args.arch.split(",") if a.strip()]
    if not archs or not all(a.isdigit() and len(a) >= 2 for a in archs):
        parser.error(f"--arch: expected compute capabilities like 90,80, not {args.arch!r}")
    cache = args.cache.expanduser().resolve()
    nvrtc = Nvrtc(ensure_toolchain(cache), cache)
    say(f"NVRTC {nvrtc.version}, options for {target(archs[0])}: {' '.join(nvrtc.options(archs[0]))}")
    if args.self_test:
        instances = self_test_instances()
    else:
        instances = [inst for inst in project_instances() if args.only in kernel_name(inst)]
        if not instances:
            say(f"no kernel instance's name contains {args.only!r}")
            return 1
    sources = cache / "generated"
    sources.mkdir(exist_ok=True)
    jobs = [(inst, *write_source(inst, sources), arch) for inst in instances for arch in archs]
    start = time.perf_counter()
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:  # NVRTC runs outside the GIL
        results = list(pool.map(lambda job: check_instance(nvrtc, *job), jobs))
    failed = results.count(False)
    say(f"{len(results) - failed} compiled, {failed} failed, in {time.perf_counter() - start:.1f}s")
    if args.self_test:
        # jobs are [good x archs, bad x archs]: the good one must compile, the bad one must not
        passed = all(results[:len(archs)]) and not any(results[len(archs):])
        say("self-test " + ("passed: the good kernel compiled, the broken one was reported"
                            if passed else "FAILED"))
        return 0 if passed else 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
