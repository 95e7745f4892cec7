"""AsyncEngine: streamed deltas add up to the offline result; cancelling aborts and frees."""

from __future__ import annotations

import asyncio
import os
import sys
import threading

import pytest

from engine import (
    LLM,
    AsyncEngine,
    EngineDeadError,
    EngineOverloadedError,
    LLMEngine,
    SamplingParams,
)
from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.outputs import RequestDelta


@pytest.fixture
async def engine(tiny_dirs):
    config = EngineConfig(
        model=tiny_dirs["llama"], dtype="float32", cache=CacheConfig(num_blocks=64)
    )
    eng = AsyncEngine(LLMEngine(config))
    eng.start()
    yield eng
    eng.shutdown()


def assert_all_free(eng: AsyncEngine) -> None:
    """Every block is back in the pool and no request is left.

    Called once the last delta has arrived: the engine frees a request's blocks before it hands
    that delta over, so this needs no waiting.
    """
    s = eng.stats()
    assert (s.num_free_blocks, s.num_running, s.num_waiting) == (s.num_blocks, 0, 0), s


class StepCounter:
    """Counts the engine's steps: the clock of the abort tests (a request asking for N tokens
    needs N steps to finish on its own, so freeing after a few steps proves the abort did it)."""

    def __init__(self, eng: AsyncEngine) -> None:
        self.steps = 0
        real_step = eng.engine.step

        def step() -> list[RequestDelta]:
            self.steps += 1
            return real_step()

        eng.engine.step = step  # type: ignore[method-assign]


async def wait_freed_by_abort(eng: AsyncEngine, counter: StepCounter, max_tokens: int) -> None:
    """Wait for the pool to be whole again, then check it happened long before the request of
    `max_tokens` tokens could have finished by itself (event ordering, not time)."""
    while True:
        s = eng.stats()
        if s.num_free_blocks == s.num_blocks and s.num_running == 0 and s.num_waiting == 0:
            break
        await asyncio.sleep(0.005)
    assert counter.steps < max_tokens // 4, f"freed after {counter.steps} steps"


def long_request(eng: AsyncEngine, prompt: list[int]) -> SamplingParams:
    """Parameters for a request that fills the whole context: hundreds of steps to finish."""
    max_tokens = eng.max_model_len - len(prompt)
    assert max_tokens >= 400
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True)


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
    assert_all_free(engine)


async def test_abort_ends_the_stream_and_frees_the_pool(engine: AsyncEngine) -> None:
    counter = StepCounter(engine)
    prompt = [1, 2, 3] * 20
    params = long_request(engine, prompt)
    stream = engine.add_request(prompt, params)
    tokens: list[int] = []
    aborted = False
    last = None
    async for delta in stream:
        tokens += [t for d in delta.deltas for t in d.token_ids]
        if len(tokens) >= 3 and not aborted:
            engine.abort(stream.request_id)  # the stream stays open for the abort's delta
            aborted = True
        last = delta
    assert last is not None and last.finished
    assert [d.finish_reason for d in last.deltas] == ["abort"]
    assert 3 <= len(tokens) < (params.max_tokens or 0) // 4
    assert_all_free(engine)
    assert counter.steps < (params.max_tokens or 0) // 4


async def test_cancel_aborts_and_frees(engine: AsyncEngine) -> None:
    counter = StepCounter(engine)
    prompt = [1, 2, 3] * 20
    params = long_request(engine, prompt)
    stream = engine.add_request(prompt, params)
    got = 0
    async for _ in stream:
        got += 1
        if got == 3:
            break
    await stream.aclose()
    await wait_freed_by_abort(engine, counter, params.max_tokens or 0)


async def test_task_cancellation_aborts(engine: AsyncEngine) -> None:
    counter = StepCounter(engine)
    prompt = [4] * 30
    params = long_request(engine, prompt)
    streaming = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.generate(prompt, params):
            streaming.set()

    task = asyncio.create_task(consume())
    await streaming.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_freed_by_abort(engine, counter, params.max_tokens or 0)


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
    assert_all_free(engine)


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


