"""How the specs check that a kernel and its twin refuse the same input: whichever path a call
takes (the C++ kernel, a GPU kernel, the pure-MLX twin, or the check function the twin runs),
the same one-line ValueError, word for word."""

from __future__ import annotations

import re

import mlx.core as mx
import pytest


def assert_rejected_alike(calls: dict, args, pattern: str | None, case: str) -> None:
    """Each of calls (name -> function) raises a one-line ValueError matching `pattern` on the
    arguments args() (a function: fresh arguments for each call), all in the same words; pattern
    None: any words."""
    said = {}
    for name, call in calls.items():
        try:
            mx.eval(call(*args()))
        except ValueError as e:
            said[name] = str(e)
        else:
            pytest.fail(f"{name}, {case}: no ValueError (the others: {said or 'none yet'})")
        assert pattern is None or re.search(pattern, said[name]), f"{name}, {case}: {said[name]!r} is not {pattern!r}"
        assert "\n" not in said[name], f"{name}, {case}: the error is not one line: {said[name]}"
    assert len(set(said.values())) == 1, f"{case}: the same input, different errors: {said}"
