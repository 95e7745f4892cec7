"""Options of the CPU kernels, one set per process, given by whoever builds the engine.

The C++ library (`kernels/csrc`) is built and loaded once per process, so its options are the
process's too: `configure(KernelOptions(...))` sets them (`LLMEngine` does, from its
`EngineConfig`), `options()` reads them. The kernels read no environment; the variables behind
these fields (`PREFIXGATE_CPU_ATTENTION`, `PREFIXGATE_CPU_FUSED`, `PREFIXGATE_CACHE_DIR`) are
read by `engine.env.EngineEnv`, see docs/configuration.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class KernelOptions:
    """Which CPU kernels run, and where the library is built."""

    cpu_attention: bool = True  # False: `kernels.cpu_attention` runs the PyTorch reference
    cpu_fused: bool = True  # False: eager PyTorch layer ops (`get_layer_ops`), no C++ argmax
    # The library is built under <cache_dir>/torch_extensions (None: ~/.cache/prefixgate); read
    # when it is first loaded, so set it before the first kernel call.
    cache_dir: str | None = None


_options = KernelOptions()


def configure(options: KernelOptions) -> None:
    """Make `options` the process's kernel options."""
    global _options
    _options = options


def options() -> KernelOptions:
    """The process's kernel options (defaults until `configure` is called)."""
    return _options


def cache_root(cache_dir: str | None) -> Path:
    """The root of everything prefixgate caches (converted models, the compiled library):
    `cache_dir`, or ~/.cache/prefixgate when it is None."""
    return Path(cache_dir) if cache_dir else Path.home() / ".cache" / "prefixgate"
