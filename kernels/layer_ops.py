"""The elementwise chains of a decoder layer: eager PyTorch here (the oracle, any device), or the
fused C++ ops of `kernels.cpu_ops` on CPU (`get_layer_ops` picks).

    rms_norm(x, w, eps, residual)   with `residual`: x += residual in place first; then RMSNorm
                                    as transformers computes it (statistics in float32)
    rope_(qk, cos, sin)             rotary embedding of qk [T, heads, D] in place; cos/sin [T, D]
    silu_mul(gate_up)               SwiGLU: silu(gate) * up for gate_up = [gate | up]
"""

from __future__ import annotations

import sys
from typing import Protocol

import torch
import torch.nn.functional as F


class LayerOps(Protocol):
    def rms_norm(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor: ...

    def rope_(self, qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None: ...

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor: ...


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor:
    if residual is not None:
        x.add_(residual)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rope_(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    half = qk.shape[-1] // 2
    c, s = cos[:, None], sin[:, None]
    qk.copy_(qk * c + torch.cat((-qk[..., half:], qk[..., :half]), dim=-1) * s)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    inter = gate_up.shape[-1] // 2
    return F.silu(gate_up[:, :inter]) * gate_up[:, inter:]


def get_layer_ops(device: torch.device | str, dtype: torch.dtype) -> LayerOps:
    """The fused C++ ops where they serve (CPU, float32 or bfloat16, library built), else these."""
    from kernels import cpu_ops

    if cpu_ops.fused_available(device, dtype):
        return cpu_ops
    return sys.modules[__name__]  # type: ignore[return-value]
