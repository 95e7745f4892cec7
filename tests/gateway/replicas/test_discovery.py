"""Replica discovery through real Redis: heartbeats, KV events and snapshots into a gateway's
pool, a replica whose heartbeat stops leaving rotation with its streams ended, and a draining
one leaving rotation with its streams kept. Time is a fake clock; the replica is the fake engine
served over loopback HTTP."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis.asyncio as aioredis

from engine.errors import EngineOverloadedError
from engine.sampling_params import SamplingParams
from engine.service import protocol
from engine.service.discovery import Heartbeat, RegistryKeys
from gateway.replicas.discovery import RedisReplicas
from gateway.replicas.pool import ReplicaPool
from gateway.replicas.remote import ReplicaLostError, Timeouts
from gateway.replicas.router import HASH_BYTES, prompt_chain
from tests.gateway.fake_engine import FakeEngine
from tests.gateway.replicas.helpers import serve_replica
from tests.tenants.conftest import unique_prefix


class HashingFake(FakeEngine):
    """The fake engine with a settable set of cached block hashes (its KV events)."""

    def __init__(self) -> None:
        super().__init__(token_delay=0.01)
        self.hashes: set[bytes] = set()

    async def cached_block_hashes(self) -> list[bytes]:
        return sorted(self.hashes)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[Any]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def until_live(watcher: RedisReplicas, pool: ReplicaPool) -> None:
    while not pool.live():  # the join connects in the background
        await watcher.sync()
        await asyncio.sleep(0.01)


@dataclass
class Followed:
    """A replica beating into Redis, and a gateway's pool following the registry."""

    beat: Heartbeat
    pool: ReplicaPool
    watcher: RedisReplicas
    watcher_redis: Any


@contextlib.asynccontextmanager
async def followed(
    fake: HashingFake, redis_client: Any, redis_url: str, clock: Clock, **beat: Any
) -> AsyncIterator[Followed]:
    """`fake` served as replica r0 (TTL 3 s on `clock`), registered once, and a pool following
    the registry from its first event; all closed and deregistered at exit."""
    keys = RegistryKeys(unique_prefix())
    with serve_replica(fake, "r0") as url:
        heartbeat = Heartbeat(
            fake, redis_client, keys, replica_id="r0", url=url, ttl_s=3, clock=clock, **beat
        )
        await heartbeat.beat()
        pool = ReplicaPool("prefix", model_name=fake.model_name)
        pool.tokenizer = fake.tokenizer  # the fake's has no files to send
        watcher_redis = aioredis.Redis.from_url(redis_url)
        watcher = RedisReplicas(pool, watcher_redis, keys, Timeouts(ttl_s=3), clock=clock)
        watcher.stream_id = "0-0"
        try:
            yield Followed(heartbeat, pool, watcher, watcher_redis)
        finally:
            pool.shutdown()
            await watcher_redis.aclose()
            await heartbeat.leave()
            await redis_client.delete(keys.events)


async def test_heartbeats_kv_events_and_expiry(redis_client: Any, redis_url: str) -> None:
    clock, fake = Clock(), HashingFake()
    tokens = fake.tokenizer.encode("a system prompt long enough for two blocks." * 2)
    chain = prompt_chain(tokens, fake.block_size, "ns")
    full = [h + b"\0" * (32 - HASH_BYTES) for h in chain]  # the engine reports 32-byte hashes
    fake.hashes = set(full[:1])  # registered with a snapshot of one block
    async with followed(fake, redis_client, redis_url, clock) as f:
        beat, pool, watcher = f.beat, f.pool, f.watcher
        await until_live(watcher, pool)
        [replica] = pool.live()
        assert (replica.block_size, pool.block_size) == (fake.block_size, fake.block_size)
        assert pool.index.cached_prefix(chain) == {"r0": 1}  # from the snapshot
        fake.hashes = set(full)  # a second block stored: a KV event
        await beat.beat()
        await watcher.sync()
        assert pool.index.cached_prefix(chain) == {"r0": len(chain)}
        assert replica.stats().num_blocks == fake.num_blocks  # load from the heartbeat
        fake.hashes = set()  # all evicted
        await beat.beat()
        await watcher.sync()
        assert pool.index.cached_prefix(chain) == {}

        stream = pool.add_request(
            tokens, SamplingParams(max_tokens=400, ignore_eos=True), namespace="ns"
        )
        await stream.__anext__()
        clock.now += 3.5  # the replica stops beating: past its TTL
        await watcher.sync()
        assert not pool.replicas
        with pytest.raises(ReplicaLostError):
            async for _ in stream:
                pass


