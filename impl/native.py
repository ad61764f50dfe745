"""The compiled side of impl/: the kernels package, if it was built.

`tiny_llm_kernels` (built from kernels/ by the install) interposes OpenBLAS
under MLX's CPU matmul on Linux and, from week 2, holds the C++ kernels.
It is imported before mlx: the BLAS fix only takes effect that way. Without
it, impl/ says so once and runs on the pure-MLX paths.
"""

from __future__ import annotations

import sys

try:
    import tiny_llm_kernels as kernels
except ImportError as e:  # not built: the pure-MLX twins still work, slower
    kernels = None
    print(f"tiny-llm: kernels not built ({e}); using the pure-MLX paths."
          " Build them with: pip install ./kernels --no-build-isolation", file=sys.stderr)
