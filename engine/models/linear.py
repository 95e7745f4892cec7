"""Matmuls against weights pre-packed for oneDNN on CPUs with native bfloat16.

`F.linear` on CPU re-lays out the weight for oneDNN's kernels on every call. Packing each weight
once at load (`torch.ops.mkldnn._reorder_linear_weight`) makes the memory-bound small-batch
GEMMs of decoding 20-35% faster (bench: 120 SmolLM2 layer weights, batch 1-64), with the same
results for batches up to the packing hint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PACK_BATCH_HINT = 64  # oneDNN picks its blocking for this many rows


def can_pack(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """The weight [out, in] packed for `linear`, or None where packing does not apply."""
    if not can_pack(weight):
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_BATCH_HINT)
    except RuntimeError:  # oneDNN without bf16 support on this CPU
        return None


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    packed: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [T, in] @ weight.T (+ bias) -> [T, out], through the packed weight when there is one."""
    if packed is not None:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return F.linear(x, weight, bias)
