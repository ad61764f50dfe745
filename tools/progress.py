"""Render PROGRESS.md from the specification's JUnit XML results, never by hand.

    python -m tools.progress --junit build/week1.xml [--junit build/week2.xml ...]
                             [--collected FILE] [--impl NAME] [--out PROGRESS.md]

Results merge across runs, test by test. Each test keeps the outcome of the
last run that ran it, so running one test (`-- spec/day_1_1_attention.py::test_linear`,
`-k softmax`, `-x`) updates that test and leaves the rest of its topic as it was.
A topic is complete when every one of its tests has passed; a test never run
counts as not passed. --collected (the output of `pytest --collect-only -q`, which
the nox sessions write) names every test of the topics a run touched, so a partial
run still counts against all of them. That memory lives in PROGRESS.md itself, in
an HTML comment block (invisible when rendered), one JSON object per package and topic:

    <!-- spec-results v2 (read back by tools/progress.py; do not edit)
    {"impl": "impl", "topic": "1.1", "when": "...", "passed": ["test_linear", ...], "failed": [...]}
    -->

The table shows one package (a table mixing two implementations would describe
neither): --impl, else the one the newest JUnit file recorded (the spec records it).
Other packages' results are kept in the block and shown again when they are checked.

The learner owns the Hours, Mastery and Notes cells of each topic row and all
text below NOTES_MARKER; both are read back and written again unchanged.
PROGRESS.md is written to a temporary file and moved into place, so a bad
input never leaves it half-written or changed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from spec.curriculum import BY_ID, TOPICS, Topic, topic_of_file, week_of

NOTES_MARKER = "<!-- your notes below survive regeneration -->"
STATE_BEGIN = "<!-- spec-results v2 (read back by tools/progress.py; do not edit)"
STATE_ANY = re.compile(r"<!-- spec-results v(\d+)")
STATE_END = "-->"
WEEK_TITLES = {1: "From Matmul to Text", 2: "Tiny vLLM", 3: "Advanced Serving", 4: "Training an LLM from Scratch"}
TOPIC_COLUMNS = ("Id", "Topic", "Status", "Tests passed", "Checked against", "When",
                 "Hours", "Mastery", "Notes")
LEARNER_DEFAULT = ("0", "-", "")
GPU_SKIP = re.compile(r"\bgpu\b", re.IGNORECASE)
OUTCOMES = ("passed", "failed", "skipped", "gpu_skipped", "not_run")
COLLECTING = "collecting "  # + the module: the name of a spec file's collection error


class ProgressError(Exception):
    """An input that cannot be used; the message names the file."""


@dataclass
class Result:
    """One topic's tests, each with the outcome of the last run that ran it."""

    impl: str = "impl"
    # test name -> passed, failed (failures and errors), skipped (for any reason but a missing
    # GPU), gpu_skipped, or not_run (collected, never run)
    tests: dict[str, str] = field(default_factory=dict)
    when: str = ""  # YYYY-MM-DD HH:MM UTC of the last run that ran one of them
    # Tests marked `presence` (the names exist, the clone's kernels are built): a fresh scaffold
    # passes them, so they do not make a topic started.
    presence: set[str] = field(default_factory=set)

    def count(self, outcome: str) -> int:
        return sum(o == outcome for o in self.tests.values())

    passed = property(lambda self: self.count("passed"))
    gpu_skipped = property(lambda self: self.count("gpu_skipped"))
    not_run = property(lambda self: self.count("not_run"))
    total = property(lambda self: len(self.tests))
    # The spec file did not import (read_junit names its collection error so): none of its tests ran.
    unrunnable = property(lambda self: any(t.startswith(COLLECTING) for t in self.tests))

    def started(self) -> bool:
        """Whether a test passed that a fresh scaffold would not pass."""
        return any(o == "passed" and t not in self.presence for t, o in self.tests.items())


