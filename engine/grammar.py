"""What a constrained request's output must match: plain data, no torch (`engine.structured`
compiles it)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

GrammarKind = Literal["json_schema", "json_object", "regex", "choice"]


@dataclass(frozen=True, slots=True)
class GrammarSpec:
    """What the output must match. `text`: the schema as JSON, the regex, or the choices as a
    JSON list of strings; empty for `json_object`."""

    kind: GrammarKind
    text: str = ""
    key: str = field(init=False, compare=False)  # SHA-256 of kind and text: the cache key

    def __post_init__(self) -> None:
        digest = hashlib.sha256(f"{self.kind}\0{self.text}".encode()).hexdigest()
        object.__setattr__(self, "key", digest)

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | bool) -> GrammarSpec:
        """A schema as compact JSON, its keys in the order given: the output's properties come
        in the schema's order (as OpenAI writes them), so a reordered schema is another one."""
        return cls("json_schema", json.dumps(schema, separators=(",", ":")))

    @classmethod
    def choice(cls, choices: Sequence[str]) -> GrammarSpec:
        return cls("choice", json.dumps(list(choices)))
