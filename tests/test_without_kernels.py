"""impl/ without the compiled kernels (not built, or shadowed by its source folder): it says so once, with the
command that builds them, the engine still answers on the pure-MLX twins, and the twins
refuse bad input in the kernels' words."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

import impl
import impl.layer_kernels as lk
from impl.kv_cache import KVCache
from spec.day_2_2_quantized_matmul import BAD_LAYER, layer_calls
from spec.day_2_4_flash_attention import BAD_CACHED, bad_cached_calls

ROOT = Path(__file__).resolve().parents[1]

# A None entry in sys.modules makes `import tiny_llm_kernels` raise ImportError, as an unbuilt package does.
CHAT = """
import sys
sys.modules["tiny_llm_kernels"] = None
from impl.cli import main
from impl.native import kernels
assert kernels is None, "the kernels were imported after all"
sys.exit(main(["What is the capital of France?", "--max-tokens", "4"]))
"""


def test_the_engine_answers_without_kernels_and_says_how_to_build_them():
    run = subprocess.run([sys.executable, "-c", CHAT], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"exit {run.returncode}: {run.stderr[-2000:]}"
    hints = [line for line in run.stderr.splitlines() if "kernels not loaded" in line]
    assert len(hints) == 1, f"the missing kernels should be said once, got {len(hints)}: {run.stderr[-2000:]}"
    # The command a learner would copy: the build tools, then the kernels package.
    assert "pip install scikit-build-core cmake ninja" in hints[0] and "./kernels" in hints[0], hints[0]
    assert run.stdout.strip(), f"no reply on stdout; stderr: {run.stderr[-2000:]}"
    assert "4 tokens generated" in run.stderr, f"no stats line for 4 tokens: {run.stderr[-2000:]}"


def test_the_source_folder_is_not_taken_for_the_built_package():
    """Python started in kernels/ imports kernels/tiny_llm_kernels (no compiled files): an ImportError
    that says so, which impl turns into its one hint, not an OSError from the loader."""
    probe = "import sys; sys.path.append(sys.argv[1]); import impl; assert impl.native.kernels is None"
    run = subprocess.run([sys.executable, "-c", probe, str(ROOT)], cwd=ROOT / "kernels", capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, f"exit {run.returncode}: {run.stderr[-2000:]}"
    assert "imported from its source folder" in run.stderr and run.stderr.count("kernels not loaded") == 1, run.stderr


@pytest.mark.parametrize("case", [*(("layer", c) for c in BAD_LAYER), *(("cached", c) for c in BAD_CACHED)],
                         ids=lambda c: " ".join(c) if isinstance(c, tuple) else c)
def test_the_twin_paths_word_errors_as_the_kernels(monkeypatch, case):
    """Unbuilt (or off the CPU), impl.layer_kernels' entries take their twins after a check_*:
    each bad input of 2.2's and 2.4's tables gets, word for word, the kernel path's error."""
    table, name = case
    if table == "layer":
        calls, args = layer_calls(lk, name.split(",")[0]), BAD_LAYER[name]
    else:
        calls = {"cached_attention": bad_cached_calls(impl)["cached_attention"]}
        args = BAD_CACHED[name]
    for what, call in calls.items():
        fresh = (lambda: (KVCache(), *args)) if table == "cached" else (lambda: args)
        with pytest.raises(ValueError) as on_kernel:
            mx.eval(call(*fresh()))
        with monkeypatch.context() as m:
            m.setattr(lk, "_kernel", lambda name: None)  # as without the kernels: the twins run
            with pytest.raises(ValueError) as on_twin:
                mx.eval(call(*fresh()))
        assert str(on_twin.value) == str(on_kernel.value), f"{what}, {name}: twin path vs kernel"