@dataclass
class Previous:
    """What an existing PROGRESS.md carries over: results, learner cells, notes."""

    results: dict[tuple[str, str], Result] = field(default_factory=dict)  # (package, topic) ->
    shown: str | None = None  # the package its tables show
    learner: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    notes: str = ""


# ---------------------------------------------------------------- JUnit input


def read_junit(path: Path, impl: str) -> dict[str, Result]:
    """Per-topic results of one `pytest --junitxml` file."""
    root = _parse_xml(path)
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    outcomes: dict[tuple[str, str], tuple[str, str, str]] = {}  # (class, name) -> (topic, outcome, when)
    presence: set[tuple[str, str]] = set()
    for suite in suites:
        when = _suite_time(suite, path)
        for case in suite.iter("testcase"):
            topic = _topic_of_case(case)
            if topic is None:
                continue
            key = (case.get("classname", ""), case.get("name", ""))
            outcome = _outcome(case)
            if any(p.get("name") == "presence" for p in case.iter("property")):
                presence.add(key)
            if key in outcomes and _rank(outcomes[key][1]) > _rank(outcome):
                continue  # a duplicate entry (e.g. a teardown error): the worst wins
            outcomes[key] = (topic, outcome, when)
    results: dict[str, Result] = {}
    for key, (topic, outcome, when) in outcomes.items():
        r = results.setdefault(topic, Result(impl=impl, when=when))
        r.tests[key[1] if key[0] else COLLECTING + key[1]] = outcome  # no class name: a collection error
        r.when = max(r.when, when)
        if key in presence:
            r.presence.add(key[1])
    return results


def read_collected(path: Path) -> dict[str, list[str]]:
    """Topic -> the names of all its tests, from `pytest --collect-only -q` output
    (`spec/day_1_1_attention.py::test_linear`, one a line)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ProgressError(f"{path}: cannot read ({e.strerror})") from None
    collected: dict[str, list[str]] = {}
    for line in lines:
        file, sep, name = line.strip().partition("::")
        topic = topic_of_file(Path(file).name) if sep else None
        if topic:  # the test's name as JUnit gives it: a class (Class::test) drops, a parameter id stays whole
            function, bracket, params = name.partition("[")
            collected.setdefault(topic, []).append(function.rpartition("::")[2] + bracket + params)
    return collected


def recorded_impl(path: Path) -> str | None:
    """The package a JUnit file's run checked (spec/conftest.py records it), if it says."""
    for prop in _parse_xml(path).iter("property"):
        if prop.get("name") == "impl":
            return prop.get("value")
    return None


def _parse_xml(path: Path) -> ET.Element:
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise ProgressError(f"{path}: no such file (write it with pytest --junitxml={path})") from None
    except OSError as e:
        raise ProgressError(f"{path}: cannot read ({e.strerror})") from None
    except ET.ParseError as e:
        raise ProgressError(f"{path}: not well-formed XML ({e})") from None
    if root.tag not in ("testsuites", "testsuite"):
        raise ProgressError(f"{path}: not JUnit XML (root element <{root.tag}>)")
    return root


def _suite_time(suite: ET.Element, path: Path) -> str:
    stamp = suite.get("timestamp")
    try:
        when = datetime.fromisoformat(stamp) if stamp else None
    except ValueError:
        when = None
    if when is None:
        when = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
    return when.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")  # naive = local time


def _topic_of_case(case: ET.Element) -> str | None:
    for prop in case.iter("property"):
        if prop.get("name") == "topic" and prop.get("value") in BY_ID:
            return prop.get("value")
    # A collection error (the spec file does not import) has no class name: its name is the module's.
    for part in (case.get("classname") or case.get("name", "")).split("."):
        topic = topic_of_file(part + ".py")
        if topic:
            return topic
    return None


def _outcome(case: ET.Element) -> str:
    if case.find("failure") is not None or case.find("error") is not None:
        return "failed"
    skip = case.find("skipped")
    if skip is not None:
        return "gpu_skipped" if GPU_SKIP.search(skip.get("message", "")) else "skipped"
    return "passed"


