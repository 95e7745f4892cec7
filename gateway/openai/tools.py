"""Tool calls: `tools` and `tool_choice` to a prompt, a grammar and parsed `tool_calls`.

- The tools reach the model through its chat template, as transformers passes them
  (`apply_chat_template(..., tools=...)`). A template that never reads `tools` (SmolLM2's) gets
  them as text in a system message instead, with the Hermes convention that Qwen's and Hermes'
  templates use: calls written as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.
- `"required"` and a named function are enforced by the grammar: the reply is a JSON object
  `{"name": ..., "arguments": {...}}` naming a listed function (the named one) with arguments
  valid against its schema; with `"required"` and `parallel_tool_calls` (OpenAI's default) a
  JSON list of one or more of them.
- `"auto"`: the reply is parsed for the model's own call syntax (`<tool_call>` blocks; a template
  with tools but another syntax: JSON objects with `name` and `arguments` or `parameters`). No
  call found: the reply is plain content.
- Replies are read by `tool_parser.ToolCallParser` as they are generated, streamed or not, so a
  streamed reply's calls (sent as deltas) add up to the same calls.
- Sent back, assistant `tool_calls` and `role: "tool"` results go to the template as
  transformers' convention has them (or as `<tool_call>` / `<tool_response>` text in the
  fallback). All of it is content for the template: special tokens in it stay text
  (`template.py`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from engine.grammar import GrammarSpec
from gateway.errors import bad_request
from gateway.openai.schemas import ChatCompletionRequest, ResponseFunctionCall, ResponseToolCall
from gateway.openai.tool_parser import CallPiece, Piece, Syntax, ToolCallParser

Mode = Literal["auto", "required", "named"]
FALLBACK_PROMPT = (
    "You can call functions. To call one, reply with only:\n<tool_call>\n"
    '{"name": <function name>, "arguments": <arguments object>}\n</tool_call>\n'
    "%sThe functions:\n<tools>\n%s\n</tools>"
)
SEVERAL = "To call several, write one such block for each.\n"


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """How this request's tools are offered and read back."""

    mode: Mode
    tools: list[dict[str, Any]]  # OpenAI's tool objects, as the template receives them
    names: tuple[str, ...]
    named: str | None  # mode "named": the function
    native: bool  # the chat template renders `tools` itself
    hermes: bool  # calls look like `<tool_call>...</tool_call>` (fallback or Hermes template)
    parallel: bool  # several calls in one reply (`parallel_tool_calls`, default true)


def plan_tools(req: ChatCompletionRequest, tokenizer: Any) -> ToolPlan | None:
    """The request's tool plan, or None when no tool may be called (no tools, or "none").

    Raises:
        APIError: 400 naming `tool_choice` (a function that is not in `tools`, a choice without
            tools) or `tools` (two functions of one name).
    """
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none"):
            raise bad_request("'tool_choice' needs 'tools'.", param="tool_choice")
        return None
    if choice == "none":
        return None
    names = tuple(t.function.name for t in req.tools)
    if len(set(names)) != len(names):
        raise bad_request("Two tools have the same function name.", param="tools")
    named = None
    mode: Mode = "auto"
    if choice == "required":
        mode = "required"
    elif choice is not None and not isinstance(choice, str):
        named, mode = choice.function.name, "named"
        if named not in names:
            raise bad_request(f"tool_choice names '{named[:64]}', which is not in tools.",
                              param="tool_choice")  # fmt: skip
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    native = native_tools(tokenizer)
    hermes = not native or "<tool_call>" in _template(tokenizer)
    parallel = req.parallel_tool_calls is not False
    return ToolPlan(mode, tools, names, named, native, hermes, parallel)


def _template(tokenizer: Any) -> str:
    template = getattr(tokenizer, "chat_template", None)
    return template if isinstance(template, str) else ""


def native_tools(tokenizer: Any) -> bool:
    """Whether the chat template renders `tools` (and tool calls and results) itself."""
    return "tools" in _template(tokenizer)


def tool_grammar(plan: ToolPlan) -> GrammarSpec | None:
    """For "required" / a named function: one call object, arguments valid for that function;
    "required" with parallel calls: a list of one or more of them."""
    if plan.mode == "auto":
        return None
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": [t["function"]["name"]]},
                "arguments": t["function"].get("parameters") or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in plan.tools
        if plan.named is None or t["function"]["name"] == plan.named
    ]
    call = calls[0] if len(calls) == 1 else {"anyOf": calls}
    if plan.mode == "required" and plan.parallel:
        return GrammarSpec.json_schema({"type": "array", "items": call, "minItems": 1})
    return GrammarSpec.json_schema(call)


def template_tools(plan: ToolPlan | None) -> list[dict[str, Any]] | None:
    """What `apply_chat_template(tools=...)` gets: the tools when the template renders them."""
    return plan.tools if plan is not None and plan.native else None


def fallback_system(plan: ToolPlan | None) -> str | None:
    """The system text that offers the tools to a template that cannot render them."""
    if plan is None or plan.native:
        return None
    functions = "\n".join(json.dumps(t["function"]) for t in plan.tools)
    return FALLBACK_PROMPT % (SEVERAL if plan.parallel else "", functions)


def call_text(name: str, arguments: str) -> str:
    """An assistant's earlier call, as the fallback's text."""
    call = f'{{"name": {json.dumps(name)}, "arguments": {arguments or "{}"}}}'
    return f"<tool_call>\n{call}\n</tool_call>"


def call_parser(plan: ToolPlan) -> ToolCallParser:
    """A parser for one choice's text: `<tool_call>` blocks (auto, Hermes) or JSON calls."""
    syntax: Syntax = "tags" if plan.mode == "auto" and plan.hermes else "json"
    return ToolCallParser(plan.names, syntax, parallel=plan.parallel)


def parse_calls(text: str, plan: ToolPlan) -> tuple[str | None, list[ResponseToolCall]]:
    """A finished reply's content (None if it has none) and its tool calls (possibly none)."""
    parser = call_parser(plan)
    return add_up([*parser.feed(text), *parser.finish()])


def add_up(pieces: list[Piece]) -> tuple[str | None, list[ResponseToolCall]]:
    """Content and tool calls as a client that accumulates the streamed pieces has them."""
    content: list[str] = []
    calls: list[ResponseToolCall] = []
    for piece in pieces:
        if not isinstance(piece, CallPiece):
            content.append(piece)
        elif piece.id is not None:
            function = ResponseFunctionCall(name=piece.name or "", arguments=piece.arguments)
            calls.append(ResponseToolCall(id=piece.id, function=function))
        else:
            calls[piece.index].function.arguments += piece.arguments
    return "".join(content) or None, calls
