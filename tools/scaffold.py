"""Write a learner's package: every public signature and docstring of impl/, no bodies.

    python -m tools.scaffold NAME [--from impl] [--into DIR] [--spec DIR] [--through X.Y] [--force]

For each module of the source package (default impl/), sub-packages included
(impl/engine/x.py -> NAME/engine/x.py), NAME/ gets a module with the same
docstring, imports, constants, classes (decorators, bases, fields, class
constants) and public functions and methods (dunders included), whose bodies
raise NotImplementedError naming what to implement and its topic. Private
helpers (`_name`) are dropped, except:

- one another module imports (`from impl.x import _helper`): stubbed like a
  public one, so the import still works;
- one the module runs while it is imported (`TABLE = _build_table()`, a
  decorator, a class built at import): kept verbatim with what it calls, since
  a stub would make the import fail. The tool prints these.

A function's topic, the first that applies:
1. for a module-level function, the first topic (in course order) whose spec file
   uses it by name (`impl.engine.block_manager.compute_hash`, also through a module
   alias or fixture, or in a has-the-names table);
2. its own docstring, when it names exactly one topic, as a tag that ends a clause:
   "Chunked prefill (topic 2.7): ...", "... in the prefix cache (topic 3.2)." (public
   functions and methods only; "the Metal one (topic 2.3) on a GPU" only mentions one);
3. for a method, the first spec that uses its class;
4. its module's `TOPIC = "X.Y"`, else the first topic its module docstring names
   ("(topic 3.1) and prefix caching (topic 3.2)": 3.1; "topics 2.6 and 2.7": 2.6),
   unless that is a list ("topics 1.1, 1.4": none);
5. the first spec that uses its module.

--through X.Y starts later in the course: what belongs to the topics up to X.Y
(in course order) keeps the source's bodies, private helpers included, and only
the later topics' functions are stubbed.

INFRASTRUCTURE modules, and a sub-package's `__init__.py` that defines nothing
(it only re-exports), are copied verbatim, only the package renamed. Imports of
the source package are renamed to NAME (impl.engine.x -> NAME.engine.x); relative
imports stay. Everything is written to a temporary directory and renamed into
place at the end.

NAME must not already import as another module (`torch`) in the spec's environment
(.nox/_spec; this Python before nox has built it). --force replaces only a folder this tool wrote.
"""

from __future__ import annotations

import argparse
import ast
import keyword
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from spec.curriculum import BY_ID, TOPICS, topic_of_file, week_of

INFRASTRUCTURE = ("__init__.py", "native.py", "model_files.py")  # copied verbatim: plumbing, not exercises
RESERVED = ("impl", "spec", "reference", "tools", "kernels", "bench", "hardware")
HEADER = "# Scaffolded by tools/scaffold.py"  # the first line of each stubbed module: what --force may replace
# The spec runs in this environment (noxfile.py), which may hold modules (torch) the tool's Python lacks.
SPEC_ENV = Path(__file__).resolve().parents[1] / ".nox" / "_spec"
SPEC_PYTHON = SPEC_ENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
# Where a module imports from: its package folder, or its file ('built-in' and the like for some).
WHERE = ("import importlib.util, sys; s = importlib.util.find_spec(sys.argv[1]);"
         " print(*(s.submodule_search_locations or [s.origin]) if s else [], sep='\\n')")
CONSTRUCTORS = ("__new__", "__init__", "__post_init__")
DOC_TOPICS = re.compile(r"\btopics? (\d+\.\d+(?:, \d+\.\d+)*)")
# Every topic a docstring names ("topic 2.6", "topics 2.6 and 2.7", "topics 1.1, 1.4"), and a
# topic tag: "(topic 3.2)" or "topic 3.2" ending a clause (then . : ; , or the end).
NAMED_TOPICS = re.compile(r"\btopics?\s+(\d+\.\d+(?:(?:\s*,\s*|,?\s+and\s+)\d+\.\d+)*)")
TOPIC_TAG = re.compile(r"\btopic\s+(\d+\.\d+)\)?(?=[.:;,]|\s*$)")
FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)
DEFS = (*FUNCTIONS, ast.ClassDef)


