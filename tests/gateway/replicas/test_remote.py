"""`RemoteEngine` against a replica served over loopback HTTP: the fake engine for the protocol
(errors, prefixes, lost replicas), the tiny real engine for outputs and grammars."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest

from engine.errors import (
    ContextLengthError,
    EngineOverloadedError,
    InvalidRequestError,
    PinRefusedError,
)
from engine.grammar import GrammarSpec
from engine.sampling_params import SamplingParams
from engine.service import protocol
from engine.service.app import create_engine_app
from engine.structured import Grammars
from gateway.app import create_app
from gateway.replicas.pool import ReplicaPool
from gateway.replicas.remote import RemoteEngine, ReplicaLostError
from gateway.replicas.wire import StreamClient
from tests.gateway.conftest import make_settings, running_server
from tests.gateway.fake_engine import FakeEngine
from tests.gateway.replicas.helpers import serve_remote, serve_replica


@pytest.fixture
def fake() -> FakeEngine:
    return FakeEngine(max_active=2, token_delay=0.01, num_blocks=40)  # pin cap: 20 blocks


@pytest.fixture
async def remote(fake: FakeEngine) -> AsyncIterator[RemoteEngine]:
    with serve_replica(fake) as url:
        engine = await RemoteEngine.connect(url, tokenizer=fake.tokenizer)  # it has no files
        yield engine
        await engine.aclose()


async def collect(stream: Any) -> list[int]:
    tokens: list[int] = []
    async for out in stream:
        for delta in out.deltas:
            tokens.extend(delta.token_ids)
    return tokens


async def test_a_request_streams_back_with_its_arguments(
    remote: RemoteEngine, fake: FakeEngine
) -> None:
    prompt = fake.tokenizer.encode("Hello there")
    params = SamplingParams(max_tokens=5, temperature=0, stop=["zz"], logprobs=1)
    stream = remote.add_request(
        prompt, params, request_id="r1", tenant="acme", namespace="ns-acme", priority=3
    )
    tokens = await collect(stream)
    assert len(tokens) == 5 and stream.finished
    request_id, sent_prompt, sent_params, tenant, namespace = fake.requests[-1]
    assert (request_id, sent_prompt, tenant, namespace) == ("r1", prompt, "acme", "ns-acme")
    assert sent_params == params


async def test_every_request_and_abort_rides_the_one_channel_connection(
    remote: RemoteEngine, fake: FakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    connects = 0
    connect = remote.wire._connect

    async def counted() -> Any:
        nonlocal connects
        connects += 1
        return await connect()

    monkeypatch.setattr(remote.wire, "_connect", counted)
    params = SamplingParams(max_tokens=3, temperature=0)
    for _ in range(3):
        assert len(await collect(remote.add_request([5, 6, 7], params))) == 3
    held = remote.add_request([5, 6], SamplingParams(max_tokens=400, ignore_eos=True))
    await held.__anext__()
    await held.aclose()
    while held.request_id not in fake.aborted:
        await asyncio.sleep(0.01)
    assert connects == 1 and len(fake.requests) == 4


async def test_engine_errors_cross_as_the_same_classes(
    remote: RemoteEngine, fake: FakeEngine
) -> None:
    with pytest.raises(ContextLengthError) as too_long:  # checked here, nothing sent
        remote.add_request([5] * 600, SamplingParams(max_tokens=1))
    assert too_long.value.param == "prompt" and not fake.requests
    with pytest.raises(InvalidRequestError):
        remote.add_request([], SamplingParams())
    long = SamplingParams(max_tokens=100, ignore_eos=True)
    streams = [remote.add_request([5, 6], long) for _ in range(3)]  # the fake takes 2
    errors = []
    for stream in streams:
        try:
            await collect(stream)
        except EngineOverloadedError as exc:
            errors.append(exc)
    assert len(errors) == 1 and errors[0].retry_after_s == 2.0
    with pytest.raises(PinRefusedError) as refused:
        await remote.warm_prefix([7] * 16 * 30, key="big")
    assert refused.value.cap == fake.num_blocks // 2


async def test_prefixes_warm_pin_extend_unpin(remote: RemoteEngine, fake: FakeEngine) -> None:
    state = await remote.warm_prefix([9] * 40, key="p1", tenant="acme", expires_at=2e9)
    assert (state.num_tokens, state.num_blocks, state.pinned) == (40, 2, True)
    assert fake.pins["p1"].tenant == "acme" and fake.pins["p1"].expires_at == 2e9
    assert await remote.extend_pin("p1", 3e9) and fake.pins["p1"].expires_at == 3e9
    assert await remote.unpin_prefix("p1") and not await remote.unpin_prefix("p1")
    assert not await remote.extend_pin("p1", None)
    stats = await remote.fetch_stats()
    assert stats.num_blocks == fake.num_blocks and remote.stats() == stats


async def test_closing_a_stream_aborts_it_on_the_replica(
    remote: RemoteEngine, fake: FakeEngine
) -> None:
    stream = remote.add_request([5, 6], SamplingParams(max_tokens=400, ignore_eos=True))
    await stream.__anext__()
    await stream.aclose()
    while fake.stats().num_running:  # the replica sees the connection close
        await remote.fetch_stats()
    assert fake.aborted == [stream.request_id]


async def test_a_stream_closed_before_or_while_it_is_added(
    remote: RemoteEngine, fake: FakeEngine
) -> None:
    params = SamplingParams(max_tokens=400, ignore_eos=True)
    early = remote.add_request([5, 6], params)
    await early.aclose()  # before its add was written: never sent
    racing = remote.add_request([5, 7], params)
    while not racing._posted:
        await asyncio.sleep(0)
    await racing.aclose()  # its add written: the abort follows it on the channel
    while racing.request_id not in fake.aborted:
        await asyncio.sleep(0.01)
    assert [r[0] for r in fake.requests] == [racing.request_id]
    assert fake.stats().num_running == 0 and not remote.streams


async def test_an_abort_behind_an_add_waiting_for_its_grammar_cancels_it(
    remote: RemoteEngine, fake: FakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The replica compiles a grammar off its channel's reader: an abort read meanwhile must
    cancel the add, or the request would run with nobody to stream to."""
    gate = threading.Event()
    compile_grammar = fake.compile_grammar

    async def gated(spec: GrammarSpec) -> None:
        await compile_grammar(spec)
        await asyncio.to_thread(gate.wait)

    monkeypatch.setattr(fake, "compile_grammar", gated)
    grammar = GrammarSpec.json_schema({"type": "object"})
    params = SamplingParams(max_tokens=3, grammar=grammar)
    dropped = remote.add_request([5, 6], params)
    while not fake.grammars:
        await asyncio.sleep(0.01)
    await dropped.aclose()  # its add was written: the abort follows on the channel
    kept = remote.add_request([5, 7], params)
    while len(fake.grammars) < 2:
        await asyncio.sleep(0.01)
    gate.set()
    assert len(await collect(kept)) == 3
    assert [r[0] for r in fake.requests] == [kept.request_id]


