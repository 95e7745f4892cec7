"""Sampling: seeds, top-k=1 == greedy, stop strings trimmed, stop tokens, logprobs, penalties,
clean incremental text."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_dirs) -> LLM:
    return LLM(tiny_dirs["llama"], dtype="float32", num_blocks=256)


PROMPT = [5, 17, 230, 4000, 12, 99, 1024]


def test_seeded_sampling_is_reproducible(llm: LLM) -> None:
    p = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=11, max_tokens=16)
    a = llm.generate([PROMPT], p)[0].outputs[0].token_ids
    # Batched with other requests, the seeded request still draws the same tokens.
    others = [[7, 8, 9], [300, 301]]
    b = llm.generate([*others, PROMPT], [SamplingParams(max_tokens=5)] * 2 + [p])[2]
    assert a == b.outputs[0].token_ids
    c = llm.generate([PROMPT], SamplingParams(temperature=1.0, seed=12, max_tokens=16))
    assert c[0].outputs[0].token_ids != a


def test_top_k_one_equals_greedy(llm: LLM) -> None:
    greedy = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    top1 = llm.generate(
        [PROMPT], SamplingParams(temperature=1.3, top_k=1, max_tokens=12, ignore_eos=True)
    )
    assert greedy[0].outputs[0].token_ids == top1[0].outputs[0].token_ids


def test_stop_string_is_trimmed(llm: LLM) -> None:
    base = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    text = base.outputs[0].text
    assert len(text) > 6
    stop = text[3:6]
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=20, stop=[stop]))[0]
    c = out.outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert c.text == text[: text.index(stop)]
    assert stop not in c.text


def test_stop_token_ids_and_length(llm: LLM) -> None:
    base = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    ids = base.outputs[0].token_ids
    assert base.outputs[0].finish_reason == "length" and len(ids) == 8
    out = llm.generate(
        [PROMPT], SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[ids[3]])
    )
    c = out[0].outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == ids[3]
    assert c.token_ids == ids[: ids.index(ids[3]) + 1]


def test_logprobs_top_k(llm: LLM) -> None:
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=4, logprobs=3))[0]
    c = out.outputs[0]
    assert c.logprobs is not None and len(c.logprobs) == len(c.token_ids)
    for tok, lp in zip(c.token_ids, c.logprobs, strict=True):
        assert lp.token_id == tok and len(lp.top) == 3
        assert lp.top[0][0] == tok  # greedy picks the most likely token
        assert lp.logprob == pytest.approx(lp.top[0][1])
        assert lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]


def test_penalties_change_greedy_output(llm: LLM) -> None:
    plain = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    base = llm.generate([PROMPT], plain)[0].outputs[0].token_ids
    rep = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, frequency_penalty=2.0)
    penalized = llm.generate([PROMPT], rep)[0].outputs[0].token_ids
    assert len(set(penalized)) >= len(set(base))


def test_multibyte_text_streams_cleanly(llm: LLM) -> None:
    """Deltas never split a UTF-8 character and add up to the full text."""
    tok = llm.tokenizer
    text = "naïve café — 日本語 🙂 ok"
    ids = tok.encode(text, add_special_tokens=False)
    engine = llm.engine
    from engine.request import Request

    req = Request("mb", [1, 2], SamplingParams(max_tokens=len(ids)), len(ids))
    seq = req.seqs[0]
    pieces = []
    for t in ids:
        seq.token_ids.append(t)
        engine.output_processor.check_stop(seq, t)
        d = engine.output_processor.take_delta(seq, False)
        if d is not None:
            assert "\ufffd" not in d.text
            pieces.append(d.text)
    assert "".join(pieces) == text


def test_greedy_argmax_first_maximum_on_cpu() -> None:
    """The sampler's C++ argmax (when built) picks what `max(dim=-1).indices` picks, ties too."""
    from engine.sampler import Sampler
    from kernels import cpu_ops

    sampler = Sampler(vocab_size=1000, eos_token_ids=[0])
    assert sampler._cpu_argmax == cpu_ops.fused_available("cpu", torch.float32)
    logits = torch.randint(-3, 4, (16, 1024)).float()[:, :1000]
    assert torch.equal(sampler._argmax(logits), logits.max(dim=-1).indices)
