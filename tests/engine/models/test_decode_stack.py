"""The one-call C++ decoder stack (`cpu_ops.decode_stack`) equals the Python layers bit for bit."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from engine import LLM, SamplingParams
from kernels import cpu_ops


@pytest.fixture(scope="module", params=["llama", "qwen2"])  # qwen2: q/k/v biases
def llm(request: Any, tiny_dirs: dict[str, str]) -> LLM:
    llm = LLM(tiny_dirs[request.param], dtype="bfloat16", num_blocks=256)
    if llm.engine.runner.model._stack is None:
        pytest.skip("no decode stack here: it needs AVX512-BF16 panels and the C++ kernels")
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


def test_stack_equals_python_layers(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    stack = llm.engine.runner.model._stack
    calls = []
    real = cpu_ops.decode_stack
    monkeypatch.setattr(cpu_ops, "decode_stack", lambda *a, **k: calls.append(1) or real(*a, **k))
    prompts = [[5 + i, 17, 230, 400 + i] * (1 + 3 * i) for i in range(5)]
    for batch in (prompts[:1], prompts):
        python = generate(llm, batch, None)
        assert not calls
        fused = generate(llm, batch, stack)
        assert calls  # the decode steps took the stack
        assert fused == python
        calls.clear()


def test_stack_refuses_a_bad_slot(llm: LLM) -> None:
    model = llm.engine.runner.model
    stack = model._stack
    cache = llm.engine.runner.kv_caches
    c = model.config
    x = torch.zeros(1, c.hidden_size, dtype=torch.bfloat16)
    rope = torch.zeros(1, c.head_dim, dtype=torch.bfloat16)
    bad_slot = torch.tensor([cache[0].shape[1] * cache[0].shape[2]])  # one past the last slot
    with pytest.raises(RuntimeError, match="out of range"):
        cpu_ops.decode_stack(
            x, stack.weights, stack.qkv_biases, cache, rope, rope, bad_slot,
            torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32),
            (c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size), 1e-5, 1.0,
        )  # fmt: skip
