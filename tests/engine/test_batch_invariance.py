"""Output is batch-invariant (docs/determinism.md), in bfloat16, float32 and float16: a request's
tokens and logprobs are bit-identical whether it runs alone or inside a batch of others, however
its prompt is split into prefill chunks, and whether its prefix came from the prefix cache.
Greedy and seeded."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from engine import LLM
from kernels import cpu_attention
from kernels.options import configure, options
from tests.engine.invariance import Case, assert_invariant, cases

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


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_output_does_not_depend_on_batch_chunks_or_cache(llm: LLM, case: Case) -> None:
    assert_invariant(llm, case)
