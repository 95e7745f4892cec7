"""HTTP endpoints: thin; the work lives in chat.py, completions.py, sampling.py, generation.py."""

from __future__ import annotations

import time
import uuid
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from gateway.auth import get_principal
from gateway.chat import ChatFormat, render_chat_prompt
from gateway.completions import CompletionFormat, prompt_token_ids
from gateway.engine_client import EngineClient
from gateway.errors import bad_request, from_validation_error, model_not_found
from gateway.generation import start_generation
from gateway.hooks import GenerationInfo
from gateway.metrics import CONTENT_TYPE
from gateway.middleware import log_fields
from gateway.openapi import build_openapi
from gateway.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    ReadyResponse,
)
from gateway.responses import GenerationResponse, OutputFormat, StreamingGenerationResponse
from gateway.sampling import check_request, resolve_max_tokens, sampling_params
from gateway.state import GatewayState, get_state
from tenants import FailureMode

T = TypeVar("T", bound=BaseModel)


class JSON(JSONResponse):
    """JSONResponse for pydantic models."""

    def __init__(self, model: BaseModel, status_code: int = 200) -> None:
        super().__init__(model.model_dump(mode="json"), status_code=status_code)


async def parse_body(request: Request, model: type[T]) -> T:
    try:
        body = await request.body()
    except ClientDisconnect as exc:
        raise bad_request("The client disconnected while sending the body.") from exc
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from exc


async def chat_completions(request: Request) -> Response:
    started = time.perf_counter()
    state = get_state(request)
    req = await parse_body(request, ChatCompletionRequest)
    engine = _prepare(state, req)
    prompt = render_chat_prompt(engine.tokenizer, req.messages)
    top_logprobs = (req.top_logprobs or 0) if req.logprobs else None
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    fmt = ChatFormat(
        completion_id=completion_id,
        created=int(time.time()),
        model=state.model_name,
        n=req.n,
        top_logprobs=top_logprobs,
        token_texts=state.token_texts(),
    )
    return await _generate(request, state, engine, req, prompt, top_logprobs, fmt, started)


async def completions(request: Request) -> Response:
    started = time.perf_counter()
    state = get_state(request)
    req = await parse_body(request, CompletionRequest)
    engine = _prepare(state, req)
    prompt = prompt_token_ids(engine.tokenizer, req.prompt)
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    fmt = CompletionFormat(
        completion_id=completion_id,
        created=int(time.time()),
        model=state.model_name,
        logprobs=req.logprobs,
        token_texts=state.token_texts(),
    )
    return await _generate(request, state, engine, req, prompt, req.logprobs, fmt, started)


def _prepare(state: GatewayState, req: ChatCompletionRequest | CompletionRequest) -> EngineClient:
    state.check_model(req.model)
    check_request(req, state.settings.max_n)
    return state.require_engine()


async def _generate(
    request: Request,
    state: GatewayState,
    engine: EngineClient,
    req: ChatCompletionRequest | CompletionRequest,
    prompt: list[int],
    logprobs: int | None,
    fmt: ChatFormat | CompletionFormat,
    started: float,
) -> Response:
    principal = get_principal(request.scope)
    cap = principal.max_tokens_per_request
    default_cap = None if cap is None else cap // req.n
    max_tokens = resolve_max_tokens(req, len(prompt), engine.max_model_len, default_cap)
    params = sampling_params(req, max_tokens, logprobs)
    route = "chat" if isinstance(req, ChatCompletionRequest) else "completions"
    info = GenerationInfo(
        request_id=fmt.id,
        principal=principal,
        route=route,
        prompt_tokens=len(prompt),
        max_completion_tokens=max_tokens * req.n,
    )
    log = log_fields(request.scope)
    log.update(completion_id=fmt.id, model=req.model, stream=req.stream, n=req.n)
    gen, headers = await start_generation(
        engine,
        hooks=state.hooks,
        metrics=state.metrics,
        info=info,
        prompt_token_ids=prompt,
        params=params,
        started_at=started,
        log=log,
    )
    output: OutputFormat = fmt
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingGenerationResponse(
            gen, output, include_usage=include_usage, headers=headers
        )
    return GenerationResponse(gen, output, n=req.n, headers=headers)


def _model_card(state: GatewayState) -> ModelCard:
    engine = state.engine
    return ModelCard(
        id=state.model_name,
        created=state.created,
        max_model_len=engine.max_model_len if engine is not None else None,
    )


async def list_models(request: Request) -> Response:
    return JSON(ModelList(data=[_model_card(get_state(request))]))


async def retrieve_model(request: Request) -> Response:
    state = get_state(request)
    model = request.path_params["model"]
    if model != state.model_name:
        raise model_not_found(model)
    return JSON(_model_card(state))


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> Response:
    """200 once the engine is up and, with Redis configured, Redis answers; while Redis is
    down, 503 in closed mode (this gateway refuses every /v1 request) and 200 in open mode
    (it admits with per-process limits), both with `tenant_store: unavailable`."""
    state = get_state(request)
    if state.engine is None:
        if state.load_error is not None:
            failed = ReadyResponse(
                status="failed", model=state.model_name, detail=str(state.load_error)
            )
            return JSON(failed, status_code=503)
        return JSON(ReadyResponse(status="loading", model=state.model_name), status_code=503)
    if not state.settings.redis_url:
        return JSON(ReadyResponse(status="ready", model=state.model_name))
    if await state.tenants.check():
        return JSON(ReadyResponse(status="ready", model=state.model_name, tenant_store="ok"))
    if state.tenants.failure_mode is FailureMode.OPEN:
        detail = "Redis is unreachable: admitting with per-process limits (open mode)."
        body = ReadyResponse(
            status="ready", model=state.model_name, tenant_store="unavailable", detail=detail
        )
        return JSON(body)
    detail = "Redis is unreachable: API requests get 503 (closed mode)."
    body = ReadyResponse(
        status="unavailable", model=state.model_name, tenant_store="unavailable", detail=detail
    )
    return JSON(body, status_code=503)


async def usage(request: Request) -> Response:
    """The caller's own usage: today, this month, the last hour by minute, and its quota."""
    state = get_state(request)
    return JSON(await state.tenants.get_usage(get_principal(request.scope).tenant))


async def metrics(request: Request) -> Response:
    return Response(get_state(request).metrics.render(), media_type=CONTENT_TYPE)


async def openapi(request: Request) -> Response:
    return JSONResponse(build_openapi())


def routes() -> list[BaseRoute]:
    return [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", retrieve_model, methods=["GET"]),
        Route("/v1/usage", usage, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"], include_in_schema=False),
    ]
