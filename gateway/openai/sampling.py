"""From an OpenAI request to engine `SamplingParams`, with the checks that need the prompt."""

from __future__ import annotations

from engine.errors import InvalidRequestError
from engine.grammar import GrammarSpec
from engine.sampling_params import SamplingParams
from gateway.errors import APIError, bad_request
from gateway.limits import RequestLimits
from gateway.openai.schemas import ChatCompletionRequest, CompletionRequest, _SamplingRequest

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def check_request(req: _SamplingRequest, limits: RequestLimits) -> None:
    """Checks that need no tokenizer: the deployer's limits, unsupported fields,
    stream_options."""
    if req.n > limits.max_n:
        raise bad_request(f"n must be at most {limits.max_n}, got {req.n}.", param="n")
    _check_best_of(req, limits)
    if isinstance(req, ChatCompletionRequest):
        _check_messages(req, limits)
    elif isinstance(req, CompletionRequest) and _prompt_size(req.prompt) > limits.max_prompt_chars:
        raise bad_request(
            f"The prompt is too long: at most {limits.max_prompt_chars} characters (or token "
            "ids) per request.",
            param="prompt",
        )
    unsupported = req.unsupported_fields()
    if unsupported:
        name = unsupported[0]
        raise bad_request(f"'{name}' is not supported by this server.", param=name)
    if req.stream_options is not None and not req.stream:
        raise bad_request(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            param="stream_options",
        )
    if isinstance(req, ChatCompletionRequest) and req.top_logprobs and not req.logprobs:
        raise bad_request("'top_logprobs' requires 'logprobs' to be true.", param="top_logprobs")


def _check_best_of(req: _SamplingRequest, limits: RequestLimits) -> None:
    if req.best_of is None:
        return
    if req.best_of > limits.max_n:
        raise bad_request(
            f"best_of must be at most {limits.max_n}, got {req.best_of}.", param="best_of"
        )
    if req.best_of < req.n:
        raise bad_request(
            f"best_of must be at least n ({req.n}), got {req.best_of}.", param="best_of"
        )
    if req.stream and req.best_of > req.n:
        raise bad_request("best_of > n cannot be streamed: the best are known at the end.",
                          param="best_of")  # fmt: skip


def _check_messages(req: ChatCompletionRequest, limits: RequestLimits) -> None:
    if len(req.messages) > limits.max_messages:
        raise bad_request(
            f"Too many messages: at most {limits.max_messages}, got {len(req.messages)}.",
            param="messages",
        )
    chars = 0
    for i, message in enumerate(req.messages):
        content = message.content
        if isinstance(content, str):
            chars += len(content)
        elif content is not None:
            chars += sum(len(part.text or "") for part in content)
        if chars > limits.max_prompt_chars:
            raise bad_request(
                f"The messages are too long: at most {limits.max_prompt_chars} characters of "
                "content per request.",
                param=f"messages[{i}].content",
            )


def _prompt_size(prompt: str | list[str] | list[int] | list[list[int]]) -> int:
    """Characters of a text prompt, or token ids of a token prompt (all prompts together)."""
    if isinstance(prompt, str):
        return len(prompt)
    return sum(len(p) if isinstance(p, (str, list)) else 1 for p in prompt)


def resolve_max_tokens(
    req: ChatCompletionRequest | CompletionRequest,
    prompt_tokens: int,
    max_model_len: int,
    default_cap: int | None = None,
) -> int:
    """The per-completion token limit, checked against the context window.

    Chat defaults to "until the context is full", text completions to 16 (clamped to the room
    left); `default_cap` (the tenant's max_tokens_per_request / n) caps that default too, so a
    request that sets no max_tokens is not refused for its default. Raises a 400
    `context_length_exceeded` when the prompt or prompt + max_tokens do not fit.
    """
    where = "messages" if isinstance(req, ChatCompletionRequest) else "prompt"
    if prompt_tokens >= max_model_len:
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"{where} resulted in {prompt_tokens} tokens. Please reduce the length of the "
            f"{where}.",
            param=where,
            code="context_length_exceeded",
        )
    room = max_model_len - prompt_tokens
    requested = _requested_max_tokens(req)
    if requested is None:
        default = (
            room
            if isinstance(req, ChatCompletionRequest)
            else min(COMPLETIONS_DEFAULT_MAX_TOKENS, room)
        )
        return default if default_cap is None else max(1, min(default, default_cap))
    if requested > room:
        param = "max_completion_tokens" if _uses_max_completion_tokens(req) else "max_tokens"
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_tokens + requested} tokens ({prompt_tokens} in the {where}, "
            f"{requested} in the completion). Please reduce the length of the {where} or "
            "completion.",
            param=param,
            code="context_length_exceeded",
        )
    return requested


def _uses_max_completion_tokens(req: _SamplingRequest) -> bool:
    return isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None


def _requested_max_tokens(req: _SamplingRequest) -> int | None:
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        return req.max_completion_tokens
    return req.max_tokens


def logit_bias(req: _SamplingRequest) -> dict[int, float]:
    """`logit_bias` with its keys as token ids (JSON keys are strings of digits)."""
    bias: dict[int, float] = {}
    for key, value in (req.logit_bias or {}).items():
        if not key.isascii() or not key.isdigit() or len(key) > 10:
            raise bad_request(
                f"logit_bias keys must be token ids (strings of digits), got {key[:32]!r}.",
                param="logit_bias",
            )
        bias[int(key)] = value
    return bias


def sampling_params(
    req: _SamplingRequest,
    max_tokens: int,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
    grammar: GrammarSpec | None = None,
) -> SamplingParams:
    """Build validated engine params; a field the engine refuses becomes a 400 naming it."""
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    try:
        return SamplingParams(
            n=req.n,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=max(0, req.top_k or 0),
            min_p=req.min_p or 0.0,
            seed=req.seed,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            max_tokens=max_tokens,
            min_tokens=min(req.min_tokens, max_tokens),
            stop=stop,
            stop_token_ids=list(req.stop_token_ids or []),
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
            logit_bias=logit_bias(req),
            best_of=req.best_of,
            prompt_logprobs=prompt_logprobs,
            grammar=grammar,
        )
    except InvalidRequestError as exc:
        raise bad_request(exc.message, param=exc.param) from exc