class ScaffoldError(Exception):
    """A request the tool refuses; the message is one line."""


@dataclass
class Module:
    """One written module and what the learner finds in it."""

    path: Path  # relative to the package
    text: str = ""
    stubs: int = 0
    copied: bool = False
    kept: list[str] = field(default_factory=list)  # kept verbatim, needed at import


# ------------------------------------------------------------------ names


def is_private(name: str) -> bool:
    """`_helper` is private; `__init__` and `public` are not."""
    return name.startswith("_") and not is_dunder(name)


def is_dunder(name: str) -> bool:
    """`__init__`, `__call__`, `__getattr__`."""
    return name.startswith("__") and name.endswith("__")


def module_name(rel: Path) -> str:
    """'attention.py' -> 'attention'; 'sub/__init__.py' -> 'sub'; '__init__.py' -> ''."""
    parts = list(rel.with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _renamed(dotted: str | None, old: str, new: str) -> str | None:
    if dotted == old or (dotted or "").startswith(old + "."):
        return new + dotted[len(old):]
    return dotted


class _Rename(ast.NodeTransformer):
    """Renames the package in absolute imports, and the name `old` where they bind it."""

    def __init__(self, old: str, new: str, binds_old: bool):
        self.old, self.new, self.binds_old = old, new, binds_old

    def visit_Import(self, node):
        for a in node.names:
            a.name = _renamed(a.name, self.old, self.new)
        return node

    def visit_ImportFrom(self, node):
        if node.level == 0:
            node.module = _renamed(node.module, self.old, self.new)
        return node

    def visit_Name(self, node):
        if self.binds_old and node.id == self.old:
            node.id = self.new
        return node


def _binds(tree: ast.AST, old: str) -> bool:
    """Whether `import old` or `import old.x` (no alias) makes `old` a name here."""
    return any(isinstance(n, ast.Import) and any(a.asname is None and a.name.split(".")[0] == old
                                                 for a in n.names) for n in ast.walk(tree))


def rename_package(tree: ast.Module, old: str, new: str) -> ast.Module:
    """Rewrite imports of `old` to `new` in place; returns the tree."""
    return _Rename(old, new, _binds(tree, old)).visit(tree)


def rename_source(source: str, old: str, new: str) -> str:
    """The source with only the package's imports (and names they bind) renamed."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))

    def offset(lineno: int, col: int) -> int:  # ast columns count UTF-8 bytes
        return starts[lineno - 1] + len(lines[lineno - 1].encode()[:col].decode())

    edits, binds_old = [], _binds(tree, old)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            text = ast.unparse(_Rename(old, new, False).visit(_copy(node)))
        elif isinstance(node, ast.Name) and binds_old and node.id == old:
            text = new
        else:
            continue
        span = offset(node.lineno, node.col_offset), offset(node.end_lineno, node.end_col_offset)
        if source[span[0]:span[1]] != text:
            edits.append((*span, text))
    for start, end, text in sorted(edits, reverse=True):
        source = source[:start] + text + source[end:]
    return source


def _copy(node: ast.AST) -> ast.AST:
    return ast.parse(ast.unparse(node)).body[0]


# ----------------------------------------------------- what runs at import


def _names(nodes) -> set[str]:
    return {n.id for node in nodes for n in ast.walk(node) if isinstance(n, ast.Name)}


def _called(nodes) -> set[str]:
    out = set()
    for node in nodes:
        for n in ast.walk(node):
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name):
                out.add(n.func.id)
    return out


def _signature_parts(fn, with_annotations: bool) -> list[ast.AST]:
    """What `def` evaluates: decorators, defaults and (without the future import) annotations."""
    a = fn.args
    parts = [*fn.decorator_list, *a.defaults, *(d for d in a.kw_defaults if d)]
    if with_annotations:
        every = [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg]
        parts += [p.annotation for p in every if p is not None and p.annotation is not None]
        parts += [fn.returns] if fn.returns else []
    return parts


def _class_evaluated(cls: ast.ClassDef, annotations: bool) -> tuple[list[ast.AST], set[str]]:
    """What a class statement evaluates, and the names it calls (decorators included)."""
    parts = [*cls.decorator_list, *cls.bases, *(k.value for k in cls.keywords)]
    calls = _decorator_names(cls)
    for stmt in cls.body:
        if isinstance(stmt, FUNCTIONS):
            parts += _signature_parts(stmt, annotations)
            calls |= _decorator_names(stmt)
        elif isinstance(stmt, ast.ClassDef):
            sub, sub_calls = _class_evaluated(stmt, annotations)
            parts, calls = parts + sub, calls | sub_calls
        elif not (isinstance(stmt, ast.AnnAssign) and stmt.value is None and not annotations):
            parts.append(stmt)
    return parts, calls | _called(parts)


def _decorator_names(node) -> set[str]:
    return {d.id for d in node.decorator_list if isinstance(d, ast.Name)}


def _self_calls(nodes) -> set[str]:
    """Methods reached as `self.x` / `cls.x`."""
    return {n.attr for node in nodes for n in ast.walk(node) if isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Name) and n.value.id in ("self", "cls")}


@dataclass
class Plan:
    """What one module's scaffold keeps of its top-level definitions."""

    keep: set[str]  # top-level defs that appear in the scaffold
    verbatim: set[str]  # top-level functions kept with their bodies
    built: dict[str, set[str]]  # classes instantiated at import -> methods kept verbatim


def plan(tree: ast.Module, required: set[str], privates: bool = False) -> Plan:
    """Which top-level definitions to keep, and which must keep their bodies to import.
    privates: keep private definitions too (a scaffold --through a topic)."""
    defs = {s.name: s for s in tree.body if isinstance(s, DEFS)}
    annotations = not _has_future_annotations(tree)
    p = Plan({n for n in defs if privates or not is_private(n)} | (required & defs.keys()), set(), {})
    while True:
        evaluated, calls = _evaluated(tree, p.keep, annotations)
        runs = _verbatim_bodies(p, defs)  # everything a verbatim body names may be called
        refs = (_names(evaluated) | _names(runs)) & defs.keys()
        calls = (calls | _names(runs)) & defs.keys()
        verbatim = {n for n in calls if isinstance(defs[n], FUNCTIONS)}
        built = {n: _constructors(defs[n]) for n in calls if isinstance(defs[n], ast.ClassDef)}
        if refs <= p.keep and verbatim <= p.verbatim and built.keys() <= p.built.keys():
            return p
        p = Plan(p.keep | refs | verbatim | built.keys(), p.verbatim | verbatim, {**p.built, **built})


def _evaluated(tree: ast.Module, keep: set[str], annotations: bool):
    parts, calls = [], set()
    for stmt in tree.body:
        if isinstance(stmt, FUNCTIONS):
            if stmt.name in keep:
                parts += _signature_parts(stmt, annotations)
                calls |= _decorator_names(stmt)
        elif isinstance(stmt, ast.ClassDef):
            if stmt.name in keep:
                sub, sub_calls = _class_evaluated(stmt, annotations)
                parts, calls = parts + sub, calls | sub_calls
        elif not isinstance(stmt, (ast.Import, ast.ImportFrom)) and not _is_main_guard(stmt):
            parts.append(stmt)
    return parts, calls | _called(parts)


def _is_main_guard(stmt: ast.stmt) -> bool:
    """`if __name__ == "__main__":` runs when executed, not when imported."""
    return isinstance(stmt, ast.If) and "__name__" in _names([stmt.test]) \
        and "__main__" in ast.unparse(stmt.test)


def _verbatim_bodies(p: Plan, defs) -> list[ast.AST]:
    runs = [defs[n] for n in p.verbatim]
    for cls, methods in p.built.items():
        runs += [s for s in defs[cls].body if isinstance(s, FUNCTIONS) and s.name in methods]
        runs += [s for s in defs[cls].body if not isinstance(s, DEFS)]  # field factories run too
    return runs


def _constructors(cls: ast.ClassDef) -> set[str]:
    """The constructors of a class and every method they reach through self."""
    methods = {s.name: s for s in cls.body if isinstance(s, FUNCTIONS)}
    keep = {n for n in CONSTRUCTORS if n in methods}
    todo = list(keep)
    while todo:
        for name in _self_calls([methods[todo.pop()]]) & methods.keys() - keep:
            keep.add(name)
            todo.append(name)
    return keep


def _has_future_annotations(tree: ast.Module) -> bool:
    return any(isinstance(s, ast.ImportFrom) and s.module == "__future__"
               and any(a.name == "annotations" for a in s.names) for s in tree.body)


# ------------------------------------------------------------ stubbing


def _docstring(node) -> list[ast.stmt]:
    first = node.body[0] if node.body else None
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
            and isinstance(first.value.value, str):
        return [first]
    return []


def _is_trivial(fn) -> bool:
    """A body with nothing to implement: `...`, `pass`, or already a NotImplementedError."""
    rest = fn.body[len(_docstring(fn)):]
    if not rest:
        return True
    if len(rest) != 1:
        return False
    s = rest[0]
    if isinstance(s, ast.Pass) or (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)
                                   and s.value.value is Ellipsis):
        return True
    return isinstance(s, ast.Raise) and "NotImplementedError" in ast.unparse(s)


