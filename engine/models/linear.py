"""Matmuls against weights pre-packed for oneDNN on CPU (bfloat16 and float32).

`F.linear` on CPU re-lays out a bf16 weight for oneDNN's kernels on every call, and sends float32
to MKL, whose small-batch SGEMMs are slow on AMD CPUs. Packing each weight once at load
(`torch.ops.mkldnn._reorder_linear_weight`) makes the memory-bound small-batch GEMMs of decoding
faster: bf16 20-35% (Intel with AMX: 120 SmolLM2 layer weights, batch 1-64), float32 1.3-2.8x at
batch 1-64 on an AVX2-only AMD EPYC (the 49152 x 576 LM head at batch 16: 41 -> 14.5 ms), equal
at prefill sizes. bf16 results are identical to `F.linear` for batches up to the packing hint;
float32 ones differ by summation order only (~1e-7 relative).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import cpu_attention, cpu_ops

PACK_BATCH_HINT = 64  # oneDNN picks its blocking for this many rows
# float32 batches of up to this many rows go through the C++ weight-streaming kernel instead
# (`kernels.cpu_attention.small_linear`): one pass over the weights for all rows.
SMALL_LINEAR_MAX_ROWS = 16
# bfloat16 batches of up to this many rows go through the AVX512-BF16 kernel where the CPU has it
# (`kernels.cpu_ops.linear_bf16`)
SMALL_LINEAR_BF16_MAX_ROWS = 16


def can_pack(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype in (torch.bfloat16, torch.float32)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """The weight [out, in] packed for `linear`, or None where packing does not apply."""
    if not can_pack(weight):
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_BATCH_HINT)
    except RuntimeError:  # oneDNN without bf16 support on this CPU (float32 always packs)
        return None


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    packed: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [T, in] @ weight.T (+ bias) -> [T, out], through the packed weight when there is one
    (decode batches of up to `SMALL_LINEAR_MAX_ROWS` / `SMALL_LINEAR_BF16_MAX_ROWS` rows: the C++
    kernels)."""
    if packed is not None:
        rows = x.shape[0]
        if x.dtype == torch.bfloat16:
            if rows <= SMALL_LINEAR_BF16_MAX_ROWS and cpu_ops.linear_bf16_available():
                return cpu_ops.linear_bf16(x, weight, bias)
        elif rows <= SMALL_LINEAR_MAX_ROWS and cpu_attention.small_linear_available():
            return cpu_attention.small_linear(x, weight, bias)  # float32 (built once, cached)
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return F.linear(x, weight, bias)
