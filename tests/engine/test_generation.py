"""Greedy generation equals transformers token for token: batching, chunked prefill, prefix
cache hits, preemption, n > 1; bfloat16 logprobs close to float32's; bad input refused."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from engine import LLM, ContextLengthError, InvalidRequestError, SamplingParams
from tests.engine.conftest import hf_greedy, hf_model

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def prompts(seed: int, count: int, lo: int = 3, hi: int = 60, prefix: list[int] | None = None):
    rng = random.Random(seed)
    pre = prefix or []
    return [
        pre + [rng.randrange(3, 49000) for _ in range(rng.randint(lo, hi))] for _ in range(count)
    ]


def check_equal(llm: LLM, hf, batch: list[list[int]], params: SamplingParams = GREEDY):
    outs = llm.generate(batch, params)
    for prompt, out in zip(batch, outs, strict=True):
        expected = hf_greedy(hf, prompt, params.max_tokens or 0)
        for completion in out.outputs:
            assert completion.token_ids == expected
    return outs


@pytest.mark.parametrize("arch", ["llama", "llama3", "qwen2"])
@pytest.mark.parametrize(
    "limits",
    [
        dict(max_num_seqs=64, max_num_batched_tokens=4096),
        dict(max_num_seqs=3, max_num_batched_tokens=16),
    ],
    ids=["one-batch", "small-batches-chunked"],
)
def test_greedy_matches_transformers(tiny_dirs, arch: str, limits: dict) -> None:
    llm = LLM(tiny_dirs[arch], dtype="float32", num_blocks=256, block_size=4, **limits)
    check_equal(llm, hf_model(tiny_dirs[arch]), prompts(1, 6))
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_prefix_cache_hits_are_exact(tiny_dirs) -> None:
    llm = LLM(tiny_dirs["llama"], dtype="float32", num_blocks=256, block_size=8)
    hf = hf_model(tiny_dirs["llama"])
    system = prompts(7, 1, 70, 70)[0]
    first = check_equal(llm, hf, prompts(2, 3, prefix=system))
    second = check_equal(llm, hf, prompts(3, 4, prefix=system))
    assert first[0].num_cached_tokens == 0
    assert all(o.num_cached_tokens == 64 for o in second)  # 8 full blocks of the 70-token prefix
    off = LLM(tiny_dirs["llama"], dtype="float32", num_blocks=256, enable_prefix_caching=False)
    assert all(o.num_cached_tokens == 0 for o in off.generate(prompts(3, 2, prefix=system), GREEDY))


def test_preemption_is_exact_and_leak_free(tiny_dirs) -> None:
    llm = LLM(tiny_dirs["qwen2"], dtype="float32", num_blocks=20, block_size=4)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    check_equal(llm, hf_model(tiny_dirs["qwen2"]), prompts(4, 6, 20, 40), params)
    assert llm.engine.scheduler.num_preemptions > 0
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_parallel_sampling_shares_prompt(tiny_dirs) -> None:
    llm = LLM(tiny_dirs["llama3"], dtype="float32", num_blocks=64, block_size=4)
    params = SamplingParams(temperature=0.0, max_tokens=10, n=3, ignore_eos=True)
    outs = check_equal(llm, hf_model(tiny_dirs["llama3"]), prompts(5, 2, 9, 9), params)
    assert [len(o.outputs) for o in outs] == [3, 3]
    sampled = llm.generate(prompts(5, 1, 9, 9), SamplingParams(n=4, seed=3, max_tokens=8))
    again = llm.generate(prompts(5, 1, 9, 9), SamplingParams(n=4, seed=3, max_tokens=8))
    ids = [c.token_ids for c in sampled[0].outputs]
    assert ids == [c.token_ids for c in again[0].outputs]
    assert len({tuple(x) for x in ids}) > 1  # each completion has its own seed


def test_bfloat16_logprobs_close_to_float32(tiny_dirs) -> None:
    """bf16 is not bit-exact: compare the chosen tokens' logprobs with float32 transformers
    on the same tokens, within 0.05 nats (mean) / 0.25 (max)."""
    llm = LLM(tiny_dirs["llama"], dtype="bfloat16", num_blocks=128)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=0)
    batch = prompts(6, 3)
    hf = hf_model(tiny_dirs["llama"])
    diffs = []
    for prompt, out in zip(batch, llm.generate(batch, params), strict=True):
        c = out.outputs[0]
        full = torch.tensor([prompt + c.token_ids])
        with torch.inference_mode():
            ref = torch.log_softmax(hf(full).logits[0].float(), dim=-1)
        for i, lp in enumerate(c.logprobs or []):
            diffs.append(abs(lp.logprob - float(ref[len(prompt) - 1 + i, lp.token_id])))
    assert len(diffs) == 30
    assert sum(diffs) / len(diffs) < 0.05 and max(diffs) < 0.25


@pytest.mark.parametrize(
    ("make", "param"),
    [
        (lambda: ([], SamplingParams()), "prompt"),
        (lambda: ([1] * 5000, SamplingParams()), "prompt"),
        (lambda: ([1, 2], SamplingParams(max_tokens=5000)), "max_tokens"),
        (lambda: ([1, 2], SamplingParams(stop_token_ids=[10**6])), "stop_token_ids"),
        (lambda: ([1, 2], SamplingParams(n=0)), "n"),
        (lambda: ([1, 2], SamplingParams(top_p=0.0)), "top_p"),
        (lambda: ([1, 2], SamplingParams(top_p=1.5)), "top_p"),
        (lambda: ([1, 2], SamplingParams(temperature=-1)), "temperature"),
        (lambda: ([1, -2], SamplingParams()), "prompt"),
        (lambda: ([1, 2], SamplingParams(seed=2**64)), "seed"),
        (lambda: ([1, 2], SamplingParams(top_k=2**40)), "top_k"),
    ],
)
def test_bad_input_refused_before_allocation(tiny_dirs, make, param: str) -> None:
    llm = LLM(tiny_dirs["llama"], dtype="float32", num_blocks=64, max_model_len=2048)
    with pytest.raises(InvalidRequestError) as err:
        prompt, params = make()
        llm.engine.add_request(prompt, params)
    assert err.value.param == param
    assert isinstance(err.value, ValueError)
    assert not llm.engine.has_unfinished
    assert llm.engine.block_manager.num_free_blocks == 64


def test_context_is_capped_by_the_kv_pool(tiny_dirs) -> None:
    llm = LLM(tiny_dirs["llama"], dtype="float32", num_blocks=8, block_size=4, max_model_len=512)
    assert llm.engine.max_model_len == 32  # 8 blocks of 4 slots
    with pytest.raises(ContextLengthError, match="maximum context length is 32"):
        llm.engine.add_request([1] * 20, SamplingParams(max_tokens=20))
    out = llm.generate([[1] * 20], SamplingParams(max_tokens=None, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 12 and out.outputs[0].finish_reason == "length"


def test_chunking_preemption_prefix_hits_and_n_at_once_match_transformers(tiny_dirs) -> None:
    """Every path that can reorder or reuse KV in one run: prompts longer than the step budget
    (chunked prefill), a pool too small for the batch (preemption by recompute), a shared
    system prefix (cache hits, on first admission and on recompute) and n = 2 (forked blocks,
    copy on write). Each completion still equals transformers' greedy output, and each of the
    four demonstrably happened."""
    llm = LLM(
        tiny_dirs["llama"],
        dtype="float32",
        num_blocks=24,  # one request needs up to 17 blocks at its end, three run at once
        block_size=4,
        max_num_seqs=6,
        max_num_batched_tokens=16,
    )
    chunked: list[int] = []  # prompt tokens scheduled while more of the prompt was left
    scheduler = llm.engine.scheduler
    real_schedule = scheduler.schedule

    def schedule() -> Any:
        out = real_schedule()
        for s in out.seqs:
            seq = scheduler.seqs.get(s.seq_id)
            if seq is not None and s.start_pos + len(s.token_ids) < seq.num_prompt_tokens:
                chunked.append(len(s.token_ids))
        return out

    scheduler.schedule = schedule  # type: ignore[method-assign]
    system = prompts(8, 1, 22, 22)[0]
    batch = prompts(9, 6, 6, 14, prefix=system)
    params = SamplingParams(temperature=0.0, max_tokens=16, n=2, ignore_eos=True)
    outs = check_equal(llm, hf_model(tiny_dirs["llama"]), batch, params)
    assert all(len(o.outputs) == 2 for o in outs)
    assert chunked, "no prompt was split across steps"
    assert scheduler.num_preemptions > 0
    assert any(o.num_cached_tokens > 0 for o in outs)
    bm = llm.engine.block_manager
    assert bm.stats().prefix_hits_tokens > sum(o.num_cached_tokens for o in outs)  # recompute
    assert bm.num_free_blocks == bm.num_blocks
