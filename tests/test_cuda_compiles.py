"""The CUDA kernels (topics 2.3, 2.5) compile as MLX 0.32.4 would compile them on a CUDA machine.

No GPU is needed: hardware/nvrtc_check.py rebuilds the source MLX generates around each body and
compiles it with NVRTC, MLX's headers and options (see its docstring). The first run downloads
the toolchain (about 150 MB, cached in ~/.cache/tiny-llm/nvrtc). Here: one compile per template
case that changes the generated code's types or branches, for the H100 (sm_90a); the whole set,
for sm_90a and sm_80, is `python -m hardware.nvrtc_check` (about 4 minutes).
"""

from __future__ import annotations

import platform
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from hardware import nvrtc_check


def representative(instances):
    """Every dtype of each kernel, both bit widths, every mask mode (group size and head size only
    change a constant)."""
    keep, seen = [], set()
    for inst in instances:
        t = dict(inst.template)
        key = (inst.name, t["T"], t.get("BITS"), t.get("MASK_MODE"))
        if key not in seen and t.get("GROUP_SIZE", 32) == 32 and t.get("D", 64) == 64:
            seen.add(key)
            keep.append(inst)
    return keep


@pytest.mark.skipif(platform.system() != "Linux" or platform.machine() != "x86_64",
                    reason="NVRTC's Python wheels exist for Linux x86-64 only")
def test_cuda_kernels_compile_for_the_h100():
    cache = Path.home() / ".cache" / "tiny-llm" / "nvrtc"
    nvrtc = nvrtc_check.Nvrtc(nvrtc_check.ensure_toolchain(cache), cache)
    instances = representative(nvrtc_check.project_instances())
    assert len(instances) == 15, f"{len(instances)} instances picked, not 15: has gpu.example_instances changed?"
    sources = cache / "generated"
    sources.mkdir(exist_ok=True)
    jobs = [(inst, *nvrtc_check.write_source(inst, sources), "90") for inst in instances]
    with ThreadPoolExecutor(2) as pool:  # NVRTC runs outside the GIL
        compiled = list(pool.map(lambda job: nvrtc_check.check_instance(nvrtc, *job), jobs))
    failed = [nvrtc_check.kernel_name(inst) for inst, ok in zip(instances, compiled, strict=True) if not ok]
    assert not failed, f"{len(failed)} CUDA kernels do not compile (NVRTC logs above): {failed}"
