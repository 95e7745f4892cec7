"""Output is batch-invariant (docs/determinism.md), in bfloat16, float32 and float16: a request's
tokens and logprobs are bit-identical whether it runs alone or inside a batch of others, however
its prompt is split into prefill chunks, and whether its prefix came from the prefix cache.
Greedy and seeded."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import LLM, SamplingParams
from kernels import cpu_attention
from kernels.options import configure, options

Tokens = list[int]
prompts = st.lists(st.integers(5, 3000), min_size=1, max_size=24)


@dataclass(frozen=True)
class Case:
    prompt: Tokens
    max_tokens: int
    seed: int | None  # None: greedy
    others: list[tuple[Tokens, int]]  # the batch around it: (prompt, max_tokens)
    budgets: tuple[int, int, int]  # step token budgets of the three runs (chunked prefill)
    cut: int  # the cached prefix: prompt[:cut] runs first, with another tail


@st.composite
def cases(draw: st.DrawFn) -> Case:
    prompt = draw(prompts)
    others = draw(st.lists(st.tuples(prompts, st.integers(1, 6)), min_size=1, max_size=4))
    return Case(
        prompt,
        draw(st.integers(1, 6)),
        draw(st.none() | st.integers(0, 2**20)),
        others,
        draw(st.tuples(*[st.integers(2, 32)] * 3)),
        draw(st.integers(1, len(prompt))),
    )


# the layer paths a CPU engine can take: the one-call layer stack (bfloat16, the default), the
# Python layers with the fused ops, the Python layers with eager PyTorch ops; qwen2 has q/k/v
# biases. float32 has no layer stack; float16 has neither it nor the fused row ops (its Python
# layers run eager row ops beside the fixed-order linear and the prefill kernel).
PARAMS = [
    ("llama", "stack", "bfloat16"),
    ("qwen2", "stack", "bfloat16"),
    ("llama", "python", "bfloat16"),
    ("llama", "eager", "bfloat16"),
    ("llama", "python", "float32"),
    ("qwen2", "python", "float32"),
    ("llama", "eager", "float32"),
    ("llama", "python", "float16"),
    ("qwen2", "python", "float16"),
]


@pytest.fixture(scope="module", params=PARAMS, ids=["-".join(p) for p in PARAMS])
def llm(request: Any, tiny_dirs: dict[str, str]) -> LLM:
    arch, path, dtype = request.param
    saved, mp = options(), pytest.MonkeyPatch()
    if path == "eager":
        mp.setenv("PREFIXGATE_CPU_FUSED", "0")
    try:
        llm = LLM(tiny_dirs[arch], dtype=dtype, block_size=4, num_blocks=1024)
    finally:  # the model chose its ops; the process's options go back for the other tests
        mp.undo()
        configure(saved)
    kv = llm.engine.runner.kv_caches[0]
    if not (cpu_attention.load_kernel() is not None and cpu_attention.one_kernel_for_all_rows(kv)):
        pytest.skip("needs the prefill kernel's vector code (docs/determinism.md)")
    model = llm.engine.runner.model
    if path == "stack" and model._stack is None:
        pytest.skip("no layer stack on this machine")
    if path != "stack":
        model._stack = None
    return llm


def run(llm: LLM, batch: list[tuple[Tokens, SamplingParams]], budget: int, ns: str) -> list[Any]:
    """Every request of `batch` to completion in one engine, `budget` tokens per step; each
    result as (token ids, logprobs)."""
    llm.engine.scheduler.config.max_num_batched_tokens = budget
    outs = llm.generate([p for p, _ in batch], [s for _, s in batch], namespaces=[ns] * len(batch))
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs, o.num_cached_tokens) for o in outs]


def result(out: tuple[Tokens, Any, int]) -> tuple[Tokens, Any]:
    return out[0], out[1]


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_output_does_not_depend_on_batch_chunks_or_cache(llm: LLM, case: Case) -> None:
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
