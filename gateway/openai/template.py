"""Chat template rendering in which message contents stay text.

A chat template joins its scaffolding (`<|im_start|>user\\n`, `<|eot_id|>`, the BOS...) and the
messages' contents into one string. Tokenizing that string with special tokens parsed, as
`apply_chat_template(..., tokenize=True)` does, also turns a special token *written inside a
content* into a control token: an end user could close their turn and forge a system or
assistant turn. Here only the template's own special tokens are control tokens:

- No content holds the text of a special token (every benign conversation): the rendered string
  is tokenized as a whole, exactly as before and as transformers does.
- Otherwise each such text in a content is replaced by a marker with a per-render nonce before
  rendering (a template's `trim` and the like act on it as on the text), so the special tokens
  left in the rendered string are all the template's. The string is split at them; each piece
  between them gets its markers turned back into the original text and is tokenized with
  `split_special_tokens=True` (special text as plain text). The tokenizer itself splits at
  special tokens before pre-tokenizing, so for benign contents this gives the same ids as the
  whole-string path (tested on SmolLM2's and a Llama-3 template).

Tool definitions, tool calls and tool results are content too: every string in the messages
and the tools (dictionary keys included: a JSON schema's property names) is masked the same way.

`/v1/completions` does not come here: a raw prompt parses special tokens (its contract).
"""

from __future__ import annotations

import functools
import re
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

_MARK_OPEN, _MARK_CLOSE = "\ue000", "\ue001"  # private-use characters around a marker


@dataclass(frozen=True, slots=True)
class SpecialTokens:
    """The tokenizer's special added tokens: their texts, ids and a pattern that splits at them.

    `split` follows the tokenizer's own matching: leftmost, longest first, and a token with
    `lstrip` / `rstrip` takes the whitespace beside it.
    """

    ids: dict[str, int]  # text -> id
    find: re.Pattern[str]  # any special text inside a content
    split: re.Pattern[str]  # a special token as the tokenizer matches it (with lstrip/rstrip)


@functools.lru_cache(maxsize=16)
def special_tokens(tokenizer: Any) -> SpecialTokens:
    """The special tokens of a transformers tokenizer (`added_tokens_decoder`, special only)."""
    tokens = [t for t in tokenizer.added_tokens_decoder.items() if t[1].special and t[1].content]
    tokens.sort(key=lambda item: len(item[1].content), reverse=True)
    ids = {t.content: i for i, t in tokens}
    find = "|".join(re.escape(t.content) for _, t in tokens)
    split = "|".join(
        (r"\s*" if getattr(t, "lstrip", False) else "")
        + f"({re.escape(t.content)})"
        + (r"\s*" if getattr(t, "rstrip", False) else "")
        for _, t in tokens
    )
    never = r"(?!)"
    return SpecialTokens(ids, re.compile(find or never), re.compile(split or never))


def render_chat(
    tokenizer: Any,
    conversation: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    *,
    tools: list[Any] | None = None,
) -> list[int]:
    """Token ids of the conversation with the assistant generation prompt (module docstring);
    without it for a registered prefix, which a request's messages then continue. `tools` go to
    the template as transformers passes them (`tools=`).

    Raises whatever the template raises (jinja2 errors from `raise_exception`).
    """
    specials = special_tokens(tokenizer)
    if not any(specials.find.search(s) for s in _strings([conversation, tools])):
        text = _apply(tokenizer, conversation, add_generation_prompt, tools)
        ids: list[int] = tokenizer.encode(text, add_special_tokens=False)
        return ids
    return render_keeping_text(tokenizer, conversation, add_generation_prompt, tools=tools)


def _strings(value: Any) -> Iterator[str]:
    """Every string in nested lists and dicts (keys included)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(key)
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


def _map_strings(value: Any, fn: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {_map_strings(k, fn): _map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_map_strings(item, fn) for item in value]
    return value


def render_keeping_text(
    tokenizer: Any,
    conversation: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    *,
    tools: list[Any] | None = None,
) -> list[int]:
    """The masked path of `render_chat` (public so tests can run it on benign contents)."""
    specials = special_tokens(tokenizer)
    texts = list(specials.ids)
    index = {text: k for k, text in enumerate(texts)}
    nonce = secrets.token_hex(8)
    marker = re.compile(f"{_MARK_OPEN}{nonce}(\\d+){_MARK_CLOSE}")

    def mask(match: re.Match[str]) -> str:
        return f"{_MARK_OPEN}{nonce}{index[match.group(0)]}{_MARK_CLOSE}"

    def mask_all(value: Any) -> Any:
        return _map_strings(value, lambda text: specials.find.sub(mask, text))

    rendered = _apply(tokenizer, mask_all(conversation), add_generation_prompt, mask_all(tools))
    ids: list[int] = []
    start = 0
    for match in specials.split.finditer(rendered):
        ids += _text_ids(tokenizer, rendered[start : match.start()], marker, texts)
        content = next(g for g in match.groups() if g is not None)
        ids.append(specials.ids[content])
        start = match.end()
    ids += _text_ids(tokenizer, rendered[start:], marker, texts)
    return ids


def _apply(
    tokenizer: Any,
    conversation: list[dict[str, Any]],
    add_generation_prompt: bool,
    tools: list[Any] | None,
) -> str:
    kwargs = {} if tools is None else {"tools": tools}
    text: str = tokenizer.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
    )
    return text


def _text_ids(
    tokenizer: Any, piece: str, marker: re.Pattern[str], texts: Sequence[str]
) -> list[int]:
    """A piece between the template's special tokens, special texts in it as plain text."""
    if not piece:
        return []
    text = marker.sub(lambda m: texts[int(m.group(1))], piece)
    ids: list[int] = tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
    return ids