class _Stubber:
    """Rewrites one module's tree into its scaffold."""

    def __init__(self, package: str, module: str, topic_of, p: Plan, solved: frozenset[str] | None = None):
        """solved: the topics whose bodies are kept (a scaffold --through them); None stubs every one."""
        self.package, self.module, self.topic_of, self.plan, self.solved = package, module, topic_of, p, solved
        self.stubs = 0

    def module_body(self, tree: ast.Module) -> list[ast.stmt]:
        body = []
        for stmt in tree.body:
            if isinstance(stmt, FUNCTIONS):
                if stmt.name in self.plan.verbatim or is_dunder(stmt.name):
                    body.append(stmt)  # module-level dunders (__getattr__, __dir__) are plumbing
                elif stmt.name in self.plan.keep:
                    body.append(self.stub(stmt, stmt.name))
            elif isinstance(stmt, ast.ClassDef):
                if stmt.name in self.plan.keep:
                    body.append(self.klass(stmt, stmt.name, self.plan.built.get(stmt.name, set())))
            else:
                body.append(stmt)
        return body

    def klass(self, cls: ast.ClassDef, qualname: str, verbatim: set[str]) -> ast.ClassDef:
        evaluated, _ = _class_evaluated(cls, True)
        needed = _names(evaluated)
        body = []
        for stmt in cls.body:
            if isinstance(stmt, FUNCTIONS):
                if stmt.name in verbatim:
                    body.append(stmt)
                elif self.keeps(stmt.name) or stmt.name in needed:
                    body.append(self.stub(stmt, f"{qualname}.{stmt.name}"))
            elif isinstance(stmt, ast.ClassDef):
                if self.keeps(stmt.name) or stmt.name in needed:
                    body.append(self.klass(stmt, f"{qualname}.{stmt.name}", set()))
            else:
                body.append(stmt)
        cls.body = body or [ast.Pass()]
        return cls

    def keeps(self, name: str) -> bool:
        """Whether a class member appears in the scaffold: public ones, and private ones --through a topic."""
        return self.solved is not None or not is_private(name)

    def is_solved(self, topic: str | None) -> bool:
        """Whether a body is kept: its topic is solved, or no topic claims it in a partial scaffold."""
        return self.solved is not None and (topic is None or topic in self.solved)

    def stub(self, fn, qualname: str):
        topic = self.topic_of(self.module, qualname, def_topic(fn))
        if _is_trivial(fn) or self.is_solved(topic):
            return fn
        self.stubs += 1
        where = f" (topic {topic})" if topic else ""
        prefix = f"{self.module}." if self.module else ""
        message = f"{self.package}: implement {prefix}{qualname}{where}"
        error = ast.Call(ast.Name("NotImplementedError", ast.Load()), [ast.Constant(message)], [])
        fn.body = [*_docstring(fn), ast.Raise(exc=error, cause=None)]
        return fn


