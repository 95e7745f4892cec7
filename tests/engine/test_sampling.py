"""Sampling: seeds, top-k=1 == greedy, stop strings trimmed, stop tokens, logprobs, penalties,
clean incremental text."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from tests.engine.conftest import hf_model


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


@pytest.fixture(scope="module")
def free_run(llm: LLM) -> tuple[list[int], int, int]:
    """Unpenalized greedy output of PROMPT, with the first i such that output i repeats an
    earlier output j (a sharp random model loops sooner or later)."""
    plain = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    out = llm.generate([PROMPT], plain)[0].outputs[0].token_ids
    i = next(i for i, t in enumerate(out) if t in out[:i])
    return out, i, out.index(out[i])


def replay_penalized(llm: LLM, tiny_dirs, prompt: list[int], params: SamplingParams) -> list[int]:
    """Generate with penalties, then replay each step on transformers' logits with the formula
    (repetition over prompt and outputs, frequency and presence over outputs only)."""
    got = llm.generate([prompt], params)[0].outputs[0].token_ids
    hf = hf_model(tiny_dirs["llama"])
    ids = list(prompt)
    for token in got:
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, -1].double()
        seen = torch.tensor(sorted(set(ids)))
        rep = params.repetition_penalty
        logits[seen] = torch.where(logits[seen] > 0, logits[seen] / rep, logits[seen] * rep)
        outputs = torch.tensor(ids[len(prompt) :], dtype=torch.long)
        counts = torch.bincount(outputs, minlength=len(logits)).double()
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
        assert int(logits.argmax()) == token
        ids.append(token)
    return got


def penalized(max_tokens: int, **knobs: float) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **knobs)


def test_repetition_penalty_on_the_model_logits(llm: LLM, tiny_dirs, free_run) -> None:
    out, i, _ = free_run
    # Prompt up to the repeat: unpenalized, output 0 would repeat a prompt token.
    got = replay_penalized(llm, tiny_dirs, PROMPT + out[:i], penalized(4, repetition_penalty=2))
    assert got[0] != out[i]


def test_frequency_and_presence_penalties_on_the_model_logits(llm, tiny_dirs, free_run) -> None:
    out, i, j = free_run
    # Prompt up to the first occurrence: unpenalized, output i - j would repeat output 0.
    for knobs in (dict(frequency_penalty=2.0), dict(presence_penalty=2.0)):
        got = replay_penalized(llm, tiny_dirs, PROMPT + out[:j], penalized(i - j + 2, **knobs))
        assert got[: i - j] == out[j:i] and got[i - j] != out[i]


def test_frequency_and_presence_penalties_ignore_the_prompt(llm, tiny_dirs, free_run) -> None:
    out, i, _ = free_run
    # Prompt up to the repeat: the repeated token is a prompt token, so it is not penalized.
    params = penalized(3, frequency_penalty=2.0, presence_penalty=2.0)
    got = replay_penalized(llm, tiny_dirs, PROMPT + out[:i], params)
    assert got[0] == out[i]


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
