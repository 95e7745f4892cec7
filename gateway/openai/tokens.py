"""Token text for `logprobs`, and cheap JSON for the per-token streamed chunks."""

from __future__ import annotations

from json.encoder import encode_basestring
from typing import Any

from pydantic import BaseModel


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


def json_str(text: str) -> bytes:
    """A JSON string literal, UTF-8 (as pydantic writes it): what `json.dumps(text,
    ensure_ascii=False)` returns, without building a `JSONEncoder` per streamed token."""
    return encode_basestring(text).encode()


def json_opt_str(text: str | None) -> bytes:
    return b"null" if text is None else json_str(text)


def chunk_frame(empty: BaseModel) -> tuple[bytes, bytes]:
    """Split a chunk serialized with `choices=[]` into the bytes before and after one choice.

    `head + choice_json + tail` is then the chunk with that single choice.
    """
    raw = empty.model_dump_json().encode()
    marker = b'"choices":[]'
    at = raw.index(marker) + len(marker) - 1
    return raw[:at], raw[at:]