# ---------------------------------------------------------------- topics


def spec_topics(spec_dir: Path | None) -> dict[str, str]:
    """'attention' and 'attention.sdpa' -> the first topic whose spec uses `impl.attention.sdpa`."""
    found: dict[str, str] = {}
    if spec_dir is None or not spec_dir.is_dir():
        return found
    for path in sorted(spec_dir.glob("day_*.py")):
        topic = topic_of_file(path.name)
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue  # a spec file being written; its topics just go unnamed
        for key in _impl_uses(tree) if topic else set():
            if key not in found or _order(topic) < _order(found[key]):
                found[key] = topic
    return found


def _impl_uses(tree: ast.AST) -> set[str]:
    """'mod' and 'mod.name' for each impl.mod.name the spec file uses, directly, through an alias
    of a module (`lk = impl.layer_kernels`, or a fixture `def norm(impl): return impl.norm`), or
    by name in a has-the-names table (`{"model": ["Embedding", "TransformerBlock"]}`). A chain
    into a sub-package gives each of its prefixes: impl.engine.scheduler.Scheduler gives 'engine',
    'engine.scheduler' and 'engine.scheduler.Scheduler'."""
    aliases: dict[str, list[str]] = {}

    def chain(node) -> list[str] | None:  # ["engine", "scheduler"] for impl.engine.scheduler
        attrs = []
        while isinstance(node, ast.Attribute):
            attrs.append(node.attr)
            node = node.value
        if not attrs or not isinstance(node, ast.Name):
            return None
        base = [] if node.id == "impl" else aliases.get(node.id)
        return None if base is None else [*base, *reversed(attrs)]

    for n in ast.walk(tree):
        if isinstance(n, ast.Assign) and (mod := chain(n.value)):
            aliases.update((t.id, mod) for t in n.targets if isinstance(t, ast.Name))
        elif isinstance(n, ast.FunctionDef) and len(body := n.body[len(_docstring(n)):]) == 1 \
                and isinstance(body[0], ast.Return) and (mod := chain(body[0].value)):
            aliases[n.name] = mod  # a fixture: its tests take it as a parameter of this name
    uses = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Attribute) and (names := chain(n)):
            uses.add(".".join(names))
        elif isinstance(n, ast.Dict):
            for key, value in zip(n.keys, n.values, strict=True):
                if isinstance(key, ast.Constant) and isinstance(key.value, str) \
                        and isinstance(value, (ast.List, ast.Tuple)):
                    uses.update(f"{key.value}.{e.value}" for e in value.elts
                                if isinstance(e, ast.Constant) and isinstance(e.value, str))
    return uses


