"""The serving benchmark's plumbing (bench.serving): its workload, its summary of a peer's run,
and its table, without running any peer."""

from bench.serving import BASELINES, make_workload, serving_table, summarize


def test_the_workload_is_seeded_and_in_range():
    a, b = make_workload(64, (100, 512), (64, 256)), make_workload(64, (100, 512), (64, 256))
    assert a == b, "seed 0 gives the same workload every run"
    assert len(a["prompts"]) == len(a["max_tokens"]) == 64
    assert all(100 <= len(p) <= 512 for p in a["prompts"])
    assert all(64 <= m <= 256 for m in a["max_tokens"])
    assert all(0 <= t < 10000 for p in a["prompts"] for t in p)
    assert len({len(p) for p in a["prompts"]}) > 10, "lengths vary"


def _raw(wall: float, n: int = 4, tokens: int = 8) -> dict:
    return {"wall_s": wall, "note": "n", "peak_rss_mb": 100.0,
            "requests": [{"ttft": 0.1 * (i + 1), "tpot": 0.01, "output_tokens": tokens} for i in range(n)]}


def test_summary_counts_prompt_and_output_tokens_over_the_wall_time():
    workload = {"prompts": [[1] * 10] * 4, "max_tokens": [8] * 4}
    s = summarize("impl", _raw(2.0), workload)
    assert s["output_tokens"] == 32 and s["prompt_tokens"] == 40
    assert s["output_tps"] == 16.0 and s["total_tps"] == 36.0
    assert s["ttft_p50"] == 0.25 and abs(s["ttft_p99"] - 0.397) < 1e-9
    assert s["tpot_p50"] == 0.01


def test_a_peer_without_per_request_latencies_gets_dashes_not_wrong_percentiles():
    raw = _raw(1.0)
    raw["requests"][0]["ttft"] = None
    s = summarize("x", raw, {"prompts": [[1]] * 4, "max_tokens": [8] * 4})
    assert s["ttft_p50"] is None and s["tpot_p50"] is not None


def test_table_has_ratios_to_the_baselines_and_one_line_per_failed_peer():
    workload = {"prompts": [[1] * 10] * 4, "max_tokens": [8] * 4}
    results = [summarize("impl", _raw(1.0), workload), summarize(BASELINES[0], _raw(2.0), workload),
               {"peer": BASELINES[1], "error": "did not run: no binary"}]
    table = serving_table(results, {"total_tps_limit": 144.0})
    impl_row = next(ln for ln in table.splitlines() if ln.startswith("| impl "))
    cells = [c.strip() for c in impl_row.strip("|").split("|")]
    assert cells[1:6] == ["32.0", "2.00x", "-", "72.0", "50%"]
    assert f"| {BASELINES[1]} | did not run: no binary |" in table
