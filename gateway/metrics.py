"""Prometheus metrics, one `CollectorRegistry` per app (tests build many apps in one process).

Request and token counters carry a `tenant` label (always "default" until the tenants phase).
Engine gauges are read from `EngineClient.stats()` at scrape time, never pushed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.engine_client import EngineClient

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    40.0,
    80.0,
)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)


class EngineStatsCollector(Collector):
    """Reads `engine.stats()` at each scrape; yields nothing while the engine is loading."""

    def __init__(self, get_engine: Callable[[], EngineClient | None]) -> None:
        self._get_engine = get_engine

    def collect(self) -> Iterator[Metric]:
        engine = self._get_engine()
        if engine is None:
            return
        s = engine.stats()
        yield GaugeMetricFamily(
            "prefixgate_num_requests_running", "Requests in the running batch.", s.num_running
        )
        yield GaugeMetricFamily(
            "prefixgate_num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting
        )
        yield GaugeMetricFamily(
            "prefixgate_kv_cache_usage_percent",
            "KV cache blocks in use, percent.",
            100.0 * s.kv_usage,
        )
        yield GaugeMetricFamily("prefixgate_kv_cache_blocks", "KV cache blocks.", s.num_blocks)
        yield GaugeMetricFamily(
            "prefixgate_kv_cache_free_blocks", "Free KV cache blocks.", s.num_free_blocks
        )
        yield CounterMetricFamily(
            "prefixgate_prefix_cache_queries_tokens",
            "Prompt tokens looked up in the prefix cache.",
            s.prefix_queries_tokens,
        )
        yield CounterMetricFamily(
            "prefixgate_prefix_cache_hits_tokens",
            "Prompt tokens served from the prefix cache.",
            s.prefix_hits_tokens,
        )
        yield CounterMetricFamily(
            "prefixgate_preemptions", "Requests preempted (recompute).", s.num_preemptions
        )


class GatewayMetrics:
    """All gateway metrics on a private registry; `render()` is the `/metrics` body."""

    def __init__(self, get_engine: Callable[[], EngineClient | None]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "prefixgate_http_requests",
            "HTTP requests by route and status.",
            ["route", "method", "status", "tenant"],
            registry=r,
        )
        self.ttft = Histogram(
            "prefixgate_time_to_first_token_seconds",
            "Time from request to first token.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "prefixgate_inter_token_latency_seconds",
            "Time between streamed tokens.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "prefixgate_e2e_request_latency_seconds",
            "Time from request to last token.",
            ["route", "outcome"],
            buckets=_E2E_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "prefixgate_prompt_tokens", "Prompt tokens processed.", ["tenant"], registry=r
        )
        self.completion_tokens = Counter(
            "prefixgate_completion_tokens", "Completion tokens generated.", ["tenant"], registry=r
        )
        self.cached_tokens = Counter(
            "prefixgate_cached_tokens",
            "Prompt tokens served from the prefix cache.",
            ["tenant"],
            registry=r,
        )
        r.register(EngineStatsCollector(get_engine))

    def count_tokens(self, tenant: str, prompt: int, completion: int, cached: int) -> None:
        self.prompt_tokens.labels(tenant).inc(prompt)
        self.completion_tokens.labels(tenant).inc(completion)
        self.cached_tokens.labels(tenant).inc(cached)

    def render(self) -> bytes:
        return generate_latest(self.registry)