async def test_an_add_and_its_abort_in_one_read_leave_nothing_held(fake: FakeEngine) -> None:
    """An add waiting for its grammar, aborted in the same chunk (its task cancelled before it
    first ran), is never added and releases its hold on the replica's drain."""
    held: list[int] = []
    app = create_engine_app(fake, replica_id="r0", track=held.append)
    params = protocol.jsonable(SamplingParams(max_tokens=3, grammar=GrammarSpec.json_schema({})))
    add = {"op": "add", "request_id": "g", "prompt_token_ids": [5, 6], "params": params}
    with running_server(app) as url:
        async with StreamClient(url).duplex(protocol.CHANNEL) as (response, write):
            lines = response.lines()
            assert "channel" in json.loads(await anext(lines))
            write(protocol.encode(add) + b'\n{"op": "abort", "request_id": "g"}\n')
            for _ in range(500):  # 5 s at most
                if len(held) >= 2:
                    break
                await asyncio.sleep(0.01)
    assert held == [1, -1] and fake.requests == [] and fake.grammars == []


async def test_a_channel_answers_bad_lines_with_error_lines(fake: FakeEngine) -> None:
    """A line that is not a command gets an error line (with its request id when it has
    one), and the channel goes on serving; another channel cannot abort its requests."""
    with serve_replica(fake) as url:
        wire = StreamClient(url)
        async with wire.duplex(protocol.CHANNEL) as (response, write):
            lines = response.lines()
            assert "channel" in json.loads(await anext(lines))
            bad = [(b"[1, 2]", None), (b'{"op": "add"}', None),
                   (b'{"op": "stop", "request_id": "a"}', "a"),
                   (b'{"op": "add", "request_id": "b", "params": {}}', "b")]  # fmt: skip
            for line, request_id in bad:
                write(line + b"\n")
                error = json.loads(await anext(lines))
                assert error["error"]["type"] == "InvalidRequestError", error
                assert error["request_id"] == request_id, error
            params = protocol.jsonable(SamplingParams(max_tokens=20, ignore_eos=True))
            add = {"op": "add", "request_id": "c", "prompt_token_ids": [5, 6], "params": params}
            write(protocol.encode(add) + b"\n")
            deltas = [json.loads(await anext(lines))]
            async with wire.duplex(protocol.CHANNEL) as (other, write_other):
                assert "channel" in json.loads(await anext(other.lines()))
                write_other(b'{"op": "abort", "request_id": "c"}\n')  # not its request
                while not deltas[-1]["finished"]:
                    deltas.append(json.loads(await anext(lines)))
            assert {d["request_id"] for d in deltas} == {"c"} and fake.aborted == []
            assert deltas[-1]["deltas"][0]["finish_reason"] == "length"


