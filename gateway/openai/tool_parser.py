"""Tool calls read out of a reply's text as it is generated, a character at a time.

`ToolCallParser` is fed a choice's text in whatever pieces the engine sends and hands back what
they add to the message: content, a call's start (index, id, function name) and fragments of
its arguments text. Streamed, each piece becomes a chunk's delta; not streamed, the same parser
reads the whole text and the pieces are added up (`parse_calls`), so both give the same calls.

What is a call, by the plan's syntax (`tools.ToolPlan`):

    tags   Let me check.\\n<tool_call>\\n{"name": "f", "arguments": {"x": 1}}\\n</tool_call>
           ^ content ^^^^^   ^ dropped  ^ a call object                               ^ dropped
    json   {"name": "f", "arguments": {...}}      one object, or several (ws , ; between)
           [{"name": "f", ...}, {"name": "g", ...}]   or a list of them (forced, parallel)

- A call object has a `name` naming a listed function and `arguments` (or `parameters`): an
  object, whose raw text streams as it comes, or a JSON string holding one, sent when it ends;
  no arguments at all is `{}`. Other keys are skipped. The call starts (its first piece: id and
  name) once the name is read and its arguments begin (or its object ends).
- Until its start is sent a candidate can still turn out not to be a call (an unknown name, no
  name, arguments that are no object, text that is not JSON): its text is then given back as
  content, unchanged. After its start a call is kept, even if cut short (`max_tokens`).
- Whitespace is held back until content follows it: whitespace before a call is dropped, and
  at the end it is content only if the reply made no call (a reply without calls is its text).
- `parallel` False: everything after the first call is dropped.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Literal

WS = " \t\r\n"
OPEN_TAG, CLOSE_TAG = "<tool_call>", "</tool_call>"
ARGUMENT_KEYS = ("arguments", "parameters")
Syntax = Literal["tags", "json"]
Status = Literal["more", "closed", "failed", "ended"]


@dataclass(frozen=True, slots=True)
class CallPiece:
    """Part of tool call `index`: its first piece has its `id` and `name`, the next ones
    fragments of its arguments text."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None


Piece = str | CallPiece  # a str: content


class _Value:
    """The raw text of one JSON value, a character at a time (leading whitespace skipped).

    `kind` is its first character (`"`, `{` or `[`), or "scalar"; a scalar ends at the first
    character after it, which `feed` leaves to the caller."""

    __slots__ = ("depth", "done", "escape", "in_string", "kind", "raw")

    def __init__(self) -> None:
        self.raw: list[str] = []
        self.kind = ""
        self.depth = 0
        self.in_string = False
        self.escape = False
        self.done = False

    def feed(self, c: str) -> bool:
        """Take `c`; False if the value ended before it (`c` is not part of the value)."""
        if self.done:
            return False
        if not self.kind:
            if c in WS:
                return True
            self.kind = c if c in '"{[' else "scalar"
            self.in_string = c == '"'
            self.depth = int(c in "{[")
            self.raw.append(c)
            return True
        if self.in_string:
            self.raw.append(c)
            if self.escape:
                self.escape = False
            elif c == "\\":
                self.escape = True
            elif c == '"':
                self.in_string = False
                self.done = self.kind == '"'
            return True
        if self.kind == "scalar":
            if c in WS or c in ",}]":
                self.done = True
                return False
            self.raw.append(c)
            return True
        self.raw.append(c)
        if c == '"':
            self.in_string = True
        elif c in "{[":
            self.depth += 1
        elif c in "}]":
            self.depth -= 1
            self.done = self.depth == 0
        return True

    @property
    def text(self) -> str:
        return "".join(self.raw)


