"""`ToolCallParser`: a reply's text to content and tool-call pieces, whatever pieces the text
comes in; a call's first piece has its id and name, the next ones its arguments; text that is
not a call comes back unchanged as content."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.openai.tool_parser import CallPiece, Piece, Syntax, ToolCallParser
from gateway.openai.tools import add_up

NAMES = ("get_weather", "get_time")
WEATHER = '{"name": "get_weather", "arguments": {"city": "Os}{lo \\"x\\"", "unit": "C"}}'
TIME = '{"name": "get_time", "arguments": {"zone": "UTC"}}'
NOT_CALLS: list[tuple[Syntax, str]] = [
    ("tags", '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>'),  # not a listed name
    ("tags", "Plain text, <b>bold</b> and a <tool_ca trap.\n"),
    ("json", '{"name": "get_ti'),  # cut short before its name ended
    ("json", '  {"answer": 42} and more'),
    ("json", '{"name": "get_time", "arguments": [1]}'),
    ("json", "[1, 2]"),
]
REPLIES: list[tuple[Syntax, str]] = [
    ("tags", f"Let me check.\n<tool_call>\n{WEATHER}\n</tool_call>"),
    ("tags", f"<tool_call>{TIME}</tool_call>\n<tool_call>\n{WEATHER}\n</tool_call>\n"),
    ("tags", 'a <tool_call>{"arguments": {"zone": "CET"}, "name": "get_time"}</tool_call> b'),
    ("json", f"[{TIME}, {WEATHER}]"),
    ("json", '{"name": "get_time", "arguments": {"zone": "UT'),
    *NOT_CALLS,
]


def _parse(syntax: Syntax, pieces: list[str], parallel: bool = True) -> list[Piece]:
    parser = ToolCallParser(NAMES, syntax, parallel=parallel)
    out = [p for text in pieces for p in parser.feed(text)]
    return out + parser.finish()


def _message(pieces: list[Piece]) -> tuple[str | None, list[tuple[str, str]]]:
    content, calls = add_up(pieces)
    return content, [(c.function.name, c.function.arguments) for c in calls]


@settings(max_examples=40, deadline=None)  # no timing in tests
@given(data=st.data())
@pytest.mark.parametrize(("syntax", "text"), REPLIES)
def test_any_split_of_the_text_gives_the_same_message(
    syntax: Syntax, text: str, data: st.DataObject
) -> None:
    cuts = sorted(data.draw(st.sets(st.integers(1, max(len(text) - 1, 1)), max_size=12)))
    parts = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    assert _message(_parse(syntax, parts)) == _message(_parse(syntax, [text]))


def test_calls_and_content_of_hermes_replies() -> None:
    pieces = _parse("tags", list(REPLIES[0][1]))  # a character at a time
    first = next(p for p in pieces if isinstance(p, CallPiece))
    assert first.id is not None and first.id.startswith("call_")
    assert first.name == "get_weather" and first.arguments == ""  # as OpenAI's first delta
    fragments = [p for p in pieces if isinstance(p, CallPiece) and p.id is None]
    assert len(fragments) > 10  # the arguments stream as they come
    content, calls = _message(pieces)
    assert content == "Let me check."  # the tag and the whitespace before it are not content
    assert calls == [("get_weather", json.dumps(json.loads(WEATHER)["arguments"]))]
    assert json.loads(calls[0][1])["city"] == 'Os}{lo "x"'
    assert _message(_parse("tags", [REPLIES[1][1]]))[1] == [
        ("get_time", '{"zone": "UTC"}'),
        ("get_weather", json.dumps(json.loads(WEATHER)["arguments"])),
    ]
    # Arguments before the name: sent with the start, once the name is read.
    assert _message(_parse("tags", [REPLIES[2][1]])) == ("a b", [("get_time", '{"zone": "CET"}')])


@pytest.mark.parametrize(("syntax", "text"), NOT_CALLS)
def test_text_that_is_no_call_is_content_unchanged(syntax: Syntax, text: str) -> None:
    assert _message(_parse(syntax, list(text))) == (text, [])


def test_json_calls_a_list_and_a_call_cut_short() -> None:
    both = _message(_parse("json", [REPLIES[3][1]]))
    assert both[0] is None and [name for name, _ in both[1]] == ["get_time", "get_weather"]
    # Started calls are kept, cut short (max_tokens) or not.
    assert _message(_parse("json", [REPLIES[4][1]])) == (None, [("get_time", '{"zone": "UT')])
    bare = '{"name": "get_time"}'
    assert _message(_parse("json", [bare])) == (None, [("get_time", "{}")])
    as_text = '{"name": "get_time", "parameters": "{\\"zone\\": \\"UTC\\"}"}'
    assert _message(_parse("json", [as_text])) == (None, [("get_time", '{"zone": "UTC"}')])


def test_one_call_only_when_not_parallel() -> None:
    text = REPLIES[1][1]
    assert [n for n, _ in _message(_parse("tags", [text], parallel=False))[1]] == ["get_time"]
    assert len(_message(_parse("json", [REPLIES[3][1]], parallel=False))[1]) == 1
