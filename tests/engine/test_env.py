"""The engine's environment variables: read once by `EngineEnv`, handed down as config."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from engine import LLM
from engine.config import EngineConfig
from engine.env import EngineEnv
from engine.models import loader
from kernels import layer_ops
from kernels import options as kernel_options
from kernels.options import KernelOptions


def test_engine_env(monkeypatch: pytest.MonkeyPatch) -> None:
    assert EngineEnv().apply(EngineConfig()) == EngineConfig()
    monkeypatch.setenv("PREFIXGATE_CACHE_DIR", "/srv/prefixgate")
    assert EngineEnv().apply(EngineConfig(seed=3)) == EngineConfig(
        seed=3, cache_dir="/srv/prefixgate"
    )
    monkeypatch.setenv("PREFIXGATE_CACHE_DIR", "")  # empty means unset
    assert EngineEnv().cache_dir is None
    monkeypatch.setenv("PREFIXGATE_CPU_ATTENTION", "Torch")
    monkeypatch.setenv("PREFIXGATE_CPU_FUSED", "0")
    config = EngineEnv().apply(EngineConfig())
    assert (config.cpu_attention, config.cpu_fused) == (False, False)
    monkeypatch.setenv("PREFIXGATE_CPU_ATTENTION", "")
    monkeypatch.setenv("PREFIXGATE_CPU_FUSED", "1")
    config = EngineEnv().apply(EngineConfig())
    assert (config.cpu_attention, config.cpu_fused) == (True, True)


@pytest.mark.parametrize(
    ("name", "value"), [("PREFIXGATE_CPU_ATTENTION", "cuda"), ("PREFIXGATE_CPU_FUSED", "maybe")]
)
def test_invalid_engine_env_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name.removeprefix("PREFIXGATE_").lower()):
        EngineEnv()


def test_offline_llm_hands_the_kernel_switches_down(
    tiny_dirs: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """PREFIXGATE_CPU_ATTENTION=torch and PREFIXGATE_CPU_FUSED=0 reach the kernels through the
    engine's config: the model runs the eager ops and the reference attention."""
    monkeypatch.setattr(kernel_options, "_options", KernelOptions())  # restored after the test
    monkeypatch.setenv("PREFIXGATE_CPU_ATTENTION", "torch")
    monkeypatch.setenv("PREFIXGATE_CPU_FUSED", "0")
    llm = LLM(tiny_dirs["llama"], dtype="float32", device="cpu", num_blocks=8)
    assert kernel_options.options() == KernelOptions(cpu_attention=False, cpu_fused=False)
    model = llm.engine.loaded.model
    assert model.ops is layer_ops and model._stack is None
    assert not llm.engine.runner.sampler._cpu_argmax


def test_offline_llm_converts_into_the_cache_dir_of_the_environment(
    tiny_dirs: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`LLM(...)` without the gateway still honours PREFIXGATE_CACHE_DIR; a config given
    explicitly is used as it is."""
    targets: list[Path] = []

    def fake_convert(gguf: Path, target: Path) -> None:  # transformers' part, tested elsewhere
        targets.append(target)
        shutil.copytree(tiny_dirs["llama"], target)

    monkeypatch.setattr(loader, "_convert_gguf", fake_convert)
    monkeypatch.setenv("PREFIXGATE_CACHE_DIR", str(tmp_path / "env-cache"))
    gguf = tmp_path / "Tiny.gguf"
    gguf.write_bytes(b"GGUF")
    llm = LLM(str(gguf), num_blocks=8)
    assert llm.engine.config.cache_dir == str(tmp_path / "env-cache")
    assert targets[0].parent == tmp_path / "env-cache" / "models"
    config = EngineConfig(model=str(gguf), cache_dir=str(tmp_path / "own"))
    assert LLM(config=config).engine.config.cache_dir == str(tmp_path / "own")
    assert targets[1].parent == tmp_path / "own" / "models"