def _rank(outcome: str) -> int:
    return ("passed", "gpu_skipped", "skipped", "failed").index(outcome)


# ------------------------------------------------------- existing PROGRESS.md


def read_previous(path: Path) -> Previous:
    """Results, learner cells and notes carried by an existing PROGRESS.md."""
    if not path.exists():
        return Previous()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ProgressError(f"{path}: not UTF-8; fix or move it, then run again") from None
    generated, marker, notes = text.partition(NOTES_MARKER)
    shown = re.search(r"^- Implementation checked: `([^`]+)`", generated, re.M)
    return Previous(_read_state(generated, path), shown and shown.group(1), _read_learner(generated),
                    notes if marker else "")


def _read_state(text: str, path: Path) -> dict[tuple[str, str], Result]:
    found = STATE_ANY.search(text)
    if found is None:
        return {}
    if not text.startswith(STATE_BEGIN, found.start()):  # v1 kept counts, not tests: nothing to merge into
        print(f"progress: {path}: results in an older format (v{found.group(1)}) are replaced by this run's",
              file=sys.stderr)
        return {}
    body = text[found.start() + len(STATE_BEGIN):].split(STATE_END, 1)[0]
    results = {}
    for line in filter(None, (ln.strip() for ln in body.splitlines())):
        try:
            row = json.loads(line)
            tests = {name: outcome for outcome in OUTCOMES for name in row.get(outcome, [])}
            results[row["impl"], row["topic"]] = Result(row["impl"], tests, row.get("when", ""),
                                                        set(row.get("presence", [])))
        except (ValueError, TypeError, KeyError, AttributeError):
            print(f"progress: warning: {path}: unreadable results line ignored: {line[:60]}",
                  file=sys.stderr)
    return {k: r for k, r in results.items() if k[1] in BY_ID}


def _read_learner(text: str) -> dict[str, tuple[str, str, str]]:
    learner, columns = {}, None
    for line in text.splitlines():
        if not line.lstrip().startswith("|"):
            columns = None
            continue
        cells = [c.strip() for c in _split_row(line)]
        if {"Hours", "Mastery", "Notes"} <= set(cells):
            columns = (cells.index("Hours"), cells.index("Mastery"), cells.index("Notes"))
        elif columns and cells[0] in BY_ID and len(cells) > columns[2]:
            hours, mastery, notes = columns
            learner[cells[0]] = (cells[hours], cells[mastery], "|".join(cells[notes:]).strip())
    return learner


def _split_row(line: str) -> list[str]:
    s = line.strip()[1:]
    if s.endswith("|") and not s.endswith("\\|"):
        s = s[:-1]
    return re.split(r"(?<!\\)\|", s)


# ------------------------------------------------------------------- status


def status_of(topic: Topic, results: dict[str, Result]) -> str:
    """The status words of one topic, given every topic's results."""
    r = results.get(topic.id)
    if r is None and topic.spec_file is None:
        return "not specified yet"
    if _complete(topic, results):
        return "complete"
    if _needs_gpu(topic, r):
        return "needs a GPU"
    blockers = [p for p in topic.prerequisites if not _complete(BY_ID[p], results)]
    if blockers:
        return "blocked by " + ", ".join(blockers)
    if r is None or not r.started():
        return "not started"
    return f"in progress ({r.passed} of {r.total})"


def _complete(topic: Topic, results: dict[str, Result]) -> bool:
    r = results.get(topic.id)
    return r is not None and r.total > 0 and r.passed == r.total


def _needs_gpu(topic: Topic, r: Result | None) -> bool:
    # All that could run passed and the rest was skipped for want of a GPU,
    # or a GPU topic that has never been run.
    if r is None or r.total == 0:
        return topic.needs_gpu
    return r.gpu_skipped > 0 and r.passed + r.gpu_skipped == r.total


# ------------------------------------------------------------------ render


