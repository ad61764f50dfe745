"""The online serving benchmark (bench.online): its arithmetic on synthetic timings, its tables,
and its load generator against impl's real server (python -m impl.server) on loopback."""

import pytest

from bench.online import (
    QUICK_OUTPUT_LEN,
    QUICK_PROMPT_LEN,
    level_workloads,
    online_table,
    ratio_table,
    request_latencies,
    run_level,
    summarize_level,
    token_arrivals,
)


def _chunk(text, finish=None, usage=None):
    obj = {"choices": [{"index": 0, "text": text, "finish_reason": finish}]}
    if usage is not None:
        obj["usage"] = {"completion_tokens": usage}
    return obj


def test_arrivals_are_the_chunks_that_carry_tokens_and_usage_gives_the_count():
    # impl's and vLLM's shape: the last token's chunk has the finish reason, then a usage chunk
    chunks = [(0.5, _chunk("a")), (0.6, _chunk("b")), (0.8, _chunk("c", "length")),
              (0.81, {"choices": [], "usage": {"completion_tokens": 3}})]
    got = token_arrivals(chunks)
    assert got == {"arrivals": [0.5, 0.6, 0.8], "usage_tokens": 3, "finish_reason": "length"}


def test_llama_servers_closing_chunk_without_text_is_not_a_token():
    chunks = [(0.5, _chunk("a")), (0.6, _chunk("b")), (0.61, _chunk("", "length", usage=2))]
    assert token_arrivals(chunks, empty_closing_chunk=True)["arrivals"] == [0.5, 0.6]
    # impl's last token whose text was held back: its chunk has no text, and is the token's arrival
    chunks = [(0.5, _chunk("a")), (0.7, _chunk("", "length", usage=3))]
    assert token_arrivals(chunks)["arrivals"] == [0.5, 0.7]


def test_a_stream_without_usage_is_counted_by_its_chunks():
    got = token_arrivals([(0.1, _chunk("a")), (0.2, _chunk("b", "length"))])
    assert got["usage_tokens"] is None and len(got["arrivals"]) == 2


def test_ttft_tpot_and_inter_token_latencies_from_arrivals():
    ttft, tpot, itl = request_latencies([0.5, 0.6, 0.8, 1.1], 4)
    assert ttft == 0.5
    assert tpot == pytest.approx(0.2)  # (1.1 - 0.5) / 3
    assert itl == pytest.approx([0.1, 0.2, 0.3])
    # a chunk carrying two tokens: TPOT divides by the tokens, ITL is the chunks' gap
    ttft, tpot, itl = request_latencies([0.5, 0.9], 3)
    assert tpot == pytest.approx(0.2) and itl == pytest.approx([0.4])
    assert request_latencies([0.3], 1) == (0.3, None, [])
    assert request_latencies([], 0) == (None, None, [])


def _record(i, ttft, gaps, asked=None, error=None, tokens=None):
    arrivals = [ttft]
    for g in gaps:
        arrivals.append(arrivals[-1] + g)
    n = len(arrivals) if tokens is None else tokens
    t, tpot, itl = request_latencies(arrivals, n)
    return {"index": i, "prompt_tokens": 10, "max_tokens": asked or n, "output_tokens": n, "counted_from": "usage",
            "chunks": len(arrivals), "finish_reason": "length", "ttft": t, "tpot": tpot, "itl": itl, "error": error}


def test_level_summary_throughput_over_wall_time_and_percentiles():
    records = [_record(0, 0.1, [0.01, 0.01, 0.01]),  # 4 tokens, TPOT 10 ms
               _record(1, 0.3, [0.02, 0.02, 0.02]),  # 4 tokens, TPOT 20 ms
               _record(2, 0.2, [0.03, 0.03, 0.03]),  # 4 tokens, TPOT 30 ms
               _record(3, 0.4, [0.04, 0.04, 0.04])]  # 4 tokens, TPOT 40 ms
    s = summarize_level(records, 2.0, 2)
    assert (s["requests"], s["completed"], s["errors"], s["mismatches"]) == (4, 4, 0, 0)
    assert s["requests_per_s"] == 2.0 and s["output_tps"] == 8.0  # 16 tokens / 2 s
    assert s["prompt_tokens"] == 40 and s["output_tokens"] == 16
    assert s["ttft_p50"] == pytest.approx(0.25) and s["ttft_p99"] == pytest.approx(0.397)
    assert s["tpot_p50"] == pytest.approx(0.025) and s["tpot_p99"] == pytest.approx(0.0397)
    # ITL pools every request's gaps: 3 each of 10, 20, 30, 40 ms
    assert s["itl_p50"] == pytest.approx(0.025) and s["itl_p99"] == pytest.approx(0.04)
    assert s["first_error"] is None and s["first_mismatch"] is None