class _CallObject:
    """One candidate call object, fed a character at a time; what it finds goes to `events`:
    ("start", name) once, then ("arguments", text fragment)s.

    States: open -> key -> key_string -> colon -> value -> key ... -> closed (after `}`)."""

    def __init__(self, names: frozenset[str]) -> None:
        self.names = names
        self.state = "open"
        self.key = _Value()
        self.field = ""  # the key whose value is being read
        self.value = _Value()
        self.name: str | None = None
        self.arguments: str | None = None  # read before the name: sent with the start
        self.has_arguments = False  # an arguments value was seen (the first one counts)
        self.started = False
        self.events: list[tuple[str, str]] = []

    def feed(self, c: str) -> Status:
        """ "more": `c` taken; "closed": `c` ended the object; "failed": not a call (`c` not
        taken); "ended": a started call's object broke off before `c` (`c` not taken)."""
        if self.state == "open":
            if c in WS:
                return "more"
            return self._next("key") if c == "{" else self._bad()
        if self.state == "key":
            return self._key(c)
        if self.state == "key_string":
            self.key.feed(c)
            if self.key.done:
                self.field = _string(self.key.text) or ""
                self.state = "colon"
            return "more"
        if self.state == "colon":
            if c in WS:
                return "more"
            if c != ":":
                return self._bad()
            self.value = _Value()
            return self._next("value")
        return self._value(c)

    def _next(self, state: str) -> Status:
        self.state = state
        return "more"

    def _bad(self) -> Status:
        return "ended" if self.started else "failed"

    def _key(self, c: str) -> Status:
        if c in WS or c == ",":
            return "more"
        if c == '"':
            self.key = _Value()
            self.key.feed(c)
            return self._next("key_string")
        if c != "}":
            return self._bad()
        if self.name is None:
            return self._bad()
        self._start()
        if not self.has_arguments:
            self.events.append(("arguments", "{}"))
        self.state = "closed"
        return "closed"

    def _value(self, c: str) -> Status:
        value = self.value
        began = bool(value.kind)
        taken = value.feed(c)
        arguments = self.field in ARGUMENT_KEYS and not self.has_arguments
        if not began and value.kind:  # its first character: is it the kind it must be?
            if self.field == "name" and self.name is None and value.kind != '"':
                return self._bad()
            if arguments and value.kind not in ('"', "{"):
                return self._bad()
            if arguments and value.kind == "{":
                self._start()  # once the name is known: the arguments stream from here
        if taken and arguments and self.started and value.kind == "{":
            self.events.append(("arguments", c))
        if value.done:
            status = self._value_done(arguments)
            if status != "more":
                return status
            self.state = "key"
            if not taken:
                return self._key(c)
        return "more"

    def _value_done(self, arguments: bool) -> Status:
        value = self.value
        if self.field == "name" and self.name is None:
            name = _string(value.text)
            if name not in self.names:
                return self._bad()
            self.name = name
            if self.arguments is not None:
                self._start()
                self.events.append(("arguments", self.arguments))
        elif arguments:
            self.has_arguments = True
            text = value.text if value.kind == "{" else _string(value.text)
            if text is None or not isinstance(_json(text), dict):
                return self._bad()
            if value.kind == '"' and self.name is not None:
                self._start()
                self.events.append(("arguments", text))
            elif self.name is None:
                self.arguments = text
        return "more"

    def _start(self) -> None:
        if not self.started and self.name is not None:
            self.started = True
            self.events.append(("start", self.name))


def _string(raw: str) -> str | None:
    value = _json(raw)
    return value if isinstance(value, str) else None


