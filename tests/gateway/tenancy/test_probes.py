"""A hostile tenant probing another's private pinned prefix on the real engine (tiny random
Llama) behind a real server, Redis holding the registry:

- by name: GET, DELETE and use of the other tenant's prefix are 404 (never 403, never its
  data), its own list, usage and a prefix of the same name are its own;
- by timing: a prompt equal to the pinned prefix is served exactly as a cold prompt of the
  same length. The hard assertion is structural (no cached token across tenants); the timing
  one is a rank test over interleaved probes with a threshold loose enough for a busy machine.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.app import create_app
from tests.gateway.conftest import make_settings, running_server
from tests.gateway.tenancy.helpers import ADMIN_KEY, admin_sync, bearer, tenant_key_sync
from tests.gateway.tenancy.test_prefix_server import small_engine

SECRET = "The vault code of Acme is 7-3-9-1; tell it to nobody."
ROUNDS = 16
Z_LIMIT = 4.0  # two-sided p < 6e-5 under the null: no flake from chance alone


@pytest.fixture
def served(tiny_model_dir: str, redis_url: str) -> Iterator[tuple[str, str]]:
    """(URL, model name) of a server over a fresh small engine (64 blocks, pins allowed)."""
    engine = small_engine(tiny_model_dir)
    app = create_app(make_settings(redis_url=redis_url, admin_key=ADMIN_KEY), engine)
    try:
        with running_server(app) as url:
            yield url, engine.model_name
    finally:
        engine.shutdown()


def call(url: str, key: str, method: str, path: str, body: Any = None) -> httpx.Response:
    return httpx.request(method, url + path, json=body, headers=bearer(key), timeout=60)


def system(nonce: int) -> str:
    """A ~70-token system prompt; nonces of the same digit count give the same token count."""
    return f"[{nonce}] You are the assistant of the Acme vault team. {SECRET} " * 2


def messages(system_text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": system_text}, {"role": "user", "content": "Hello?"}]


def timed_chat(url: str, key: str, model: str, system_text: str) -> tuple[float, dict[str, Any]]:
    """(seconds to the only token, usage) of a one-token completion."""
    body = {"model": model, "messages": messages(system_text), "max_tokens": 1}
    start = time.perf_counter()
    r = call(url, key, "POST", "/v1/chat/completions", body)
    elapsed = time.perf_counter() - start
    assert r.status_code == 200, r.text
    usage: dict[str, Any] = r.json()["usage"]
    return elapsed, usage


def rank_z(xs: list[float], ys: list[float]) -> float:
    """Mann-Whitney U of xs against ys as a z score (normal approximation, no ties expected)."""
    ranked = sorted([(x, 0) for x in xs] + [(y, 1) for y in ys])
    rank_sum = sum(rank for rank, (_, side) in enumerate(ranked, 1) if side == 0)
    n, m = len(xs), len(ys)
    u = rank_sum - n * (n + 1) / 2
    return (u - n * m / 2) / math.sqrt(n * m * (n + m + 1) / 12)


def test_another_tenants_prefix_by_name(served: tuple[str, str]) -> None:
    url, model = served
    alpha, bravo = tenant_key_sync(url, "alpha"), tenant_key_sync(url, "bravo")
    secret = {"name": "vault", "messages": messages(system(1))[:1], "pin": True}
    assert call(url, alpha, "POST", "/v1/prefixes", secret).status_code == 201
    use = {"model": model, "messages": messages("")[1:], "prefix": "vault", "max_tokens": 1}
    for method, path, body in [
        ("GET", "/v1/prefixes/vault", None),
        ("DELETE", "/v1/prefixes/vault", None),
        ("POST", "/v1/chat/completions", use),
    ]:
        r = call(url, bravo, method, path, body)
        assert r.status_code == 404 and r.json()["error"]["code"] == "prefix_not_found", r.text
        assert "vault code" not in r.text and "alpha" not in r.text
    assert call(url, bravo, "GET", "/v1/prefixes").json()["data"] == []
    usage = call(url, bravo, "GET", "/v1/usage").json()
    assert usage["tenant_id"] == "bravo" and "alpha" not in str(usage)
    # Bravo's own prefix of the same name is bravo's; alpha's is untouched (still pinned).
    own = {"name": "vault", "messages": [{"role": "system", "content": "Bravo's own."}]}
    assert call(url, bravo, "POST", "/v1/prefixes", own).status_code == 201
    assert "vault code" not in call(url, bravo, "GET", "/v1/prefixes/vault").text
    mine = call(url, alpha, "GET", "/v1/prefixes/vault").json()
    assert mine["pinned"] is True and mine["num_blocks"] > 1
    # Alpha's keys: the admin's to see, not another tenant's.
    assert admin_sync(url, "GET", "/admin/tenants/alpha/keys").status_code == 200
    r = call(url, bravo, "GET", "/admin/tenants/alpha/keys")
    assert r.status_code == 403 and "alpha" not in r.text


def test_a_private_pinned_prefix_cannot_be_timed(served: tuple[str, str]) -> None:
    url, model = served
    owner = tenant_key_sync(url, "owner")
    secret = system(10**8)
    body = {"name": "vault", "messages": messages(secret)[:1], "pin": True}
    assert call(url, owner, "POST", "/v1/prefixes", body).status_code == 201
    # The owner's own prompt hits the pinned blocks: the probes below aim at a real hit.
    assert timed_chat(url, owner, model, secret)[1]["prompt_tokens_details"]["cached_tokens"] > 16
    rng = random.Random(0)
    times: dict[str, list[float]] = {"probe": [], "cold": []}
    for i in range(ROUNDS):
        # Fresh tenants each round: no probe hits blocks an earlier probe of its own left.
        order = [("probe", secret), ("cold", system(10**8 + 1 + i))]  # cold: never sent before
        rng.shuffle(order)
        prompt_tokens = set()
        for kind, text in order:
            key = tenant_key_sync(url, f"{kind}-{i}")
            elapsed, usage = timed_chat(url, key, model, text)
            assert usage["prompt_tokens_details"]["cached_tokens"] == 0, (kind, i)
            prompt_tokens.add(usage["prompt_tokens"])
            times[kind].append(elapsed)
        assert len(prompt_tokens) == 1  # the same work for both
    z = rank_z(times["probe"], times["cold"])
    assert abs(z) < Z_LIMIT, (z, sorted(times["probe"]), sorted(times["cold"]))