def test_errors_and_short_outputs_are_counted_and_named_not_hidden():
    records = [_record(0, 0.1, [0.01]), _record(1, 0.2, [0.02], asked=8),
               _record(2, 0.1, [], error="HTTPStatusError: 500")]
    s = summarize_level(records, 1.0, 1)
    assert (s["completed"], s["errors"], s["mismatches"]) == (2, 1, 1)
    assert s["output_tps"] == 4.0  # the completed requests' tokens only (2 + 2)
    assert s["asked_output_tokens"] == 2 + 8 + 1
    assert s["first_error"] == "request 2: HTTPStatusError: 500"
    assert s["first_mismatch"].startswith("request 1 (10 prompt tokens) asked for 8 tokens and got 2")


def test_levels_draw_disjoint_seeded_requests_from_the_offline_distribution():
    a = level_workloads([1, 4, 16], [8, 8, 32], (100, 512), (64, 256))
    b = level_workloads([1, 4, 16], [8, 8, 32], (100, 512), (64, 256))
    assert a == b
    assert [len(lv["prompts"]) for lv in a["levels"]] == [8, 8, 32]
    prompts = [tuple(p) for lv in a["levels"] for p in lv["prompts"]]
    assert len(set(prompts)) == len(prompts), "no prompt is sent twice in a run"
    assert all(100 <= len(p) <= 512 for p in prompts)
    assert all(64 <= m <= 256 for lv in a["levels"] for m in lv["max_tokens"])


def test_tables_have_a_row_per_level_ratios_to_impl_and_one_line_per_failed_peer():
    def level(c, tps):
        return {"concurrency": c, "requests": 4, "errors": 0, "mismatches": 0, "requests_per_s": 1.0,
                "output_tps": tps, "ttft_p50": 0.1, "ttft_p99": 0.2, "tpot_p50": 0.01, "tpot_p99": 0.02,
                "itl_p50": 0.01, "itl_p99": 0.03, "wall_s": 4.0}

    results = [{"peer": "impl", "levels": [level(1, 30.0), level(4, 80.0)]},
               {"peer": "vllm", "levels": [level(1, 60.0), level(4, 40.0)]},
               {"peer": "llama-server", "error": "did not start: no binary"}]
    table = online_table(results)
    assert table.count("| impl |") == 2 and table.count("| vllm |") == 2
    assert "| llama-server | did not start: no binary |" in table
    ratios = ratio_table(results, [1, 4]).splitlines()
    assert ratios[2] == "| 1 | 30.0 | 60.0 | 0.50x | - | - |"
    assert ratios[3] == "| 4 | 80.0 | 40.0 | 2.00x | - | - |"


def test_the_load_generator_against_impls_server():
    """Concurrency 1 and 2, four short requests of 8 tokens each: every one completes with exactly
    8 tokens, streamed, with positive TTFT and inter-token latencies; a bad request is an error."""
    from tests.server_process import ServerProcess

    work = level_workloads([1, 2], [4, 4], QUICK_PROMPT_LEN, QUICK_OUTPUT_LEN)
    with ServerProcess("--max-num-seqs", "2") as server:
        for lv in work["levels"]:
            s = run_level(server.url, None, lv["prompts"], lv["max_tokens"], lv["concurrency"], timeout=60)
            assert (s["completed"], s["errors"], s["mismatches"]) == (4, 0, 0), s["first_error"] or s["first_mismatch"]
            for r in s["records"]:
                assert r["output_tokens"] == r["max_tokens"] == 8 and r["counted_from"] == "usage"
                assert r["ttft"] > 0 and r["tpot"] > 0
                assert r["itl"] and all(x > 0 for x in r["itl"])
            assert s["output_tps"] > 0 and s["itl_p50"] > 0 and s["ttft_p50"] > 0
        bad = run_level(server.url, None, [[10**9]], [8], 1, timeout=60)  # a token id past the vocabulary
        assert bad["errors"] == 1 and "HTTP 400" in bad["first_error"]
