"""Run the GPU kernel bodies of gpu_src/ on the CPU, emulated (for checking them without a GPU).

`emulate(kernel, inputs, output_shapes, output_dtypes, grid, threadgroup, template)` takes what
the mx.fast kernel call takes; `emulate_run` has the signature of gpu._run, so that a test can
put it there and call gpu.quantized_matmul / gpu.flash_attention end to end. It writes a C++ file the way MLX writes the GPU one (a function
whose parameters are the inputs, their `<name>_shape` when the body uses it, and the outputs;
template arguments as constants) but with dialect_cpu.h, compiles it with the system C++
compiler (cached by source) and runs every threadgroup, each thread a std::thread. Slow, and
only as faithful as the emulation: warps in lockstep at each collective, fp16 as _Float16,
bf16 rounded to nearest even; the real check is the spec on a GPU.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from tiny_llm_kernels.gpu import kernel_source

CPP_TYPES = {"float32": "float", "float16": "_Float16", "bfloat16": "tl_bf16", "uint32": "uint32_t",
             "int32": "int32_t"}
NUMPY = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16, "uint32": np.uint32,
         "int32": np.int32}
CACHE = Path(os.environ.get("TINY_LLM_EMULATOR_CACHE", Path(tempfile.gettempdir()) / "tiny_llm_gpu_emulator"))


def cpp_source(kernel: str, input_dtypes: list[str], output_dtypes: list[str], template: list) -> str:
    """The emulated kernel as one C++ translation unit with an extern "C" launcher."""
    src = kernel_source(kernel, "cpu")
    params, args = [], []
    for i, (name, dtype) in enumerate(zip(src.input_names, input_dtypes, strict=True)):
        params.append(f"const {CPP_TYPES[dtype]}* {name}")
        args.append(f"static_cast<const {CPP_TYPES[dtype]}*>(in[{i}])")
        if f"{name}_shape" in src.source:
            params.append(f"const int* {name}_shape")
            args.append(f"shapes[{i}]")
    for i, (name, dtype) in enumerate(zip(src.output_names, output_dtypes, strict=True)):
        params.append(f"{CPP_TYPES[dtype]}* {name}")
        args.append(f"static_cast<{CPP_TYPES[dtype]}*>(out[{i}])")
    constants = "".join(
        f"  using {name} = {CPP_TYPES[value]};\n" if isinstance(value, str)
        else f"  constexpr bool {name} = {str(value).lower()};\n" if isinstance(value, bool)
        else f"  constexpr int {name} = {value};\n" for name, value in template)
    return f"""{src.header}
#include <thread>
#include <vector>

static void tl_kernel({", ".join(params)}) {{
{constants}{src.source}
}}

extern "C" void tl_launch(void** in, const int** shapes, void** out, int groups_x, int groups_y,
                          int groups_z, int threads) {{
  for (int z = 0; z < groups_z; ++z)
    for (int y = 0; y < groups_y; ++y)
      for (int x = 0; x < groups_x; ++x) {{
        std::vector<tl_emu::Warp> warps(threads / 32);
        std::vector<std::thread> team;
        for (int t = 0; t < threads; ++t)
          team.emplace_back([&, t] {{
            tl_emu::self = tl_emu::Thread{{t, x, y, z, warps.data()}};
            tl_kernel({", ".join(args)});
          }});
        for (auto& member : team) member.join();
      }}
}}
"""


def _library(source: str) -> ctypes.CDLL:
    CACHE.mkdir(parents=True, exist_ok=True)
    lib = CACHE / f"{hashlib.sha256(source.encode()).hexdigest()[:16]}.so"
    if not lib.exists():
        cpp = lib.with_suffix(".cpp")
        cpp.write_text(source)
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        cmd = [os.environ.get("CXX", "c++"), "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread",
               "-o", str(tmp), str(cpp)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"emulated kernel does not compile ({' '.join(cmd)}):\n{done.stderr}")
        tmp.replace(lib)  # atomic: a parallel run never loads a half-written library
    return ctypes.CDLL(str(lib))


def _dtype_name(a) -> str:
    return str(a.dtype).removeprefix("mlx.core.")


def emulate(kernel: str, inputs: list, output_shapes: list, output_dtypes: list, grid: tuple,
            threadgroup: tuple, template: list) -> list[np.ndarray]:
    """Run `kernel` as the GPU would, on mx arrays; returns numpy outputs (bf16 as float32)."""
    import mlx.core as mx

    in_dtypes = [_dtype_name(a) for a in inputs]
    out_dtypes = [str(d).removeprefix("mlx.core.") for d in output_dtypes]
    template = [(n, str(v).removeprefix("mlx.core.") if isinstance(v, mx.Dtype) else v) for n, v in template]
    lib = _library(cpp_source(kernel, in_dtypes, out_dtypes, template))
    # bf16 travels as its 16 bits; everything row-contiguous, as MLX makes it for the GPU.
    host = [np.ascontiguousarray(np.array(a.view(mx.uint16) if d == "bfloat16" else a))
            for a, d in zip(inputs, in_dtypes, strict=True)]
    shapes = [np.array(list(a.shape) or [1], np.int32) for a in inputs]
    outs = [np.zeros(s, NUMPY[d]) for s, d in zip(output_shapes, out_dtypes, strict=True)]
    as_ptrs = lambda arrays: (ctypes.c_void_p * len(arrays))(*[a.ctypes.data for a in arrays])  # noqa: E731
    (gx, gy, gz), (tx, ty, tz) = grid, threadgroup
    assert ty == tz == 1 and tx % 32 == 0, "the emulator runs 1-D threadgroups of whole warps"
    lib.tl_launch(as_ptrs(host), as_ptrs(shapes), as_ptrs(outs), math.ceil(gx / tx), gy, gz, tx)
    return [(o.astype(np.uint32) << 16).view(np.float32) if d == "bfloat16" else o
            for o, d in zip(outs, out_dtypes, strict=True)]


def emulate_run(kernel: str, inputs: list, output_shapes: list, output_dtypes: list, stream, launch: dict) -> list:
    """gpu._run on the emulator: the outputs as mx arrays of the asked dtypes."""
    import mlx.core as mx

    outs = emulate(kernel, inputs, output_shapes, output_dtypes, **launch)
    return [mx.array(o).astype(d) for o, d in zip(outs, output_dtypes, strict=True)]
