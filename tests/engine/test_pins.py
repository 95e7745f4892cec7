"""Pinned prefixes on the real engine: they survive a flood that evicts everything else, their
leases end on the engine's clock, the cap refuses pins that would starve traffic, and outputs
served from pinned blocks equal transformers' token for token (float32)."""

from __future__ import annotations

import asyncio
import random

import pytest

from engine import LLM, AsyncEngine, EngineDeadError, LLMEngine, SamplingParams
from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.errors import PinRefusedError
from tests.engine.conftest import hf_greedy, hf_model

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 49000) for _ in range(n)]


def small_llm(path: str, **kw: object) -> LLM:
    """32 blocks of 4 tokens; max_model_len 64 (16 blocks) leaves a pin cap of 16 blocks."""
    options: dict[str, object] = dict(num_blocks=32, block_size=4, max_model_len=64)
    options.update(kw)
    return LLM(path, dtype="float32", **options)  # type: ignore[arg-type]


def flood(llm: LLM, seed: int) -> None:
    """Unique long prompts that together need twice the pool: evicts every unpinned block."""
    batch = [tokens(seed + i, 56) for i in range(4)]
    llm.generate(batch, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))


class FakeClock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_pinned_prefix_survives_a_flood_and_outputs_stay_exact(tiny_dirs) -> None:
    llm = small_llm(tiny_dirs["llama"])
    system, other = tokens(1, 42), tokens(2, 42)  # 10 full blocks each
    state = llm.warm_prefix(system, key="acme/support")
    assert (state.num_tokens, state.num_blocks, state.pinned) == (42, 10, True)
    assert llm.warm_prefix(other).pinned is False
    bm = llm.engine.block_manager
    assert bm.num_pinned_blocks == 10 and bm.tenant_pinned == {"default": 10}
    flood(llm, 100)
    question = tokens(3, 5)
    hit, miss = llm.generate([system + question, other + question], GREEDY)
    assert hit.num_cached_tokens == 40 and miss.num_cached_tokens == 0
    hf = hf_model(tiny_dirs["llama"])
    assert hit.outputs[0].token_ids == hf_greedy(hf, system + question, 8)
    assert bm.num_free_blocks == bm.num_blocks - 10  # nothing leaks but the pin
    assert llm.unpin_prefix("acme/support") and not llm.unpin_prefix("acme/support")
    assert bm.num_free_blocks == bm.num_blocks
    flood(llm, 200)
    assert llm.generate([system + question], GREEDY)[0].num_cached_tokens == 0


def test_pin_lease_ends_on_the_engine_clock(tiny_dirs) -> None:
    llm = small_llm(tiny_dirs["llama"])
    clock = FakeClock()
    llm.engine.clock = clock
    system = tokens(5, 20)
    llm.warm_prefix(system, key="p", expires_at=clock.now + 10)
    clock.now += 9.9
    flood(llm, 300)  # every step checks the leases
    assert llm.engine.is_pinned("p")
    assert llm.engine.extend_pin("p", clock.now + 10)  # a use extends the lease
    clock.now += 9.9
    flood(llm, 400)
    assert llm.engine.is_pinned("p")
    clock.now += 0.1
    assert llm.engine.expire_pins() == ["p"] and not llm.engine.is_pinned("p")
    flood(llm, 500)
    assert llm.generate([[*system, 7, 8]], GREEDY)[0].num_cached_tokens == 0


def test_cap_keeps_room_for_the_longest_request(tiny_dirs) -> None:
    llm = small_llm(tiny_dirs["llama"], max_model_len=96)  # 24 blocks: only 8 may be pinned
    assert llm.engine.block_manager.max_pinned_blocks == 8
    with pytest.raises(PinRefusedError, match="cap of 8"):
        llm.warm_prefix(tokens(1, 40), key="big")
    assert not llm.engine.has_unfinished  # refused before anything ran
    assert llm.warm_prefix(tokens(1, 32), key="fits").num_blocks == 8
    # The longest admissible request still runs beside the pin.
    out = llm.generate([tokens(9, 90)], SamplingParams(max_tokens=6, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 6
    whole = small_llm(tiny_dirs["llama"], max_model_len=None)  # context = the whole pool
    assert whole.engine.block_manager.max_pinned_blocks == 0
    with pytest.raises(PinRefusedError):
        whole.warm_prefix(tokens(1, 8), key="any")
    off = small_llm(tiny_dirs["llama"], enable_prefix_caching=False)
    with pytest.raises(PinRefusedError, match="caching is off"):
        off.warm_prefix(tokens(1, 8), key="any")


def test_second_of_two_racing_pins_is_refused_when_its_prompt_finishes(tiny_dirs) -> None:
    engine = small_llm(tiny_dirs["llama"]).engine  # cap 16 blocks
    first = engine.warm_prefix(tokens(1, 40), key="a")  # both pass the early check...
    second = engine.warm_prefix(tokens(2, 40), key="b")
    while engine.has_unfinished:
        engine.step()
    assert engine.prefix_state(first).pinned
    with pytest.raises(PinRefusedError):  # ...one of them cannot be pinned
        engine.prefix_state(second)
    assert engine.block_manager.num_pinned_blocks == 10


async def test_async_engine_warms_pins_and_unpins(tiny_dirs) -> None:
    config = EngineConfig(
        model=tiny_dirs["llama"],
        dtype="float32",
        cache=CacheConfig(num_blocks=32, block_size=4),
        scheduler=SchedulerConfig(max_model_len=64),
    )
    engine = AsyncEngine(LLMEngine(config))
    engine.start()
    try:
        system = tokens(1, 24)
        warmed = await asyncio.gather(
            engine.warm_prefix(system, key="a/sys", tenant="a", namespace="ns-a"),
            engine.warm_prefix(system, tenant="b", namespace="ns-b"),
        )
        assert [w.pinned for w in warmed] == [True, False]
        stats = engine.stats()
        assert stats.pinned_blocks_by_tenant == {"a": 6} and stats.num_pinned_blocks == 6
        cached = {}
        for ns in ("ns-a", "ns-b", "ns-c"):
            async for delta in engine.generate([*system, 5], GREEDY, namespace=ns):
                cached[ns] = delta.cached_tokens
        assert cached == {"ns-a": 24, "ns-b": 24, "ns-c": 0}  # namespaces never share
        assert await engine.extend_pin("a/sys", None)
        assert await engine.unpin_prefix("a/sys") and not await engine.unpin_prefix("a/sys")
        assert not await engine.extend_pin("a/sys", None)
        await engine.warm_prefix(tokens(2, 40), key="ten")
        with pytest.raises(PinRefusedError):
            await engine.warm_prefix(tokens(3, 40), key="ten-more")
        assert engine.stats().num_pinned_blocks == 10
    finally:
        engine.shutdown()
    with pytest.raises(EngineDeadError):
        await engine.warm_prefix(system, key="late")
