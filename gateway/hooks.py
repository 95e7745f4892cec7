"""Seam around each generation for admission control and usage accounting (tenants phase).

The gateway calls `admit` once the prompt is tokenized and before the engine sees the request,
and `settle` exactly once afterwards, whatever happened (finished, engine error, client gone,
server shutdown). The default hooks do nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from gateway.tenancy.auth import Principal

Outcome = Literal["finished", "error", "disconnected", "rejected"]


@dataclass(frozen=True, slots=True)
class GenerationInfo:
    request_id: str
    principal: Principal
    route: str  # "chat" | "completions"
    prompt_tokens: int
    max_completion_tokens: int  # all n completions together: the most this request may use


@dataclass(frozen=True, slots=True)
class UsageCounts:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


class GenerationHooks:
    """No-op hooks; subclass to enforce quotas."""

    async def admit(self, info: GenerationInfo) -> Mapping[str, str]:
        """Admit or refuse (raise `APIError`, e.g. 429). Returns extra response headers."""
        return {}

    async def settle(self, info: GenerationInfo, usage: UsageCounts, outcome: Outcome) -> None:
        """Charge the real usage (refunding any reservation made by `admit`)."""
        return None