def _order(topic: str) -> tuple[int, ...]:
    return tuple(int(p) for p in topic.split("."))


def def_topic(fn) -> str | None:
    """The topic a public function's or method's own docstring tags, when it names that one alone:
    "Chunked prefill (topic 2.7): ..." -> '2.7'; "the Metal one (topic 2.3) on a GPU" (a mention,
    not a tag) and "(topic 3.2); reads topic 3.1's pool" (two topics) -> None."""
    if is_private(fn.name):  # a helper belongs with its module or class
        return None
    doc = ast.get_docstring(fn) or ""
    tags = set(TOPIC_TAG.findall(doc))
    named = {t for m in NAMED_TOPICS.findall(doc) for t in re.findall(r"\d+\.\d+", m)}
    return next(iter(tags)) if len(tags) == 1 and named == tags and tags <= BY_ID.keys() else None


def _module_topic(tree: ast.Module) -> str | None:
    """A module-level `TOPIC = "1.3"`, else the one topic its docstring names ("(topic 1.5)")."""
    for s in tree.body:
        named = isinstance(s, ast.Assign) and "TOPIC" in _names(s.targets)
        if named and isinstance(s.value, ast.Constant) and isinstance(s.value.value, str):
            return s.value.value
    named = DOC_TOPICS.search(ast.get_docstring(tree) or "")
    ids = named.group(1).split(", ") if named else []
    return ids[0] if len(ids) == 1 else None  # "topics 1.1, 1.4": the spec has to tell


