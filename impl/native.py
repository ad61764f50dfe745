"""The compiled side of impl/: the kernels package, if it was built.

`tiny_llm_kernels` (built from kernels/ by the install) interposes OpenBLAS
under MLX's CPU matmul on Linux and, from week 2, holds the C++ kernels and
(`tiny_llm_kernels.gpu`) the Metal/CUDA ones. It is imported before mlx: the
BLAS fix only takes effect that way. Without it, impl/ says so once and runs
on the pure-MLX paths. The same holds for a GPU kernel that fails its first-use
check on this GPU (`gpu_works`).
"""

from __future__ import annotations

import os
import sys

try:
    import tiny_llm_kernels as kernels
except ImportError as e:  # not built: the pure-MLX twins still work, slower
    kernels = None
    print(f"tiny-llm: kernels not loaded ({e}); using the pure-MLX paths. Build them with: pip install"
          ' scikit-build-core cmake ninja "nanobind>=3,<4" && pip install --no-build-isolation ./kernels',
          file=sys.stderr)

try:
    from tiny_llm_kernels import gpu as gpu_kernels
except ImportError:  # not built, or built from a tree before the GPU kernels
    gpu_kernels = None


def gpu_kernel(name: str):
    """The GPU kernel `name` when MLX computes on a GPU (Metal or CUDA) and it is built; else None."""
    import mlx.core as mx

    if gpu_kernels is None or mx.default_device() != mx.gpu or gpu_kernels.backend() is None:
        return None
    return getattr(gpu_kernels, name)


_gpu_checked: dict[tuple, bool] = {}  # (kernel, variant) -> passed its first-use check


def gpu_works(name: str, variant: tuple) -> bool:
    """Whether the GPU kernel `name` works here in `variant` (see tiny_llm_kernels.gpu.first_use_check),
    checked once; a failure is said once on stderr, and the caller then runs its pure-MLX twin.
    False, silently, for a variant the kernel does not compute (another dtype, bits, mask kind)."""
    if not gpu_kernels.supports(name, variant):
        return False
    key = (name, variant)
    if key not in _gpu_checked:
        reason = gpu_kernels.first_use_check(name, variant)
        if reason is not None:
            shown = ", ".join(str(v).removeprefix("mlx.core.") for v in variant)
            print(f"tiny-llm: the {gpu_kernels.backend()} {name} kernel ({shown}) failed its first-use check"
                  f" ({reason}); using the pure-MLX path", file=sys.stderr)
        _gpu_checked[key] = reason is None
    return _gpu_checked[key]


HUGE_PAGES_MIN = 4 << 20  # bytes: under two 2 MB pages the kernel's huge_pages is a plain copy


def huge_pages(a):
    """`a` copied onto 2 MB pages (Linux transparent huge pages) by the kernels' `huge_pages`, for
    weights that every token streams through; `a` itself under 4 MB, off Linux or the CPU, without
    the kernels, or with TINY_LLM_HUGE_PAGES=0. Evaluated at once, so that `a`'s own copy can be
    freed before the next weight is copied."""
    import mlx.core as mx

    if (a.nbytes < HUGE_PAGES_MIN or sys.platform != "linux" or not hasattr(kernels, "huge_pages")
            or mx.default_device() != mx.cpu or os.environ.get("TINY_LLM_HUGE_PAGES") == "0"):
        return a
    out = kernels.huge_pages(a)
    mx.eval(out)
    return out
