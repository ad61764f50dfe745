"""Render PROGRESS.md from the specification's JUnit XML results, never by hand.

    python -m tools.progress --junit build/week1.xml [--junit build/week2.xml ...]
                             [--impl NAME] [--out PROGRESS.md]

Results merge across runs. Each --junit file (in the order given) replaces the
results of the topics it contains; every other topic keeps the result it had in
the existing PROGRESS.md. That memory lives in PROGRESS.md itself, in an HTML
comment block (invisible when rendered) with one JSON object per topic:

    <!-- spec-results v1 (read back by tools/progress.py; do not edit)
    {"topic": "1.1", "impl": "impl", "passed": 12, "failed": 0, ...}
    -->

Results recorded for another --impl package are dropped, not merged: a table
mixing two implementations would describe neither. The spec records the package
it checked in its JUnit file; without --impl, the newest file's package is the one.

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
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from spec.curriculum import BY_ID, TOPICS, Topic, topic_of_file, week_of

NOTES_MARKER = "<!-- your notes below survive regeneration -->"
STATE_BEGIN = "<!-- spec-results v1 (read back by tools/progress.py; do not edit)"
STATE_END = "-->"
WEEK_TITLES = {1: "From Matmul to Text", 2: "Tiny vLLM", 3: "Advanced Serving"}
TOPIC_COLUMNS = ("Id", "Topic", "Status", "Tests passed", "Checked against", "When",
                 "Hours", "Mastery", "Notes")
LEARNER_DEFAULT = ("0", "-", "")
GPU_SKIP = re.compile(r"\bgpu\b", re.IGNORECASE)


class ProgressError(Exception):
    """An input that cannot be used; the message names the file."""


@dataclass
class Result:
    """One topic's test outcomes from one run."""

    impl: str = "impl"
    passed: int = 0
    failed: int = 0  # failures and errors
    skipped: int = 0  # skipped for any reason but a missing GPU
    gpu_skipped: int = 0
    when: str = ""  # YYYY-MM-DD HH:MM UTC of the run

    @property
    def total(self) -> int:
        return self.passed + self.failed + self.skipped + self.gpu_skipped


@dataclass
class Previous:
    """What an existing PROGRESS.md carries over: results, learner cells, notes."""

    results: dict[str, Result] = field(default_factory=dict)
    learner: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    notes: str = ""


# ---------------------------------------------------------------- JUnit input


def read_junit(path: Path, impl: str) -> dict[str, Result]:
    """Per-topic results of one `pytest --junitxml` file."""
    root = _parse_xml(path)
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    outcomes: dict[tuple[str, str], tuple[str, str, str]] = {}  # (class, name) -> (topic, outcome, when)
    for suite in suites:
        when = _suite_time(suite, path)
        for case in suite.iter("testcase"):
            topic = _topic_of_case(case)
            if topic is None:
                continue
            key = (case.get("classname", ""), case.get("name", ""))
            outcome = _outcome(case)
            if key in outcomes and _rank(outcomes[key][1]) > _rank(outcome):
                continue  # a duplicate entry (e.g. a teardown error): the worst wins
            outcomes[key] = (topic, outcome, when)
    results: dict[str, Result] = {}
    for topic, outcome, when in outcomes.values():
        r = results.setdefault(topic, Result(impl=impl, when=when))
        setattr(r, outcome, getattr(r, outcome) + 1)
        r.when = max(r.when, when)
    return results


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
    for part in case.get("classname", "").split("."):
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
    return Previous(_read_state(generated, path), _read_learner(generated),
                    notes if marker else "")


def _read_state(text: str, path: Path) -> dict[str, Result]:
    start = text.find(STATE_BEGIN)
    if start < 0:
        return {}
    body = text[start + len(STATE_BEGIN):].split(STATE_END, 1)[0]
    results = {}
    for line in filter(None, (ln.strip() for ln in body.splitlines())):
        try:
            row = json.loads(line)
            topic = row.pop("topic")
            results[topic] = Result(**row)
        except (ValueError, TypeError, KeyError):
            print(f"progress: warning: {path}: unreadable results line ignored: {line[:60]}",
                  file=sys.stderr)
    return {t: r for t, r in results.items() if t in BY_ID}


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
    if r is None or r.passed == 0:
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


