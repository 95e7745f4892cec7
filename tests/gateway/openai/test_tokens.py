"""The hand-built streamed chunks are byte-identical to the pydantic models' JSON."""

from __future__ import annotations

import pydantic_core
import pytest

from engine.outputs import Delta
from gateway.openai.chat import ChatFormat
from gateway.openai.completions import CompletionFormat
from gateway.openai.schemas import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    Completion,
    CompletionChoice,
)
from gateway.openai.tokens import TokenTexts, json_str
from tests.gateway.fake_engine import FakeTokenizer

TEXTS = [
    "",
    "plain",
    'quote " and \\ backslash',
    "tab\tnew\nline\x01\x1f",
    "é 漢字 🙂",
    "</script>",
]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("finish", [None, "stop", "length"])
def test_chat_chunk_fast_path(text: str, finish: str | None) -> None:
    fmt = ChatFormat(
        completion_id="chatcmpl-1", created=7, model='m"1', n=2, top_logprobs=None,
        token_texts=TokenTexts(FakeTokenizer()),
    )  # fmt: skip
    delta = Delta(1, text, [5], None, finish)
    chunks = fmt.delta_chunks(delta)
    if not text and finish is None:
        assert chunks == []
        return
    expected = ChatCompletionChunk(
        id="chatcmpl-1", created=7, model='m"1',
        choices=[ChatChunkChoice(
            index=1, delta=ChatDelta(content=text) if text else ChatDelta(), finish_reason=finish
        )],
    )  # fmt: skip
    assert chunks == [expected.model_dump_json().encode()]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("finish", [None, "stop"])
def test_completion_chunk_fast_path(text: str, finish: str | None) -> None:
    fmt = CompletionFormat(
        completion_id="cmpl-1", created=7, model="m", logprobs=None,
        token_texts=TokenTexts(FakeTokenizer()),
    )  # fmt: skip
    chunks = fmt.delta_chunks(Delta(0, text, [5], None, finish))
    if not text and finish is None:
        assert chunks == []
        return
    expected = Completion(
        id="cmpl-1", created=7, model="m",
        choices=[CompletionChoice(index=0, text=text, finish_reason=finish)],
    )  # fmt: skip
    assert chunks == [expected.model_dump_json().encode()]


def test_json_str() -> None:
    assert json_str('a"b') == b'"a\\"b"'
    # the same bytes as pydantic's serializer for every character a token may decode to
    every = "".join(chr(c) for c in range(0x3000)) + '\u2028\u2029\ufffd\U0001f600 \\ " end'
    for text in (every, *every[:0x100]):
        assert json_str(text) == pydantic_core.to_json(text)


def test_token_texts_are_memoized() -> None:
    texts = TokenTexts(FakeTokenizer())
    assert texts(3 + ord("é")) == "é" and texts.utf8(3 + ord("é")) == [0xC3, 0xA9]
