"""Decodes that share a prompt's blocks are attended as groups (`kernels.metadata.prefix_groups`,
the prefill kernel's grouped items), and a request's tokens and logprobs are the same bits as with
grouping switched off: through prefix-cache hits, preemption by recompute and n > 1 forks."""

from __future__ import annotations

import random
from typing import Any

import pytest

from engine import LLM, SamplingParams
from kernels import cpu_attention, cpu_ops
from tests.helpers import make_tiny_model_dir

# head_dim 16 (the tiny llama: bfloat16 dot products, decodes with their keys in the lanes) and 64
# with SmolLM2's 3 query heads per KV head (AMX tiles where the CPU has them)
SHAPES = {"d16": {}, "d64": dict(hidden_size=192, num_attention_heads=3, num_key_value_heads=1)}


@pytest.fixture(scope="module", params=sorted(SHAPES))
def llm(request: Any, tmp_path_factory: pytest.TempPathFactory) -> LLM:
    path = make_tiny_model_dir(tmp_path_factory.mktemp(request.param), **SHAPES[request.param])
    llm = LLM(
        path,
        dtype="bfloat16",
        block_size=16,
        num_blocks=20,  # 9 shared blocks, ~3 of its own per request and fork: preempts
        max_num_seqs=8,
        max_num_batched_tokens=96,
    )
    kv = llm.engine.runner.kv_caches[0]
    if not (cpu_ops.linear_bf16_available() and cpu_attention.one_kernel_for_all_rows(kv)):
        pytest.skip("decodes take the prefill kernel only where it is batch-invariant")
    return llm


def run(llm: LLM, prompts: list[list[int]], shared: bool, monkeypatch: Any) -> list[Any]:
    monkeypatch.setattr(cpu_attention, "SHARED_PREFIX", shared)
    monkeypatch.setattr(cpu_attention, "GROUP_ALWAYS", shared)  # small groups too, on any CPU
    params = [
        SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0.9, seed=7, max_tokens=40, ignore_eos=True, n=2, logprobs=1),
    ]
    outs = llm.generate(prompts, [params[i % 2] for i in range(len(prompts))])
    return [[(c.token_ids, c.logprobs) for c in o.outputs] for o in outs]


def test_grouped_and_ungrouped_outputs_are_identical(
    llm: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(0)
    system = [rng.randrange(3, 49000) for _ in range(140)]  # 2 whole blocks of 64 keys, and more
    prompts = [system + [rng.randrange(3, 49000) for _ in range(rng.randint(1, 20))]
               for _ in range(8)]  # fmt: skip
    plans: list[Any] = []  # each step's groups, as the plan hands them to the kernels
    stacked: list[bool] = []  # whether each layer_stack call got groups
    real_plan, real_stack = cpu_attention._make_plan, cpu_ops.layer_stack

    def plan_spy(*args: Any) -> Any:
        plan = real_plan(*args)
        plans.append(plan.groups)
        return plan

    def stack_spy(*args: Any, **kwargs: Any) -> Any:
        stacked.append(args[7].groups is not None)
        return real_stack(*args, **kwargs)

    monkeypatch.setattr(cpu_attention, "_make_plan", plan_spy)
    monkeypatch.setattr(cpu_ops, "layer_stack", stack_spy)
    scheduler, bm = llm.engine.scheduler, llm.engine.block_manager
    preempted, hits = scheduler.num_preemptions, bm.stats().prefix_hits_tokens
    grouped = run(llm, prompts, True, monkeypatch)
    used = [g for g in plans if g is not None]
    assert used, "no step grouped its decodes"
    assert max(len(set(g.group_of.tolist()) - {-1}) for g in used) >= 1
    assert max(int((g.group_of >= 0).sum()) for g in used) >= 4  # forks and other prompts
    assert llm.engine.runner.model._stack is None or any(stacked)  # the one-call stack too
    plans.clear()
    ungrouped = run(llm, prompts, False, monkeypatch)
    assert all(g is None for g in plans)
    assert grouped == ungrouped
    assert scheduler.num_preemptions > preempted
    assert bm.stats().prefix_hits_tokens > hits
    assert bm.num_free_blocks == bm.num_blocks
