"""The tenant's engine share: `--scheduling-policy` reaches the engine config, and a tenant's quota
`priority`, `weight` and `max_kv_blocks` reach the engine with each of its requests."""

from __future__ import annotations

import pytest

from engine.request import DEFAULT_SHARE, TenantShare
from gateway.cli import build_parser, settings_from_args
from gateway.settings import Settings
from tests.gateway.conftest import MakeGateway


def test_scheduling_policy_from_environment_and_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().engine_config().scheduler.policy == "fcfs"
    monkeypatch.setenv("PREFIXGATE_SCHEDULING_POLICY", "FAIR")
    assert Settings().engine_config().scheduler.policy == "fair"
    args = build_parser().parse_args(["serve", "--scheduling-policy", "priority"])
    assert settings_from_args(args).engine_config().scheduler.policy == "priority"
    monkeypatch.setenv("PREFIXGATE_SCHEDULING_POLICY", "lottery")
    with pytest.raises(ValueError, match="scheduling_policy"):
        Settings()


async def test_quota_priority_weight_and_kv_cap_reach_the_engine(make_gateway: MakeGateway) -> None:
    gw = await make_gateway()
    gold = await gw.tenant("gold", priority=-5, weight=3, max_kv_blocks=40)
    plain = await gw.tenant("plain")
    for key in (gold, plain):
        assert (await gw.chat(key, max_tokens=1)).status_code == 200
    r = await gw.admin("PATCH", "/admin/tenants/plain", {"quota": {"priority": 2, "weight": 2}})
    assert r.status_code == 200, r.text
    assert (await gw.chat(plain, max_tokens=1)).status_code == 200
    seen = [gw.engine.tenancy[rid] for rid, *_ in gw.engine.requests]
    assert seen == [
        (-5, TenantShare(weight=3, max_kv_blocks=40)),
        (0, DEFAULT_SHARE),
        (2, TenantShare(weight=2)),
    ]


async def test_out_of_range_share_fields_are_refused(make_gateway: MakeGateway) -> None:
    gw = await make_gateway()
    for quota in ({"weight": 0}, {"priority": 10**6}, {"priority": 1.5}, {"max_kv_blocks": 0}):
        r = await gw.admin("POST", "/admin/tenants", {"id": "bad", "quota": quota})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["type"] == "invalid_request_error"


def test_admin_cli_takes_a_signed_priority_and_a_positive_weight() -> None:
    from gateway.admin.cli import _quota

    create = ["admin", "tenants", "create", "acme", "--priority", "-2", "--weight", "3"]
    assert _quota(build_parser().parse_args(create)) == {"priority": -2, "weight": 3}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["admin", "quota", "set", "acme", "--weight", "0"])


def test_per_tenant_engine_gauges_in_metrics() -> None:
    from engine.fairness import TenantStats
    from gateway.metrics import GatewayMetrics
    from tests.gateway.fake_engine import FakeEngine

    class Busy(FakeEngine):
        def _tenant_stats(self) -> dict[str, TenantStats]:
            return {
                "acme": TenantStats(running=3, waiting=2, kv_blocks=17, max_kv_blocks=20),
                "beta": TenantStats(running=1, kv_blocks=4, service_lead=96.5),
            }

    engine = Busy()
    metrics = GatewayMetrics(lambda: engine)
    metrics.render()
    value = metrics.registry.get_sample_value
    assert value("prefixgate_tenant_requests_running", {"tenant": "acme"}) == 3
    assert value("prefixgate_tenant_requests_waiting", {"tenant": "acme"}) == 2
    assert value("prefixgate_tenant_kv_blocks", {"tenant": "acme"}) == 17
    assert value("prefixgate_tenant_max_kv_blocks", {"tenant": "acme"}) == 20
    assert value("prefixgate_tenant_max_kv_blocks", {"tenant": "beta"}) is None  # no cap
    assert value("prefixgate_tenant_service_lead_tokens", {"tenant": "beta"}) == 96.5


def test_share_and_tenant_stats_cross_the_replica_protocol() -> None:
    """A remote replica gets the share as the in-process engine does, and a pool of replicas
    sums their per-tenant figures (counts add up; a cap and a lead are per engine)."""
    from engine.fairness import TenantStats
    from engine.service.protocol import STATS_ADAPTER, KwargsCodec, ReplicaStats, encode, jsonable
    from gateway.engine_client import EngineClient
    from gateway.replicas.pool import sum_stats

    codec = KwargsCodec(EngineClient.add_request, skip=("request_id",))
    sent = {"priority": -1, "share": TenantShare(weight=2, max_kv_blocks=30)}
    assert codec.decode(jsonable(sent)) == sent

    def replica(**tenants: TenantStats) -> ReplicaStats:
        stats = ReplicaStats(0, 0, 0, 0, 0.0, 0, 0, 0, tenants=tenants)
        return STATS_ADAPTER.validate_json(encode(stats))

    one = replica(a=TenantStats(running=2, kv_blocks=10, max_kv_blocks=30, service_lead=5.0))
    two = replica(a=TenantStats(waiting=1, kv_blocks=4, max_kv_blocks=30), b=TenantStats(running=1))
    total = sum_stats([one, two]).tenants
    assert total["a"] == TenantStats(2, 1, 14, 30, 5.0)
    assert total["b"] == TenantStats(running=1)