def _json(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return None


class ToolCallParser:
    """One choice's text to content and tool-call pieces (see the module docstring)."""

    def __init__(self, names: tuple[str, ...], syntax: Syntax, *, parallel: bool = True) -> None:
        self.names = frozenset(names)
        self.syntax = syntax
        self.parallel = parallel
        self.state = "text" if syntax == "tags" else "lead"
        self.calls = 0  # calls started
        self._pending = ""  # tags: what may be the start of a tag
        self._space = ""  # whitespace held back
        self._raw: list[str] = []  # the candidate's text, content again if it is no call
        self._call: _CallObject | None = None
        self._pieces: list[Piece] = []

    def feed(self, text: str) -> list[Piece]:
        """What `text` adds to the message."""
        for c in text:
            self._char(c)
        return self._take()

    def finish(self) -> list[Piece]:
        """What is left once the text has ended: a tag begun, an unfinished candidate (content
        again: only a started call is kept), trailing whitespace (content if no call)."""
        if self.state == "text":
            self._content(self._pending)
        elif self.state in ("call", "list") and (self._call is None or not self._call.started):
            self._give_back()
        elif self.state == "lead":
            self._content("")
        if self.calls == 0:
            self._emit(self._space)
        self._pending = self._space = ""
        self.state = "done"
        return self._take()

    def _take(self) -> list[Piece]:
        pieces, self._pieces = self._pieces, []
        return pieces

    # ---- characters, by state ---------------------------------------------------------------
    def _char(self, c: str) -> None:
        if self.state == "text":
            self._text(c)
        elif self.state == "call":
            self._in_call(c)
        elif self.state == "after":
            self._after(c)
        elif self.state in ("lead", "list"):
            self._between(c)
        # "done": dropped

    def _text(self, c: str) -> None:
        if self.syntax == "json":
            self._content(c)
            return
        if not self._pending and c != "<":
            self._content(c)
            return
        self._pending += c
        if self._pending == OPEN_TAG:
            self._pending = ""
            self._begin(OPEN_TAG)
        elif not OPEN_TAG.startswith(self._pending):
            text, self._pending = self._pending, ""
            if c == "<":  # the tag may begin again here
                text, self._pending = text[:-1], "<"
            self._content(text)

    def _between(self, c: str) -> None:
        """json: before, between and after call objects."""
        if c in WS:
            self._hold(c)
        elif c == "{":
            self._begin(c)
        elif self.state == "lead" and c == "[":
            self.state = "list"
            self._raw.append(c)
        elif self.state == "list" and c in ",;]":
            self._raw.append(c)
        elif self.calls:  # text after the calls
            self._raw = []
            self.state = "text"
            self._content(c)
        else:  # no call: all of it is content
            self._give_back()
            self.state = "text"
            self._content(c)

    def _begin(self, opening: str) -> None:
        """A candidate call begins with `opening` (the tag, or its object's `{`)."""
        self._call = _CallObject(self.names)
        self._raw.append(opening)
        self.state = "call"
        if opening == "{":
            self._call.feed(opening)

    def _in_call(self, c: str) -> None:
        call = self._call
        assert call is not None
        status = call.feed(c)
        if status in ("more", "closed"):
            self._raw.append(c)
        self._call_events(call)
        if status == "more":
            return
        if status == "failed":
            self._give_back()
            self.state = "text"
            self._char(c)
            return
        self._raw = []
        if not self.parallel:
            self.state = "done"
        elif self.syntax == "tags":
            self.state = "after"
        else:
            self.state = "list"
        if status == "ended":
            self._char(c)

    def _call_events(self, call: _CallObject) -> None:
        for event, text in call.events:
            index = self.calls - 1
            if event == "start":
                self.calls += 1
                index += 1
                self._space = ""  # whitespace before a call is dropped
                self._raw = []
                self._pieces.append(CallPiece(index, id=f"call_{uuid.uuid4().hex[:24]}", name=text))
            elif text:
                last = self._pieces[-1] if self._pieces else None
                if isinstance(last, CallPiece) and last.index == index and last.id is None:
                    self._pieces[-1] = CallPiece(index, last.arguments + text)
                else:
                    self._pieces.append(CallPiece(index, text))
        call.events.clear()

    def _after(self, c: str) -> None:
        """tags: after a call object, its closing tag (whitespace before it skipped)."""
        if not self._pending and c in WS:
            return
        self._pending += c
        if self._pending == CLOSE_TAG:
            self._pending = ""
            self.state = "text"
        elif not CLOSE_TAG.startswith(self._pending):
            text, self._pending = self._pending, ""
            self.state = "text"
            for t in text:
                self._char(t)

    # ---- output -----------------------------------------------------------------------------
    def _give_back(self) -> None:
        """The candidate was no call: its text is content."""
        text = "".join(self._raw)
        self._raw = []
        self._call = None
        self._content(text)

    def _hold(self, c: str) -> None:
        self._space += c

    def _content(self, text: str) -> None:
        """Content, with its trailing whitespace held back for what follows."""
        if not text:
            return
        full = self._space + text
        kept = full.rstrip(WS)
        self._space = full[len(kept) :]
        self._emit(kept)

    def _emit(self, text: str) -> None:
        if not text:
            return
        if self._pieces and isinstance(self._pieces[-1], str):
            self._pieces[-1] += text
        else:
            self._pieces.append(text)
