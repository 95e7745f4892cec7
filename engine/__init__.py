"""prefixgate engine: paged KV cache with prefix caching, continuous batching, exact sampling.

`from engine import LLM, SamplingParams`. Heavy modules (torch) load lazily, so the pure-Python
bookkeeping (`engine.block_manager`, `engine.scheduler`) imports without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from engine.errors import (
    ContextLengthError,
    EngineDeadError,
    EngineOverloadedError,
    InvalidRequestError,
)
from engine.grammar import GrammarSpec
from engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from engine.async_engine import AsyncEngine, RequestStream
    from engine.llm import LLM
    from engine.llm_engine import EngineStats, LLMEngine

_LAZY = {
    "LLM": "engine.llm",
    "LLMEngine": "engine.llm_engine",
    "EngineStats": "engine.llm_engine",
    "AsyncEngine": "engine.async_engine",
    "RequestStream": "engine.async_engine",
}

__all__ = [
    "LLM",
    "AsyncEngine",
    "ContextLengthError",
    "EngineDeadError",
    "EngineOverloadedError",
    "EngineStats",
    "GrammarSpec",
    "InvalidRequestError",
    "LLMEngine",
    "RequestStream",
    "SamplingParams",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
