"""Request fields to engine SamplingParams; max_tokens against the context window."""

from __future__ import annotations

import pytest

from gateway.errors import APIError
from gateway.limits import RequestLimits
from gateway.openai.sampling import check_request, resolve_max_tokens, sampling_params
from gateway.openai.schemas import ChatCompletionRequest, CompletionRequest

MESSAGES = [{"role": "user", "content": "x"}]


def chat(**fields: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": MESSAGES, **fields})


def completion(**fields: object) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", "prompt": "x", **fields})


def test_max_tokens_defaults() -> None:
    assert resolve_max_tokens(chat(), prompt_tokens=100, max_model_len=512) == 412
    assert resolve_max_tokens(completion(), prompt_tokens=100, max_model_len=512) == 16
    assert resolve_max_tokens(completion(), prompt_tokens=500, max_model_len=512) == 12
    assert resolve_max_tokens(chat(max_tokens=5, max_completion_tokens=7), 100, 512) == 7


def test_max_tokens_must_fit() -> None:
    assert resolve_max_tokens(chat(max_tokens=412), 100, 512) == 412
    with pytest.raises(APIError) as info:
        resolve_max_tokens(chat(max_tokens=413), 100, 512)
    assert info.value.code == "context_length_exceeded" and info.value.param == "max_tokens"
    with pytest.raises(APIError) as info:
        resolve_max_tokens(chat(), 512, 512)
    assert info.value.param == "messages"


def test_sampling_params_defaults_and_mapping() -> None:
    params = sampling_params(completion(), max_tokens=16, logprobs=None)
    assert (params.temperature, params.top_p, params.top_k, params.n) == (1.0, 1.0, 0, 1)
    assert params.stop == [] and params.logprobs is None
    params = sampling_params(completion(top_k=-1, stop="\n", min_tokens=50), 16, 3)
    assert (params.top_k, params.stop, params.min_tokens, params.logprobs) == (0, ["\n"], 16, 3)


def test_engine_validation_becomes_a_400() -> None:
    with pytest.raises(APIError) as info:
        sampling_params(completion(stop_token_ids=[-1]), 16, None)
    assert (info.value.status, info.value.param) == (400, "stop_token_ids")


def test_check_request() -> None:
    check_request(chat(n=4), RequestLimits(max_n=4))
    with pytest.raises(APIError, match="at most 4"):
        check_request(chat(n=5), RequestLimits(max_n=4))
    check_request(
        chat(response_format={"type": "text"}, tool_choice="none"), RequestLimits(max_n=1)
    )
    with pytest.raises(APIError) as info:
        check_request(chat(functions=[{"name": "f"}]), RequestLimits(max_n=1))
    assert info.value.param == "functions"
