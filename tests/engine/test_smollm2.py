"""The real bundled model: SmolLM2-135M-Instruct greedy output equals transformers', with and
without prefix-cache hits."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams

pytestmark = pytest.mark.slow

SYSTEM = (
    "You are a concise assistant for a travel company. Answer in one or two sentences, "
    "be factual, and never invent prices."
)
QUESTIONS = [
    "What is the capital of France?",
    "Name three things to pack for a beach holiday.",
    "Is it better to visit Norway in summer or winter?",
    "How do I say thank you in Japanese?",
]


def test_smollm2_greedy_matches_transformers() -> None:
    from transformers import AutoModelForCausalLM

    from engine.models.loader import bundled_model_dir

    llm = LLM(dtype="float32", num_blocks=512)
    prompts = [
        llm.chat_prompt([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}])
        for q in QUESTIONS
    ]
    params = SamplingParams(temperature=0, max_tokens=24)
    first = llm.generate(prompts, params)
    second = llm.generate(prompts, params)  # the shared system prompt now hits the cache
    hf = AutoModelForCausalLM.from_pretrained(bundled_model_dir(), dtype=torch.float32).eval()
    for prompt, a, b in zip(prompts, first, second, strict=True):
        with torch.inference_mode():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)
        expected = ref[0, len(prompt) :].tolist()
        assert a.outputs[0].token_ids == expected
        assert b.outputs[0].token_ids == expected
        assert b.num_cached_tokens >= 32
    assert "Paris" in first[0].outputs[0].text