def render(results: dict[str, Result], state: dict[tuple[str, str], Result], prev: Previous, impl: str,
           sources: list[str]) -> str:
    """The whole of PROGRESS.md: `impl`'s results in the tables, every package's in the state block."""
    lines = ["# Progress", "",
             "Generated by `nox -s progress` from spec results; edit only Hours, Mastery, Notes"
             " and the notes section.", ""]
    lines += _header(results, impl, sources)
    lines += ["## Overall", ""] + _overall_table(results) + [""]
    for week in sorted(WEEK_TITLES):
        lines += [f"## Week {week}: {WEEK_TITLES[week]}", ""]
        lines += _week_table(week, results, prev.learner) + [""]
    lines += _state_block(state) + [""]
    lines += ["## Notes", "", "Everything below the next line is yours: it survives regeneration.",
              "", NOTES_MARKER]
    return "\n".join(lines) + (prev.notes or "\n")  # the notes start after the marker


def _header(results: dict[str, Result], impl: str, sources: list[str]) -> list[str]:
    last = max((r.when for r in results.values()), default="never")
    return [f"- Implementation checked: `{impl}`",
            f"- Last run: {last}" + (f" (this update read {', '.join(sources)})" if sources else ""),
            "- Status: complete (every test passed, in the last run that ran it); in progress (k of n"
            " tests pass; a test not run yet is not a pass); not started (none passed but the names and"
            " built-kernel checks); blocked by X.Y (a prerequisite is not complete); needs a GPU (its tests skip on"
            " this machine); not specified yet (no spec file)",
            ""]


def _overall_table(results: dict[str, Result]) -> list[str]:
    rows = ["| Week | Topics complete | Tests passed |", "| --- | --- | --- |"]
    for week in sorted(WEEK_TITLES):
        topics = [t for t in TOPICS if week_of(t.id) == week]
        complete, passed = _totals(topics, results)
        rows.append(f"| Week {week}: {WEEK_TITLES[week]} | {complete} | {passed} |")
    complete, passed = _totals(TOPICS, results)
    rows.append(f"| **Total** | **{complete}** | **{passed}** |")
    return rows


def _totals(topics, results: dict[str, Result]) -> tuple[str, str]:
    done = sum(_complete(t, results) for t in topics)
    ran = [results[t.id] for t in topics if t.id in results]
    passed, total = sum(r.passed for r in ran), sum(r.total for r in ran)
    gpu = sum(r.gpu_skipped for r in ran)  # what this machine cannot pass: say so, not just a shortfall
    return f"{done} of {len(topics)}", f"{passed} of {total}" + (f" ({gpu} need a GPU)" if gpu else "")


def _week_table(week: int, results: dict[str, Result], learner) -> list[str]:
    rows = ["| " + " | ".join(TOPIC_COLUMNS) + " |", "|" + " --- |" * len(TOPIC_COLUMNS)]
    for t in TOPICS:
        if week_of(t.id) != week:
            continue
        r = results.get(t.id)
        tests = f"{r.passed} of {r.total}" + (f" ({r.not_run} not run)" if r.not_run else "") if r else "-"
        cells = [t.id, t.title, status_of(t, results), tests, t.checked_against or "-",
                 (r.when if r else "") or "-", *learner.get(t.id, LEARNER_DEFAULT)]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def _state_block(results: dict[tuple[str, str], Result]) -> list[str]:
    lines = []
    for impl, topic in sorted(results, key=lambda k: (k[0], _order(k[1]))):
        r = results[impl, topic]
        by_outcome = {o: [t for t, got in r.tests.items() if got == o] for o in OUTCOMES}
        row = {"impl": impl, "topic": topic, "when": r.when, **{o: names for o, names in by_outcome.items() if names},
               **({"presence": sorted(r.presence)} if r.presence else {})}
        lines.append(json.dumps(row).replace(">", "\\u003e"))  # a test id with "-->" must not end the comment
    return [STATE_BEGIN, *lines, STATE_END]


