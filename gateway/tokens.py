"""Token ids to the strings OpenAI shows in `logprobs` (cached: a vocabulary is small)."""

from __future__ import annotations

from typing import Any


class TokenTexts:
    """`tokenizer.decode([id])` per token id, memoized."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            self._cache[token_id] = text
        return text

    def utf8(self, token_id: int) -> list[int]:
        return list(self(token_id).encode("utf-8"))
