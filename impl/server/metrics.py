"""GET /metrics: the engine's state and the requests' latencies in Prometheus' text format,
under vLLM's metric names with a `tiny_llm:` prefix."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from impl.engine.outputs import RequestOutput

# Seconds; finer at the low end, where a small model's TPOT lives.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                   2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class Metrics:
    """One registry per server (tests run several in one process)."""

    def __init__(self, stats, model_name: str):
        """stats: a callable returning the engine's latest stats() snapshot."""
        self.registry = r = CollectorRegistry()
        labels = {"model_name": model_name}

        def gauge(name, doc, key):
            g = Gauge(f"tiny_llm:{name}", doc, list(labels), registry=r).labels(**labels)
            g.set_function(lambda: stats().get(key, 0))

        gauge("num_requests_running", "Requests in the running queue (scheduled each step).", "running")
        gauge("num_requests_waiting", "Requests waiting to be admitted (or preempted).", "waiting")
        gauge("kv_blocks_total", "KV cache blocks in the pool.", "num_blocks")
        gauge("kv_blocks_used", "KV cache blocks held by requests.", "blocks_used")
        gauge("kv_blocks_free", "KV cache blocks free (cached prefixes included: they are reusable).", "blocks_free")
        gauge("prefix_cache_hit_rate", "Prompt blocks found in the prefix cache, over blocks looked up.",
              "prefix_cache_hit_rate")
        gauge("spec_decode_draft_cache_positions", "Positions the draft model's caches hold (speculative decoding"
              " with a draft model; 0 otherwise).", "spec_draft_cache_positions")
        r.register(_EngineCounters(stats, model_name))
        self.prompt_tokens = Counter("tiny_llm:prompt_tokens", "Prompt tokens of requests admitted.",
                                     list(labels), registry=r).labels(**labels)
        self.generation_tokens = Counter("tiny_llm:generation_tokens", "Tokens generated.",
                                         list(labels), registry=r).labels(**labels)
        self.success = Counter("tiny_llm:request_success", "Requests finished, by finish reason.",
                               [*labels, "finished_reason"], registry=r)
        self.labels = labels

        def histogram(name, doc):
            return Histogram(f"tiny_llm:{name}", doc, list(labels), buckets=LATENCY_BUCKETS,
                             registry=r).labels(**labels)

        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.")
        self.tpot = histogram("time_per_output_token_seconds", "Time per output token after the first.")
        self.e2e = histogram("e2e_request_latency_seconds", "Time from arrival to the last token.")

    def added(self, num_prompt_tokens: int) -> None:
        self.prompt_tokens.inc(num_prompt_tokens)

    def output(self, out: RequestOutput) -> None:
        """Count a step's new tokens; a finished request's latencies."""
        self.generation_tokens.inc(len(out.new_token_ids))
        if not out.finished or out.metrics is None:
            return
        self.success.labels(**self.labels, finished_reason=out.finish_reason).inc()
        m = out.metrics
        if m.ttft is not None:
            self.ttft.observe(m.ttft)
        if m.tpot is not None:
            self.tpot.observe(m.tpot)
        if m.finished_time is not None:
            self.e2e.observe(m.finished_time - m.arrival_time)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCounters:
    """Counters the engine keeps itself, read at each scrape."""

    COUNTERS = (("prefix_cache_queries", "prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache."),
                ("prefix_cache_hits", "prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache."),
                ("num_preemptions", "preemptions", "Sequences preempted (recomputed later) for want of KV blocks."),
                ("engine_steps", "steps", "Engine steps (one model call each, at most)."),
                ("spec_decode_num_draft_tokens", "spec_num_draft_tokens", "Draft tokens the model checked (speculative"
                 " decoding; 0 without)."),
                ("spec_decode_num_accepted_tokens", "spec_num_accepted_tokens", "Draft tokens accepted."))

    def __init__(self, stats, model_name: str):
        self.stats, self.model_name = stats, model_name

    def collect(self):
        s = self.stats()
        for name, key, doc in self.COUNTERS:
            family = CounterMetricFamily(f"tiny_llm:{name}", doc, labels=["model_name"])
            family.add_metric([self.model_name], s.get(key, 0))
            yield family
