"""Prometheus metrics for /metrics: the engine's state at scrape time, plus request latencies
the server measures from output arrival times.

Each app gets its own CollectorRegistry, so several servers in one process (tests) never share
or clash over metric names.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sorai.engine.outputs import EngineStats, RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
FINISH_REASONS = ("stop", "length", "abort")

# vLLM's buckets, so dashboards built for it read these the same way.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
)  # fmt: skip
E2E_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip


class _EngineCollector(Collector):
    """Reads engine.stats() on every scrape: no copy of the engine's counters to drift."""

    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        gauges = (
            ("sorai_num_requests_running", "Requests in the running batch.", s.running),
            ("sorai_num_requests_waiting", "Requests waiting to be scheduled.", s.waiting),
            ("sorai_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use.", s.kv_usage),
            ("sorai_kv_cache_blocks_total", "KV-cache blocks in the pool.", s.kv_blocks_total),
            ("sorai_kv_cache_blocks_used", "KV-cache blocks in use.", s.kv_blocks_used),
            (
                "sorai_prefix_cache_hit_rate",
                "Prompt tokens found in the prefix cache / prompt tokens looked up, since start.",
                s.prefix_cache_hit_rate,
            ),
        )
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        counters = (
            ("sorai_num_preemptions", "Requests preempted to free KV blocks.", s.preemptions),
            (
                "sorai_prompt_tokens",
                "Prompt tokens computed by the engine (prefix-cache hits excluded).",
                s.prompt_tokens,
            ),
            ("sorai_generation_tokens", "Tokens generated.", s.generation_tokens),
            (
                "sorai_prefix_cache_queries",
                "Prompt tokens looked up in the prefix cache.",
                s.prefix_cache_queries,
            ),
            (
                "sorai_prefix_cache_hits",
                "Prompt tokens found in the prefix cache.",
                s.prefix_cache_hits,
            ),
        )
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value)


class ServerMetrics:
    """The registry behind /metrics and the instruments request handlers record into."""

    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_EngineCollector(stats))
        self.finished = Counter(
            "sorai_requests_finished",
            "Choices finished, by finish reason (abort: client gone or server stopping).",
            ["finish_reason"],
            registry=self.registry,
        )
        for reason in FINISH_REASONS:
            self.finished.labels(reason)
        self.ttft = Histogram(
            "sorai_time_to_first_token_seconds",
            "From request arrival to its first generated token.",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "sorai_inter_token_latency_seconds",
            "Between successive token outputs of a request.",
            buckets=ITL_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "sorai_e2e_request_latency_seconds",
            "From request arrival to its last choice finishing.",
            buckets=E2E_BUCKETS,
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def tracker(self, arrival: float, n: int) -> RequestTracker:
        return RequestTracker(self, arrival, n)


class RequestTracker:
    """Timing and outcome of one engine request (one prompt, `n` choices)."""

    def __init__(self, metrics: ServerMetrics, arrival: float, n: int) -> None:
        self._metrics = metrics
        self._arrival = arrival
        self._n = n
        self._last_token_at: float | None = None
        self._finished = 0
        self._closed = False

    def on_output(self, output: RequestOutput, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        if any(choice.token_ids for choice in output.choices):
            if self._last_token_at is None:
                self._metrics.ttft.observe(now - self._arrival)
            else:
                self._metrics.itl.observe(now - self._last_token_at)
            self._last_token_at = now
        for choice in output.choices:
            if choice.finish_reason is not None:
                self._finished += 1
                self._metrics.finished.labels(choice.finish_reason).inc()
        if output.finished and not self._closed:
            self._closed = True
            self._metrics.e2e.observe(now - self._arrival)

    def close(self) -> None:
        """The request is over; choices that never finished were aborted."""
        if self._finished < self._n:
            self._metrics.finished.labels("abort").inc(self._n - self._finished)
            self._finished = self._n
        self._closed = True
