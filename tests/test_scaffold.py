"""tools/scaffold.py: a learner's package from a small synthetic one, and from the real impl/."""

from __future__ import annotations

import importlib
import inspect
import itertools
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from spec.conftest import STUB
from tools import scaffold
from tools.scaffold import INFRASTRUCTURE, main

ROOT = Path(__file__).resolve().parents[1]
_names = itertools.count()

UTIL = '''\
"""Utilities (topic 1.4)."""
from __future__ import annotations

from dataclasses import dataclass, field

from {pkg}.other import _shared
from .other import helper

EPS: float = 1e-6
Shape = tuple[int, ...]


def _table() -> dict[int, str]:
    return {{b: chr(b) for b in range(4)}}


def _unused(x):
    return x


TABLE = _table()  # runs at import: _table must survive


def add(a: int, b: int = 2, *, c: float = EPS) -> int:
    """Add two numbers."""
    return a + b


@dataclass
class Config:
    """A config."""

    hidden: int = 8
    names: list[str] = field(default_factory=list)
    KIND = "llama"

    def __post_init__(self):
        self._check()

    def _check(self):
        assert self.hidden > 0

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        """From a dict."""
        return cls(**d)

    @property
    def size(self) -> int:
        """Twice the hidden size."""
        return self.hidden * 2

    def _private(self):
        return 1


class Cache:
    """A cache."""

    def __init__(self, n: int):
        """Make it."""
        self.n = n

    def __call__(self, x):
        return x

    def _evict(self):
        pass


if __name__ == "__main__":
    print(add(1))
'''

OTHER = '''\
import math

TOPIC = "1.2"


def _shared(x):
    return x + 1


def helper(x: float) -> float:
    """Help."""
    return math.sqrt(x)


class Proto:
    def update(self, k) -> int:
        """Declared only."""
        ...
'''


def make_package(root: Path, name: str) -> Path:
    pkg = root / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(f'"""The {name} package."""\n\nfrom {name} import native  # noqa: F401  (kept)\n')
    (pkg / "native.py").write_text('"""Plumbing."""\n\nkernels = None  # not built\n')
    (pkg / "model_files.py").write_text(f'"""Fetching models."""\n\nfrom {name} import native  # noqa: F401\n\n\n'
                                        'def fetch(name):\n    return name\n')
    (pkg / "util.py").write_text(UTIL.format(pkg=name))
    (pkg / "other.py").write_text(OTHER)
    return pkg


