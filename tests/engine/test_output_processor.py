"""Output processor, token by token as the engine drives it: text deltas, stop strings held back
and cut, stop tokens, EOS, min_tokens, length, special tokens. A small byte-level BPE trained
here (no model, no torch) splits multibyte characters across tokens, like real vocabularies."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engine.output_processor import OutputProcessor
from engine.outputs import Delta, TokenLogprob
from engine.request import Request, SeqStatus, Sequence
from engine.sampling_params import SamplingParams

CORPUS = ["hello world, the stop is near here", "naïve café 日本語 🙂 ok"]


@dataclass
class Tok:
    """The attribute `OutputProcessor` reads from a transformers tokenizer."""

    backend_tokenizer: Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    t.train_from_iterator(CORPUS * 10, trainer)
    return t


@pytest.fixture(scope="module")
def eos(tok: Tokenizer) -> int:
    token = tok.token_to_id("<eos>")
    assert token is not None
    return token


@dataclass
class Run:
    deltas: list[Delta]
    seq: Sequence
    sent_after_each: list[str]  # the text the client holds after each delta

    @property
    def streamed(self) -> str:
        return "".join(d.text for d in self.deltas)

    @property
    def last(self) -> Delta:
        return self.deltas[-1]


def run(
    tok: Tokenizer,
    ids: list[int],
    params: SamplingParams,
    eos: int | None = None,
    grammar_done_at: int | None = None,
) -> Run:
    """Feed `ids` one per step, as `LLMEngine.step` does, until the processor stops them
    (a grammar, when given, allows nothing after the token at index `grammar_done_at`)."""
    op = OutputProcessor(Tok(tok), [] if eos is None else [eos])
    request = Request("r", [1, 2], params, params.max_tokens or len(ids))
    seq = request.seqs[0]
    deltas: list[Delta] = []
    sent: list[str] = []
    for i, token in enumerate(ids):
        seq.token_ids.append(token)
        stop = op.check_stop(seq, token, grammar_done=i == grammar_done_at)
        if stop is not None:  # what Scheduler.finish records
            seq.status = SeqStatus.FINISHED
            seq.finish_reason, seq.stop_reason = stop
        delta = op.take_delta(seq, with_logprobs=False)
        if delta is not None:
            deltas.append(delta)
            sent.append("".join(d.text for d in deltas))
        if seq.finished:
            break
    return Run(deltas, seq, sent)


def test_deltas_add_up_and_never_split_a_character(tok: Tokenizer) -> None:
    text = "naïve café 日本語 🙂 ok"
    ids = tok.encode(text).ids
    assert len(ids) < len(text.encode())  # some tokens hold several bytes, some part of one
    r = run(tok, ids, SamplingParams(max_tokens=len(ids)))
    assert r.streamed == r.seq.text == text
    assert all("\ufffd" not in d.text for d in r.deltas)
    assert [t for d in r.deltas for t in d.token_ids] == ids
    assert (r.last.finish_reason, r.last.stop_reason) == ("length", None)


def test_length_stops_at_max_tokens_exactly(tok: Tokenizer) -> None:
    ids = tok.encode("hello world, the stop is near").ids
    r = run(tok, ids, SamplingParams(max_tokens=3))
    assert r.seq.output_token_ids == ids[:3] and r.last.finish_reason == "length"
    assert r.streamed == tok.decode(ids[:3])


@pytest.mark.parametrize("stop", ["stop is", "o w", "near", "d, t"])
def test_stop_string_is_held_back_then_cut(tok: Tokenizer, stop: str) -> None:
    text = "hello world, the stop is near here"
    ids = tok.encode(text).ids
    r = run(tok, ids, SamplingParams(max_tokens=len(ids), stop=[stop]))
    expected = text[: text.index(stop)]
    assert (r.last.finish_reason, r.last.stop_reason) == ("stop", stop)
    assert r.streamed == r.seq.text == expected
    for sent in r.sent_after_each:
        assert expected.startswith(sent)  # nothing sent is ever taken back


def test_hold_back_is_exactly_one_less_than_the_longest_stop(tok: Tokenizer) -> None:
    text = "hello world, the stop is near here"
    ids = tok.encode(text).ids
    op = OutputProcessor(Tok(tok), [])
    params = SamplingParams(max_tokens=len(ids), stop=["zzzz", "qq"])  # never matched
    seq = Request("r", [1], params, len(ids)).seqs[0]
    for i, token in enumerate(ids):
        seq.token_ids.append(token)
        assert op.check_stop(seq, token) is None or i == len(ids) - 1
        op.take_delta(seq, False)
        assert seq.num_text_sent == max(0, len(seq.text) - 3)
    seq.status = SeqStatus.FINISHED
    final = op.take_delta(seq, False)
    assert final is not None and final.text == seq.text[-3:]  # the rest once finished


def test_the_earliest_stop_wins_not_the_first_listed(tok: Tokenizer) -> None:
    text = "hello world, the stop is near here"
    r = run(tok, tok.encode(text).ids, SamplingParams(max_tokens=40, stop=["near", "world"]))
    assert r.last.stop_reason == "world" and r.streamed == "hello "
    # Both complete with the token " stop": the one that starts first cuts the text.
    r = run(tok, tok.encode(text).ids, SamplingParams(max_tokens=40, stop=["e s", "the stop"]))
    assert r.last.stop_reason == "the stop" and r.streamed == "hello world, "


def test_stop_token_ends_without_its_text(tok: Tokenizer) -> None:
    ids = tok.encode("hello world, the stop").ids
    r = run(tok, ids, SamplingParams(max_tokens=40, stop_token_ids=[ids[2]]))
    assert (r.last.finish_reason, r.last.stop_reason) == ("stop", ids[2])
    assert r.seq.output_token_ids == ids[:3]  # the stop token is kept in the ids
    assert r.streamed == tok.decode(ids[:2])  # but not in the text


def test_eos_stops_unless_ignored(tok: Tokenizer, eos: int) -> None:
    ids = [*tok.encode("hello").ids, eos, *tok.encode(" world").ids]
    r = run(tok, ids, SamplingParams(max_tokens=40), eos=eos)
    assert (r.last.finish_reason, r.last.stop_reason) == ("stop", eos)
    assert r.streamed == "hello"
    r = run(tok, ids, SamplingParams(max_tokens=len(ids), ignore_eos=True), eos=eos)
    assert r.last.finish_reason == "length" and r.streamed == "hello world"


def test_min_tokens_defers_eos_and_stop_tokens(tok: Tokenizer, eos: int) -> None:
    word = tok.encode("hello").ids
    assert len(word) == 1
    ids = [eos, word[0], eos, word[0], eos]
    # The first two outputs cannot stop; the third can.
    r = run(tok, ids, SamplingParams(max_tokens=9, min_tokens=2), eos=eos)
    assert r.seq.output_token_ids == ids[:3] and r.last.finish_reason == "stop"
    r = run(tok, ids, SamplingParams(max_tokens=9, min_tokens=2, stop_token_ids=[word[0]]))
    assert r.seq.output_token_ids == ids[:4] and r.last.stop_reason == word[0]
    r = run(tok, ids, SamplingParams(max_tokens=9, min_tokens=3), eos=eos)
    assert r.seq.output_token_ids == ids[:5]


def test_special_tokens_are_skipped_unless_asked(tok: Tokenizer, eos: int) -> None:
    ids = [*tok.encode("ok").ids, eos, *tok.encode(" ok").ids]
    assert run(tok, ids, SamplingParams(max_tokens=len(ids))).streamed == "ok ok"
    kept = run(tok, ids, SamplingParams(max_tokens=len(ids), skip_special_tokens=False))
    assert kept.streamed == "ok<eos> ok"


def test_delta_carries_new_tokens_and_their_logprobs_once(tok: Tokenizer) -> None:
    ids = tok.encode("hello world").ids
    op = OutputProcessor(Tok(tok), [])
    seq = Request("r", [1], SamplingParams(max_tokens=9, logprobs=0), 9).seqs[0]
    seq.logprobs = []
    got: list[tuple[list[int], list[TokenLogprob] | None]] = []
    for token in ids:
        seq.token_ids.append(token)
        seq.logprobs.append(TokenLogprob(token, -0.5))
        op.check_stop(seq, token)
        delta = op.take_delta(seq, with_logprobs=True)
        assert delta is not None
        got.append((delta.token_ids, delta.logprobs))
    assert [t for t, _ in got] == [[t] for t in ids]
    assert [[lp.token_id for lp in lps or []] for _, lps in got] == [[t] for t in ids]
    assert op.take_delta(seq, with_logprobs=True) is None  # nothing new, not finished


def test_length_past_256_tokens(tok: Tokenizer) -> None:
    """Counts compared by value (small ints are shared objects in CPython, 300 is not)."""
    ids = tok.encode("ok " * 400).ids
    assert len(ids) > 300
    r = run(tok, ids, SamplingParams(max_tokens=300))
    assert len(r.seq.output_token_ids) == 300 and r.last.finish_reason == "length"


def test_nothing_new_past_256_characters_is_no_delta(tok: Tokenizer) -> None:
    """A sequence asked again with nothing new (a preempted one recomputing its prompt) sends
    no empty delta, however much text it already sent (lengths compared by value)."""
    r = run(tok, tok.encode("ok " * 200).ids, SamplingParams(max_tokens=400))
    seq = r.seq
    seq.status = SeqStatus.RUNNING  # not finished: more tokens may come
    assert seq.num_text_sent > 300
    assert OutputProcessor.take_delta(seq, with_logprobs=False) is None


def test_stop_at_the_very_start_of_the_output(tok: Tokenizer) -> None:
    r = run(tok, tok.encode("hello world").ids, SamplingParams(max_tokens=9, stop=["hel"]))
    assert (r.last.stop_reason, r.streamed) == ("hel", "")


@pytest.mark.parametrize(
    ("stops", "reason", "text"),
    [
        (["the stop", "e s"], "the stop", "hello world, "),  # earlier start, listed first
        (["e s", "the stop"], "the stop", "hello world, "),  # earlier start, listed last
        (["the st", "the stop"], "the st", "hello world, "),  # same start: the first listed
    ],
)
def test_stops_completed_by_the_same_token(
    tok: Tokenizer, stops: list[str], reason: str, text: str
) -> None:
    ids = tok.encode("hello world, the stop is near here").ids
    r = run(tok, ids, SamplingParams(max_tokens=40, stop=stops))
    assert (r.last.stop_reason, r.streamed) == (reason, text)


def test_min_tokens_one_defers_a_first_eos(tok: Tokenizer, eos: int) -> None:
    word = tok.encode("hello").ids
    r = run(tok, [eos, *word, eos], SamplingParams(max_tokens=9, min_tokens=1), eos=eos)
    assert r.seq.output_token_ids == [eos, *word, eos] and r.streamed == "hello"


def test_abort_before_the_first_token_with_logprobs(tok: Tokenizer) -> None:
    op = OutputProcessor(Tok(tok), [])
    seq = Request("r", [1], SamplingParams(max_tokens=9, logprobs=2), 9).seqs[0]
    seq.status, seq.finish_reason = SeqStatus.FINISHED, "abort"
    delta = op.take_delta(seq, with_logprobs=True)
    assert delta is not None and (delta.token_ids, delta.logprobs) == ([], None)
    assert delta.finish_reason == "abort"
    plain = Request("p", [1], SamplingParams(max_tokens=9), 9).seqs[0]
    plain.logprobs = [TokenLogprob(5, -1.0)]  # never handed out unless asked for
    plain.token_ids.append(5)
    delta = op.take_delta(plain, with_logprobs=False)
    assert delta is not None and delta.logprobs is None


def cut_mid_character(tok: Tokenizer) -> list[int]:
    """The longest token prefix of a text the vocabulary splits across characters whose decode
    ends in an incomplete character (shown as U+FFFD), as a model's output can end. Its last
    token completes one character and starts the next ("¥æ"), which holds both back."""
    ids = tok.encode("naïve café 語日本 ok").ids
    cuts = [n for n in range(1, len(ids)) if tok.decode(ids[:n]).endswith("\ufffd")]
    assert cuts, "the vocabulary splits no character across tokens"
    return ids[: cuts[-1]]


def test_length_on_an_incomplete_character_flushes_it(tok: Tokenizer) -> None:
    """The final text is the tokenizer's decode of the output tokens, whatever they end on:
    the held-back bytes come out (as U+FFFD) with the finishing delta, not dropped."""
    ids = cut_mid_character(tok)
    r = run(tok, ids, SamplingParams(max_tokens=len(ids)))
    assert r.last.finish_reason == "length"
    assert r.streamed == r.seq.text == tok.decode(ids)
    assert r.last.text.endswith("\ufffd")  # only the last delta carries the broken character
    assert all("\ufffd" not in d.text for d in r.deltas[:-1])


@pytest.mark.parametrize("how", ["eos", "stop_token", "grammar"])
def test_other_token_stops_flush_too(tok: Tokenizer, eos: int, how: str) -> None:
    ids = cut_mid_character(tok)
    params = SamplingParams(max_tokens=99)
    if how == "eos":
        r = run(tok, [*ids, eos], params, eos=eos)
    elif how == "stop_token":  # a token with text: the stop token's text is not flushed
        (ok,) = tok.encode(" ok").ids
        r = run(tok, [*ids, ok], SamplingParams(max_tokens=99, stop_token_ids=[ok]))
    else:
        r = run(tok, [*ids, *ids], params, grammar_done_at=len(ids) - 1)
    assert r.last.finish_reason == "stop"
    assert r.streamed == tok.decode(ids)


def test_a_stop_string_cut_does_not_flush(tok: Tokenizer) -> None:
    """Text after a matched stop string is never sent, held-back bytes included."""
    ids = cut_mid_character(tok)
    r = run(tok, ids, SamplingParams(max_tokens=99, stop=["caf"]))
    assert (r.last.stop_reason, r.streamed) == ("caf", "naïve ")
