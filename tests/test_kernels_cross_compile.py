"""The C++ kernels compile for Apple silicon, ARM Linux and with clang, not only here (x86-64, GCC).

hardware/cross_compile.py compiles every file kernels/CMakeLists.txt builds for each target, with its
per-file options and -Werror, using zig's clang as the cross compiler (see its docstring). The first
run downloads ziglang and the macOS mlx-metal headers (about 150 MB, cached in
~/.cache/tiny-llm/cross). Nothing is linked or run: this guards the build, not the results.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hardware import cross_compile

CACHE = Path.home() / ".cache" / "tiny-llm" / "cross"
JOBS = os.cpu_count() or 1


def test_the_check_tells_portable_code_from_x86_only_code():
    assert cross_compile.self_test(CACHE, JOBS), "see the cross_compile lines above"


@pytest.mark.parametrize("target", list(cross_compile.TARGETS))
def test_kernels_compile_for(target):
    results = cross_compile.check([target], CACHE, JOBS)
    expected = {p.name for p in cross_compile.sources(cross_compile.TARGETS[target])}
    assert {f for _, f in results} == expected
    assert len(expected) >= 10, f"only {sorted(expected)}: has kernels/src moved?"
    failed = sorted(f for (_, f), ok in results.items() if not ok)
    assert not failed, f"{len(failed)} files do not compile for {target} (compiler logs above): {failed}"
