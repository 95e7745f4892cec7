"""`/v1/chat/completions`: messages to prompt tokens, engine deltas to chat chunks."""

from __future__ import annotations

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
    TopLogprob,
    Usage,
)
from gateway.openai.template import render_chat
from gateway.openai.tokens import TokenTexts, chunk_frame, json_opt_str, json_str

ROLE_ALIASES = {"developer": "system"}
ROLES = ("system", "user", "assistant")
TOOL_ROLES = ("tool", "function")


def template_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """Messages as the chat template wants them: known roles, text content only."""
    out = []
    for i, message in enumerate(messages):
        role = ROLE_ALIASES.get(message.role, message.role)
        if role in TOOL_ROLES:
            raise bad_request(
                f"Messages with role '{role}' are not supported: this server has no tool calling.",
                param=f"messages[{i}].role",
            )
        if role not in ROLES:
            raise bad_request(
                f"Invalid role '{message.role}': expected one of system, developer, user, "
                "assistant.",
                param=f"messages[{i}].role",
            )
        out.append({"role": role, "content": _text_content(message, i)})
    return out


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
) -> list[int]:
    """Apply the model's chat template (with the assistant generation prompt) and tokenize;
    special tokens written in a message are text, never control tokens (`template.py`).
    `prefix`: a registered prefix's messages (already checked), put first."""
    return render_conversation(tokenizer, [*prefix, *template_messages(messages)])


def render_conversation(
    tokenizer: Any, conversation: list[dict[str, str]], add_generation_prompt: bool = True
) -> list[int]:
    """`template.render_chat`, a template's own refusal as a 400 on `messages`."""
    try:
        return render_chat(tokenizer, conversation, add_generation_prompt)
    except Exception as exc:  # jinja2 errors raised by the template itself (raise_exception)
        raise bad_request(f"The chat template rejected the messages: {exc}", "messages") from exc


class ChatFormat:
    """Chat completion JSON: chunks while streaming, one `ChatCompletion` otherwise."""

    def __init__(
        self,
        *,
        completion_id: str,
        created: int,
        model: str,
        n: int,
        top_logprobs: int | None,  # None: no logprobs
        token_texts: TokenTexts,
    ) -> None:
        self.id = completion_id
        self.created = created
        self.model = model
        self.n = n
        self.top_logprobs = top_logprobs
        self.texts = token_texts
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
        role = ChatDelta(role="assistant", content="")
        return [self._chunk([ChatChunkChoice(index=i, delta=role)]) for i in range(self.n)]

    def delta_chunks(self, delta: Delta) -> list[bytes]:
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

    def usage_chunk(self, usage: Usage) -> bytes:
        return self._chunk([], usage)

    def final_body(self, choices: list[ChoiceState], usage: Usage) -> bytes:
        body = ChatCompletion(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[
                ChatChoice(
                    index=c.index,
                    message=ChatResponseMessage(content=c.text),
                    logprobs=self._logprobs(c.logprobs),
                    finish_reason=c.finish_reason,
                )
                for c in choices
            ],
            usage=usage,
        )
        return body.model_dump_json().encode()

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
