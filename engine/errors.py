"""Errors the engine raises for bad requests or overload, before anything is allocated."""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """A request the engine cannot serve; `param` names the offending field (OpenAI's `param`)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class ContextLengthError(InvalidRequestError):
    """Prompt (plus max_tokens) longer than the model's context window."""


class EngineOverloadedError(RuntimeError):
    """The waiting queue is at its bound; the caller should retry later (HTTP 503)."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class EngineDeadError(RuntimeError):
    """The engine loop crashed; no more requests are accepted."""


class PinRefusedError(RuntimeError):
    """A pin the engine refuses: it would take the pool below what running requests need (the
    pin cap), or prefix caching is off (HTTP 409)."""

    def __init__(self, message: str, *, cap: int = 0, requested: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.cap = cap  # the engine's cap on distinct pinned blocks
        self.requested = requested  # pinned blocks the pin would have led to
