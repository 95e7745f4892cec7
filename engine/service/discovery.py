"""A replica's registration in Redis: heartbeat with a TTL, load, and KV events.

Key layout (under the deployment's key prefix `p`, as the tenant store's):

```
p:replicas                 ZSET  replica id -> expiry (epoch s); a gateway reads the live ones
p:replica:{id}             STRING (EX ttl) JSON: id, url, model, stats, heartbeat time
p:kv-events                STREAM  r=id, s=stored hashes, e=evicted hashes (8 bytes each,
                                   concatenated); with full=1, s is every cached hash (a full
                                   snapshot, replacing what the gateway knew); trimmed to about
                                   MAX_EVENTS entries
p:replica-blocks:{id}      STRING (EX 10 ttl) the latest full snapshot, for a gateway that
                                   starts (or sees the replica join) after it went out
```

Every `ttl_s / 3` the replica renews its key and its ZSET score (from the event loop alone:
liveness never waits for an engine step), and, in a loop of its own, diffs its cached block
hashes (read on the engine thread between steps) against the previous diff: new ones go out as
stored, gone ones as evicted, in one stream entry; every `snapshot_s` the entry is a full
snapshot instead. Gateways apply entries in
stream order, so a snapshot never erases a later event; one that starts late or missed events
converges at the next snapshot. A replica that stops beating leaves the ZSET's live range and
its key expires within `ttl_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from engine.service import protocol

logger = logging.getLogger("prefixgate.engine.discovery")

HASH_BYTES = 8  # index keys: the first bytes of the engine's 32-byte block hash
MAX_EVENTS = 100_000


@dataclass(frozen=True, slots=True)
class RegistryKeys:
    prefix: str

    @property
    def replicas(self) -> str:
        return f"{self.prefix}:replicas"

    @property
    def events(self) -> str:
        return f"{self.prefix}:kv-events"

    def replica(self, replica_id: str) -> str:
        return f"{self.prefix}:replica:{replica_id}"

    def blocks(self, replica_id: str) -> str:
        return f"{self.prefix}:replica-blocks:{replica_id}"


def pack(hashes: set[bytes]) -> bytes:
    return b"".join(sorted(hashes))


def unpack(blob: bytes) -> list[bytes]:
    return [blob[i : i + HASH_BYTES] for i in range(0, len(blob), HASH_BYTES)]


class Heartbeat:
    """Publishes one replica's liveness, load and KV events (see the module docstring).

    Args:
        engine: the served engine (`stats()`, `async cached_block_hashes()`).
        redis: an asyncio Redis client (binary replies).
        clock: epoch seconds.
        stats: what the record's stats are (the replica's `EngineService.wire_stats`, with
            its drain state); default `engine.stats`.
    """

    def __init__(
        self,
        engine: Any,
        redis: aioredis.Redis,
        keys: RegistryKeys,
        *,
        replica_id: str,
        url: str,
        ttl_s: float = 5.0,
        snapshot_s: float = 10.0,
        clock: Callable[[], float] = time.time,
        stats: Callable[[], Any] | None = None,
    ) -> None:
        self.engine = engine
        self.stats = stats or engine.stats
        self.redis = redis
        self.keys = keys
        self.replica_id = replica_id
        self.url = url
        self.ttl_s = ttl_s
        self.snapshot_s = snapshot_s
        self.clock = clock
        self.cached: set[bytes] = set()
        self._last_snapshot: float | None = None

    async def beat(self) -> None:
        """One heartbeat: liveness and load, then the KV diff (a snapshot when due)."""
        await self.announce()
        await self.publish_blocks()

    async def announce(self) -> None:
        """Liveness and load: the replica's record and its expiry. Never waits for the engine
        thread, so a long engine step (seconds on a starved CPU) cannot make a live replica look
        dead and end every stream open on it."""
        now = self.clock()
        record = {
            "replica_id": self.replica_id,
            "url": self.url,
            "model_name": self.engine.model_name,
            "stats": protocol.jsonable(self.stats()),
            "time": now,
        }
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self.keys.replica(self.replica_id), json.dumps(record), px=self._ttl_ms)
        pipe.zadd(self.keys.replicas, {self.replica_id: now + self.ttl_s})
        await pipe.execute()

    async def publish_blocks(self) -> None:
        """The KV diff since the last one, or a full snapshot when due. The hashes come from the
        engine thread, between two steps."""
        current = {h[:HASH_BYTES] for h in await self.engine.cached_block_hashes()}
        now = self.clock()
        stored, evicted = current - self.cached, self.cached - current
        full = self._last_snapshot is None or now - self._last_snapshot >= self.snapshot_s
        fields: dict[Any, Any] = {"r": self.replica_id, "s": pack(stored), "e": pack(evicted)}
        pipe = self.redis.pipeline(transaction=False)
        if full:
            fields = {"r": self.replica_id, "s": pack(current), "e": b"", "full": b"1"}
            pipe.set(self.keys.blocks(self.replica_id), pack(current), px=10 * self._ttl_ms)
        if full or stored or evicted:
            pipe.xadd(self.keys.events, fields, maxlen=MAX_EVENTS, approximate=True)
        await pipe.execute()
        if full:
            self._last_snapshot = now
        self.cached = current

    @property
    def _ttl_ms(self) -> int:
        return max(1, int(self.ttl_s * 1000))

    async def leave(self) -> None:
        """Deregister at a clean shutdown (gateways drop it at once, not after the TTL)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrem(self.keys.replicas, self.replica_id)
        pipe.delete(self.keys.replica(self.replica_id), self.keys.blocks(self.replica_id))
        await pipe.execute()

    async def run(self) -> None:
        """Announce and publish KV events every ttl/3, each in its own loop (the KV hashes wait
        for the engine thread, liveness must not), until cancelled; a Redis outage is logged and
        retried."""
        await asyncio.gather(self._every(self.announce), self._every(self.publish_blocks))

    async def _every(self, step: Callable[[], Awaitable[None]]) -> None:
        while True:
            try:
                await step()
            except Exception:
                logger.exception("heartbeat to Redis failed")
            await asyncio.sleep(self.ttl_s / 3)


@contextlib.asynccontextmanager
async def heartbeating(heartbeat: Heartbeat) -> AsyncIterator[None]:
    """Run `heartbeat` for the duration of the block; leave the registry at the end."""
    task = asyncio.get_running_loop().create_task(heartbeat.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        with contextlib.suppress(Exception):
            await heartbeat.leave()
        await heartbeat.redis.aclose()
