"""impl/ without the compiled kernels (tiny_llm_kernels not built): it says so once, with the
command that builds them, and the engine still answers on the pure-MLX twins."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
    hints = [line for line in run.stderr.splitlines() if "kernels not built" in line]
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
    assert "is the source folder" in run.stderr and run.stderr.count("kernels not built") == 1, run.stderr
