"""The registry's quotas across processes: two `prefixgate serve` processes (each with its own
embedded tiny engine) on one Redis, registering prefixes for one tenant at the same time.
`max_prefixes` and `max_pinned_blocks` hold exactly: the check and the write are one Redis
script, so no interleaving of the two gateways lets a tenant past either limit."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any

import httpx
import pytest

from tests.gateway.replicas.helpers import CliProcess, cli_process
from tests.gateway.tenancy.helpers import ADMIN_KEY, bearer, tenant_key_sync


@pytest.fixture
def gateways(tiny_model_dir: str, redis_url: str) -> Iterator[list[CliProcess]]:
    env = {"PREFIXGATE_REDIS_URL": redis_url, "PREFIXGATE_ADMIN_KEY": ADMIN_KEY,
           "PREFIXGATE_LOG_LEVEL": "warning"}  # fmt: skip
    args = ["--model", tiny_model_dir, "--dtype", "float32", "--num-blocks", "128"]
    with ExitStack() as stack:
        yield [stack.enter_context(cli_process("serve", args, env)) for _ in range(2)]


def register_all(gateways: list[CliProcess], key: str, bodies: list[dict[str, Any]]) -> list[int]:
    """POST every body at once, alternating between the gateways; their statuses in order."""

    def post(i: int) -> int:
        url = gateways[i % len(gateways)].url
        r = httpx.post(f"{url}/v1/prefixes", json=bodies[i], headers=bearer(key), timeout=120)
        assert r.status_code in (201, 409), r.text
        if r.status_code == 409:
            assert r.json()["error"]["type"] == "invalid_request_error"
        return r.status_code

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(post, range(len(bodies))))


def listed(url: str, key: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{url}/v1/prefixes", headers=bearer(key), timeout=30)
    assert r.status_code == 200, r.text
    data: list[dict[str, Any]] = r.json()["data"]
    return data


def test_registry_quotas_hold_across_two_gateway_processes(gateways: list[CliProcess]) -> None:
    """One pair of processes for both limits (starting them is most of the test's time)."""
    max_prefixes_holds(gateways)
    max_pinned_blocks_holds(gateways)


def max_prefixes_holds(gateways: list[CliProcess]) -> None:
    key = tenant_key_sync(gateways[0].url, "racer", max_prefixes=3)
    bodies = [{"name": f"p{i}", "text": f"prefix number {i} " * 4} for i in range(8)]
    statuses = register_all(gateways, key, bodies)
    assert statuses.count(201) == 3
    assert statuses.count(409) == 5
    for g in gateways:  # both see the same three
        names = {p["name"] for p in listed(g.url, key)}
        assert names == {b["name"] for b, s in zip(bodies, statuses, strict=True) if s == 201}


def max_pinned_blocks_holds(gateways: list[CliProcess]) -> None:
    key = tenant_key_sync(gateways[0].url, "pinner", max_prefixes=20, max_pinned_blocks=5)
    # texts of one shape, so the same number of full blocks each: as many pins as fit in 5 win
    bodies = [{"name": f"pin{i}", "text": f"{i}" + " a b" * 12, "pin": True} for i in range(6)]
    statuses = register_all(gateways, key, bodies)
    won = [b["name"] for b, s in zip(bodies, statuses, strict=True) if s == 201]
    prefixes = {p["name"]: p for p in listed(gateways[1].url, key)}
    assert set(prefixes) == set(won)
    [blocks] = {p["num_blocks"] for p in prefixes.values()}
    assert blocks >= 1 and all(p["pinned"] for p in prefixes.values())
    assert len(won) == 5 // blocks < len(bodies)