async def test_a_replica_joins_once_while_its_snapshot_is_read(
    redis_client: Any, redis_url: str
) -> None:
    """A sync round that comes while a join is still reading the replica's snapshot starts no
    second join: the second connection replaced the first one ("replaced by a new process"),
    ending any stream already routed to it (found by bench/soak.py)."""
    keys, clock, fake = RegistryKeys(unique_prefix()), Clock(), HashingFake()
    with serve_replica(fake, "r0") as url:
        beat = Heartbeat(fake, redis_client, keys, replica_id="r0", url=url, ttl_s=3, clock=clock)
        await beat.beat()
        pool = ReplicaPool("prefix", model_name=fake.model_name)
        pool.tokenizer = fake.tokenizer
        removed: list[str] = []
        remove = pool.remove

        def recording_remove(replica_id: str, reason: str) -> None:
            removed.append(reason)
            remove(replica_id, reason)

        pool.remove = recording_remove  # type: ignore[method-assign]
        watcher_redis = aioredis.Redis.from_url(redis_url)
        reading, release = asyncio.Event(), asyncio.Event()
        get = watcher_redis.get

        async def held_get(name: str) -> Any:
            reading.set()
            await release.wait()
            return await get(name)

        watcher_redis.get = held_get  # type: ignore[method-assign]
        watcher = RedisReplicas(pool, watcher_redis, keys, Timeouts(ttl_s=3), clock=clock)
        watcher.stream_id = "0-0"
        try:
            await watcher.sync()
            await reading.wait()  # connected, reading the snapshot
            await watcher.sync()  # another round meanwhile
            release.set()
            await until_live(watcher, pool)
            while watcher._joining:  # any other join done too
                await asyncio.sleep(0.01)
            assert removed == [] and list(pool.replicas) == ["r0"]
        finally:
            pool.shutdown()
            await watcher_redis.aclose()
            await beat.leave()
            await redis_client.delete(keys.events)


async def test_liveness_does_not_wait_for_the_engine_thread(redis_client: Any) -> None:
    """A replica whose engine thread is busy (a long step: the KV hashes are read between two
    steps) keeps announcing itself, its expiry moving on, so gateways do not drop it and end
    its streams (found by bench/soak.py: on a starved CPU both replicas flapped every few
    seconds at the 5 s TTL)."""
    keys, clock, fake = RegistryKeys(unique_prefix()), Clock(), HashingFake()
    release = asyncio.Event()

    async def busy_engine_thread() -> list[bytes]:
        await release.wait()
        return []

    fake.cached_block_hashes = busy_engine_thread  # type: ignore[method-assign]
    beat = Heartbeat(fake, redis_client, keys, replica_id="r0", url="http://r0", ttl_s=0.3,
                     clock=clock)  # fmt: skip
    task = asyncio.get_running_loop().create_task(beat.run())
    try:
        for _ in range(3):  # the expiry moves with the clock while the hashes never come
            clock.now += 1.0
            while (await redis_client.zscore(keys.replicas, "r0") or 0) < clock.now:
                await asyncio.sleep(0.01)
        assert not release.is_set() and beat.cached == set()
    finally:
        release.set()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await beat.leave()
        await redis_client.delete(keys.events)


async def test_a_draining_replica_leaves_rotation_and_keeps_its_streams(
    redis_client: Any, redis_url: str
) -> None:
    """A replica whose heartbeat says it drains (`gateway/drain.py`) gets no new request; the
    streams it has run to their end."""
    fake, draining = HashingFake(), False

    def stats() -> dict[str, Any]:
        wire: dict[str, Any] = protocol.jsonable(fake.stats())
        return wire | {"draining": draining}

    async with followed(fake, redis_client, redis_url, Clock(), stats=stats) as f:
        await until_live(f.watcher, f.pool)
        tokens = fake.tokenizer.encode("Hello there")
        stream = f.pool.add_request(tokens, SamplingParams(max_tokens=30, ignore_eos=True))
        await stream.__anext__()
        draining = True
        await f.beat.beat()
        await f.watcher.sync()
        assert not f.pool.live() and "r0" in f.pool.replicas
        with pytest.raises(EngineOverloadedError):
            f.pool.add_request(tokens, SamplingParams(max_tokens=1))
        deltas = [delta async for delta in stream]
        assert deltas[-1].finished


async def test_a_redis_outage_longer_than_the_ttl_drops_no_live_replica(
    redis_client: Any, redis_url: str
) -> None:
    """Redis down for longer than the TTL: every registration has expired when it answers
    again, before the replicas beat anew. The gateway waits one TTL for them instead of
    dropping them and ending their streams (found by test_compose on a loaded machine)."""
    fake, clock = HashingFake(), Clock()

    async def unreachable(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("Redis is down")

    async with followed(fake, redis_client, redis_url, clock) as f:
        read = f.watcher_redis.zrangebyscore
        await until_live(f.watcher, f.pool)
        tokens = fake.tokenizer.encode("Hello there")
        stream = f.pool.add_request(tokens, SamplingParams(max_tokens=30, ignore_eos=True))
        await stream.__anext__()
        f.watcher_redis.zrangebyscore = unreachable
        with pytest.raises(ConnectionError):
            await f.watcher.sync()
        clock.now += 10.0  # the outage outlasts the TTL: r0's registration has expired
        f.watcher_redis.zrangebyscore = read
        await f.watcher.sync()  # back, r0 not beaten yet: kept
        assert [e.replica_id for e in f.pool.live()] == ["r0"]
        await f.beat.beat()
        clock.now += 2.0
        await f.watcher.sync()
        assert "r0" in f.pool.replicas
        deltas = [delta async for delta in stream]
        assert deltas[-1].finished  # its stream was never ended
        clock.now += 3.5  # now truly silent for a TTL: dropped
        await f.watcher.sync()
        assert not f.pool.replicas
