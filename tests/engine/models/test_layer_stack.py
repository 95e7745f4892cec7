"""The one-call C++ decoder stack (`cpu_ops.layer_stack`) equals the Python layers bit for bit,
in decode, prefill, chunked-prefill and mixed steps.

The two runs of a batch are not made up alike (the second finds the first's prompts in the prefix
cache), so this also needs each token's output to be independent of its step's make-up: it failed
on AMX CPUs while `linear_bf16` ran batches of 1-3 rows on AVX-512 and larger ones on tiles.
Now one kernel family serves every batch (see docs/determinism.md)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from engine import LLM, SamplingParams
from kernels import cpu_attention, cpu_ops


@pytest.fixture(scope="module", params=["llama", "qwen2"])  # qwen2: q/k/v biases
def llm(request: Any, tiny_dirs: dict[str, str]) -> LLM:
    # a 24-token step budget: long prompts prefill in chunks beside other sequences' decodes
    llm = LLM(tiny_dirs[request.param], dtype="bfloat16", num_blocks=256, max_num_batched_tokens=24)
    if llm.engine.runner.model._stack is None:
        pytest.skip("no layer stack here: it needs AVX512-BF16 panels and the C++ kernels")
    return llm


def generate(llm: LLM, prompts: list[list[int]], stack: Any) -> list[Any]:
    model = llm.engine.runner.model
    saved, model._stack = model._stack, stack
    try:
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)
        outs = [o.outputs[0] for o in llm.generate(prompts, params)]
    finally:
        model._stack = saved
    return [(o.token_ids, o.logprobs) for o in outs]


def step_kind(attention: cpu_attention.StackAttention) -> str:
    """decode (every sequence one new token), prefill (none) or mixed, whichever kernel attends
    them (bfloat16 decodes go to the prefill kernel too: `one_kernel_for_all_rows`)."""
    q_lens = attention.query_start_loc.diff().tolist()
    if all(n == 1 for n in q_lens):
        return "decode"
    return "prefill" if all(n > 1 for n in q_lens) else "mixed"


def test_stack_equals_python_layers(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    stack = llm.engine.runner.model._stack
    kinds: list[str] = []
    real = cpu_ops.layer_stack

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        kinds.append(step_kind(args[7]))
        return real(*args, **kwargs)

    monkeypatch.setattr(cpu_ops, "layer_stack", spy)
    prompts = [[5 + i, 17, 230, 400 + i] * (1 + 3 * i) for i in range(5)]  # 4 to 52 tokens
    for batch in (prompts[:1], prompts):
        python = generate(llm, batch, None)
        assert not kinds
        fused = generate(llm, batch, stack)
        assert fused == python
        assert {"decode", "prefill"} <= set(kinds)
        if len(batch) > 1:
            assert "mixed" in kinds  # chunks of long prompts beside decodes
        kinds.clear()
    # prefix-cache hits: the second time each prompt's full blocks come from the cache, so its
    # prefill attends over cached context it did not compute in this step
    again = [[*p, 7, 8, 9] for p in prompts]
    assert generate(llm, again, stack) == generate(llm, again, None)


def test_stack_refuses_a_bad_slot(llm: LLM) -> None:
    model = llm.engine.runner.model
    stack = model._stack
    cache = llm.engine.runner.kv_caches
    c = model.config
    x = torch.zeros(1, c.hidden_size, dtype=torch.bfloat16)
    rope = torch.zeros(1, c.head_dim, dtype=torch.bfloat16)
    bad_slot = torch.tensor([cache[0].shape[1] * cache[0].shape[2]])  # one past the last slot
    attention = cpu_attention.StackAttention(
        None, torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32), None,
        torch.zeros(1, 1, dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32),
        torch.ones(1, dtype=torch.int32),
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="out of range"):
        cpu_ops.layer_stack(
            x, stack.weights, stack.qkv_biases, cache, rope, rope, bad_slot, attention,
            (c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size), 1e-5, 1.0,
        )  # fmt: skip
