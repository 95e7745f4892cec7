"""`/v1/completions`: one prompt (text or token ids) to text completion JSON.

Batched prompts (a list of several prompts) are refused with a 400 naming `prompt`: send one
request per prompt, concurrently; the engine batches them anyway.
"""

from __future__ import annotations

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


class CompletionFormat:
    """Text completion JSON; streamed chunks have the same shape with `usage: null`."""

    def __init__(
        self,
        *,
        completion_id: str,
        created: int,
        model: str,
        logprobs: int | None,
        token_texts: TokenTexts,
    ) -> None:
        self.id = completion_id
        self.created = created
        self.model = model
        self.logprobs = logprobs
        self.texts = token_texts
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

    def delta_chunks(self, delta: Delta) -> list[bytes]:
        if not delta.text and delta.finish_reason is None and not delta.logprobs:
            return []
        if self.logprobs is None:  # same bytes as the pydantic path below, 10x cheaper
            choice_json = b'{"index":%d,"text":%s,"logprobs":null,"finish_reason":%s}' % (
                delta.index,
                json_str(delta.text),
                json_opt_str(delta.finish_reason),
            )
            return [self._head + choice_json + self._tail]
        choice = CompletionChoice(
            index=delta.index,
            text=delta.text,
            logprobs=self._logprobs(delta.index, delta.logprobs),
            finish_reason=delta.finish_reason,
        )
        return [self._body([choice])]

    def usage_chunk(self, usage: Usage) -> bytes:
        return self._body([], usage)

    def final_body(self, choices: list[ChoiceState], usage: Usage) -> bytes:
        return self._body(
            [
                CompletionChoice(
                    index=c.index,
                    text=c.text,
                    logprobs=self._logprobs(c.index, c.logprobs),
                    finish_reason=c.finish_reason,
                )
                for c in choices
            ],
            usage,
        )

    def _logprobs(
        self, index: int, logprobs: list[TokenLogprob] | None
    ) -> CompletionLogprobs | None:
        if self.logprobs is None or logprobs is None:
            return None
        out = CompletionLogprobs()
        offset = self._offsets.get(index, 0)
        for lp in logprobs:
            token = self.texts(lp.token_id)
            out.tokens.append(token)
            out.token_logprobs.append(lp.logprob)
            out.top_logprobs.append({self.texts(t): v for t, v in lp.top[: self.logprobs]})
            out.text_offset.append(offset)
            offset += len(token)
        self._offsets[index] = offset
        return out