def _order(topic_id: str) -> tuple[int, ...]:
    return tuple(int(p) for p in topic_id.split("."))


# -------------------------------------------------------------------- main


def merge(before: Result | None, run: Result, names: list[str] | None) -> Result:
    """`before` updated with a run's outcomes, test by test. names: all the topic's tests (from a
    collection), or None (then the tests known before and those the run ran)."""
    before = before or Result(impl=run.impl)
    names = list(names if names is not None else before.tests)
    names += [t for t in run.tests if t not in names]
    earlier = {} if run.unrunnable else before.tests  # a file that does not import ran none of them
    tests = {t: run.tests.get(t) or earlier.get(t) or "not_run" for t in names}
    return Result(run.impl, tests, run.when if run.tests else before.when, (run.presence | before.presence) & set(tests))


def update(junit: list[Path], impl: str | None, out: Path,
           collected: Path | None = None) -> tuple[dict[str, Result], str]:
    """Merge the given runs (none: a re-render) into `out`'s results and rewrite it; returns the
    package's results and name."""
    recorded = {path: recorded_impl(path) for path in junit}
    prev = read_previous(out)
    if not junit and not prev.results:
        raise ProgressError(f"{out} holds no results to render yet: run the spec first (nox -s week1)")
    # The newest file that says, else the package PROGRESS.md shows (a re-render), else impl.
    impl = impl or next((recorded[p] for p in reversed(junit) if recorded[p]), None) or prev.shown or "impl"
    every = read_collected(collected) if collected else {}
    state = dict(prev.results)
    for path in junit:  # in order: a later file's outcomes win
        if recorded[path] not in (None, impl):
            print(f"progress: {path} checked {recorded[path]!r}, not {impl!r}; left out", file=sys.stderr)
            continue
        for topic, run in read_junit(path, impl).items():
            state[impl, topic] = merge(state.get((impl, topic)), run, every.get(topic))
    for topic, names in every.items():  # topics collected but not reached (-x): their test list
        state[impl, topic] = merge(state.get((impl, topic)), Result(impl=impl), names)
    others = sorted({i for i, _ in state} - {impl})
    if others:
        print(f"progress: PROGRESS.md shows {impl!r}; the results of {', '.join(map(repr, others))} are kept"
              " and come back when it is checked again", file=sys.stderr)
    results = {topic: r for (i, topic), r in state.items() if i == impl}
    shown = [os.path.relpath(p, out.resolve().parent) for p in junit]  # no machine's paths in the file
    _write_atomically(out, render(results, state, prev, impl, shown))
    return results, impl


def _write_atomically(out: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    """Command line: python -m tools.progress [--junit FILE ...] [--collected FILE] [--impl NAME]."""
    parser = argparse.ArgumentParser(prog="python -m tools.progress", description=__doc__.split("\n")[0])
    parser.add_argument("--junit", action="append", default=[], type=Path,
                        help="JUnit XML written by pytest --junitxml (repeatable; later files win); none:"
                        " render PROGRESS.md again from the results it holds")
    parser.add_argument("--collected", type=Path, help="`pytest --collect-only -q` output: every test of the"
                        " topics run, so that a partial run counts against all of them")
    parser.add_argument("--impl", help="the package the spec checked (default: the one the newest --junit file"
                        " recorded, else the one PROGRESS.md shows, else impl)")
    parser.add_argument("--out", default=Path("PROGRESS.md"), type=Path, help="default: PROGRESS.md")
    args = parser.parse_args(argv)
    try:
        results, impl = update(args.junit, args.impl, args.out, args.collected)
    except ProgressError as e:
        print(f"progress: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"progress: error: cannot write {args.out}: {e.strerror}", file=sys.stderr)
        return 1
    done, passed = _totals(TOPICS, results)
    print(f"wrote {args.out}: {done} topics complete, {passed} tests passed ({impl})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
