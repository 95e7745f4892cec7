"""The OpenAI API's endpoints: thin; the work lives in chat.py, completions.py, sampling.py,
generation.py."""

from __future__ import annotations

import time
import uuid

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

from engine.grammar import GrammarSpec
from gateway.engine_client import EngineClient
from gateway.errors import bad_request, model_not_found
from gateway.hooks import GenerationInfo
from gateway.middleware import log_fields
from gateway.openai.chat import ChatFormat, render_chat_prompt
from gateway.openai.completions import CompletionFormat, echo_prompt, prompt_token_ids
from gateway.openai.generation import start_generation
from gateway.openai.responses import GenerationResponse, OutputFormat, StreamingGenerationResponse
from gateway.openai.sampling import check_request, resolve_max_tokens, sampling_params
from gateway.openai.schemas import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ModelCard,
    ModelList,
)
from gateway.openai.structured import compile_grammar, requested_grammar
from gateway.openai.tools import ToolPlan, plan_tools, tool_grammar
from gateway.routing import JSON, Endpoint, Handler, parse_body
from gateway.state import GatewayState, get_state
from gateway.tenancy.auth import get_principal
from tenants import Prefix


async def chat_completions(request: Request) -> Response:
    started = time.perf_counter()
    state = get_state(request)
    req = await parse_body(request, ChatCompletionRequest)
    engine = _prepare(state, req)
    prefix = await _resolve_prefix(request, state, engine, req)
    tools = plan_tools(req, engine.tokenizer)
    prompt = render_chat_prompt(engine.tokenizer, req.messages, _prefix_messages(prefix), tools)
    top_logprobs = (req.top_logprobs or 0) if req.logprobs else None
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    fmt = ChatFormat(
        completion_id=completion_id,
        created=int(time.time()),
        model=state.model_name,
        n=req.n,
        top_logprobs=top_logprobs,
        token_texts=state.token_texts(),
        tools=tools,
    )
    return await _generate(request, state, engine, req, prompt, top_logprobs, fmt, started, prefix)


async def completions(request: Request) -> Response:
    started = time.perf_counter()
    state = get_state(request)
    req = await parse_body(request, CompletionRequest)
    engine = _prepare(state, req)
    prefix = await _resolve_prefix(request, state, engine, req)
    prompt = prompt_token_ids(engine.tokenizer, req.prompt, prefix.token_ids if prefix else None)
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    fmt = CompletionFormat(
        completion_id=completion_id,
        created=int(time.time()),
        model=state.model_name,
        logprobs=req.logprobs,
        token_texts=state.token_texts(),
        echo=echo_prompt(engine.tokenizer, req.prompt, prompt) if req.echo else None,
    )
    return await _generate(request, state, engine, req, prompt, req.logprobs, fmt, started, prefix)


def _prepare(state: GatewayState, req: ChatCompletionRequest | CompletionRequest) -> EngineClient:
    state.check_model(req.model)
    check_request(req, state.limits)
    return state.require_engine()


async def _resolve_prefix(
    request: Request,
    state: GatewayState,
    engine: EngineClient,
    req: ChatCompletionRequest | CompletionRequest,
) -> Prefix | None:
    """The registered prefix the request names with `prefix` or `prompt_cache_key`, if any."""
    principal = get_principal(request.scope)
    return await state.prefixes.resolve(engine, principal, req.prefix, req.prompt_cache_key)


def _prefix_messages(prefix: Prefix | None) -> list[dict[str, str]]:
    if prefix is None:
        return []
    if prefix.messages is None:
        raise bad_request(
            f"Prefix '{prefix.name}' was registered as text: a chat completion can only use a "
            "prefix registered with messages (use it with /v1/completions).",
            param="prefix",
        )
    return prefix.messages


async def _generate(
    request: Request,
    state: GatewayState,
    engine: EngineClient,
    req: ChatCompletionRequest | CompletionRequest,
    prompt: list[int],
    logprobs: int | None,
    fmt: ChatFormat | CompletionFormat,
    started: float,
    prefix: Prefix | None,
) -> Response:
    principal = get_principal(request.scope)
    cap = principal.max_tokens_per_request
    default_cap = None if cap is None else cap // req.num_seqs
    max_tokens = resolve_max_tokens(req, len(prompt), engine.max_model_len, default_cap)
    echo = isinstance(req, CompletionRequest) and req.echo
    grammar = requested_grammar(req)
    if isinstance(fmt, ChatFormat) and fmt.tools is not None:
        grammar = _forced_call(fmt.tools, grammar)
    spec = None if grammar is None else grammar[0]
    params = sampling_params(req, max_tokens, logprobs, logprobs if echo else None, spec)
    if grammar is not None:
        await compile_grammar(engine, *grammar)
    route = "chat" if isinstance(req, ChatCompletionRequest) else "completions"
    info = GenerationInfo(
        request_id=fmt.id,
        principal=principal,
        route=route,
        prompt_tokens=len(prompt),
        max_completion_tokens=max_tokens * req.num_seqs,
    )
    log = log_fields(request.scope)
    log.update(completion_id=fmt.id, model=req.model, stream=req.stream, n=req.n)
    gen, headers = await start_generation(
        engine,
        hooks=state.prefixes.hooks(state.hooks, prefix),
        metrics=state.metrics,
        info=info,
        prompt_token_ids=prompt,
        params=params,
        started_at=started,
        log=log,
        shared_blocks=state.prefixes.shared_blocks(engine, prompt, prefix),
    )
    output: OutputFormat = fmt
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingGenerationResponse(
            gen, output, include_usage=include_usage, headers=headers
        )
    return GenerationResponse(gen, output, n=req.n, headers=headers)


def _forced_call(
    tools: ToolPlan, grammar: tuple[GrammarSpec, str] | None
) -> tuple[GrammarSpec, str] | None:
    """A forced tool call's grammar ("required", a named function) in place of the request's
    own, which it cannot have too (a 400 naming that field)."""
    forced = tool_grammar(tools)
    if forced is None:
        return grammar
    if grammar is not None:
        raise bad_request(f"A forced tool call cannot also have a {grammar[1]}.", param=grammar[1])
    return forced, "tools"


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


def _generation(
    path: str,
    summary: str,
    op_id: str,
    request: type[BaseModel],
    result: type[BaseModel],
    chunk: type[BaseModel],
    handler: Handler,
) -> Endpoint:
    return Endpoint(
        "POST", path, handler, summary, op_id, "OpenAI", result,
        description=f"A {result.__name__} (or server-sent events when `stream` is true)",
        stream=chunk, security="apiKey", body=request, errors=(401, 404, 429, 503),
    )  # fmt: skip


ENDPOINTS = (
    _generation("/v1/chat/completions", "Create a chat completion", "createChatCompletion",
                ChatCompletionRequest, ChatCompletion, ChatCompletionChunk, chat_completions),
    _generation("/v1/completions", "Create a text completion", "createCompletion",
                CompletionRequest, Completion, Completion, completions),
    Endpoint("GET", "/v1/models", list_models, "List models", "listModels", "OpenAI", ModelList,
             description="Served models", security="apiKey", errors=(401, 503)),
    Endpoint("GET", "/v1/models/{model:path}", retrieve_model, "Describe the model",
             "retrieveModel", "OpenAI", ModelCard, description="The model", security="apiKey",
             errors=(401, 404, 503)),
)  # fmt: skip
