"""An engine served as a replica (`engine.service.app`) in this process, and a gateway over it
through the remote client."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from engine.service.app import create_engine_app
from gateway.app import create_app
from gateway.replicas import replicas_loader
from tests.gateway.conftest import make_settings, running_server, wait_until


def is_ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def serve_replica(engine: Any, replica_id: str = "replica-0") -> Iterator[str]:
    """`engine` behind the replica API on a loopback port; yields its URL."""
    with running_server(create_engine_app(engine, replica_id=replica_id)) as url:
        yield url


@contextmanager
def serve_gateway(engine_urls: list[str], model: str, **settings: Any) -> Iterator[str]:
    """A gateway (uvicorn, loopback) over replicas at `engine_urls`; yields its URL once ready."""
    settings = make_settings(served_model_name=model, engine_urls=",".join(engine_urls), **settings)
    app = create_app(settings, engine_loader=replicas_loader(settings))
    with running_server(app) as url:
        assert wait_until(lambda: is_ready(url))
        yield url


@contextmanager
def serve_remote(engine: Any) -> Iterator[str]:
    """A gateway whose engine is `engine` served as a replica; yields the gateway's URL."""
    with serve_replica(engine) as replica, serve_gateway([replica], engine.model_name) as url:
        yield url
