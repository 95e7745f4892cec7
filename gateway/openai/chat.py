"""`/v1/chat/completions`: messages to prompt tokens, engine deltas to chat chunks."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from engine.outputs import Delta, TokenLogprob
from gateway.errors import bad_request
from gateway.openai.generation import ChoiceState
from gateway.openai.schemas import (
    ChatChoice,
    ChatChoiceLogprobs,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatMessage,
    ChatResponseMessage,
    ChatTokenLogprob,
    ChunkFunctionCall,
    ChunkToolCall,
    FunctionCall,
    ResponseToolCall,
    TopLogprob,
    Usage,
)
from gateway.openai.template import render_chat
from gateway.openai.tokens import TokenTexts, chunk_frame, json_opt_str, json_str
from gateway.openai.tool_parser import CallPiece, Piece, ToolCallParser
from gateway.openai.tools import (
    ToolPlan,
    call_parser,
    call_text,
    fallback_system,
    native_tools,
    parse_calls,
    template_tools,
)

ROLE_ALIASES = {"developer": "system"}
ROLES = ("system", "user", "assistant", "tool")


def template_messages(
    messages: list[ChatMessage], native_tools: bool = False
) -> list[dict[str, Any]]:
    """Messages as the chat template wants them: known roles, text content; tool calls and
    results as transformers' convention has them (`native_tools`), else as text (`tools.py`)."""
    out = []
    for i, message in enumerate(messages):
        role = ROLE_ALIASES.get(message.role, message.role)
        if role not in ROLES:
            raise bad_request(
                f"Invalid role '{message.role}': expected one of system, developer, user, "
                "assistant, tool.",
                param=f"messages[{i}].role",
            )
        if role == "assistant" and message.tool_calls:
            out.append(_assistant_calls(message, i, native_tools))
        elif role == "tool":
            out.append(_tool_result(message, i, native_tools))
        else:
            out.append({"role": role, "content": _text_content(message, i)})
    return out


def _assistant_calls(message: ChatMessage, i: int, native: bool) -> dict[str, Any]:
    content = "" if message.content is None else _text_content(message, i)
    calls = message.tool_calls or []
    if not native:
        texts = [call_text(c.function.name, c.function.arguments) for c in calls]
        return {"role": "assistant", "content": "\n".join([content, *texts]).strip()}
    return {
        "role": "assistant",
        "content": content,
        "tool_calls": [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.function.name, "arguments": _arguments(c.function)},
            }
            for c in calls
        ],
    }


def _arguments(call: FunctionCall) -> Any:
    """Templates read the arguments as an object; kept as text if it is not JSON."""
    try:
        return json.loads(call.arguments)
    except ValueError:
        return call.arguments


def _tool_result(message: ChatMessage, i: int, native: bool) -> dict[str, Any]:
    if message.tool_call_id is None:
        raise bad_request("A 'tool' message needs its 'tool_call_id'.",
                          param=f"messages[{i}].tool_call_id")  # fmt: skip
    content = _text_content(message, i)
    if not native:
        return {"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"}
    return {"role": "tool", "tool_call_id": message.tool_call_id, "content": content}


def _text_content(message: ChatMessage, i: int) -> str:
    content = message.content
    if content is None:
        raise bad_request("Message content is required.", param=f"messages[{i}].content")
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise bad_request(
                f"Content parts of type '{part.type}' are not supported; only 'text'.",
                param=f"messages[{i}].content[{j}]",
            )
        texts.append(part.text)
    return "\n".join(texts)


def render_chat_prompt(
    tokenizer: Any,
    messages: list[ChatMessage],
    prefix: Sequence[dict[str, str]] = (),
    tools: ToolPlan | None = None,
) -> list[int]:
    """Apply the model's chat template (with the assistant generation prompt) and tokenize;
    special tokens written in a message are text, never control tokens (`template.py`).
    `prefix`: a registered prefix's messages (already checked), put first. `tools`: offered
    through the template, or as a system message when the template cannot render them."""
    conversation = [*prefix, *template_messages(messages, native_tools(tokenizer))]
    offer = fallback_system(tools)
    if offer is not None:
        if conversation and conversation[0]["role"] == "system":
            first = conversation[0]
            conversation[0] = {**first, "content": f"{first['content']}\n\n{offer}"}
        else:
            conversation.insert(0, {"role": "system", "content": offer})
    return render_conversation(tokenizer, conversation, tools=template_tools(tools))


