"""Tool calls: `tools` and `tool_choice` to a prompt, a grammar and parsed `tool_calls`.

- The tools reach the model through its chat template, as transformers passes them
  (`apply_chat_template(..., tools=...)`). A template that never reads `tools` (SmolLM2's) gets
  them as text in a system message instead, with the Hermes convention that Qwen's and Hermes'
  templates use: calls written as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.
- `"required"` and a named function are enforced by the grammar: the reply is one JSON object
  `{"name": ..., "arguments": {...}}` naming a listed function (the named one) with arguments
  valid against its schema.
- `"auto"`: the reply is parsed for the model's own call syntax (`<tool_call>` blocks; a template
  with tools but another syntax: a reply that is one JSON object with `name` and `arguments` or
  `parameters`). No call found: the reply is plain content.
- Sent back, assistant `tool_calls` and `role: "tool"` results go to the template as
  transformers' convention has them (or as `<tool_call>` / `<tool_response>` text in the
  fallback). All of it is content for the template: special tokens in it stay text
  (`template.py`).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from engine.grammar import GrammarSpec
from gateway.errors import bad_request
from gateway.openai.schemas import ChatCompletionRequest, ResponseFunctionCall, ResponseToolCall

Mode = Literal["auto", "required", "named"]
HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
FALLBACK_PROMPT = (
    "You can call functions. To call one, reply with only:\n<tool_call>\n"
    '{"name": <function name>, "arguments": <arguments object>}\n</tool_call>\n'
    "The functions:\n<tools>\n%s\n</tools>"
)


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """How this request's tools are offered and read back."""

    mode: Mode
    tools: list[dict[str, Any]]  # OpenAI's tool objects, as the template receives them
    names: tuple[str, ...]
    named: str | None  # mode "named": the function
    native: bool  # the chat template renders `tools` itself
    hermes: bool  # calls look like `<tool_call>...</tool_call>` (fallback or Hermes template)


def plan_tools(req: ChatCompletionRequest, tokenizer: Any) -> ToolPlan | None:
    """The request's tool plan, or None when no tool may be called (no tools, or "none").

    Raises:
        APIError: 400 naming `tool_choice` (a function that is not in `tools`, a choice without
            tools), `tools` (two functions of one name) or `response_format` (with a forced call).
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
    if mode != "auto" and req.response_format is not None and req.response_format.type != "text":
        raise bad_request("A forced tool call cannot also have a response_format.",
                          param="response_format")  # fmt: skip
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    native = native_tools(tokenizer)
    hermes = not native or "<tool_call>" in _template(tokenizer)
    return ToolPlan(mode, tools, names, named, native, hermes)


def _template(tokenizer: Any) -> str:
    template = getattr(tokenizer, "chat_template", None)
    return template if isinstance(template, str) else ""


def native_tools(tokenizer: Any) -> bool:
    """Whether the chat template renders `tools` (and tool calls and results) itself."""
    return "tools" in _template(tokenizer)


def tool_grammar(plan: ToolPlan) -> GrammarSpec | None:
    """For "required" / a named function: one call object, arguments valid for that function."""
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
    return GrammarSpec.json_schema(calls[0] if len(calls) == 1 else {"anyOf": calls})


def template_tools(plan: ToolPlan | None) -> list[dict[str, Any]] | None:
    """What `apply_chat_template(tools=...)` gets: the tools when the template renders them."""
    return plan.tools if plan is not None and plan.native else None


def fallback_system(plan: ToolPlan | None) -> str | None:
    """The system text that offers the tools to a template that cannot render them."""
    if plan is None or plan.native:
        return None
    return FALLBACK_PROMPT % "\n".join(json.dumps(t["function"]) for t in plan.tools)


def call_text(name: str, arguments: str) -> str:
    """An assistant's earlier call, as the fallback's text."""
    call = f'{{"name": {json.dumps(name)}, "arguments": {arguments or "{}"}}}'
    return f"<tool_call>\n{call}\n</tool_call>"


def parse_calls(text: str, plan: ToolPlan) -> tuple[str | None, list[ResponseToolCall]]:
    """The reply's content (None if it is only calls) and its tool calls (possibly none)."""
    if plan.mode != "auto":
        call = _call(_json(text), plan)
        return (None, [call]) if call is not None else (text, [])
    if plan.hermes:
        calls = [c for m in HERMES_CALL.finditer(text) if (c := _call(_json(m.group(1)), plan))]
        if not calls:
            return text, []
        content = text[: text.index("<tool_call>")].strip()
        return content or None, calls
    call = _call(_json(text.strip()), plan)
    return (None, [call]) if call is not None else (text, [])


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _call(value: Any, plan: ToolPlan) -> ResponseToolCall | None:
    if not isinstance(value, dict) or value.get("name") not in plan.names:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON text
        arguments = _json(arguments)
    if not isinstance(arguments, dict):
        return None
    return ResponseToolCall(
        id=f"call_{uuid.uuid4().hex[:24]}",
        function=ResponseFunctionCall(
            name=value["name"], arguments=json.dumps(arguments, ensure_ascii=False)
        ),
    )
