"""API fuzzing from the gateway's own OpenAPI document (schemathesis), through a real uvicorn
server over the fake engine and the in-process tenant store.

Every operation, tenant and admin, gets valid and invalid bodies, parameters and keys (a
tenant's key, the admin key, a revoked-looking key, none): no server error, no hang (a client
timeout fails the example), every status documented, every body valid against the document,
every error in OpenAI's shape. Bounded for CI: a fixed number of examples per operation,
derandomized so a run is reproducible.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway.app import ENDPOINTS, create_app
from gateway.openapi import build_openapi
from tests.gateway.conftest import make_settings, running_server
from tests.gateway.fake_engine import FakeEngine
from tests.gateway.tenancy.helpers import ADMIN_KEY

# Per operation: ~50 s for the whole document on 2 cores; FUZZ_EXAMPLES=1000 for a longer run.
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "80"))
TENANT = "fuzz-tenant-5d1c9e"  # an id the generator will not hit

schema = schemathesis.openapi.from_dict(build_openapi(ENDPOINTS))


class Server:
    url = ""
    key = ""  # the tenant's


SERVER = Server()


ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


def _new_tenant_key(url: str) -> str:
    """(Re)create the tenant and a key of it."""
    httpx.delete(url + f"/admin/tenants/{TENANT}", headers=ADMIN)
    r = httpx.post(url + "/admin/tenants", json={"id": TENANT}, headers=ADMIN)
    assert r.status_code == 201, r.text
    r = httpx.post(url + f"/admin/tenants/{TENANT}/keys", headers=ADMIN)
    assert r.status_code == 201, r.text
    key: str = r.json()["key"]
    return key


def live_tenant_key() -> str:
    """The tenant's key, made anew when the fuzzer has found the tenant through the admin API
    (schemathesis reuses ids from responses) and deleted, disabled or revoked it."""
    usage = httpx.get(SERVER.url + "/v1/usage", headers={"authorization": f"Bearer {SERVER.key}"})
    if usage.status_code != 200:
        SERVER.key = _new_tenant_key(SERVER.url)
    return SERVER.key


@pytest.fixture(scope="module", autouse=True)
def server() -> Iterator[Server]:
    with running_server(create_app(make_settings(admin_key=ADMIN_KEY), FakeEngine())) as url:
        served = httpx.get(url + "/openapi.json").json()
        assert served == json.loads(json.dumps(build_openapi(ENDPOINTS)))  # the fuzzed document
        SERVER.url, SERVER.key = url, _new_tenant_key(url)
        yield SERVER


# (key, the status every answer must have, if any): the right key twice as often as each wrong
# one. On the OpenAI API the admin key is no tenant key (401); on the admin API a tenant key
# gets 403, any other key 401. The operations routes need no key.
TENANT_KEY, UNKNOWN_KEY = "<the tenant's key>", "pg-" + "A" * 43
OPENAI_KEYS = [(TENANT_KEY, None), (TENANT_KEY, None), (ADMIN_KEY, 401), (UNKNOWN_KEY, 401),
               (None, 401)]  # fmt: skip
ADMIN_KEYS = [(ADMIN_KEY, None), (ADMIN_KEY, None), (TENANT_KEY, 403), (UNKNOWN_KEY, 401),
              (None, 401)]  # fmt: skip


def _key(path: str, choice: int) -> tuple[str | None, int | None]:
    if path.startswith("/admin"):
        return ADMIN_KEYS[choice]
    key, status = OPENAI_KEYS[choice]
    return key, status if path.startswith("/v1") else None


def openai_error_shape(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every error carries OpenAI's four fields (message and type strings)."""
    if response.status_code < 400:
        return None
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and isinstance(error["type"], str), error
    return True


CHECKS = [
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    negative_data_rejection,
]


@schema.parametrize()
@schema.given(key_choice=st.integers(min_value=0, max_value=4))
@settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_fuzz(case: Any, key_choice: int) -> None:
    key, status = _key(case.path, key_choice)
    if key == TENANT_KEY:
        key = live_tenant_key()
    headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
    case.headers = headers | ({"authorization": f"Bearer {key}"} if key is not None else {})
    response = case.call(base_url=SERVER.url, timeout=30)
    assert response.status_code < 500, (response.status_code, response.text)
    case.validate_response(response, checks=CHECKS, additional_checks=[openai_error_shape])
    if status is not None and response.json()["error"]["code"] != "not_found":  # unknown path
        assert response.status_code == status, (key, response.text)
