"""The wire protocol between a gateway and an engine replica (`prefixgate engine`).

HTTP/1.1 with JSON bodies. A gateway opens one channel per replica: a POST whose chunked
request body stays open and carries the gateway's commands, one JSON line each, and whose
chunked response carries the deltas of all the requests added there, one JSON line each
(NDJSON), every line of an engine step in one write. Adding a request is one line written on a
connection already open (no HTTP request of its own: the replica parses no head and starts no
task for it), and an abort written after it can never overtake it. Per streamed token the
replica wakes no task and makes no write of its own, and the gateway reads one socket.
docs/deployment.md says why this transport (measured against the embedded engine).

```
POST /engine/channels              request body, NDJSON, written as the gateway goes:
                                     {"op": "add", "request_id", "prompt_token_ids", "params",
                                      "kwargs"}
                                     {"op": "abort", "request_id"}   (idempotent)
                                   -> 200, then NDJSON: {"channel": id}, then one line per
                                      RequestDelta of the requests added on this channel,
                                      or {"error": {...}, "request_id"} ending one of them
                                      (an add refused: invalid, too long, replica draining).
                                      Closing the connection aborts all of its requests;
                                      a line past MAX_LINE_BYTES ends the channel (an error
                                      line without request_id, then the answer's end).
POST /engine/prefixes/warm         {"token_ids", "kwargs"} -> PrefixState
POST /engine/prefixes/unpin        {"key"} -> {"ok": bool}
POST /engine/prefixes/extend       {"key", "expires_at"} -> {"ok": bool}
GET  /engine/stats                 -> EngineStats
GET  /engine/info                  -> ReplicaInfo
GET  /engine/tokenizer             -> {"files": {name: text}} (the gateway tokenizes itself)
GET  /health, /ready
```

The keyword arguments of `add_request` and `warm_prefix` travel generically as `kwargs`: the
client encodes whatever it was given (dataclasses included, with pydantic's JSON encoder) and
the replica rebuilds each one from the type hints of `AsyncEngine`'s own signature, so a new
argument of the in-process engine (a tenant share, a shared-block count) needs no protocol
change. Engine errors cross as `{"error": {"type", "message", ...fields}}` and are raised again
as the same class on the client.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import TypeAdapter
from pydantic_core import to_json, to_jsonable_python

from engine.errors import (
    ContextLengthError,
    EngineDeadError,
    EngineOverloadedError,
    InvalidRequestError,
    PinRefusedError,
)
from engine.fairness import TenantStats
from engine.outputs import PrefixState, RequestDelta
from engine.sampling_params import SamplingParams

CHANNEL = "/engine/channels"
WARM = "/engine/prefixes/warm"
UNPIN = "/engine/prefixes/unpin"
EXTEND = "/engine/prefixes/extend"
STATS = "/engine/stats"
INFO = "/engine/info"
TOKENIZER = "/engine/tokenizer"
# A channel line longer than this ends the channel (an error line, then the end of the answer,
# which aborts its requests) instead of being buffered on: an add carries at most the context
# length in token ids (~7 bytes each), so 16 MiB holds a 2M-token prompt.
MAX_LINE_BYTES = 16 * 1024 * 1024

DELTA = TypeAdapter(RequestDelta)
PARAMS = TypeAdapter(SamplingParams)
PREFIX_STATE = TypeAdapter(PrefixState)


@dataclass(frozen=True, slots=True)
class ReplicaInfo:
    """What a replica serves: a gateway checks it and validates requests with it."""

    replica_id: str
    model_name: str
    max_model_len: int
    vocab_size: int
    block_size: int


@dataclass(slots=True)
class ReplicaStats:
    """`EngineStats` as it crosses the wire (the gateway's `EngineStats` protocol)."""

    num_running: int
    num_waiting: int
    num_blocks: int
    num_free_blocks: int
    kv_usage: float
    prefix_queries_tokens: int
    prefix_hits_tokens: int
    num_preemptions: int
    num_pinned_blocks: int = 0
    max_pinned_blocks: int = 0
    pinned_blocks_by_tenant: dict[str, int] = field(default_factory=dict)
    tenants: dict[str, TenantStats] = field(default_factory=dict)
    draining: bool = False  # shutting down: gateways send it no new request (gateway/drain.py)


INFO_ADAPTER = TypeAdapter(ReplicaInfo)
STATS_ADAPTER = TypeAdapter(ReplicaStats)


def encode(value: Any) -> bytes:
    """JSON bytes of plain data, dataclasses included."""
    return to_json(value)


def jsonable(value: Any) -> Any:
    return to_jsonable_python(value)


# ---- keyword arguments, rebuilt from the engine's own signature ---------------------------


class KwargsCodec:
    """Rebuilds the keyword arguments of one engine method from JSON by its type hints.

    Args:
        method: the in-process engine's method (e.g. `AsyncEngine.add_request`); its keyword
            parameters are the ones accepted.
        skip: parameters carried outside `kwargs`.
    """

    def __init__(self, method: Callable[..., Any], skip: tuple[str, ...]) -> None:
        hints = typing.get_type_hints(method)
        names = [
            name
            for name, p in inspect.signature(method).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in skip
        ]
        self.adapters = {name: TypeAdapter(hints[name]) for name in names}

    def decode(self, raw: dict[str, Any]) -> dict[str, Any]:
        """Raises InvalidRequestError for an unknown or ill-typed argument."""
        out: dict[str, Any] = {}
        for name, value in raw.items():
            adapter = self.adapters.get(name)
            if adapter is None:
                raise InvalidRequestError(f"unknown engine argument {name!r}", param=name)
            try:
                out[name] = adapter.validate_python(value)
            except ValueError as exc:
                raise InvalidRequestError(f"invalid engine argument {name!r}: {exc}", name) from exc
        return out


# ---- errors ---------------------------------------------------------------------------------

# Subclasses first: the first class an exception is an instance of names it.
_ERRORS: tuple[type[Exception], ...] = (
    ContextLengthError,
    InvalidRequestError,
    EngineOverloadedError,
    PinRefusedError,
    EngineDeadError,
)
_BY_NAME = {cls.__name__: cls for cls in _ERRORS}
_STATUS = {
    "ContextLengthError": 400,
    "InvalidRequestError": 400,
    "EngineOverloadedError": 503,
    "PinRefusedError": 409,
    "EngineDeadError": 503,
}


def is_engine_error(exc: BaseException) -> bool:
    return isinstance(exc, _ERRORS)


def error_body(exc: BaseException) -> dict[str, Any]:
    """`{"error": {...}}` for an engine error (anything else crosses as EngineDeadError)."""
    name = next((cls.__name__ for cls in _ERRORS if isinstance(exc, cls)), "EngineDeadError")
    fields: dict[str, Any] = {"type": name, "message": getattr(exc, "message", str(exc))}
    for attr in ("param", "retry_after_s", "cap", "requested"):
        if hasattr(exc, attr):
            fields[attr] = getattr(exc, attr)
    return {"error": fields}


def error_status(body: dict[str, Any]) -> int:
    return _STATUS.get(body["error"]["type"], 503)


def decode_error(body: Any) -> Exception:
    """The engine error an error body describes (EngineDeadError for anything unreadable)."""
    try:
        fields = dict(body["error"])
        cls = _BY_NAME[fields.pop("type")]
        message = str(fields.pop("message"))
    except (KeyError, TypeError, ValueError):
        return EngineDeadError(f"unreadable answer from the engine replica: {body!r:.200}")
    if issubclass(cls, InvalidRequestError):
        return cls(message, param=fields.get("param"))
    if cls is EngineOverloadedError:
        return EngineOverloadedError(message, retry_after_s=float(fields.get("retry_after_s", 1)))
    if cls is PinRefusedError:
        return PinRefusedError(
            message, cap=int(fields.get("cap", 0)), requested=int(fields.get("requested", 0))
        )
    return cls(message)