async def run_once(eng: AsyncEngine, max_tokens: int) -> None:
    """Start `eng`, run one greedy request to its end, shut it down."""
    eng.start()
    try:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        async for _ in eng.generate([5, 6, 7], params):
            pass
    finally:
        eng.shutdown()


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
    eng.start()  # again in run_once: idempotent
    await run_once(eng, max_tokens=4)
    assert len(seen["init"]) == 1 and seen["init"] == seen["step"]
    assert threading.get_ident() not in seen["init"]


@pytest.mark.skipif(sys.platform != "linux", reason="a nice value per thread is Linux's")
@pytest.mark.parametrize("build", ["from_config", "start"])
async def test_the_step_runs_at_the_configured_nice_above_the_process(
    tiny_dirs, monkeypatch, build: str
) -> None:
    """The step's thread (and so the OpenMP workers it creates) runs `compute_nice` above the
    process's nice value, set once however the engine was built; the caller's thread keeps its
    own."""
    nice: list[int] = []
    real_step = LLMEngine.step

    def step(self):
        nice.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return real_step(self)

    monkeypatch.setattr(LLMEngine, "step", step)
    base = os.getpriority(os.PRIO_PROCESS, os.getpid())
    if base > 16:
        pytest.skip("the process already runs at nice > 16")
    config = EngineConfig(model=tiny_dirs["llama"], dtype="float32", compute_nice=3)
    if build == "from_config":
        eng = await asyncio.to_thread(AsyncEngine.from_config, config)
    else:
        eng = AsyncEngine(LLMEngine(config))
    await run_once(eng, max_tokens=3)
    assert nice and set(nice) == {base + 3}
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base


def test_from_config_raises_the_load_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="not a local path"):
        AsyncEngine.from_config(EngineConfig(model=str(tmp_path / "missing")))


def test_shutdown_before_start_ends_the_loop_thread(tiny_dirs) -> None:
    eng = AsyncEngine.from_config(EngineConfig(model=tiny_dirs["llama"], dtype="float32"))
    thread = eng._thread
    assert thread is not None and thread.is_alive()
    eng.shutdown()
    assert not thread.is_alive()


async def test_streamed_text_with_stop_equals_the_offline_text(engine: AsyncEngine, tiny_dirs):
    """A stop string that spans two tokens: its first part must be held back from the stream,
    never sent and then taken back, so the deltas add up to the offline (non-streamed) text."""
    prompt = [5, 17, 230, 4000, 12, 99, 1024]
    pieces: list[str] = []
    async for delta in engine.generate(prompt, SamplingParams(temperature=0, max_tokens=24)):
        pieces += [d.text for d in delta.deltas]
    text = "".join(pieces)
    # The stop: the last two characters of one step's text and the first two of the next's,
    # at the first place where it occurs nowhere earlier in the text.
    stop = ""
    for k in range(1, len(pieces) - 1):
        start = len("".join(pieces[:k])) - 2
        candidate = text[start : start + 4]
        if len(pieces[k - 1]) >= 2 and len(pieces[k]) >= 2 and text.find(candidate) == start:
            stop = candidate
            break
    assert stop, f"no stop string spans two steps of {pieces!r}"
    expected = text[: text.index(stop)]

    params = SamplingParams(temperature=0, max_tokens=24, stop=[stop])
    streamed = ""
    last = None
    async for delta in engine.generate(prompt, params):
        for d in delta.deltas:
            streamed += d.text
            assert expected.startswith(streamed), f"sent {streamed!r}, ends as {expected!r}"
        last = delta
    assert last is not None and last.finished
    assert [(d.finish_reason, d.stop_reason) for d in last.deltas] == [("stop", stop)]
    assert streamed == expected
    offline = LLM(tiny_dirs["llama"], dtype="float32", num_blocks=64).generate([prompt], params)
    assert offline[0].outputs[0].text == streamed
    assert_all_free(engine)
