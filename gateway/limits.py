"""Every bound on what one request may carry, in one place.

The constants are OpenAI's own bounds or fixed by this server; the request models declare them
(`Field(max_length=...)`), so the OpenAPI document states them and a request past one gets a 400
naming the field. `RequestLimits` holds the bounds a deployer sets (`Settings.request_limits()`);
the handlers and the HTTP layer check them:

| bound | where | answer |
|---|---|---|
| header bytes (request line + headers) | `gateway.server` (uvicorn protocol) | 431 |
| header arrival time (slow headers) | `gateway.server` (uvicorn protocol) | 408 `request_timeout` |
| body bytes | `BodyLimitMiddleware` | 413 `request_too_large` |
| body arrival time (slow bodies) | `BodyLimitMiddleware` | 408 `request_timeout` |
| JSON: invalid UTF-8, nesting deeper than 200 | pydantic's parser | 400 `invalid_json` |
| `n`, messages, prompt characters | `gateway.openai.sampling.check_request` | 400, `param` |
| the fields below | the request models | 400, `param` |
"""

from __future__ import annotations

from dataclasses import dataclass

# OpenAI's bounds.
MAX_STOP = 4  # stop sequences
MAX_TOP_LOGPROBS = 20  # chat `top_logprobs`, completions `logprobs`
MAX_LOGIT_BIAS = 300  # logit_bias entries (refused anyway: unsupported)

# This server's fixed bounds.
MAX_STOP_CHARS = 1024  # characters of one stop sequence
MAX_STOP_TOKEN_IDS = 256
MAX_NAME_CHARS = 256  # `model`, a message's `name`
MAX_USER_CHARS = 1024  # `user`
MAX_CONTENT_PARTS = 256  # parts of one message's content
MAX_TOKENS = 2**31 - 1  # max_tokens, max_completion_tokens, min_tokens
MAX_GRAMMAR_CHARS = 65536  # a JSON schema (as JSON) or a regex, for structured outputs
MAX_CHOICES = 256  # guided_choice entries
MAX_TOOLS = 128  # tools of a request, tool calls of a message


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """The bounds a deployer sets (environment `PREFIXGATE_*`, see `Settings`)."""

    max_n: int = 16  # completions per request
    max_messages: int = 2048  # messages of one chat request
    max_prompt_chars: int = 1_048_576  # all message contents, or the prompt (chars or token ids)
    max_body_bytes: int = 2 * 1024 * 1024
    body_timeout_s: float = 30.0  # the headers, then the whole body, must each arrive within it
    max_header_bytes: int = 32 * 1024  # request line and headers

    def __post_init__(self) -> None:
        for name in self.__slots__:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
