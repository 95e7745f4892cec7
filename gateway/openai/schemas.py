"""Wire models of the OpenAI API: request and response bodies in OpenAI's shapes (pydantic).

Requests are validated strictly from JSON (`"0.5"` is not a number; `1` is a valid float), and
unknown fields are ignored like OpenAI does. Fields that OpenAI defines but we cannot honour
(`functions`, `suffix`) are declared so `unsupported_fields` can refuse them clearly
instead of silently ignoring them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gateway.limits import (
    MAX_CHOICES,
    MAX_CONTENT_PARTS,
    MAX_GRAMMAR_CHARS,
    MAX_LOGIT_BIAS,
    MAX_NAME_CHARS,
    MAX_STOP,
    MAX_STOP_CHARS,
    MAX_STOP_TOKEN_IDS,
    MAX_TOKENS,
    MAX_TOOLS,
    MAX_TOP_LOGPROBS,
    MAX_USER_CHARS,
)
from gateway.schemas import is_none

# ---------------------------------------------------------------------------------------------
# Requests


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]
Bias = Annotated[float, Field(ge=-100.0, le=100.0)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(_Request):
    include_usage: bool = False


class ContentPart(_Request):
    """A part of a message's content; only `{"type": "text", "text": ...}` is supported."""

    type: str
    text: str | None = None


ToolName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")]


class FunctionCall(_Request):
    """A call in an assistant message sent back: `arguments` is a JSON text."""

    name: str = Field(max_length=MAX_NAME_CHARS)
    arguments: str = Field(max_length=MAX_GRAMMAR_CHARS)


class ToolCall(_Request):
    id: str = Field(max_length=MAX_NAME_CHARS)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: str
    content: str | Annotated[list[ContentPart], Field(max_length=MAX_CONTENT_PARTS)] | None = None
    name: str | None = Field(default=None, max_length=MAX_NAME_CHARS)
    tool_calls: list[ToolCall] | None = Field(default=None, max_length=MAX_TOOLS)  # assistant
    tool_call_id: str | None = Field(default=None, max_length=MAX_NAME_CHARS)  # role "tool"


class FunctionDefinition(_Request):
    name: ToolName
    description: str | None = Field(default=None, max_length=MAX_GRAMMAR_CHARS)
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None


class ToolDefinition(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Request):
    name: str = Field(max_length=MAX_NAME_CHARS)


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: FunctionName


class JSONSchemaFormat(_Request):
    """`response_format.json_schema`: OpenAI's structured outputs."""

    model_config = ConfigDict(populate_by_name=True)

    name: str = Field(max_length=64)
    description: str | None = Field(default=None, max_length=MAX_GRAMMAR_CHARS)
    json_schema: dict[str, Any] | bool = Field(default=True, alias="schema")  # True: any JSON
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class _SamplingRequest(_Request):
    """Fields shared by chat and text completions."""

    model: str = Field(max_length=MAX_NAME_CHARS)
    n: int = Field(default=1, ge=1)  # at most `RequestLimits.max_n`
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1, le=2**31 - 1)  # vLLM extension; 0, -1: off
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)  # OpenAI: int64
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = None
    stop_token_ids: list[int] | None = Field(default=None, max_length=MAX_STOP_TOKEN_IDS)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    min_tokens: int = Field(default=0, ge=0, le=MAX_TOKENS)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    ignore_eos: bool = False
    user: str | None = Field(default=None, max_length=MAX_USER_CHARS)
    # A registered prefix (`/v1/prefixes`) put before the messages / prompt; unknown: 404.
    prefix: str | None = Field(default=None, max_length=64)
    # OpenAI's cache routing hint; naming a registered prefix uses it like `prefix` does.
    prompt_cache_key: str | None = Field(default=None, max_length=MAX_USER_CHARS)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # token id (a string of digits, as OpenAI's JSON keys) -> bias added to its logit
    logit_bias: dict[str, Bias] | None = Field(default=None, max_length=MAX_LOGIT_BIAS)
    best_of: int | None = Field(default=None, ge=1)  # at most `RequestLimits.max_n`
    # Structured outputs, vLLM's names (at most one of them, and not with response_format).
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = Field(default=None, max_length=MAX_GRAMMAR_CHARS)
    guided_choice: list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]] | None = (
        Field(default=None, min_length=1, max_length=MAX_CHOICES)
    )

    @property
    def num_seqs(self) -> int:
        """Completions sampled: best_of when set, else n."""
        return self.best_of if self.best_of is not None else self.n

    def unsupported_fields(self) -> list[str]:
        return []


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)  # at most `RequestLimits.max_messages`
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[ToolDefinition] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # None: true, as OpenAI
    functions: list[Any] | None = None
    response_format: ResponseFormat | None = None

    def unsupported_fields(self) -> list[str]:
        found = super().unsupported_fields()
        if self.functions:
            found.append("functions")
        return found


class CompletionRequest(_SamplingRequest):
    # One prompt: text, a list of one text, token ids, or a list of one token id list.
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None

    def unsupported_fields(self) -> list[str]:
        found = super().unsupported_fields()
        if self.suffix:
            found.append("suffix")
        return found


# ---------------------------------------------------------------------------------------------
# Responses


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails

    @classmethod
    def of(cls, prompt: int, completion: int, cached: int) -> Usage:
        return cls(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        )


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ResponseFunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class ChunkFunctionCall(BaseModel):
    name: str | None = Field(default=None, exclude_if=is_none)  # the call's first delta
    arguments: str  # a fragment of the JSON text ("" in the first delta)


class ChunkToolCall(BaseModel):
    """A streamed tool call's part: its first has `id`, `type` and the function's name."""

    index: int
    id: str | None = Field(default=None, exclude_if=is_none)
    type: Literal["function"] | None = Field(default=None, exclude_if=is_none)
    function: ChunkFunctionCall


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ResponseToolCall] | None = Field(default=None, exclude_if=is_none)


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatDelta(BaseModel):
    """A streamed message fragment; absent fields are left out (`{}` on the final chunk)."""

    role: Literal["assistant"] | None = Field(default=None, exclude_if=is_none)
    content: str | None = Field(default=None, exclude_if=is_none)
    tool_calls: list[ChunkToolCall] | None = Field(default=None, exclude_if=is_none)


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionLogprobs(BaseModel):
    """Per token; with `echo` the prompt's tokens come first, the very first with nulls."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(BaseModel):
    """A text completion, and also each streamed chunk of one (then `usage` is null)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "prefixgate"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
