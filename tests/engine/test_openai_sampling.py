"""The OpenAI sampling extras in the engine: logit_bias bans and forces tokens, best_of returns
the candidates with the highest cumulative logprob, prompt logprobs equal transformers' (also
when the prompt is in the prefix cache, and across prefill chunks)."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, InvalidRequestError, SamplingParams
from tests.engine.conftest import hf_model
from tests.engine.test_generation import prompts


@pytest.fixture(scope="module")
def llm(tiny_dirs) -> LLM:
    return LLM(tiny_dirs["llama"], dtype="float32", num_blocks=256, block_size=4)


def test_logit_bias_minus_100_bans_a_token_and_plus_100_forces_one(llm: LLM) -> None:
    prompt = prompts(11, 1)[0]
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    plain = llm.generate([prompt], greedy)[0].outputs[0].token_ids
    banned = plain[0]
    params = SamplingParams(
        temperature=0.0, max_tokens=8, ignore_eos=True, logit_bias={banned: -100.0}
    )
    assert banned not in llm.generate([prompt], params)[0].outputs[0].token_ids
    forced = 4242
    sampled = SamplingParams(temperature=1.0, seed=3, max_tokens=8, logit_bias={forced: 100.0})
    assert llm.generate([prompt], sampled)[0].outputs[0].token_ids == [forced] * 8


def test_logit_bias_is_checked(llm: LLM) -> None:
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(logit_bias={5: 101.0})
    assert err.value.param == "logit_bias"
    with pytest.raises(InvalidRequestError) as err:
        llm.generate([[5, 6, 7]], SamplingParams(logit_bias={10**7: 1.0}))
    assert err.value.param == "logit_bias"


def test_best_of_returns_the_candidates_with_the_highest_cumulative_logprob(llm: LLM) -> None:
    prompt = prompts(12, 1)[0]
    knobs = dict(temperature=1.0, seed=17, max_tokens=6, ignore_eos=True)
    # The same seeds (seed + index) draw the same 5 candidates, all returned with logprobs.
    every = llm.generate([prompt], SamplingParams(n=5, logprobs=0, **knobs))[0].outputs
    totals = [sum(lp.logprob for lp in c.logprobs or []) for c in every]
    ranked = sorted(range(5), key=lambda i: (-totals[i], i))
    best = llm.generate([prompt], SamplingParams(n=2, best_of=5, **knobs))[0]
    assert [c.token_ids for c in best.outputs] == [every[i].token_ids for i in ranked[:2]]
    assert [c.index for c in best.outputs] == [0, 1]
    assert best.outputs[0].logprobs is None  # not asked for
    assert best.completion_tokens == 2 * 6
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_best_of_below_n_is_refused() -> None:
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(n=3, best_of=2)
    assert err.value.param == "best_of"


def _hf_prompt_logprobs(hf, prompt: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        logits = hf(torch.tensor([prompt])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return logprobs[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]


@pytest.mark.parametrize("chunk", [4096, 7], ids=["one-chunk", "chunked"])
def test_prompt_logprobs_equal_transformers_also_from_a_cached_prefix(tiny_dirs, chunk) -> None:
    llm = LLM(
        tiny_dirs["llama"], dtype="float32", num_blocks=256, block_size=4,
        max_num_batched_tokens=chunk,
    )  # fmt: skip
    hf = hf_model(tiny_dirs["llama"])
    prompt = prompts(13, 1, 30, 30)[0]
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=3)
    llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=2))  # caches the prompt
    out = llm.generate([prompt], params)[0]
    assert out.prompt_logprobs is not None and out.prompt_logprobs[0] is None
    got = torch.tensor([lp.logprob for lp in out.prompt_logprobs[1:] if lp is not None])
    torch.testing.assert_close(got, _hf_prompt_logprobs(hf, prompt), atol=1e-4, rtol=1e-4)
    second = out.prompt_logprobs[1]
    assert second is not None and second.token_id == prompt[1] and len(second.top) == 3
