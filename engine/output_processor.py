"""Per-token output handling: incremental detokenization, stop checks, streaming deltas.

Text is decoded with the tokenizer's incremental `DecodeStream`, which returns nothing until a
token completes a UTF-8 character, so deltas never split a multibyte character. When a sequence
ends on such an incomplete character (length, a stop token, a finished grammar), the held-back
tokens are decoded as they stand, so the final text equals the tokenizer's decode of the output
tokens, replacement characters included. While a stop string could still be forming, its possible
prefix is held back from the client; once it matches, the text is cut before it and never sent.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tokenizers.decoders import DecodeStream

from engine.outputs import Delta, TokenLogprob
from engine.request import Sequence


class TextStream:
    """`DecodeStream` plus a count of the tokens it holds back, so a finished sequence can
    flush them. The tokens fed are always the first `fed` of the sequence's outputs: a token is
    fed unless it stops the sequence, and nothing is fed after that."""

    CONTEXT = 4  # tokens decoded before the held-back ones, for decoders that read neighbours

    def __init__(self, skip_special_tokens: bool) -> None:
        self.skip_special_tokens = skip_special_tokens
        self.stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self.fed = 0  # output tokens decoded
        self.done = 0  # how many of them have produced their text

    def step(self, backend: Any, token_id: int) -> str:
        self.fed += 1
        piece: str | None = self.stream.step(backend, token_id)
        if piece:
            self.done = self.fed
            return piece
        return ""

    def flush(self, backend: Any, outputs: list[int]) -> str:
        """The text of the held-back tokens, incomplete characters decoded as U+FFFD."""
        if self.done == self.fed:
            return ""
        skip = self.skip_special_tokens
        context = outputs[max(0, self.done - self.CONTEXT) : self.done]
        base: str = backend.decode(context, skip_special_tokens=skip)
        text: str = backend.decode(
            context + outputs[self.done : self.fed], skip_special_tokens=skip
        )
        self.done = self.fed
        return text[len(base) :]


class OutputProcessor:
    """Appends sampled tokens' text to sequences and decides when they stop."""

    def __init__(self, tokenizer: Any, eos_token_ids: Iterable[int]) -> None:
        self.backend = getattr(tokenizer, "_tokenizer", None) or tokenizer.backend_tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)

    def check_stop(
        self, seq: Sequence, token_id: int, grammar_done: bool = False
    ) -> tuple[str, int | str | None] | None:
        """Account for `token_id` (already appended to `seq`); return (reason, stop) if done.

        `grammar_done`: the request's grammar allows nothing after this token."""
        stop = self._check_stop(seq, token_id)
        if stop is None and grammar_done:
            stop = ("stop", token_id)
        if stop is not None and not isinstance(stop[1], str):  # not cut at a stop string
            self._flush(seq)
        return stop

    def _check_stop(self, seq: Sequence, token_id: int) -> tuple[str, int | str | None] | None:
        request = seq.request
        params = request.params
        if seq.num_output_tokens > params.min_tokens or params.min_tokens == 0:
            if token_id in params.stop_token_ids:
                return "stop", token_id
            if not params.ignore_eos and token_id in self.eos_token_ids:
                return "stop", token_id
        self._detokenize(seq, token_id)
        if params.stop:
            hit = self._find_stop(seq, params.stop)
            if hit is not None:
                return "stop", hit
        if seq.num_output_tokens >= request.max_tokens:
            return "length", None
        return None

    @staticmethod
    def _stream(seq: Sequence) -> TextStream:
        stream = seq.detok_state
        if stream is None:
            stream = TextStream(seq.request.params.skip_special_tokens)
            seq.detok_state = stream
        assert isinstance(stream, TextStream)
        return stream

    def _detokenize(self, seq: Sequence, token_id: int) -> None:
        seq.text += self._stream(seq).step(self.backend, token_id)

    def _flush(self, seq: Sequence) -> None:
        seq.text += self._stream(seq).flush(self.backend, seq.output_token_ids)

    @staticmethod
    def _find_stop(seq: Sequence, stops: list[str]) -> str | None:
        longest = max(len(s) for s in stops)
        start = max(0, seq.num_text_sent - longest)
        best: tuple[int, str] | None = None
        for stop in stops:
            idx = seq.text.find(stop, start)
            if idx >= 0 and (best is None or idx < best[0]):
                best = (idx, stop)
        if best is None:
            return None
        seq.text = seq.text[: best[0]]
        return best[1]

    @staticmethod
    def take_delta(seq: Sequence, with_logprobs: bool) -> Delta | None:
        """What `seq` produced since the last delta, or None if nothing is ready to send."""
        end = len(seq.text)
        stops = seq.request.params.stop
        if stops and not seq.finished:
            end = max(seq.num_text_sent, end - (max(len(s) for s in stops) - 1))
        outputs = seq.output_token_ids
        new_tokens = outputs[seq.num_tokens_sent :]
        if end == seq.num_text_sent and not new_tokens and not seq.finished:
            return None
        logprobs: list[TokenLogprob] | None = None
        if with_logprobs and seq.logprobs is not None:
            logprobs = seq.logprobs[seq.num_tokens_sent :]
        delta = Delta(
            seq.index,
            seq.text[seq.num_text_sent : end],
            new_tokens,
            logprobs,
            seq.finish_reason,
            seq.stop_reason,
        )
        seq.num_text_sent = end
        seq.num_tokens_sent = len(outputs)
        return delta
