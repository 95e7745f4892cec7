"""Where a `ReplicaPool` learns its replicas: a fixed URL list (`StaticReplicas`) or the
registry in Redis that replicas heartbeat into (`RedisReplicas`, key layout in
`engine.service.discovery`)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import httpx
import redis.asyncio as aioredis

from engine.service import protocol
from engine.service.discovery import RegistryKeys, unpack
from gateway.replicas.pool import ReplicaPool
from gateway.replicas.remote import RemoteEngine, Timeouts

logger = logging.getLogger("prefixgate.replicas")


async def connect_until_up(url: str, timeouts: Timeouts, tokenizer: Any) -> RemoteEngine:
    """Connect to a replica, retrying every probe period while it is not up yet (cancellable)."""
    while True:
        try:
            return await RemoteEngine.connect(url, timeouts, tokenizer)
        except (httpx.HTTPError, ValueError, KeyError):
            await asyncio.sleep(timeouts.probe_s)


class StaticReplicas:
    """Replicas at fixed URLs, each watched by its own liveness probe (a lost one comes back
    into rotation when it answers again)."""

    def __init__(self, pool: ReplicaPool, urls: list[str], timeouts: Timeouts) -> None:
        self.pool = pool
        self.urls = urls
        self.timeouts = timeouts
        self._tasks: list[asyncio.Task[None]] = []

    async def first(self) -> None:
        """Wait for the first replica to answer, then connect the others in the background."""
        pending = [asyncio.ensure_future(self._join(url)) for url in self.urls]
        self._tasks = pending  # type: ignore[assignment]
        self.pool.on_close(self.stop)
        done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()

    async def _join(self, url: str) -> None:
        engine = await connect_until_up(url, self.timeouts, self.pool.tokenizer)
        if self.pool.add(engine):
            engine.start()

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()


class RedisReplicas:
    """Follows the replica registry in Redis: joins live replicas, drops the ones whose
    heartbeat expired (their streams end with an error), and applies KV events and full
    snapshots to the pool's block index in stream order (a joining replica starts from its
    latest snapshot).

    While Redis does not answer, the pool stays as it is; once it answers again, replicas get
    one TTL to renew their registration (which expired meanwhile if the outage outlasted it)
    before a missing one is dropped, so an outage never ends the streams of live replicas."""

    def __init__(
        self,
        pool: ReplicaPool,
        redis: aioredis.Redis,
        keys: RegistryKeys,
        timeouts: Timeouts,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.pool = pool
        self.redis: Any = redis  # binary replies; redis-py's annotations do not say which
        self.keys = keys
        self.timeouts = timeouts
        self.clock = clock
        self.stream_id = "$"
        self._joining: dict[str, asyncio.Task[None]] = {}
        self._task: asyncio.Task[None] | None = None
        self._readable_since: float | None = None  # registry read without a failure since

    async def first(self) -> None:
        """Start following; return once one replica is in rotation."""
        self._task = asyncio.get_running_loop().create_task(self._run())
        self.pool.on_close(self.stop)
        while not self.pool.live():
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.05)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for task in self._joining.values():
            task.cancel()
        asyncio.get_running_loop().create_task(self.redis.aclose())

    async def _run(self) -> None:
        first = await self.redis.xrevrange(self.keys.events, count=1)
        self.stream_id = first[0][0].decode() if first else "0-0"
        while True:
            try:
                await self.sync()
            except Exception:
                logger.exception("replica discovery: Redis call failed")
            await asyncio.sleep(min(self.timeouts.probe_s, self.timeouts.ttl_s / 3))

    async def sync(self) -> None:
        """One round: membership and load, then KV events."""
        now = self.clock()
        try:
            records = await self._live_records(now)
        except Exception:
            self._readable_since = None
            raise
        if self._readable_since is None:
            self._readable_since = now
        settled = now - self._readable_since >= self.timeouts.ttl_s  # every replica beat since
        for replica_id in list(self.pool.replicas):
            if replica_id not in records and settled:
                self.pool.remove(replica_id, "heartbeat expired")
        for replica_id, record in records.items():
            self._update(replica_id, record)
        await self._apply_events()

    async def _live_records(self, now: float) -> dict[str, dict[str, Any]]:
        ids = [i.decode() for i in await self.redis.zrangebyscore(self.keys.replicas, now, "+inf")]
        if not ids:
            return {}
        raw = await self.redis.mget([self.keys.replica(i) for i in ids])
        return {i: json.loads(r) for i, r in zip(ids, raw, strict=True) if r is not None}

    def _update(self, replica_id: str, record: dict[str, Any]) -> None:
        engine = self.pool.replicas.get(replica_id)
        if engine is not None and engine.url == record["url"].rstrip("/"):
            beat = record.get("time")
            stats = protocol.STATS_ADAPTER.validate_python(record["stats"])
            engine.seen(stats, None if beat is None else float(beat))
            return
        if replica_id not in self._joining:
            task = asyncio.get_running_loop().create_task(self._join(replica_id, record["url"]))
            self._joining[replica_id] = task

    async def _join(self, replica_id: str, url: str) -> None:
        """Connect, read the replica's snapshot, put it in rotation. It counts as joining until
        it is in the pool: a sync round meanwhile must not start a second join, whose connection
        would replace this one (ending the streams already routed to it)."""
        try:
            try:
                engine = await RemoteEngine.connect(url, self.timeouts, self.pool.tokenizer)
                engine.clock = self.clock  # the heartbeats' clock
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                logger.warning(json.dumps({"event": "replica_unreachable", "replica": replica_id,
                                           "url": url, "error": repr(exc)}))  # fmt: skip
                return
            blob = await self.redis.get(self.keys.blocks(replica_id))
            # In rotation with what it caches known, in one go.
            if self.pool.add(engine) and blob is not None:
                self.pool.index.snapshot(replica_id, unpack(blob))
        finally:
            self._joining.pop(replica_id, None)

    async def _apply_events(self) -> None:
        while True:
            batch = await self.redis.xread({self.keys.events: self.stream_id}, count=1000)
            if not batch:
                return
            [(_, entries)] = batch
            for entry_id, fields in entries:
                self.stream_id = entry_id.decode()
                replica_id = fields[b"r"].decode()
                if replica_id not in self.pool.replicas:
                    continue
                if fields.get(b"full"):
                    self.pool.index.snapshot(replica_id, unpack(fields[b"s"]))
                else:
                    self.pool.index.evicted(replica_id, unpack(fields[b"e"]))
                    self.pool.index.stored(replica_id, unpack(fields[b"s"]))
            if len(entries) < 1000:
                return