@pytest.fixture
def importable(tmp_path):
    """tmp_path on sys.path; modules imported from it are forgotten afterwards."""
    sys.path.insert(0, str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    sys.path.remove(str(tmp_path))
    for name in set(sys.modules) - before:
        if getattr(sys.modules[name], "__file__", "") and str(tmp_path) in sys.modules[name].__file__:
            del sys.modules[name]


@pytest.fixture
def names():
    n = next(_names)
    return f"srcpkg{n}", f"learner{n}"


def scaffold_synthetic(root: Path, names, capsys) -> tuple[Path, str]:
    src_name, name = names
    src = make_package(root / "src", src_name)
    (root / "src" / "spec").mkdir()
    (root / "src" / "spec" / "day_1_3_gqa.py").write_text("def test_add(impl):\n    impl.util.add(1)\n")
    assert main([name, "--from", str(src), "--into", str(root)]) == 0
    return src, capsys.readouterr().out


def test_stubs_keep_the_interface(importable, names, capsys):
    src, out = scaffold_synthetic(importable, names, capsys)
    sys.path.insert(0, str(src.parent))
    try:
        orig, mine = importlib.import_module(f"{names[0]}.util"), importlib.import_module(f"{names[1]}.util")
    finally:
        sys.path.remove(str(src.parent))
    for qual in ("add", "Config.from_dict", "Config.__post_init__", "Cache.__init__", "Cache.__call__"):
        a, b = _lookup(orig, qual), _lookup(mine, qual)
        assert inspect.signature(a) == inspect.signature(b), qual
        assert inspect.getdoc(a) == inspect.getdoc(b), qual
    assert inspect.getdoc(mine) == "Utilities (topic 1.4)."
    assert inspect.getdoc(mine.Config.size) == "Twice the hidden size."
    with pytest.raises(NotImplementedError, match=rf"^{names[1]}: implement util.add \(topic 1.3\)$"):
        mine.add(1)  # the spec names the topic
    with pytest.raises(NotImplementedError, match=r"util.Cache.__init__ \(topic 1.4\)$"):
        mine.Cache(3)  # else the module docstring does
    assert mine.EPS == 1e-6 and mine.Shape == tuple[int, ...] and mine.Config.KIND == "llama"
    assert [f.name for f in mine.Config.__dataclass_fields__.values()] == ["hidden", "names"]
    assert not hasattr(mine, "_unused") and not hasattr(mine.Cache, "_evict")
    assert not hasattr(mine.Config, "_private")
    assert "util.py" in out and "next: nox -s week1 -- --impl=" + names[1] in out


def test_through_keeps_the_solved_topics_bodies(importable, names, capsys):
    # util.add is topic 1.3 (the spec uses it), the rest of util 1.4 (its docstring): --through
    # 1.3 keeps add's body and stubs 1.4's; private helpers come along, stubbed or not likewise.
    src_name, name = names
    src = make_package(importable / "src", src_name)
    (importable / "src" / "spec").mkdir()
    (importable / "src" / "spec" / "day_1_3_gqa.py").write_text("def test_add(impl):\n    impl.util.add(1)\n")
    assert main([name, "--from", str(src), "--into", str(importable), "--through", "1.3"]) == 0
    out = capsys.readouterr().out
    source = (importable / name / "util.py").read_text()
    assert "implement util.add" not in source and "implement util.Cache.__init__ (topic 1.4)" in source, source
    assert "def _unused(" in source and "next: nox -s week1" in out and "topics up to 1.3" in out, out
    assert main([name + "x", "--from", str(src), "--into", str(importable), "--through", "1.9"]) == 2
    assert "'1.9' is not a topic id" in capsys.readouterr().err


def test_what_runs_at_import_is_kept(importable, names, capsys):
    _, out = scaffold_synthetic(importable, names, capsys)
    mine = importlib.import_module(f"{names[1]}.util")
    assert mine.TABLE == {0: "\0", 1: "\1", 2: "\2", 3: "\3"}
    assert "util.py" in out and "needed at import: _table\n" in out
    with pytest.raises(NotImplementedError, match="Config.__post_init__"):
        mine.Config(hidden=2)  # no module constant builds a Config, so its constructor is an exercise
    other = importlib.import_module(f"{names[1]}.other")
    with pytest.raises(NotImplementedError, match=r"other._shared \(topic 1.2\)"):
        other._shared(1)  # imported by util, so stubbed rather than dropped
    assert inspect.getsource(other.Proto.update).rstrip().endswith("...")  # nothing to implement


def test_infrastructure_copied_with_the_package_renamed(importable, names, capsys):
    src, _ = scaffold_synthetic(importable, names, capsys)
    for module in INFRASTRUCTURE:
        written = (importable / names[1] / module).read_text().split("\n", 1)
        assert written[0].startswith("# Copied by tools/scaffold.py")
        imports_renamed = (src / module).read_text().replace(f"from {names[0]} ", f"from {names[1]} ")
        assert written[1] == imports_renamed  # comments and the docstring stay as they were
    util = (importable / names[1] / "util.py").read_text()
    assert util.startswith("# Scaffolded by tools/scaffold.py")
    assert f"from {names[1]}.other import _shared" in util and "from .other import helper" in util
    assert names[0] not in util.split("\n", 1)[1]  # only the header names the source
    importlib.import_module(names[1])


def test_refuses_to_overwrite_unless_forced(importable, names, capsys):
    # The scaffold is importable from where it is written: that is not another module, so --force works.
    src, _ = scaffold_synthetic(importable, names, capsys)
    target = importable / names[1]
    (target / "mine.py").write_text("x = 1\n")
    args = [names[1], "--from", str(src), "--into", str(importable)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "exists" in err and "--force" in err and err.count("\n") == 1
    assert (target / "mine.py").exists()
    assert main(args + ["--force"]) == 0
    assert not (target / "mine.py").exists() and (target / "util.py").exists()
    assert sorted(p.name for p in importable.iterdir()) == [names[1], "src"]  # no temp dirs left


def test_force_replaces_only_a_scaffold(tmp_path, capsys):
    # A results folder, and a package the learner wrote by hand: --force leaves both as they were.
    src = make_package(tmp_path, "srcpkg")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "junit.xml").write_text("<testsuites/>")
    (tmp_path / "handmade").mkdir()
    (tmp_path / "handmade" / "attention.py").write_text("def sdpa(q, k, v):\n    return q\n")
    for name in ("results", "handmade"):
        assert main([name, "--from", str(src), "--into", str(tmp_path), "--force"]) == 2
        err = capsys.readouterr().err
        assert "is not a scaffold" in err and err.count("\n") == 1, err
    assert (tmp_path / "results" / "junit.xml").read_text() == "<testsuites/>"
    assert [p.name for p in (tmp_path / "handmade").iterdir()] == ["attention.py"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["handmade", "results", "srcpkg"]  # no temp dirs left


@pytest.mark.parametrize("taken", ["numpy", "pytest", "json", "sys"])
def test_refuses_names_importable_as_another_module(tmp_path, capsys, taken):
    # `import numpy.linalg` in the spec would find the real numpy, or a half of each.
    src = make_package(tmp_path, "srcpkg")
    assert main([taken, "--from", str(src), "--into", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "already importable" in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["srcpkg"]


def test_refuses_a_module_the_spec_environment_has(tmp_path, capsys, monkeypatch):
    # The tool may run in another Python than the spec (nox's): the spec's environment is asked too.
    fake_env = tmp_path / "env"
    (fake_env / "only_in_spec_env").mkdir(parents=True)
    (fake_env / "only_in_spec_env" / "__init__.py").write_text("")
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\nPYTHONPATH={fake_env} exec {sys.executable} \"$@\"\n")
    python.chmod(0o755)
    monkeypatch.setattr(scaffold, "SPEC_PYTHON", python)
    src = make_package(tmp_path, "srcpkg")
    assert main(["only_in_spec_env", "--from", str(src), "--into", str(tmp_path)]) == 2
    assert "already importable" in capsys.readouterr().err
    assert main(["elsewhere", "--from", str(src), "--into", str(tmp_path)]) == 0


@pytest.mark.parametrize("bad", ["1x", "my-pkg", "class", "impl", "spec", "reference", "tools", "kernels", "bench", "hardware"])
def test_refuses_bad_names(tmp_path, capsys, bad):
    src = make_package(tmp_path, "srcpkg")
    assert main([bad, "--from", str(src), "--into", str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["srcpkg"]


def test_nothing_half_written(tmp_path, capsys, monkeypatch):
    src = make_package(tmp_path, "srcpkg")
    (src / "broken.py").write_text("def f(:\n")
    assert main(["mine", "--from", str(src), "--into", str(tmp_path)]) == 2
    assert "broken.py" in capsys.readouterr().err
    (src / "broken.py").unlink()

    def fail(tmp, target):
        raise OSError("disk full")

    monkeypatch.setattr(scaffold, "_swap_in", fail)
    with pytest.raises(OSError):
        main(["mine", "--from", str(src), "--into", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["srcpkg"]


def _exercises(modules: list[scaffold.Module]) -> list[str]:
    """The dotted names of the stubbed modules, sub-packages' included ('engine.scheduler')."""
    names = sorted(scaffold.module_name(m.path) for m in modules if not m.copied)
    assert "engine.scheduler" in names and "attention" in names, names
    assert not any(scaffold.module_name(m.path).startswith("server") for m in modules), \
        "the HTTP server is a layer above the topics, not scaffolded"
    return names


def test_scaffold_of_the_real_impl(importable, names):
    name = names[1]
    modules = scaffold.build(ROOT / "impl", name, ROOT / "spec")
    scaffold.write(modules, importable / name, force=False)
    stubs = 0

    def doc(obj) -> str | None:  # impl's docstring as the learner's package reads it: impl.norm -> <name>.norm
        text = inspect.getdoc(obj)
        return text and re.sub(r"\bimpl\.(?=[a-z_])", f"{name}.", text)

    for module in _exercises(modules):
        orig = importlib.import_module(f"impl.{module}")
        mine = importlib.import_module(f"{name}.{module}")
        assert doc(orig) == inspect.getdoc(mine), module
        for qual, a in _public_callables(orig):
            b = _lookup(mine, qual)
            assert _signature(a) == _signature(b), f"{module}.{qual}"
            assert doc(a) == inspect.getdoc(b), f"{module}.{qual}"
            if "raise NotImplementedError(" in _source(b):
                stubs += 1
                with pytest.raises(NotImplementedError, match=rf"^{name}: implement {module}\.{qual}\b") as e:
                    _call_with_nones(b)
                assert STUB.fullmatch(str(e.value)), f"spec/conftest.py would not know {e.value!r} for a stub"
    assert stubs > 0, "no function of impl/ was stubbed"


def test_a_test_that_reaches_a_stub_fails_with_its_message_alone(importable, names):
    # spec/conftest.py replaces the traceback (about 60 lines a test) by the stub's message.
    name = names[1]
    scaffold.write(scaffold.build(ROOT / "impl", name, ROOT / "spec"), importable / name, force=False)
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--impl={name}",
                          "spec/day_1_1_attention.py::test_linear"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(importable)}, timeout=300)
    assert run.returncode == 1, run.stdout[-3000:]
    assert f"\n{name}: implement basics.linear (topic 1.1)  (a stub: write it)\n" in run.stdout, run.stdout[-3000:]
    assert "raise NotImplementedError" not in run.stdout, run.stdout[-3000:]


# A sub-package, its topics told per function: a method's own docstring tag (chunk) overrides its
# class and module; a mention of a topic inside a clause, two topics, or a private helper do not.
ENGINE = {
    "eng/__init__.py": '"""The engine: re-exports only."""\n\nfrom {pkg}.eng.sched import Scheduler\n\n__all__ = ["Scheduler"]\n',
    "eng/sched.py": '''\
"""The scheduler: no topic here; the spec that uses it tells."""
from __future__ import annotations

from {pkg}.eng.pool import Pool
from {pkg}.util import add


class Scheduler:
    """Which sequences run next."""

    def __init__(self, pool: Pool):
        self.pool = pool

    def schedule(self) -> int:
        """One step's batch."""
        return self._private() + self.chunk(add(1), 4)

    @staticmethod
    def chunk(todo: int, budget: int) -> int:
        """Chunked prefill (topic 2.7): at most the budget."""
        return min(todo, budget)

    def kernel(self) -> str:
        """The C++ kernel on the CPU, the GPU one (topic 2.5) on a GPU."""
        return "cpu"

    def both(self) -> str:
        """Reads topic 3.1's pool (topic 3.2)."""
        return "both"

    def _private(self) -> int:
        """A helper (topic 3.2)."""
        return 0
''',
    "eng/pool.py": '''\
"""The pool (topic 3.1) and prefix caching (topic 3.2)."""


class Pool:
    def allocate(self, n: int) -> list[int]:
        """Blocks for n tokens."""
        return list(range(n))

    def cached(self, n: int) -> list[int]:
        """The cached blocks, found by their hashes
        (topic 3.2). Wrapped over two lines."""
        return []


def compute_hash(tokens: tuple[int, ...]) -> int:
    """A block's hash (topic 3.2)."""
    return hash(tokens)
''',
}
# The scheduler's topic comes from the spec, through a fixture and a three-level chain.
ENGINE_SPEC = "import pytest\n\n@pytest.fixture\ndef eng(impl):\n    return impl.eng\n\n" \
              "def test_sched(eng):\n    eng.sched.Scheduler(None)\n"


def scaffold_engine(root: Path, names, *extra: str) -> Path:
    """The synthetic package with the sub-package eng/, scaffolded into root (extra: more arguments)."""
    src_name, name = names
    src = make_package(root / "src", src_name)
    for rel, text in ENGINE.items():
        (src / rel).parent.mkdir(exist_ok=True)
        (src / rel).write_text(text.format(pkg=src_name))
    (root / "src" / "spec").mkdir()
    (root / "src" / "spec" / "day_2_6_continuous_batching.py").write_text(ENGINE_SPEC)
    assert main([name, "--from", str(src), "--into", str(root), *extra]) == 0
    return root / name


def test_a_sub_package_and_topics_per_function(importable, names, capsys):
    target = scaffold_engine(importable, names)
    out = capsys.readouterr().out
    init = (target / "eng" / "__init__.py").read_text()
    assert init.startswith("# Copied by tools/scaffold.py") and f"from {names[1]}.eng.sched import Scheduler" in init
    assert f"{(target / 'eng' / '__init__.py').as_posix()}" in out and "copied (infrastructure)" in out, out
    sched = (target / "eng" / "sched.py").read_text()
    assert sched.startswith("# Scaffolded by tools/scaffold.py") and names[0] not in sched.split("\n", 1)[1]
    assert f"from {names[1]}.eng.pool import Pool" in sched and f"from {names[1]}.util import add" in sched
    eng = importlib.import_module(f"{names[1]}.eng")
    assert eng.Scheduler is importlib.import_module(f"{names[1]}.eng.sched").Scheduler
    pool = importlib.import_module(f"{names[1]}.eng.pool")
    topics = {"Scheduler.__init__": "2.6", "Scheduler.schedule": "2.6", "Scheduler.chunk": "2.7",
              "Scheduler.kernel": "2.6", "Scheduler.both": "2.6"}
    for qual, topic in topics.items():
        with pytest.raises(NotImplementedError, match=rf"^{names[1]}: implement eng\.sched\.{qual} \(topic {topic}\)$"):
            _call_with_nones(_lookup(eng.sched, qual))
    for qual, topic in {"Pool.allocate": "3.1", "Pool.cached": "3.2", "compute_hash": "3.2"}.items():
        with pytest.raises(NotImplementedError, match=rf"^{names[1]}: implement eng\.pool\.{qual} \(topic {topic}\)$"):
            _call_with_nones(_lookup(pool, qual))
    assert not hasattr(eng.sched.Scheduler, "_private")


def test_through_keeps_a_sub_packages_solved_functions(importable, names, capsys):
    target = scaffold_engine(importable, names, "--through", "3.1")
    capsys.readouterr()
    sched, pool = (target / "eng" / "sched.py").read_text(), (target / "eng" / "pool.py").read_text()
    # Through 3.1: 2.6's schedule, the private helper it calls, 2.7's chunk and 3.1's allocate keep
    # their bodies; 3.2's do not. Through 2.6, chunk is stubbed.
    assert "implement eng.sched.Scheduler.schedule" not in sched and "def _private(self)" in sched
    assert "implement eng.sched.Scheduler._private" not in sched
    assert "implement eng.sched.Scheduler.chunk" not in sched  # 2.7 is before 3.1 too
    assert "implement eng.pool.Pool.allocate" not in pool
    assert "implement eng.pool.Pool.cached (topic 3.2)" in pool and "implement eng.pool.compute_hash (topic 3.2)" in pool
    mine = importlib.import_module(f"{names[1]}.eng.sched")
    assert mine.Scheduler(None).schedule() == 3  # 0 + min(add(1), 4): every body it reaches is kept
    target = scaffold_engine(importable / "b", names, "--through", "2.6")
    capsys.readouterr()
    sched = (target / "eng" / "sched.py").read_text()
    assert "implement eng.sched.Scheduler.schedule" not in sched and \
        "implement eng.sched.Scheduler.chunk (topic 2.7)" in sched, sched


def test_a_sub_packages_init_that_defines_something_is_an_exercise():
    import ast

    assert scaffold.is_infrastructure(Path("eng/__init__.py"), ast.parse("from x.eng.a import A\n__all__ = ['A']\n"))
    assert not scaffold.is_infrastructure(Path("eng/__init__.py"), ast.parse("def f():\n    return 1\n"))
    assert not scaffold.is_infrastructure(Path("eng/a.py"), ast.parse("X = 1\n"))


def test_def_topic_reads_tags_not_mentions():
    import ast

    def topic(doc: str, name: str = "f") -> str | None:
        return scaffold.def_topic(ast.parse(f"def {name}():\n    {doc!r}\n").body[0])

    assert topic("Chunked prefill (topic 2.7): a long prompt over several steps.") == "2.7"
    assert topic("Found in the prefix cache (topic\n3.2). At least one token is left.") == "3.2"
    assert topic("The kernel when built (topic 3.2); the twin otherwise.") == "3.2"
    assert topic("The hash of a full block (topic 3.2)") == "3.2"
    assert topic("The C++ kernel, the Metal one (topic 2.3) on a GPU, when built.") is None  # a mention
    assert topic("The batched engine (topic 2.6) for one conversation.") is None
    assert topic("Uses topic 3.1's pool (topic 3.2).") is None  # two topics
    assert topic("Both (topics 2.6 and 2.7).") is None
    assert topic("No topic at all.") is None
    assert topic("A helper (topic 3.2).", "_helper") is None  # private: its module's or class's
    assert topic("Made up (topic 9.9).") is None  # not a topic of the course
    assert topic("Constructs it (topic 3.1).", "__init__") == "3.1"


def test_the_real_engine_per_function_topics(importable, names):
    """impl/engine: 2.6 but Scheduler.chunk (2.7); block_manager 3.1 but its prefix cache (3.2)."""
    name = names[1]
    texts = {scaffold.module_name(m.path): m.text for m in scaffold.build(ROOT / "impl", name, ROOT / "spec")}
    for module, qual, topic in [("engine.scheduler", "Scheduler.schedule", "2.6"),
                                ("engine.scheduler", "Scheduler.chunk", "2.7"),
                                ("engine.llm_engine", "LLMEngine.step", "2.6"),
                                ("engine.block_manager", "BlockManager.allocate", "3.1"),
                                ("engine.block_manager", "BlockManager.get_computed_blocks", "3.2"),
                                ("engine.block_manager", "BlockManager.cache_full_blocks", "3.2"),
                                ("engine.block_manager", "compute_hash", "3.2"),
                                ("engine.kv_pool", "KVPool.__init__", "3.1"),
                                ("engine.paged_attention", "paged_attention_mlx", "3.1"),
                                ("engine.paged_attention", "paged_attention", "3.2")]:
        assert f"{name}: implement {module}.{qual} (topic {topic})" in texts[module], (module, qual, topic)
    assert texts["engine"].startswith("# Copied by tools/scaffold.py from impl/engine/__init__.py")

    solved = scaffold.topics_through("3.1")
    scaffold.write(scaffold.build(ROOT / "impl", name, ROOT / "spec", solved), importable / name, force=False)
    bm = importlib.import_module(f"{name}.engine.block_manager")
    source = (importable / name / "engine" / "block_manager.py").read_text()
    assert "implement engine.block_manager.BlockManager.allocate" not in source
    manager = bm.BlockManager(num_blocks=4, block_size=16)  # 3.1's: it runs
    assert manager.num_free_blocks == 4
    with pytest.raises(NotImplementedError, match=r"implement engine\.block_manager\.BlockManager\."
                                                   r"get_computed_blocks \(topic 3\.2\)$"):
        manager.get_computed_blocks(None)
    engine = importlib.import_module(f"{name}.engine")
    assert engine.LLM.__module__ == f"{name}.engine.llm"


def test_the_impl_fixture_reaches_a_sub_package(importable, names):
    """spec/conftest.py's ImplPackage: impl.engine.scheduler, impl.engine.LLM; a missing module of
    the sub-package fails with what to create."""
    from spec.conftest import ImplPackage

    name = names[1]
    scaffold.write(scaffold.build(ROOT / "impl", name, ROOT / "spec"), importable / name, force=False)
    impl = ImplPackage(name)
    assert impl.engine.scheduler.Scheduler.__module__ == f"{name}.engine.scheduler"
    assert impl.engine.LLM is importlib.import_module(f"{name}.engine.llm").LLM
    assert impl.engine.trace.__name__ == f"{name}.engine.trace"  # not imported by the package's __init__
    assert not hasattr(impl.engine, "nothing_of_that_name") and not hasattr(impl, "engine_of_no_kind")
    (importable / name / "engine" / "block_manager.py").unlink()
    with pytest.raises(pytest.fail.Exception, match=rf"^{name}\.engine\.block_manager does not exist: create"
                                                    rf" {name}/engine/block_manager\.py \(nox -s scaffold -- {name} "):
        getattr(impl.engine, "block_manager")  # noqa: B009  (the attribute access is the test)


def _lookup(module, qualname: str):
    obj = module
    for part in qualname.split("."):
        obj = inspect.getattr_static(obj, part)
    return obj.fget if isinstance(obj, property) else getattr(obj, "__func__", obj)


def _public_callables(module):
    """(qualname, function) for the module's own public functions and the methods of its classes."""
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj):
            yield name, obj
        elif inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if attr.startswith("_") and not (attr.startswith("__") and attr.endswith("__")):
                    continue
                if isinstance(member, (staticmethod, classmethod, property)) or inspect.isfunction(member):
                    yield f"{name}.{attr}", _lookup(module, f"{name}.{attr}")


def _signature(fn) -> list[tuple]:
    """Names, kinds, annotations and defaults; a callable default compares by its name."""
    def same(v):
        return getattr(v, "__qualname__", v) if callable(v) else v

    return [(p.name, p.kind, same(p.annotation), same(p.default))
            for p in inspect.signature(fn).parameters.values()]


def _source(fn) -> str:
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):  # made at run time (dataclass __init__, ...)
        return ""


def _call_with_nones(fn):
    """A stub raises before it looks at its arguments: None will do for each required one."""
    params = inspect.signature(fn).parameters.values()
    positional = [None for p in params if p.default is p.empty
                  and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    keyword = {p.name: None for p in params if p.default is p.empty and p.kind is p.KEYWORD_ONLY}
    result = fn(*positional, **keyword)
    if inspect.iscoroutine(result):
        result.send(None)


def test_topics_follow_aliases_and_name_tables(tmp_path):
    """A function's topic is the first spec that uses it, however it reaches it: directly, through a
    module alias or fixture, or by name in a has-the-names table; a later direct use does not win."""
    spec = tmp_path / "spec"
    spec.mkdir()
    (spec / "day_1_2_rope.py").write_text(
        "import pytest\n\n@pytest.fixture\ndef rope(impl):\n    return impl.rope\n\n"
        "def test_rope(rope):\n    rope.RoPE(8)\n")
    (spec / "day_1_4_norm_mlp.py").write_text("def test_norm(impl):\n    norm = impl.norm\n    norm.RMSNorm(8)\n")
    (spec / "day_1_5_model.py").write_text('NAMES = {"model": ["Model", "TransformerBlock"]}\n')
    (spec / "day_2_2_quantized_matmul.py").write_text(
        "def test_all(impl):\n    impl.rope.RoPE(8), impl.norm.RMSNorm(8), impl.model.TransformerBlock()\n")
    topics = scaffold.spec_topics(spec)
    assert {k: topics[k] for k in ("rope.RoPE", "norm.RMSNorm", "model.TransformerBlock", "model.Model")} == {
        "rope.RoPE": "1.2", "norm.RMSNorm": "1.4", "model.TransformerBlock": "1.5", "model.Model": "1.5"}


def test_format_is_ast_unparse():
    import ast

    source = textwrap.dedent('''\
        """Doc."""
        import os
        X = 1


        def f(a, b=2):
            return a
        ''')
    tree = ast.parse(source)
    text = scaffold.format_module(tree)
    assert ast.dump(ast.parse(text)) == ast.dump(tree)
    assert text == '"""Doc."""\n\nimport os\n\nX = 1\n\n\ndef f(a, b=2):\n    return a\n'
