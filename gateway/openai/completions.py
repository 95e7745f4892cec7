"""`/v1/completions`: one prompt (text or token ids) to text completion JSON.

Batched prompts (a list of several prompts) are refused with a 400 naming `prompt`: send one
request per prompt, concurrently; the engine batches them anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.outputs import Delta, TokenLogprob
from gateway.errors import bad_request
from gateway.openai.generation import ChoiceState
from gateway.openai.schemas import Completion, CompletionChoice, CompletionLogprobs, Usage
from gateway.openai.tokens import TokenTexts, chunk_frame, json_opt_str, json_str


def prompt_token_ids(
    tokenizer: Any,
    prompt: str | list[str] | list[int] | list[list[int]],
    prefix: list[int] | None = None,
) -> list[int]:
    """Tokenize the prompt (special tokens such as BOS added as the model expects); after a
    registered prefix's tokens, the prompt continues them (no BOS of its own)."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise bad_request(
                f"Batched prompts are not supported (got {len(prompt)}); send one prompt per "
                "request.",
                param="prompt",
            )
        prompt = prompt[0]  # type: ignore[assignment]
    if isinstance(prompt, str):
        special = prefix is None
        ids: list[int] = tokenizer.encode(prompt, add_special_tokens=special) if prompt else []
    else:
        ids = list(prompt)  # type: ignore[arg-type]
        vocab = len(tokenizer)
        if any(not 0 <= t < vocab for t in ids):
            raise bad_request(f"Prompt token ids must be in [0, {vocab}).", param="prompt")
    if not ids:
        raise bad_request("The prompt must not be empty.", param="prompt")
    return ids if prefix is None else [*prefix, *ids]


@dataclass(slots=True)
class EchoPrompt:
    """`echo`: the prompt's text and token ids, sent before each completion's text."""

    text: str
    token_ids: list[int]


def echo_prompt(
    tokenizer: Any, prompt: str | list[str] | list[int] | list[list[int]], ids: list[int]
) -> EchoPrompt:
    """The prompt as sent when it was text, else its token ids decoded."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        prompt = prompt[0]  # type: ignore[assignment]
    text = prompt if isinstance(prompt, str) else tokenizer.decode(ids, skip_special_tokens=False)
    return EchoPrompt(text, ids)


class CompletionFormat:
    """Text completion JSON; streamed chunks have the same shape with `usage: null`.

    With `echo`, each completion's first chunk (or its whole text) starts with the prompt, and
    with `logprobs` the prompt tokens' logprobs come first (the first token's are null).
    """

    def __init__(
        self,
        *,
        completion_id: str,
        created: int,
        model: str,
        logprobs: int | None,
        token_texts: TokenTexts,
        echo: EchoPrompt | None = None,
    ) -> None:
        self.id = completion_id
        self.created = created
        self.model = model
        self.logprobs = logprobs
        self.texts = token_texts
        self.echo = echo
        self._prompt_logprobs: list[TokenLogprob | None] | None = None
        self._echoed: set[int] = set()  # choices whose prompt went out already
        self._offsets: dict[int, int] = {}  # per choice: characters streamed so far
        # Fast path for the common chunk (text, no logprobs): the fixed JSON around it, once.
        self._head, self._tail = chunk_frame(
            Completion(id=completion_id, created=created, model=model, choices=[])
        )

    def _body(self, choices: list[CompletionChoice], usage: Usage | None = None) -> bytes:
        body = Completion(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )
        return body.model_dump_json().encode()

    def opening_chunks(self) -> list[bytes]:
        return []

    def take_prompt_logprobs(self, logprobs: list[TokenLogprob | None]) -> None:
        self._prompt_logprobs = logprobs

    def delta_chunks(self, delta: Delta) -> list[bytes]:
        if self.echo is not None and delta.index not in self._echoed:
            return [self._delta_body(delta)]
        if not delta.text and delta.finish_reason is None and not delta.logprobs:
            return []
        if self.logprobs is None:  # same bytes as the pydantic path below, 10x cheaper
            choice_json = b'{"index":%d,"text":%s,"logprobs":null,"finish_reason":%s}' % (
                delta.index,
                json_str(delta.text),
                json_opt_str(delta.finish_reason),
            )
            return [self._head + choice_json + self._tail]
        return [self._delta_body(delta)]

    def _delta_body(self, delta: Delta) -> bytes:
        choice = self._choice(delta.index, delta.text, delta.logprobs, delta.finish_reason)
        return self._body([choice])

    def usage_chunk(self, usage: Usage) -> bytes:
        return self._body([], usage)

    def final_body(self, choices: list[ChoiceState], usage: Usage) -> bytes:
        return self._body(
            [self._choice(c.index, c.text, c.logprobs, c.finish_reason) for c in choices],
            usage,
        )

    def _choice(
        self,
        index: int,
        text: str,
        logprobs: list[TokenLogprob] | None,
        finish_reason: str | None,
    ) -> CompletionChoice:
        echo_now = self.echo is not None and index not in self._echoed
        wanted = self.logprobs is not None and (logprobs is not None or echo_now)
        out = CompletionLogprobs() if wanted else None
        if self.echo is not None and echo_now:
            self._echoed.add(index)
            text = self.echo.text + text
            if out is not None:
                self._add_prompt_logprobs(index, out, self.echo.token_ids)
        if out is not None and logprobs is not None:
            self._add_logprobs(index, out, [(lp.token_id, lp) for lp in logprobs])
        return CompletionChoice(index=index, text=text, logprobs=out, finish_reason=finish_reason)

    def _add_prompt_logprobs(self, index: int, out: CompletionLogprobs, ids: list[int]) -> None:
        known = self._prompt_logprobs or []
        pairs = [(t, known[i] if i < len(known) else None) for i, t in enumerate(ids)]
        self._add_logprobs(index, out, pairs)

    def _add_logprobs(
        self, index: int, out: CompletionLogprobs, pairs: list[tuple[int, TokenLogprob | None]]
    ) -> None:
        offset = self._offsets.get(index, 0)
        for token_id, lp in pairs:
            token = self.texts(token_id)
            out.tokens.append(token)
            out.text_offset.append(offset)
            offset += len(token)
            if lp is None:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
            else:
                out.token_logprobs.append(lp.logprob)
                out.top_logprobs.append({self.texts(t): v for t, v in lp.top[: self.logprobs]})
        self._offsets[index] = offset
