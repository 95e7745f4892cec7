"""`prefixgate admin ...` against a real uvicorn server (admin API over Redis)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.app import create_app
from gateway.cli import main
from tests.gateway.conftest import make_settings, running_server
from tests.gateway.fake_engine import FakeEngine
from tests.gateway.tenancy.helpers import ADMIN_KEY, bearer, chat


@pytest.fixture
def url(redis_url: str) -> Iterator[str]:
    app = create_app(make_settings(redis_url=redis_url, admin_key=ADMIN_KEY), FakeEngine())
    with running_server(app) as base:
        yield base


class CLI:
    def __init__(self, url: str, capsys: pytest.CaptureFixture[str]) -> None:
        self.url = url
        self.capsys = capsys

    def __call__(self, *argv: str, status: int = 0) -> Any:
        """Run `prefixgate admin --url ... --admin-key ... ARGV`; the parsed stdout JSON."""
        code = main(["admin", "--url", self.url, "--admin-key", ADMIN_KEY, *argv])
        out, err = self.capsys.readouterr()
        assert code == status, err
        return json.loads(out) if status == 0 else err


@pytest.fixture
def cli(url: str, capsys: pytest.CaptureFixture[str]) -> CLI:
    return CLI(url, capsys)


def limits(tenant: dict[str, Any]) -> dict[str, int]:
    return {k: v for k, v in tenant["quota"].items() if v is not None}


def completion(url: str, key: str) -> int:
    r = httpx.post(f"{url}/v1/chat/completions", json=chat(max_tokens=2), headers=bearer(key))
    return r.status_code


def test_tenants_and_quota(cli: CLI) -> None:
    made = cli("tenants", "create", "acme", "--name", "Acme", "--metadata", "plan=pro",
               "--requests-per-minute", "50", "--tokens-per-day", "100000")  # fmt: skip
    assert (made["id"], made["name"], made["metadata"]) == ("acme", "Acme", {"plan": "pro"})
    assert limits(made) == {"requests_per_minute": 50, "tokens_per_day": 100_000}
    cli("tenants", "create", "beta")
    assert [t["id"] for t in cli("tenants", "list")["data"]] == ["acme", "beta"]
    # update changes only the limits given; none makes one unlimited.
    updated = cli("tenants", "update", "acme", "--tokens-per-day", "none",
                  "--max-concurrent-requests", "4", "--disable")  # fmt: skip
    assert limits(updated) == {"requests_per_minute": 50, "max_concurrent_requests": 4}
    assert updated["disabled"] is True and updated["name"] == "Acme"
    assert cli("tenants", "update", "acme", "--enable")["disabled"] is False
    # quota set replaces the whole quota.
    assert limits(cli("quota", "set", "acme", "--tokens-per-minute", "9000")) == {
        "tokens_per_minute": 9000
    }
    assert limits(cli("tenants", "get", "acme")) == {"tokens_per_minute": 9000}
    assert cli("tenants", "delete", "beta") == {"id": "beta", "object": "tenant", "deleted": True}
    err = cli("tenants", "get", "beta", status=1)
    assert "404 (tenant_not_found): Tenant 'beta' does not exist." in err
    err = cli("tenants", "create", "acme", status=1)
    assert "409 (tenant_exists)" in err


def test_keys_and_usage(cli: CLI, url: str) -> None:
    cli("tenants", "create", "acme")
    issued = cli("keys", "issue", "acme", "--name", "ci", "--expires-in", "3600")
    key, key_id = issued["key"], issued["key_id"]
    assert key.startswith("pg-") and issued["expires_at"] is not None
    assert completion(url, key) == 200
    [listed] = cli("keys", "list", "acme")["data"]
    assert listed["key_id"] == key_id and "key" not in listed

    rotated = cli("keys", "rotate", "acme", key_id)
    assert completion(url, key) == 401 and completion(url, rotated["key"]) == 200
    graced = cli("keys", "rotate", "acme", rotated["key_id"], "--grace", "60")
    assert completion(url, rotated["key"]) == 200 and completion(url, graced["key"]) == 200
    assert cli("keys", "revoke", "acme", rotated["key_id"])["revoked"] is True
    assert completion(url, rotated["key"]) == 401

    usage = cli("usage", "get", "acme")
    assert usage["today"]["requests"] == 4 and usage["today"]["completion_tokens"] == 8
    assert cli("usage", "reset", "acme")["today"]["requests"] == 0


def test_cli_errors(
    url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["admin", "--url", url, "--admin-key", "wrong", "tenants", "list"]) == 1
    assert "401 (invalid_api_key)" in capsys.readouterr().err
    monkeypatch.delenv("PREFIXGATE_ADMIN_KEY", raising=False)
    assert main(["admin", "--url", url, "tenants", "list"]) == 2
    assert "no admin key" in capsys.readouterr().err
    nowhere = "http://127.0.0.1:9"  # discard port: nothing listens
    assert main(["admin", "--url", nowhere, "--admin-key", "k", "tenants", "list"]) == 1
    assert f"cannot reach {nowhere}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["admin", "tenants", "create", "acme", "--requests-per-minute", "0"])
    assert "positive integer or 'none'" in capsys.readouterr().err


def test_entry_point_reads_the_admin_key_from_the_environment(url: str) -> None:
    env = {**os.environ, "PREFIXGATE_ADMIN_KEY": ADMIN_KEY, "PREFIXGATE_URL": url}
    cmd = [sys.executable, "-m", "gateway.cli", "admin", "tenants", "create", "acme"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["id"] == "acme"


def test_public_prefixes(cli: CLI, tmp_path: Any) -> None:
    made = cli("prefixes", "create", "house", "--system", "You are terse.", "--pin")
    assert (made["name"], made["public"], made["pinned"]) == ("house", True, True)
    messages = tmp_path / "messages.json"
    messages.write_text(json.dumps([{"role": "system", "content": "Be kind."}]))
    made = cli("prefixes", "create", "kind", "--messages-file", str(messages), "--ttl", "60")
    assert made["messages"] == [{"role": "system", "content": "Be kind."}]
    assert made["expires_at"] is not None
    assert cli("prefixes", "create", "doc", "--text", "Once upon a time")["text"]
    assert [p["name"] for p in cli("prefixes", "list")["data"]] == ["doc", "house", "kind"]
    assert cli("prefixes", "get", "house")["requests"] == 0
    assert cli("prefixes", "delete", "house")["deleted"] is True
    err = cli("prefixes", "get", "house", status=1)
    assert "404 (prefix_not_found)" in err