def render(results: dict[str, Result], prev: Previous, impl: str, sources: list[Path]) -> str:
    """The whole of PROGRESS.md."""
    lines = ["# Progress", "",
             "Generated by `nox -s progress` from spec results; edit only Hours, Mastery, Notes"
             " and the notes section.", ""]
    lines += _header(results, impl, sources)
    lines += ["## Overall", ""] + _overall_table(results) + [""]
    for week in sorted(WEEK_TITLES):
        lines += [f"## Week {week}: {WEEK_TITLES[week]}", ""]
        lines += _week_table(week, results, prev.learner) + [""]
    lines += _state_block(results) + [""]
    lines += ["## Notes", "", "Everything below the next line is yours: it survives regeneration.",
              "", NOTES_MARKER]
    return "\n".join(lines) + (prev.notes or "\n")  # the notes start after the marker


def _header(results: dict[str, Result], impl: str, sources: list[Path]) -> list[str]:
    last = max((r.when for r in results.values()), default="never")
    return [f"- Implementation checked: `{impl}`",
            f"- Last run: {last} (this update read {', '.join(str(s) for s in sources)})",
            "- Status: complete; in progress (k of n tests pass); not started; blocked by X.Y"
            " (a prerequisite is not complete); needs a GPU (its tests skip on this machine);"
            " not specified yet (no spec file)",
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
    return f"{done} of {len(topics)}", f"{passed} of {total}"


def _week_table(week: int, results: dict[str, Result], learner) -> list[str]:
    rows = ["| " + " | ".join(TOPIC_COLUMNS) + " |", "|" + " --- |" * len(TOPIC_COLUMNS)]
    for t in TOPICS:
        if week_of(t.id) != week:
            continue
        r = results.get(t.id)
        tests = f"{r.passed} of {r.total}" if r else "-"
        cells = [t.id, t.title, status_of(t, results), tests, t.checked_against or "-",
                 r.when if r else "-", *learner.get(t.id, LEARNER_DEFAULT)]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def _state_block(results: dict[str, Result]) -> list[str]:
    lines = [json.dumps({"topic": t, **asdict(results[t])}) for t in sorted(results, key=_order)]
    return [STATE_BEGIN, *lines, STATE_END]


def _order(topic_id: str) -> tuple[int, ...]:
    return tuple(int(p) for p in topic_id.split("."))


# -------------------------------------------------------------------- main


def update(junit: list[Path], impl: str | None, out: Path) -> tuple[dict[str, Result], str]:
    """Merge the given runs into `out`'s results and rewrite it; returns the results and the package.
    impl None: the package the last file recorded (else "impl")."""
    recorded = {path: recorded_impl(path) for path in junit}
    impl = impl or recorded[junit[-1]] or "impl"
    prev = read_previous(out)
    results = {t: r for t, r in prev.results.items() if r.impl == impl}
    if len(results) < len(prev.results):
        print(f"progress: results recorded for another package than {impl!r} were dropped",
              file=sys.stderr)
    for path in junit:  # a later file replaces the topics it contains
        if recorded[path] not in (None, impl):
            print(f"progress: {path} checked {recorded[path]!r}, not {impl!r}; left out", file=sys.stderr)
            continue
        results.update(read_junit(path, impl))
    _write_atomically(out, render(results, prev, impl, junit))
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
    """Command line: python -m tools.progress --junit FILE [--junit FILE ...]."""
    parser = argparse.ArgumentParser(prog="python -m tools.progress", description=__doc__.split("\n")[0])
    parser.add_argument("--junit", action="append", required=True, type=Path,
                        help="JUnit XML written by pytest --junitxml (repeatable; later files win)")
    parser.add_argument("--impl", help="the package the spec checked (default: the one the last --junit file"
                        " recorded, else impl)")
    parser.add_argument("--out", default=Path("PROGRESS.md"), type=Path, help="default: PROGRESS.md")
    args = parser.parse_args(argv)
    try:
        results, impl = update(args.junit, args.impl, args.out)
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
