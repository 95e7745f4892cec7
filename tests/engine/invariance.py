"""The batch-invariance property (docs/determinism.md), shared by the tests of every backend: a
request's tokens and logprobs are bit-identical alone, in chunks, inside a batch of others and
after a request that cached its prefix."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from engine import LLM, SamplingParams

Tokens = list[int]


@dataclass(frozen=True)
class Case:
    prompt: Tokens
    max_tokens: int
    seed: int | None  # None: greedy
    others: list[tuple[Tokens, int]]  # the batch around it: (prompt, max_tokens)
    budgets: tuple[int, int, int]  # step token budgets of the three runs (chunked prefill)
    cut: int  # the cached prefix: prompt[:cut] runs first, with another tail


@st.composite
def cases(draw: st.DrawFn, max_prompt: int = 24, max_others: int = 4) -> Case:
    """Cases with prompts of up to `max_prompt` tokens among up to `max_others` other requests."""
    prompts = st.lists(st.integers(5, 3000), min_size=1, max_size=max_prompt)
    prompt = draw(prompts)
    others = draw(st.lists(st.tuples(prompts, st.integers(1, 6)), min_size=1, max_size=max_others))
    return Case(
        prompt,
        draw(st.integers(1, 6)),
        draw(st.none() | st.integers(0, 2**20)),
        others,
        draw(st.tuples(*[st.integers(2, 32)] * 3)),
        draw(st.integers(1, len(prompt))),
    )


def run(llm: LLM, batch: list[tuple[Tokens, SamplingParams]], budget: int, ns: str) -> list[Any]:
    """Every request of `batch` to completion in one engine, `budget` tokens per step; each
    result as (token ids, logprobs, cached prompt tokens)."""
    llm.engine.scheduler.config.max_num_batched_tokens = budget
    outs = llm.generate([p for p, _ in batch], [s for _, s in batch], namespaces=[ns] * len(batch))
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs, o.num_cached_tokens) for o in outs]


def result(out: tuple[Tokens, Any, int]) -> tuple[Tokens, Any]:
    return out[0], out[1]


def assert_invariant(llm: LLM, case: Case) -> None:
    """The case's prompt gives the same tokens and logprobs in one step alone, in chunks, in a
    batch of others, and after its first `cut` tokens were cached."""
    mine = SamplingParams(
        temperature=0.0 if case.seed is None else 0.8, seed=case.seed, max_tokens=case.max_tokens,
        ignore_eos=True, logprobs=2,
    )  # fmt: skip
    others = [
        (p, SamplingParams(temperature=0.7, max_tokens=m, ignore_eos=True)) for p, m in case.others
    ]
    target = (case.prompt, mine)
    small, mixed, cached = case.budgets
    alone = result(run(llm, [target], 4096, uuid.uuid4().hex)[0])  # the prompt in one step
    assert result(run(llm, [target], small, uuid.uuid4().hex)[0]) == alone  # in chunks
    batched = run(llm, [*others[:1], target, *others[1:]], mixed, uuid.uuid4().hex)
    assert result(batched[1]) == alone
    ns = uuid.uuid4().hex  # a namespace whose cache holds the prompt's first `cut` tokens
    run(llm, [([*case.prompt[: case.cut], 7, 7, 7, 7], mine), *others], cached, ns)
    hit = run(llm, [target, *others], cached, ns)[0]
    assert result(hit) == alone
    if case.cut >= 4 and len(case.prompt) > 4:  # a whole block of 4 tokens was cached
        assert hit[2] >= 4