def render_conversation(
    tokenizer: Any,
    conversation: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    *,
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """`template.render_chat`, a template's own refusal as a 400 on `messages`."""
    try:
        return render_chat(tokenizer, conversation, add_generation_prompt, tools=tools)
    except Exception as exc:  # jinja2 errors raised by the template itself (raise_exception)
        raise bad_request(f"The chat template rejected the messages: {exc}", "messages") from exc


class ChatFormat:
    """Chat completion JSON: chunks while streaming, one `ChatCompletion` otherwise.

    With tools, each choice's text goes through its `ToolCallParser` as it comes: content goes
    out as content, a call as a first `tool_calls` delta (index, id, name, arguments "") and
    then fragments of its arguments; a choice that called ends with `finish_reason:
    "tool_calls"`. Not streamed, the same parsing of the whole text gives the message.
    """

    def __init__(
        self,
        *,
        completion_id: str,
        created: int,
        model: str,
        n: int,
        top_logprobs: int | None,  # None: no logprobs
        token_texts: TokenTexts,
        tools: ToolPlan | None = None,
    ) -> None:
        self.id = completion_id
        self.created = created
        self.model = model
        self.n = n
        self.top_logprobs = top_logprobs
        self.texts = token_texts
        self.tools = tools
        self._parsers: dict[int, ToolCallParser] = {}  # with tools: each choice's parser
        # Fast path for the common chunk (text, no logprobs): the fixed JSON around it, once.
        self._head, self._tail = chunk_frame(
            ChatCompletionChunk(id=completion_id, created=created, model=model, choices=[])
        )

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> bytes:
        chunk = ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )
        return chunk.model_dump_json().encode()

    def take_prompt_logprobs(self, logprobs: list[TokenLogprob | None]) -> None:
        """Chat never asks for prompt logprobs."""

    def opening_chunks(self) -> list[bytes]:
        # With tools the reply may have no content at all: none yet (null, as OpenAI sends).
        role = ChatDelta(role="assistant", content=None if self.tools else "")
        return [self._chunk([ChatChunkChoice(index=i, delta=role)]) for i in range(self.n)]

    def delta_chunks(self, delta: Delta) -> list[bytes]:
        if self.tools is not None:
            return self._tool_chunks(delta, self.tools)
        if not delta.text and delta.finish_reason is None and not delta.logprobs:
            return []
        if self.top_logprobs is None:  # same bytes as the pydantic path below, 10x cheaper
            content = b'{"content":%s}' % json_str(delta.text) if delta.text else b"{}"
            choice_json = b'{"index":%d,"delta":%s,"logprobs":null,"finish_reason":%s}' % (
                delta.index,
                content,
                json_opt_str(delta.finish_reason),
            )
            return [self._head + choice_json + self._tail]
        choice = ChatChunkChoice(
            index=delta.index,
            delta=ChatDelta(content=delta.text) if delta.text else ChatDelta(),
            logprobs=self._logprobs(delta.logprobs),
            finish_reason=delta.finish_reason,
        )
        return [self._chunk([choice])]

    def _tool_chunks(self, delta: Delta, tools: ToolPlan) -> list[bytes]:
        parser = self._parsers.get(delta.index)
        if parser is None:
            parser = self._parsers[delta.index] = call_parser(tools)
        pieces = parser.feed(delta.text)
        if delta.finish_reason is not None:
            pieces += parser.finish()
        choices = [ChatChunkChoice(index=delta.index, delta=_piece_delta(p)) for p in pieces]
        logprobs = self._logprobs(delta.logprobs or None)
        if logprobs is not None:
            if not choices:
                choices.append(ChatChunkChoice(index=delta.index, delta=ChatDelta()))
            choices[0].logprobs = logprobs
        if delta.finish_reason is not None:
            finish = _finish_reason(delta.finish_reason, parser.calls > 0)
            choices.append(
                ChatChunkChoice(index=delta.index, delta=ChatDelta(), finish_reason=finish)
            )
        return [self._chunk([choice]) for choice in choices]

    def usage_chunk(self, usage: Usage) -> bytes:
        return self._chunk([], usage)

    def final_body(self, choices: list[ChoiceState], usage: Usage) -> bytes:
        body = ChatCompletion(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[self._final_choice(c) for c in choices],
            usage=usage,
        )
        return body.model_dump_json().encode()

    def _final_choice(self, c: ChoiceState) -> ChatChoice:
        content: str | None = c.text
        calls: list[ResponseToolCall] = []
        finish = c.finish_reason
        if self.tools is not None:
            content, calls, finish = _read_calls(c, self.tools)
        return ChatChoice(
            index=c.index,
            message=ChatResponseMessage(content=content, tool_calls=calls or None),
            logprobs=self._logprobs(c.logprobs),
            finish_reason=finish,
        )

    def _logprobs(self, logprobs: list[TokenLogprob] | None) -> ChatChoiceLogprobs | None:
        if self.top_logprobs is None or logprobs is None:
            return None
        k, texts = self.top_logprobs, self.texts
        return ChatChoiceLogprobs(
            content=[
                ChatTokenLogprob(
                    token=texts(lp.token_id),
                    logprob=lp.logprob,
                    bytes=texts.utf8(lp.token_id),
                    top_logprobs=[
                        TopLogprob(token=texts(t), logprob=v, bytes=texts.utf8(t))
                        for t, v in lp.top[:k]
                    ],
                )
                for lp in logprobs
            ]
        )


def _read_calls(
    choice: ChoiceState, tools: ToolPlan
) -> tuple[str | None, list[ResponseToolCall], str | None]:
    """A finished choice's content, tool calls and finish reason ("tool_calls" if it called)."""
    content, calls = parse_calls(choice.text, tools)
    return content, calls, _finish_reason(choice.finish_reason, bool(calls))


def _finish_reason(finish: str | None, called: bool) -> str | None:
    return "tool_calls" if called and finish == "stop" else finish


def _piece_delta(piece: Piece) -> ChatDelta:
    if not isinstance(piece, CallPiece):
        return ChatDelta(content=piece)
    call = ChunkToolCall(
        index=piece.index,
        id=piece.id,
        type=None if piece.id is None else "function",
        function=ChunkFunctionCall(name=piece.name, arguments=piece.arguments),
    )
    return ChatDelta(tool_calls=[call])