# ---------------------------------------------------------------- package


# Layers above the course's topics that a learner's package does not re-implement: the HTTP
# server (impl/server/) serves whichever engine it is given, and is not a topic of its own.
# Left out of a learner's package: the HTTP server (a layer above the engine) and week 4's training
# command and its M3 run (tools that run impl/, not exercises).
NOT_SCAFFOLDED = frozenset({"server", "train/cli.py", "train/__main__.py", "train/finetune.py"})


def _sources(src: Path) -> dict[Path, ast.Module]:
    trees = {}
    for path in sorted(src.rglob("*.py")):
        rel = path.relative_to(src)
        if "__pycache__" in rel.parts or rel.parts[0] in NOT_SCAFFOLDED or rel.as_posix() in NOT_SCAFFOLDED:
            continue
        try:
            trees[rel] = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (SyntaxError, UnicodeDecodeError) as e:
            raise ScaffoldError(f"{path}: cannot parse ({e})") from None
    if not trees:
        raise ScaffoldError(f"{src}: no Python modules to scaffold")
    return trees


def _imported_privates(trees: dict[Path, ast.Module], package: str) -> dict[str, set[str]]:
    """module -> its private names that other modules import by name."""
    wanted: dict[str, set[str]] = {}
    for rel, tree in trees.items():
        here = module_name(rel)
        base = here if rel.name == "__init__.py" else here.rpartition(".")[0]
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            target = _resolve(node, base, package)
            if target is not None:
                wanted.setdefault(target, set()).update(a.name for a in node.names if is_private(a.name))
    return wanted


def _resolve(node: ast.ImportFrom, base: str, package: str) -> str | None:
    if node.level == 0:
        mod = node.module or ""
        if mod == package:
            return ""
        return mod[len(package) + 1:] if mod.startswith(package + ".") else None
    parts = base.split(".") if base else []
    parts = parts[:len(parts) - (node.level - 1)] if node.level > 1 else parts
    return ".".join([*parts, *([node.module] if node.module else [])])


def build(src: Path, name: str, spec_dir: Path | None = None, solved: frozenset[str] | None = None) -> list[Module]:
    """The scaffold of package `src` renamed `name`, as Module texts (nothing written).

    solved: topic ids whose bodies are kept (with every private helper, and what no topic
    claims); None stubs every topic."""
    old, trees = src.resolve().name, _sources(src)
    wanted, topics = _imported_privates(trees, old), spec_topics(spec_dir)
    modules = []
    for rel, tree in trees.items():
        if is_infrastructure(rel, tree):
            text = rename_source((src / rel).read_text(encoding="utf-8"), old, name)
            modules.append(Module(rel, f"# Copied by tools/scaffold.py from {old}/{rel.as_posix()}:"
                                       f" infrastructure, not an exercise.\n{text}", copied=True))
        else:
            modules.append(_stub_module(tree, rel, old, name, wanted, topics, solved))
    return modules


def is_infrastructure(rel: Path, tree: ast.Module) -> bool:
    """INFRASTRUCTURE, or a sub-package's `__init__.py` that defines no function or class (it
    re-exports: `from impl.engine.llm import LLM`), so there is nothing in it to write."""
    if rel.as_posix() in INFRASTRUCTURE:
        return True
    return rel.name == "__init__.py" and len(rel.parts) > 1 and not any(isinstance(n, DEFS) for n in ast.walk(tree))


def topics_through(last: str) -> frozenset[str]:
    """The ids of the topics up to `last`, in course order ('1.7': week 1)."""
    if last not in BY_ID:
        raise ScaffoldError(f"{last!r} is not a topic id; they run {TOPICS[0].id} to {TOPICS[-1].id}")
    return frozenset(t.id for t in TOPICS if _order(t.id) <= _order(last))


