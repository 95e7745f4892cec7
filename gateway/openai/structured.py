"""Structured outputs: from a request's `response_format` (chat) or `guided_*` fields (vLLM's
names, both endpoints) to the engine's `GrammarSpec`, compiled before the request is added.

| request | grammar |
|---|---|
| `response_format: {"type": "json_object"}` | any JSON object |
| `response_format: {"type": "json_schema", "json_schema": {"name", "schema"}}` | the schema |
| `guided_json` (a schema, as an object or a JSON string) | the schema |
| `guided_regex` | the regex |
| `guided_choice` (a list of strings) | exactly one of them |
"""

from __future__ import annotations

import json

from engine.errors import InvalidRequestError
from engine.grammar import GrammarSpec
from gateway.engine_client import EngineClient
from gateway.errors import bad_request
from gateway.limits import MAX_GRAMMAR_CHARS
from gateway.openai.schemas import ChatCompletionRequest, _SamplingRequest


def requested_grammar(req: _SamplingRequest) -> tuple[GrammarSpec, str] | None:
    """The grammar the request asks for and the field that asked, or None.

    Raises:
        APIError: 400 naming the field: two of them at once, a schema that is not JSON or is
            too long.
    """
    found: list[tuple[GrammarSpec, str]] = []
    if isinstance(req, ChatCompletionRequest) and req.response_format is not None:
        fmt = req.response_format
        if fmt.type == "json_object":
            found.append((GrammarSpec("json_object"), "response_format"))
        elif fmt.type == "json_schema":
            if fmt.json_schema is None:
                raise bad_request(
                    "response_format of type 'json_schema' needs a 'json_schema' object.",
                    param="response_format.json_schema",
                )
            schema = fmt.json_schema.json_schema
            found.append((_schema_spec(schema, "response_format"), "response_format"))
    if req.guided_json is not None:
        found.append((_schema_spec(req.guided_json, "guided_json"), "guided_json"))
    if req.guided_regex is not None:
        found.append((GrammarSpec("regex", req.guided_regex), "guided_regex"))
    if req.guided_choice is not None:
        found.append((GrammarSpec.choice(req.guided_choice), "guided_choice"))
    if len(found) > 1:
        raise bad_request(
            f"At most one of response_format, guided_json, guided_regex and guided_choice may "
            f"constrain the output; got {found[0][1]} and {found[1][1]}.",
            param=found[1][1],
        )
    return found[0] if found else None


def _schema_spec(schema: dict[str, object] | str | bool, param: str) -> GrammarSpec:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise bad_request(f"The JSON schema is not valid JSON: {exc}.", param=param) from exc
        if not isinstance(schema, (dict, bool)):
            raise bad_request("A JSON schema must be an object or a boolean.", param=param)
    spec = GrammarSpec.json_schema(schema)  # type: ignore[arg-type]
    if len(spec.text) > MAX_GRAMMAR_CHARS:
        raise bad_request(
            f"The JSON schema is too long: at most {MAX_GRAMMAR_CHARS} characters as JSON.",
            param=param,
        )
    return spec


async def compile_grammar(engine: EngineClient, spec: GrammarSpec, param: str) -> None:
    """Compile (or find in the cache) before the request is added, so a grammar the library
    refuses is a 400 with its reason, before any stream starts."""
    try:
        await engine.compile_grammar(spec)
    except InvalidRequestError as exc:
        raise bad_request(exc.message, param=param) from exc
