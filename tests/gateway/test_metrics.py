"""/metrics: request counters by route/status/tenant, latency histograms, engine gauges."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import GatewayMetrics
from tests.gateway.fake_engine import FakeEngine
from tests.gateway.openai.test_routes import chat_body


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics_after_traffic(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    system = {"role": "system", "content": "Shared system prompt. " * 6}
    for q in ("a", "b"):
        body = chat_body(messages=[system, {"role": "user", "content": q}], max_tokens=4)
        assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
    await client.post("/v1/chat/completions", json=chat_body(model="nope"))
    body = chat_body(max_tokens=5, stream=True)
    assert (await client.post("/v1/chat/completions", json=body)).status_code == 200

    r = await client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    s = samples(r.text)
    route = "/v1/chat/completions"
    ok = (("method", "POST"), ("route", route), ("status", "200"), ("tenant", "default"))
    nf = (("method", "POST"), ("route", route), ("status", "404"), ("tenant", "default"))
    assert s[("prefixgate_http_requests_total", ok)] == 3
    assert s[("prefixgate_http_requests_total", nf)] == 1
    tenant = (("tenant", "default"),)
    assert s[("prefixgate_completion_tokens_total", tenant)] == 13
    stats = engine.stats()
    assert s[("prefixgate_prompt_tokens_total", tenant)] == stats.prefix_queries_tokens
    assert s[("prefixgate_cached_tokens_total", tenant)] == stats.prefix_hits_tokens > 0
    assert s[("prefixgate_time_to_first_token_seconds_count", (("route", "chat"),))] == 3
    assert s[("prefixgate_inter_token_latency_seconds_count", (("route", "chat"),))] == 10
    e2e = (("outcome", "finished"), ("route", "chat"))
    assert s[("prefixgate_e2e_request_latency_seconds_count", e2e)] == 3
    assert s[("prefixgate_kv_cache_blocks", ())] == engine.num_blocks
    assert s[("prefixgate_kv_cache_free_blocks", ())] == engine.num_blocks
    assert s[("prefixgate_kv_cache_usage_percent", ())] == 0.0
    assert s[("prefixgate_num_requests_running", ())] == 0
    assert s[("prefixgate_num_requests_waiting", ())] == 0
    assert s[("prefixgate_prefix_cache_queries_tokens_total", ())] == stats.prefix_queries_tokens
    assert s[("prefixgate_prefix_cache_hits_tokens_total", ())] == stats.prefix_hits_tokens
    assert s[("prefixgate_preemptions_total", ())] == 0


def test_engine_gauges_absent_while_loading() -> None:
    metrics = GatewayMetrics(lambda: None)
    assert b"prefixgate_kv_cache_blocks" not in metrics.render()
    assert b"prefixgate_http_requests" in metrics.render()


def test_each_app_has_its_own_registry() -> None:
    a, b = GatewayMetrics(lambda: None), GatewayMetrics(lambda: None)
    a.count_tokens("t", 1, 2, 3)
    assert b.registry.get_sample_value("prefixgate_prompt_tokens_total", {"tenant": "t"}) is None
