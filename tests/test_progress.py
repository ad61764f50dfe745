"""tools/progress.py: PROGRESS.md from synthetic JUnit XML."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from xml.sax.saxutils import quoteattr

import pytest

from spec.curriculum import TOPICS, Topic
from tools.progress import NOTES_MARKER, Result, main, status_of

ROOT = Path(__file__).resolve().parents[1]
GPU_SKIP = "needs a GPU (Metal or CUDA); this machine has none"


MODULES = {"1.1": "day_1_1_attention", "1.2": "day_1_2_rope", "1.3": "day_1_3_gqa", "1.4": "day_1_4_norm_mlp",
           "1.5": "day_1_5_model", "1.6": "day_1_6_generate", "1.7": "day_1_7_sampling",
           "2.1": "day_2_1_kv_cache", "2.6": "day_2_6_continuous_batching", "2.7": "day_2_7_chunked_prefill",
           "3.1": "day_3_1_paged_kv_cache", "3.2": "day_3_2_paged_attention"}


def case(topic: str, outcome: str = "passed", *, prop: bool = True, message: str = "", name: str = "",
         presence: bool = False) -> str:
    """One <testcase> (a new test's name unless `name` is given); the class name follows the
    topic's spec file, and the properties are spec/conftest.py's, as pytest writes them."""
    module = MODULES[topic]
    props = "".join([f'<property name="topic" value="{topic}"/>'] * prop + ['<property name="presence" value="1"/>'] * presence)
    props = f"<properties>{props}</properties>" if props else ""
    body = {"passed": "", "failed": '<failure message="assert 0">E assert 0</failure>',
            "error": '<error message="failed on setup">E boom</error>',
            "skipped": f'<skipped type="pytest.skip" message={quoteattr(message)}>skip</skipped>'}[outcome]
    case.n += 1
    name = quoteattr(name or f"test_{case.n}")
    return f'<testcase classname="spec.{module}" name={name} time="0.01">{props}{body}</testcase>'


case.n = 0


def junit(path: Path, cases: list[str], stamp: str = "2025-03-04T05:06:07.123456+00:00",
          impl: str | None = None) -> Path:
    """A pytest JUnit file; impl: the package it records having checked (spec/conftest.py does)."""
    props = f'<properties><property name="impl" value="{impl}"/></properties>' if impl else ""
    path.write_text('<?xml version="1.0" encoding="utf-8"?><testsuites name="pytest tests">'
                    f'<testsuite name="pytest" timestamp="{stamp}">{props}{"".join(cases)}</testsuite>'
                    "</testsuites>", encoding="utf-8")
    return path


def rows(text: str) -> dict[str, list[str]]:
    """Topic id -> the cells of its row."""
    out = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0][:1].isdigit():
            out[cells[0]] = cells
    return out


def run(tmp_path: Path, *files: Path, impl: str | None = None, collected: Path | None = None) -> str:
    out = tmp_path / "PROGRESS.md"
    args = [a for f in files for a in ("--junit", str(f))] + ["--out", str(out)]
    args += ["--impl", impl] if impl else []
    assert main(args + (["--collected", str(collected)] if collected else [])) == 0
    return out.read_text(encoding="utf-8")


def listing(path: Path, tests: dict[str, list[str]]) -> Path:
    """What `pytest --collect-only -q` prints for these tests (topic -> names)."""
    lines = [f"spec/{MODULES[t]}.py::{name}" for t, names in tests.items() for name in names]
    path.write_text("\n".join(lines) + f"\n\n{len(lines)} tests collected in 0.5s\n", encoding="utf-8")
    return path


def result(**outcomes: int) -> Result:
    """A topic's Result with that many tests of each outcome (passed=2, gpu_skipped=1, ...)."""
    return Result(tests={f"test_{o}_{i}": o for o, n in outcomes.items() for i in range(n)})


@pytest.fixture
def week1(tmp_path: Path) -> Path:
    return junit(tmp_path / "week1.xml", [
        case("1.1"), case("1.1"), case("1.1"),
        case("1.2", name="test_r"), case("1.2", "failed", name="test_s"),
        case("1.3", "failed"), case("1.3", "error"),
        case("1.4", prop=False),  # no topic property: the class name says 1.4
        case("1.7", "skipped", message=GPU_SKIP), case("1.7", "skipped", message=GPU_SKIP),
    ])


def test_statuses(tmp_path, week1):
    r = rows(run(tmp_path, week1))
    status = {t: cells[2] for t, cells in r.items()}
    assert status["1.1"] == "complete", r["1.1"]
    assert status["1.2"] == "in progress (1 of 2)", r["1.2"]
    assert status["1.3"] == "blocked by 1.2", r["1.3"]  # 1.1 is complete, 1.2 (its RoPE) in progress
    assert status["1.4"] == "complete", r["1.4"]
    assert status["1.5"] == "blocked by 1.2, 1.3", r["1.5"]
    assert status["1.6"] == "blocked by 1.5", r["1.6"]
    assert status["1.7"] == "needs a GPU", r["1.7"]
    unspecified = next(t.id for t in TOPICS if t.spec_file is None)  # the table grows week by week
    assert status[unspecified] == "not specified yet", r[unspecified]
    assert r["1.1"][3:6] == ["3 of 3", "PyTorch SDPA, mx.fast", "2025-03-04 05:06 UTC"]
    assert r["1.3"][3] == "0 of 2" and r["1.6"][3] == "-" and r["1.6"][5] == "-"


def test_every_topic_has_its_row(tmp_path, week1):
    """Each topic of the curriculum, the engine's (2.6-3.2) included, in its week's table with its
    title and what it is checked against; their results land in their rows."""
    engine = junit(tmp_path / "engine.xml", [case("2.1"), case("2.6"), case("2.6", "failed"), case("2.7", "failed"),
                                             case("3.1", name="test_paged[block_size=16]"),
                                             case("3.1", "failed"), case("3.2", "failed")])
    r = rows(run(tmp_path, week1, engine))
    assert list(r) == [t.id for t in TOPICS]
    for t in TOPICS:
        assert r[t.id][1] == t.title and r[t.id][4] == (t.checked_against or "-"), r[t.id]
    # Complete wins over a prerequisite not complete (2.1's 1.6); otherwise those not complete show.
    assert [r[t][2:4] for t in ("2.1", "2.7", "3.2")] == [["complete", "1 of 1"], ["blocked by 2.6", "0 of 1"],
                                                          ["blocked by 3.1", "0 of 1"]]
    assert r["2.6"][3] == "1 of 2" and r["2.6"][2].startswith("blocked by ") and "1.7" in r["2.6"][2]
    assert r["3.1"][3] == "1 of 2" and r["3.1"][2].startswith("blocked by ")
    every = listing(tmp_path / "collected.txt", {"3.2": ["test_kernel[block_size=16]", "test_prefix_hit"]})
    assert rows(run(tmp_path, collected=every))["3.2"][3] == "0 of 2 (2 not run)"  # the listing is its tests now


def test_status_rules_for_gpu_and_skips():
    gpu = Topic("9.1", "a GPU kernel", (), "x", "day_9_1_k.py", needs_gpu=True)
    cpu = Topic("9.2", "a CPU kernel", (), "x", "day_9_2_k.py")
    assert status_of(gpu, {}) == "needs a GPU"  # never run
    assert status_of(gpu, {"9.1": result(passed=3)}) == "complete"  # ran on a GPU
    assert status_of(cpu, {"9.2": result(passed=2, gpu_skipped=1)}) == "needs a GPU"
    assert status_of(cpu, {"9.2": result(passed=1, failed=1, gpu_skipped=1)}) == "in progress (1 of 3)"
    # A test that did not run, for another reason or at all, is not a pass.
    assert status_of(cpu, {"9.2": result(passed=2, skipped=1)}) == "in progress (2 of 3)"
    assert status_of(cpu, {"9.2": result(passed=2, not_run=1)}) == "in progress (2 of 3)"
    assert status_of(cpu, {}) == "not started"
    # A fresh scaffold passes the names check (and, with the clone's kernels, the built-kernel
    # check): not a start.
    fresh = Result(tests={"test_has_names": "passed", "test_kernel_is_built": "passed", "test_x": "failed"},
                   presence={"test_has_names", "test_kernel_is_built"})
    assert status_of(cpu, {"9.2": fresh}) == "not started"
    fresh.tests["test_x"] = "passed"
    assert status_of(cpu, {"9.2": fresh}) == "complete"


def test_header_and_totals(tmp_path, week1):
    text = run(tmp_path, week1, impl="mine")
    assert text.startswith("# Progress\n\nGenerated by `nox -s progress` from spec results;"
                           " edit only Hours, Mastery, Notes and the notes section.")
    assert "- Implementation checked: `mine`" in text
    assert " (this update read week1.xml)" in text  # relative to PROGRESS.md: no machine's paths
    assert "| Week 1: From Matmul to Text | 2 of 7 | 5 of 10 (2 need a GPU) |" in text
    assert "| Week 2: Tiny vLLM | 0 of 7 | 0 of 0 |" in text
    assert f"| **Total** | **2 of {len(TOPICS)}** | **5 of 10 (2 need a GPU)** |" in text  # every week's topics
    assert "Ã" not in text and "â" not in text  # plain UTF-8, none of the tracker's mojibake


def test_results_merge_across_runs_test_by_test(tmp_path):
    first = junit(tmp_path / "first.xml", [case("1.1", name="test_a"), case("1.1", name="test_b"),
                                           case("1.2", name="test_r"), case("1.2", "failed", name="test_s")])
    run(tmp_path, first)
    # A later run of one test (nox -s week1 -- spec/day_1_2_rope.py::test_s) fixes just that one.
    again = junit(tmp_path / "again.xml", [case("1.2", name="test_s")], stamp="2025-03-05T10:00:00+00:00")
    r = rows(run(tmp_path, again))
    assert r["1.1"][2:6] == ["complete", "2 of 2", "PyTorch SDPA, mx.fast", "2025-03-04 05:06 UTC"]
    assert r["1.2"][2:4] == ["complete", "2 of 2"] and r["1.2"][5] == "2025-03-05 10:00 UTC"
    # And a failure in a later run undoes a pass.
    broken = junit(tmp_path / "broken.xml", [case("1.1", "failed", name="test_b")])
    assert rows(run(tmp_path, broken))["1.1"][2:4] == ["in progress (1 of 2)", "1 of 2"]


def test_a_partial_run_counts_against_all_the_topics_tests(tmp_path):
    """-k softmax, a test id or -x run a few tests: the rest of the topic is not run, not passed."""
    every = listing(tmp_path / "collected.txt", {"1.1": ["test_has_names", "test_softmax", "test_linear"],
                                                 "1.2": ["test_rope"]})
    some = junit(tmp_path / "some.xml", [case("1.1", name="test_softmax")])
    r = rows(run(tmp_path, some, collected=every))
    assert r["1.1"][2:4] == ["in progress (1 of 3)", "1 of 3 (2 not run)"], r["1.1"]
    assert r["1.2"][2:6] == ["not started", "0 of 1 (1 not run)", "transformers RoPE, mx.fast.rope", "-"], \
        r["1.2"]  # -x stopped before it
    rest = junit(tmp_path / "rest.xml", [case("1.1", name="test_has_names"), case("1.1", name="test_linear")])
    assert rows(run(tmp_path, rest, collected=every))["1.1"][2:4] == ["complete", "3 of 3"]
    # A test the spec no longer has drops out when the topic is collected again.
    assert rows(run(tmp_path, rest, collected=listing(tmp_path / "fewer.txt", {"1.1": ["test_linear"]})))[
        "1.1"][2:4] == ["complete", "1 of 1"]


def test_later_file_wins_in_one_call(tmp_path, week1):
    fixed = junit(tmp_path / "fixed.xml", [case("1.2", name="test_r"), case("1.2", name="test_s")])
    assert rows(run(tmp_path, week1, fixed))["1.2"][2] == "complete"
    (tmp_path / "PROGRESS.md").unlink()
    assert rows(run(tmp_path, fixed, week1))["1.2"][2] == "in progress (1 of 2)"


def test_each_package_keeps_its_results(tmp_path, week1, capsys):
    run(tmp_path, week1, impl="impl")
    other = junit(tmp_path / "mine.xml", [case("1.2")])
    r = rows(run(tmp_path, other, impl="mine"))
    assert r["1.1"][2] == "not started" and r["1.2"][2] == "complete"
    assert "the results of 'impl' are kept" in capsys.readouterr().err
    # Checking impl again (with any of its topics) shows impl's results from before.
    back = rows(run(tmp_path, junit(tmp_path / "impl.xml", [case("1.4")]), impl="impl"))
    assert back["1.1"][2:4] == ["complete", "3 of 3"] and back["1.2"][2] == "in progress (1 of 2)"
    assert rows(run(tmp_path, other, impl="mine"))["1.2"][2] == "complete"


def test_an_older_state_block_is_replaced(tmp_path, week1, capsys):
    old = ("# Progress\n\n<!-- spec-results v1 (read back by tools/progress.py; do not edit)\n"
           '{"topic": "1.1", "impl": "impl", "passed": 12, "failed": 0}\n-->\n')
    (tmp_path / "PROGRESS.md").write_text(old, encoding="utf-8")
    r = rows(run(tmp_path, week1))
    assert r["1.1"][3] == "3 of 3" and "older format (v1)" in capsys.readouterr().err


def test_the_package_is_the_one_the_last_run_recorded(tmp_path):
    """`nox -s progress` passes no --impl: a learner's run credits their package, not impl."""
    theirs = junit(tmp_path / "impl.xml", [case("1.1"), case("1.2")], impl="impl")
    mine = junit(tmp_path / "mine.xml", [case("1.2")], impl="mine")
    text = run(tmp_path, theirs, mine)
    assert "Implementation checked: `mine`" in text, text.splitlines()[:8]
    r = rows(text)  # impl's file is left out, so its 1.1 result is not credited to mine
    assert r["1.1"][2] == "not started" and r["1.2"][2] == "complete"
    assert "Implementation checked: `impl`" in run(tmp_path, theirs, impl="impl")


def test_learner_columns_and_notes_survive(tmp_path, week1):
    text = run(tmp_path, week1)
    row = next(ln for ln in text.splitlines() if ln.startswith("| 1.1 |"))
    mine = row.rsplit("| 0 | - |  |", 1)[0] + "| 3.5 | Learning | masks \\| offsets, see notes |"
    notes = "\n## My notes\n\n- RoPE: half-split vs traditional — check the GGUF permutation.\n"
    text = text.replace(row, mine).split(NOTES_MARKER)[0] + NOTES_MARKER + notes
    (tmp_path / "PROGRESS.md").write_text(text, encoding="utf-8")

    later = junit(tmp_path / "later.xml", [case("1.1"), case("1.1", "failed")])
    again = run(tmp_path, later)
    assert rows(again)["1.1"][2] == "in progress (4 of 5)"  # the first run's 3 and this run's 2
    assert again.splitlines()[[ln.startswith("| 1.1 |") for ln in again.splitlines()].index(True)] \
        .endswith("| 3.5 | Learning | masks \\| offsets, see notes |")
    assert again.split(NOTES_MARKER, 1)[1] == notes
    assert run(tmp_path, later) == again  # regenerating is idempotent


@pytest.mark.parametrize("content", [None, "<testsuites><testsuite>", "<html><body/></html>"],
                         ids=["missing", "truncated", "not-junit"])
def test_bad_junit_leaves_progress_untouched(tmp_path, week1, capsys, content):
    before = run(tmp_path, week1)
    bad = tmp_path / "bad.xml"
    if content is not None:
        bad.write_text(content, encoding="utf-8")
    capsys.readouterr()
    assert main(["--junit", str(week1), "--junit", str(bad), "--out", str(tmp_path / "PROGRESS.md")]) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and err.count("\n") == 1, err
    assert (tmp_path / "PROGRESS.md").read_text(encoding="utf-8") == before
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {"PROGRESS.md", "week1.xml"} | ({"bad.xml"} if content else set())  # no temp file


def test_command_line(tmp_path, week1):
    out = tmp_path / "PROGRESS.md"
    done = subprocess.run([sys.executable, "-m", "tools.progress", "--junit", str(week1), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"2 of {len(TOPICS)} topics complete" in done.stdout and out.exists()


def test_presence_checks_are_not_a_start(tmp_path):
    """Tests marked `presence` (spec/conftest.py records it) pass on a fresh scaffold: still not started."""
    fresh = junit(tmp_path / "fresh.xml", [case("1.1", name="test_has_names", presence=True),
                                           case("1.1", "failed", name="test_softmax")])
    assert rows(run(tmp_path, fresh))["1.1"][2:4] == ["not started", "1 of 2"]
    later = junit(tmp_path / "later.xml", [case("1.1", name="test_softmax")])
    assert rows(run(tmp_path, later))["1.1"][2:4] == ["complete", "2 of 2"]  # the mark was kept in between


def test_a_spec_file_that_does_not_import_is_a_failure(tmp_path):
    ok = junit(tmp_path / "ok.xml", [case("1.2", name="test_r")])
    run(tmp_path, ok)
    broken = tmp_path / "broken.xml"  # pytest's entry for a collection error: no class name, the module as name
    broken.write_text('<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest"'
                      ' timestamp="2025-03-05T10:00:00+00:00"><testcase classname="" name="spec.day_1_2_rope"'
                      ' time="0"><error message="collection failure">ImportError</error></testcase>'
                      "</testsuite></testsuites>", encoding="utf-8")
    # None of its tests ran: the earlier pass is not counted, and the import error is a failure.
    assert rows(run(tmp_path, broken))["1.2"][2:4] == ["not started", "0 of 2 (1 not run)"]
    fixed = junit(tmp_path / "fixed.xml", [case("1.2", name="test_r")])
    every = listing(tmp_path / "collected.txt", {"1.2": ["test_r"]})
    assert rows(run(tmp_path, fixed, collected=every))["1.2"][2:4] == ["complete", "1 of 1"]


def test_odd_test_ids_survive_the_state_block(tmp_path):
    odd = ["test_x[a-->b]", "test_y[a::b]", 'test_z["quoted"]']
    every = listing(tmp_path / "collected.txt", {"1.1": odd})
    first = junit(tmp_path / "first.xml", [case("1.1", name=n) for n in odd])
    assert rows(run(tmp_path, first, collected=every))["1.1"][2:4] == ["complete", "3 of 3"]
    other = junit(tmp_path / "other.xml", [case("1.2", name="test_r")])  # re-reads the block
    text = run(tmp_path, other)
    assert rows(text)["1.1"][2:4] == ["complete", "3 of 3"] and "-->" not in text.split("spec-results v2")[1].split("\n-->")[0]


def test_a_run_that_records_no_package_keeps_the_one_shown(tmp_path):
    """A run in which no test ran, or an old report, says no package: PROGRESS.md stays on the one it shows."""
    run(tmp_path, junit(tmp_path / "mine.xml", [case("1.1")], impl="mine"))
    text = run(tmp_path, junit(tmp_path / "empty.xml", []))
    assert "Implementation checked: `mine`" in text and rows(text)["1.1"][2] == "complete"


def test_a_rerender_reads_only_what_progress_holds(tmp_path, capsys):
    out = tmp_path / "PROGRESS.md"
    assert main(["--out", str(out)]) == 1 and "no results to render yet" in capsys.readouterr().err
    before = run(tmp_path, junit(tmp_path / "w.xml", [case("1.1"), case("1.2", "failed")], impl="mine"))
    assert main(["--out", str(out)]) == 0
    assert out.read_text(encoding="utf-8").replace(" (this update read w.xml)", "") == before.replace(
        " (this update read w.xml)", "")
