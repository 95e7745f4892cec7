"""Prometheus metrics, one `CollectorRegistry` per app (tests build many apps in one process).

Request, token and quota-refusal counters carry a `tenant` label ("" for requests without a
tenant: health checks, scrapes, admin calls, failed authentication). Engine gauges are read from
`EngineClient.stats()` and the tenant store's health from `StoreStats` at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engine.fairness import TenantStats
from gateway.engine_client import EngineClient
from tenants import StoreStats

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
        yield GaugeMetricFamily(
            "prefixgate_pinned_blocks_max", "The engine's cap on pinned KV blocks.",
            s.max_pinned_blocks,
        )  # fmt: skip
        pinned = GaugeMetricFamily(
            "prefixgate_pinned_blocks",
            "KV blocks held by pinned prefixes, by owner (tenant, or (public)).",
            labels=["tenant"],
        )
        for tenant, blocks in sorted(s.pinned_blocks_by_tenant.items()):
            pinned.add_metric([tenant], blocks)
        yield pinned
        yield from _tenant_gauges(s.tenants)


_TENANT_GAUGES = (  # (metric, help, TenantStats field): one sample per tenant in the engine
    ("prefixgate_tenant_requests_running", "Sequences running, by tenant.", "running"),
    ("prefixgate_tenant_requests_waiting", "Sequences waiting, by tenant.", "waiting"),
    ("prefixgate_tenant_kv_blocks", "Distinct KV blocks held by the tenant's sequences "
     "(a public prefix's not counted): what max_kv_blocks caps.", "kv_blocks"),
    ("prefixgate_tenant_max_kv_blocks", "The tenant's max_kv_blocks (tenants with one).",
     "max_kv_blocks"),
    ("prefixgate_tenant_service_lead_tokens", "Weighted tokens of service the tenant is ahead "
     "of the least served tenant with work (the fair policy's counters; docs/fairness.md).",
     "service_lead"),
)  # fmt: skip


def _tenant_gauges(tenants: dict[str, TenantStats]) -> Iterator[Metric]:
    for name, help_text, attr in _TENANT_GAUGES:
        family = GaugeMetricFamily(name, help_text, labels=["tenant"])
        for tenant, stats in sorted(tenants.items()):
            value = getattr(stats, attr)
            if value is not None:
                family.add_metric([tenant], value)
        yield family


_STORE_HELP = {
    "errors_total": "Tenant store (Redis) calls that failed.",
    "fast_failures_total": "Tenant store calls refused at once after a recent failure.",
    "fallback_authentications_total": "Keys accepted from memory while the store was down.",
    "fallback_admissions_total": "Admission decisions made with per-process limits (open mode).",
    "settlements_queued_total": "Settlements queued while the store was down.",
    "settlements_replayed_total": "Queued settlements replayed once the store was back.",
    "settlements_dropped_total": "Queued settlements dropped (queue overflow): usage lost.",
    "available": "1 if the last tenant store call succeeded.",
    "pending_settlements": "Settlements waiting for the tenant store.",
}


class TenantStoreCollector(Collector):
    """`prefixgate_tenant_store_*`: the tenant store's `StoreStats`, read at each scrape."""

    def __init__(self, stats: StoreStats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        for name, value in self._stats.as_dict().items():
            help_text = _STORE_HELP.get(name, name)
            if name.endswith("_total"):
                base = f"prefixgate_tenant_store_{name.removesuffix('_total')}"
                yield CounterMetricFamily(base, help_text, value)
            else:
                yield GaugeMetricFamily(f"prefixgate_tenant_store_{name}", help_text, value)


class GatewayMetrics:
    """All gateway metrics on a private registry; `render()` is the `/metrics` body."""

    def __init__(
        self,
        get_engine: Callable[[], EngineClient | None],
        store_stats: StoreStats | None = None,
    ) -> None:
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
        self.rate_limited = Counter(
            "prefixgate_rate_limited_requests",
            "Requests refused by a tenant quota (429, or 400 for max_tokens_per_request).",
            ["tenant", "limit"],
            registry=r,
        )
        self.prefix_requests = Counter(
            "prefixgate_prefix_requests",
            "Requests that used a registered prefix by reference (scope: private or public).",
            ["tenant", "scope"],
            registry=r,
        )
        self.prefix_cached_tokens = Counter(
            "prefixgate_prefix_cached_tokens",
            "Tokens of registered prefixes served from the cache to requests using them.",
            ["tenant"],
            registry=r,
        )
        r.register(EngineStatsCollector(get_engine))
        if store_stats is not None:
            r.register(TenantStoreCollector(store_stats))

    def count_tokens(self, tenant: str, prompt: int, completion: int, cached: int) -> None:
        self.prompt_tokens.labels(tenant).inc(prompt)
        self.completion_tokens.labels(tenant).inc(completion)
        self.cached_tokens.labels(tenant).inc(cached)

    def render(self) -> bytes:
        return generate_latest(self.registry)