def _stub_module(tree, rel: Path, old: str, name: str, wanted, topics, solved: frozenset[str] | None) -> Module:
    mod = module_name(rel)
    p = plan(tree, wanted.get(mod, set()), privates=solved is not None)
    fallback = _module_topic(tree) or topics.get(mod)

    def topic_of(module: str, qualname: str, tagged: str | None) -> str | None:
        """The rules of this file's docstring, in order: a function's spec use, its docstring's tag,
        its class's spec use, the module's topic."""
        top = qualname.split(".")[0]
        own = topics.get(f"{module}.{top}") if top == qualname else None
        return own or tagged or topics.get(f"{module}.{top}") or fallback

    stubber = _Stubber(name, mod, topic_of, p, solved)
    tree.body = stubber.module_body(tree)
    tree = ast.fix_missing_locations(rename_package(tree, old, name))
    bodies = "bodies raising NotImplementedError" if solved is None else \
        f"{old}'s bodies for topics {', '.join(sorted(solved, key=_order))}, the rest raising NotImplementedError"
    header = f"{HEADER} from {old}/{rel.as_posix()}: the signatures and docstrings, {bodies}.\n"
    kept = sorted(p.verbatim | {f"{c}.{m}" for c, ms in p.built.items() for m in ms})
    return Module(rel, header + format_module(rename_in_strings(tree, old, name)), stubber.stubs, kept=kept)


def rename_in_strings(tree: ast.Module, old: str, new: str) -> ast.Module:
    """Docstrings and messages that name the source package's modules (impl.norm.RMSNorm) name the
    learner's (mine.norm.RMSNorm), the package they read and write; code is left to the import renaming."""
    named = re.compile(rf"\b{re.escape(old)}\.(?=[a-z_])")
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            node.value = named.sub(f"{new}.", node.value)
    return tree


def format_module(tree: ast.Module) -> str:
    """ast.unparse, statement by statement, with PEP 8's blank lines around definitions."""
    text, prev = "", None
    for stmt in tree.body:
        kind = _kind(stmt, first=prev is None)
        if prev is not None:
            text += "\n\n\n" if "def" in (kind, prev) else "\n\n" if kind != prev else "\n"
        text += ast.unparse(ast.Module([stmt], type_ignores=[])).strip("\n")
        prev = kind
    return text + "\n"


def _kind(stmt: ast.stmt, first: bool) -> str:
    if first and _docstring(ast.Module([stmt], type_ignores=[])):
        return "docstring"
    if isinstance(stmt, DEFS):
        return "def"
    return "import" if isinstance(stmt, (ast.Import, ast.ImportFrom)) else "other"


def is_scaffold(folder: Path) -> bool:
    """Whether `folder` is a package this tool wrote: one of its modules starts with HEADER."""
    def first_line(path: Path) -> str:
        with path.open(encoding="utf-8", errors="replace") as f:
            return f.readline()

    return folder.is_dir() and any(first_line(p).startswith(HEADER) for p in folder.glob("*.py") if p.is_file())


def check_target(target: Path, force: bool) -> None:
    """Refuse to replace anything but a scaffold, and a scaffold without --force."""
    if target.exists() and not is_scaffold(target):
        raise ScaffoldError(f"{target} exists and is not a scaffold (no module starts with {HEADER!r});"
                            " --force replaces only a scaffold, so choose another name")
    if target.exists() and not force:
        raise ScaffoldError(f"{target}/ exists; pass --force to replace it")


def write(modules: list[Module], target: Path, force: bool) -> None:
    """Write the package to `target` through a temporary directory renamed at the end."""
    check_target(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.scaffold-", dir=target.parent))
    try:
        for m in modules:
            (tmp / m.path).parent.mkdir(parents=True, exist_ok=True)
            (tmp / m.path).write_text(m.text, encoding="utf-8")
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.rename(tmp, target)
        return
    old = tmp.with_name(tmp.name + ".old")
    os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old)


