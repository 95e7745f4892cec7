"""Attention backends behind one API, picked by name and device.

    backend = get_attention_backend("auto", device)
    backend.write_kv(key, value, kv_cache, slot_mapping)
    out = backend.paged_attention(query, kv_cache, meta, scale)

Every backend is a module-like object with those two functions; the table maps a name to a
zero-argument factory so that optional backends (Triton) import their dependencies only when used.
"torch" is the pure PyTorch reference (the oracle); "cpu" runs decodes through a C++ kernel that is
compiled on first use and falls back to the reference when it can't be.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.util import find_spec
from typing import Protocol

import torch

from kernels.metadata import AttentionMetadata

__all__ = ["AttentionBackend", "AttentionMetadata", "get_attention_backend"]


class AttentionBackend(Protocol):
    """What the model needs from an attention implementation (see `kernels.reference`)."""

    def write_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None: ...

    def paged_attention(
        self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor: ...


def _torch_backend() -> AttentionBackend:
    from kernels import reference

    return reference


def _cpu_backend() -> AttentionBackend:
    """The C++ decode kernel on CPU (reference for prefills, and wherever it can't be built)."""
    from kernels import cpu_attention

    cpu_attention.kernel_available()  # build now (cached after the first time), not mid-request
    return cpu_attention


def _triton_backend() -> AttentionBackend:
    """Triton kernels (CUDA; CPU only under TRITON_INTERPRET=1, for tests)."""
    try:
        from kernels import triton_attention
    except ImportError as exc:
        raise RuntimeError(
            "attention backend 'triton' needs the triton package: "
            "pip install 'prefixgate[triton]' (or use --attention-backend torch)"
        ) from exc
    return triton_attention


# name -> factory returning the backend; "auto" is resolved per device by `_auto_name`.
_BACKENDS: dict[str, Callable[[], AttentionBackend]] = {
    "cpu": _cpu_backend,
    "torch": _torch_backend,
    "triton": _triton_backend,
}


def _auto_name(device: torch.device) -> str:
    """The fastest registered backend for a device: Triton on CUDA when present, the C++ kernel
    on CPU, else the torch reference."""
    if device.type == "cuda" and "triton" in _BACKENDS and find_spec("triton") is not None:
        return "triton"
    if device.type == "cpu" and "cpu" in _BACKENDS:
        return "cpu"
    return "torch"


def get_attention_backend(
    name: str = "auto", device: torch.device | str = "cpu"
) -> AttentionBackend:
    """Return the attention backend `name` ("auto", "cpu", "torch", "triton") for `device`.

    Raises:
        ValueError: for a name that is not in the table.
    """
    if name == "auto":
        name = _auto_name(torch.device(device))
    factory = _BACKENDS.get(name)
    if factory is None:
        known = ", ".join(["auto", *sorted(_BACKENDS)])
        raise ValueError(f"unknown attention backend {name!r} (known: {known})")
    return factory()
