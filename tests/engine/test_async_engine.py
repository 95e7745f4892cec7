"""AsyncEngine: streamed deltas add up to the offline result; cancelling aborts and frees."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from engine import AsyncEngine, EngineDeadError, EngineOverloadedError, LLMEngine, SamplingParams
from engine.config import CacheConfig, EngineConfig, SchedulerConfig


@pytest.fixture
async def engine(tiny_dirs):
    config = EngineConfig(
        model=tiny_dirs["llama"], dtype="float32", cache=CacheConfig(num_blocks=64)
    )
    eng = AsyncEngine(LLMEngine(config))
    eng.start()
    yield eng
    eng.shutdown()


async def wait_all_free(eng: AsyncEngine, deadline_s: float = 5.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < deadline_s:
        s = eng.stats()
        if s.num_free_blocks == s.num_blocks and s.num_running == 0 and s.num_waiting == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"blocks not freed: {eng.stats()}")


async def test_stream_adds_up(engine: AsyncEngine) -> None:
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, n=2)
    texts = ["", ""]
    tokens: list[list[int]] = [[], []]
    last = None
    async for delta in engine.generate([5, 6, 7, 8, 9], params):
        for d in delta.deltas:
            texts[d.index] += d.text
            tokens[d.index] += d.token_ids
        last = delta
    assert last is not None and last.finished and last.completion_tokens == 40
    assert tokens[0] == tokens[1] and len(tokens[0]) == 20
    assert texts[0] == engine.tokenizer.decode(tokens[0], skip_special_tokens=True)
    await wait_all_free(engine)


async def test_cancel_aborts_and_frees(engine: AsyncEngine) -> None:
    stream = engine.add_request([1, 2, 3] * 20, SamplingParams(max_tokens=400, ignore_eos=True))
    got = 0
    async for _ in stream:
        got += 1
        if got == 3:
            break
    await stream.aclose()
    await wait_all_free(engine)


async def test_task_cancellation_aborts(engine: AsyncEngine) -> None:
    async def consume() -> None:
        async for _ in engine.generate([4] * 30, SamplingParams(max_tokens=400, ignore_eos=True)):
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_all_free(engine)


async def test_many_concurrent_streams_independent(engine: AsyncEngine) -> None:
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

    async def one(i: int) -> list[int]:
        out: list[int] = []
        async for delta in engine.generate([10 + i, 20 + i, 30 + i], params):
            for d in delta.deltas:
                out += d.token_ids
        return out

    results = await asyncio.gather(*(one(i) for i in range(16)))
    sequential = [await one(i) for i in (0, 7, 15)]
    assert [results[0], results[7], results[15]] == sequential
    await wait_all_free(engine)


async def test_shutdown_refuses_new_requests(engine: AsyncEngine) -> None:
    engine.shutdown()
    with pytest.raises(EngineDeadError):
        engine.add_request([1, 2, 3], SamplingParams(max_tokens=2))


async def test_bounded_queue_refuses_past_max_waiting(tiny_dirs) -> None:
    config = EngineConfig(
        model=tiny_dirs["llama"],
        dtype="float32",
        cache=CacheConfig(num_blocks=64),
        scheduler=SchedulerConfig(max_waiting=2),
    )
    eng = AsyncEngine(LLMEngine(config))  # not started: requests stay queued
    params = SamplingParams(max_tokens=2)
    eng.add_request([1, 2, 3], params)
    eng.add_request([4, 5, 6], params)
    with pytest.raises(EngineOverloadedError):
        eng.add_request([7, 8, 9], params)
    eng.engine.add_request([1, 2], params)
    eng.engine.add_request([3, 4], params)
    with pytest.raises(EngineOverloadedError):  # the synchronous engine enforces it too
        eng.engine.add_request([5, 6], params)
    assert eng.engine.block_manager.num_free_blocks == 64  # nothing allocated for refusals


async def test_from_config_loads_and_steps_on_one_thread(tiny_dirs, monkeypatch) -> None:
    """All of the engine's torch work starts on the loop thread (one OpenMP team, see
    `AsyncEngine.from_config`): the model is built there, not on the caller's thread."""
    seen: dict[str, set[int]] = {"init": set(), "step": set()}
    real_init, real_step = LLMEngine.__init__, LLMEngine.step

    def init(self, *args, **kwargs):
        seen["init"].add(threading.get_ident())
        real_init(self, *args, **kwargs)

    def step(self):
        seen["step"].add(threading.get_ident())
        return real_step(self)

    monkeypatch.setattr(LLMEngine, "__init__", init)
    monkeypatch.setattr(LLMEngine, "step", step)
    config = EngineConfig(model=tiny_dirs["llama"], dtype="float32")
    eng = await asyncio.to_thread(AsyncEngine.from_config, config)
    eng.start()
    eng.start()  # idempotent
    try:
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        async for _ in eng.generate([5, 6, 7], params):
            pass
    finally:
        eng.shutdown()
    assert len(seen["init"]) == 1 and seen["init"] == seen["step"]
    assert threading.get_ident() not in seen["init"]


def test_from_config_raises_the_load_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="not a local path"):
        AsyncEngine.from_config(EngineConfig(model=str(tmp_path / "missing")))


def test_shutdown_before_start_ends_the_loop_thread(tiny_dirs) -> None:
    eng = AsyncEngine.from_config(EngineConfig(model=tiny_dirs["llama"], dtype="float32"))
    thread = eng._thread
    assert thread is not None and thread.is_alive()
    eng.shutdown()
    assert not thread.is_alive()