def check_name(name: str, src: Path, target: Path) -> None:
    """Refuse names that cannot be a package, or that would shadow a project directory or another module."""
    if not name.isidentifier() or keyword.iskeyword(name):
        raise ScaffoldError(f"{name!r} is not a Python identifier; choose a package name like 'mine'")
    if name in RESERVED:
        raise ScaffoldError(f"{name!r} is a directory of this project; choose another name")
    if not src.is_dir():
        raise ScaffoldError(f"{src}/ is not a directory")
    if target.resolve() == src.resolve():
        raise ScaffoldError(f"{name!r} is the source package itself")
    # The spec's environment, once nox has built it (the tool itself may run in nox's own Python,
    # whose packages the spec never sees); this Python before that.
    found = _found_at(name, str(SPEC_PYTHON), target.parent) if SPEC_PYTHON.exists() else None
    if found is None:
        found = _found_at(name, sys.executable, target.parent) or []
    other = [w for w in found if Path(w).resolve() != target.resolve()]
    if other:  # the spec would import that instead, or both: `import torch.nn` fails
        raise ScaffoldError(f"{name!r} is already importable ({other[0]}); choose another name")


def _found_at(name: str, python: str, cwd: Path) -> list[str] | None:
    """Where `python`, started in `cwd` (as pytest is, in the project), finds the module `name`;
    None if that Python could not be asked."""
    try:
        r = subprocess.run([python, "-c", WHERE, name], cwd=cwd if cwd.is_dir() else None,
                           capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return [line for line in r.stdout.splitlines() if line] if r.returncode == 0 else None


def report(modules: list[Module], src: Path, target: Path, through: str | None = None) -> str:
    """What was written and what to do next, for the terminal."""
    stubs = sum(m.stubs for m in modules)
    solved = f"; {src}/'s code kept for the topics up to {through}" if through else ""
    lines = [f"wrote {target}/ from {src}/: {len(modules)} modules, {stubs} functions to implement{solved}"]
    for m in modules:
        what = "copied (infrastructure)" if m.copied else f"{m.stubs} function{'s' * (m.stubs != 1)}"
        if m.kept:
            what += "; kept verbatim, needed at import: " + ", ".join(m.kept)
        lines.append(f"  {(target / m.path).as_posix():<32} {what}")
    later = [t for t in TOPICS if t.spec_file and (through is None or _order(t.id) > _order(through))]
    if later:
        lines.append(f"next: nox -s week{week_of(later[0].id)} -- --impl={target.name}")
    else:
        lines.append(f"every specified topic up to {through} is kept from {src}/: nothing left to check yet")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: python -m tools.scaffold NAME [--from impl] [--into DIR] [--through X.Y] [--force]."""
    parser = argparse.ArgumentParser(prog="python -m tools.scaffold", description=__doc__.split("\n")[0])
    parser.add_argument("name", help="the package to write, e.g. mine")
    parser.add_argument("--from", dest="src", default=Path("impl"), type=Path,
                        help="the package to take signatures from (default: impl)")
    parser.add_argument("--into", type=Path, help="where NAME/ goes (default: beside the source)")
    parser.add_argument("--spec", type=Path, help="spec dir naming topics (default: beside the source)")
    parser.add_argument("--through", metavar="X.Y", help="keep the source's code for the topics up to X.Y"
                        " (e.g. 1.7: start at week 2 with impl's week 1); stub only the later ones")
    parser.add_argument("--force", action="store_true", help="replace an existing NAME/ that this tool wrote")
    args = parser.parse_args(argv)
    src = args.src
    target = (args.into or src.parent) / args.name
    try:
        check_name(args.name, src, target)
        check_target(target, args.force)
        solved = topics_through(args.through) if args.through else None
        modules = build(src, args.name, args.spec or src.resolve().parent / "spec", solved)
        write(modules, target, args.force)
    except ScaffoldError as e:
        print(f"scaffold: error: {e}", file=sys.stderr)
        return 2
    print(report(modules, src, target, args.through))
    return 0


if __name__ == "__main__":
    sys.exit(main())