async def test_a_channel_line_past_the_cap_ends_the_channel(
    fake: FakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A line that grows past `MAX_LINE_BYTES` without its newline is not buffered on: the
    replica answers an error line, ends the answer and aborts the channel's requests; lines
    before it in the same chunk still count."""
    monkeypatch.setattr(protocol, "MAX_LINE_BYTES", 1024)
    params = protocol.jsonable(SamplingParams(max_tokens=400, ignore_eos=True))
    add = {"op": "add", "request_id": "c", "prompt_token_ids": [5, 6], "params": params}
    with serve_replica(fake) as url:
        async with StreamClient(url).duplex(protocol.CHANNEL) as (response, write):
            lines = response.lines()
            assert "channel" in json.loads(await anext(lines))
            write(protocol.encode(add) + b"\n" + b"x" * 600)
            write(b"x" * 600)  # 1,200 bytes and no newline yet
            async with asyncio.timeout(10):  # before: buffered on, waiting for the newline
                answers = [json.loads(line) async for line in lines if line]
    errors = [a for a in answers if "error" in a]
    assert len(errors) == 1 and errors[0]["request_id"] is None, answers
    assert "longer than 1024 bytes" in errors[0]["error"]["message"]
    assert response.complete  # the answer ended, its connection was not just cut
    while fake.stats().num_running:
        await asyncio.sleep(0.01)
    assert fake.aborted == ["c"]


async def test_a_gateway_leaving_aborts_every_request_of_its_channel(
    remote: RemoteEngine, fake: FakeEngine
) -> None:
    params = SamplingParams(max_tokens=400, ignore_eos=True)
    streams = [remote.add_request([5, i], params) for i in range(2)]  # the fake runs 2
    for stream in streams:
        await stream.__anext__()
    remote.shutdown()  # the channel's connection closes
    while fake.stats().num_running:
        await asyncio.sleep(0.01)
    assert sorted(fake.aborted) == sorted(s.request_id for s in streams)


async def test_a_replica_counts_its_channels_generations_for_its_drain(fake: FakeEngine) -> None:
    held: list[int] = []
    app = create_engine_app(fake, replica_id="r0", track=held.append)
    with running_server(app) as url:
        remote = await RemoteEngine.connect(url, tokenizer=fake.tokenizer)
        params = SamplingParams(max_tokens=400, ignore_eos=True)
        long = remote.add_request([5, 6], params)
        short = remote.add_request([5, 7], SamplingParams(max_tokens=2))
        await long.__anext__()
        await collect(short)
        assert sum(held) == 1  # the finished one let go, the running one holds the drain
        await remote.aclose()
        while sum(held):
            await asyncio.sleep(0.01)
        assert held.count(1) == 2 and held.count(-1) == 2


async def test_a_lost_replica_ends_its_streams_and_refuses_new_ones(
    remote: RemoteEngine, fake: FakeEngine
) -> None:
    stream = remote.add_request([5, 6], SamplingParams(max_tokens=400, ignore_eos=True))
    await stream.__anext__()
    remote.mark_lost("no heartbeat")
    with pytest.raises(ReplicaLostError):
        await collect(stream)
    with pytest.raises(ReplicaLostError):
        remote.add_request([5, 6], SamplingParams())
    await remote.fetch_stats()  # it answers again: back in rotation
    assert remote.lost is None
    assert await collect(remote.add_request([5, 6], SamplingParams(max_tokens=2))) != []


async def test_only_a_newer_heartbeat_puts_an_unreachable_replica_back(
    remote: RemoteEngine,
) -> None:
    """A killed replica's last heartbeat record stays readable until its TTL: read again after
    its connection failed, it must not put the replica back in rotation (the next request would
    go to it and fail); a record written after the failure, or an answer from the replica
    itself, does."""
    remote.clock = lambda: 100.0
    stats = remote.last_stats
    remote.seen(stats, beat=99.5)
    remote.out_of_rotation("connection refused")  # at 100.0
    remote.seen(stats, beat=99.5)  # the record it wrote before, read again
    with pytest.raises(ReplicaLostError):
        remote.add_request([5, 6], SamplingParams())
    remote.seen(stats, beat=100.5)  # it beat since
    assert remote.lost is None
    remote.out_of_rotation("connection reset")
    await remote.fetch_stats()  # it answered
    assert remote.lost is None


async def test_remote_and_in_process_give_identical_greedy_outputs(tiny_engine: Any) -> None:
    prompts = [
        tiny_engine.tokenizer.encode(f"Question {i}: how far is the moon?") for i in range(4)
    ]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)
    local = [await collect(tiny_engine.generate(p, params)) for p in prompts]
    with serve_replica(tiny_engine) as url:
        remote = await RemoteEngine.connect(url)  # with the replica's tokenizer files
        assert remote.tokenizer.encode("moon") == tiny_engine.tokenizer.encode("moon")
        try:
            remote_out = [await collect(remote.add_request(p, params)) for p in prompts]
        finally:
            await remote.aclose()
    assert remote_out == local


def test_a_grammar_compiles_once_on_the_replica(
    tiny_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Behind a gateway, a new schema is compiled once, by the replica that runs the request
    (the gateway only checks it); a schema that is no grammar is a 400 before any stream."""
    compiled: list[GrammarSpec] = []
    compile_spec = Grammars._compile

    def counting(self: Grammars, spec: GrammarSpec) -> Any:
        compiled.append(spec)
        return compile_spec(self, spec)

    monkeypatch.setattr(Grammars, "_compile", counting)
    schema = {"type": "object", "properties": {"once": {"type": "string", "enum": ["a", "b"]}},
              "required": ["once"], "additionalProperties": False}  # fmt: skip
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "once", "schema": schema}}
    with serve_remote(tiny_engine) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        ask: dict[str, Any] = dict(model=tiny_engine.model_name, max_tokens=16, temperature=0,
                                   messages=[{"role": "user", "content": "Once?"}])  # fmt: skip
        reply = client.chat.completions.create(response_format=fmt, **ask)
        assert json.loads(reply.choices[0].message.content or "")["once"] in ("a", "b")
        assert compiled == [GrammarSpec.json_schema(schema)]
        bad: Any = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "y"}}}
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as err:
                client.chat.completions.create(response_format=bad, stream=stream, **ask)
            assert isinstance(err.value.body, dict)
            assert (
                err.value.body["param"] == "response_format" and '"y"' in err.value.body["message"]
            )
    assert len(compiled) == 1


async def test_ready_is_503_while_no_replica_is_in_rotation(remote: RemoteEngine) -> None:
    pool = ReplicaPool("prefix", model_name=remote.model_name)
    assert pool.add(remote)
    app = create_app(make_settings(), pool)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/ready")).status_code == 200
        pool.remove(remote.replica_id, "lost")  # the last replica leaves
        gone = await client.get("/ready")
        assert gone.status_code == 503
        assert gone.json()["status"] == "unavailable"
        assert "replica" in gone.json()["detail"]
        again = await RemoteEngine.connect(remote.url, tokenizer=remote.tokenizer)
        assert pool.add(again)  # the replica's process comes back
        assert (await client.get("/ready")).status_code == 200
        pool.shutdown()
