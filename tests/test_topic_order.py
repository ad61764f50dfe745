"""Each topic's specification passes with only that topic and its prerequisites written.

A learner who has done a topic's prerequisites (spec/curriculum.py) and the topic itself must
see all of its spec pass, with every later topic still a stub. Here that learner is
`tools.scaffold --through`'s package: impl's bodies for those topics, NotImplementedError for
the rest. A test of topic T that reaches into a topic T does not require fails here, naming
the stub it hit, so topics stay checkable in the course's order.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from spec.curriculum import BY_ID, TOPICS
from tools import scaffold

ROOT = Path(__file__).resolve().parents[1]
# The topics with a spec file written (the curriculum may name one still being written).
CPU_TOPICS = [t.id for t in TOPICS if t.spec_file and not t.needs_gpu and (ROOT / "spec" / t.spec_file).is_file()]


def with_prerequisites(topic: str) -> frozenset[str]:
    """The topic and everything it requires, transitively."""
    done, todo = set(), [topic]
    while todo:
        t = todo.pop()
        if t not in done:
            done.add(t)
            todo += BY_ID[t].prerequisites
    return frozenset(done)


def test_prerequisites_come_earlier_in_the_course():
    order = [t.id for t in TOPICS]
    for t in TOPICS:
        assert all(order.index(p) < order.index(t.id) for p in t.prerequisites), t.id


@pytest.mark.parametrize("topic", CPU_TOPICS)
def test_topic_passes_with_only_its_prerequisites(topic, tmp_path):
    solved = with_prerequisites(topic)
    name = f"learner_{topic.replace('.', '_')}"
    scaffold.write(scaffold.build(ROOT / "impl", name, ROOT / "spec", solved), tmp_path / name, force=False)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "pytest", f"spec/{BY_ID[topic].spec_file}", f"--impl={name}",
                        "-q", "-p", "no:cacheprovider"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    stubs = sorted(set(re.findall(rf"{name}: implement ([\w.]+ \(topic [\d.]+\))", r.stdout)))
    summary = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-500:]
    assert r.returncode == 0, (f"{topic} with only {sorted(solved)} written: {summary}; "
                               f"the later topics' stubs it reached: {stubs or 'none (see the output)'}\n"
                               + r.stdout[-3000:])
