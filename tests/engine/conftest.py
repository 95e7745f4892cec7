"""Fixtures: tiny random models saved as Hugging Face dirs, with their transformers twin."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.helpers import make_tiny_model_dir


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_model_dir(root / arch, arch) for arch in ("llama", "llama3", "qwen2")}


def hf_model(path: str, dtype: torch.dtype = torch.float32) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.generation_config.eos_token_id = None  # compare fixed-length outputs
    model.generation_config.pad_token_id = 0
    return model.eval()


def hf_greedy(model: Any, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy `generate` for one prompt (no padding)."""
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt) :].tolist()
