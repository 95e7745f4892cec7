"""Matmuls against weights packed once at load, on CPU (bfloat16, float32 and float16).

`F.linear` on CPU re-lays out a bf16 weight for oneDNN's kernels on every call, and sends float32
to MKL, whose small-batch SGEMMs are slow on AMD CPUs. So each weight is packed at load:

- bfloat16 on CPUs with AVX512-BF16: into panels for our own kernel (`kernels.cpu_ops`), which on
  an AMD EPYC (Zen 4) runs all of SmolLM2's matmuls at 1 row in 7.2 ms (37 GB/s of weights, vs
  11.9 ms through oneDNN), at 16 rows in 12.3 vs 17.6 ms, 64 rows 41.9 vs 51.3 ms, and equal at
  1024. On CPUs with AMX the same kernel runs every batch on AMX tiles loaded straight from the
  panels, ahead of oneDNN's packed AMX GEMM (an Intel Xeon, all of SmolLM2's matmuls with 30
  layers of weights streamed from memory, medians of interleaved runs: 64 rows 22 vs 26-32 ms,
  512 rows 106 vs 118, 1,024 rows 220 vs 350, 2,048 rows 432 vs 477), so no oneDNN copy of the
  weight is kept. Where the tiles cannot serve a weight (its in-features not a multiple of 32, or
  Linux refusing tile data) the AVX-512 kernel runs every batch of it. One kernel per weight
  whatever the batch: a row's result never depends on the rows beside it (docs/determinism.md).
- float32, and bfloat16 on CPUs without AVX512-BF16: into panels for the fixed-order kernel
  (`kernels.cpu_ops.linear_fixed`): each output one chain of fused multiply-adds over K in
  order, the same bits at every batch size and on every instruction set, so float32 (and such
  CPUs' bfloat16) output does not depend on the batch either. On an Intel Xeon it runs float32
  at 0.9-1.0x oneDNN's packed GEMM (faster than MKL's `F.linear` up to 256 rows), and bfloat16
  at 2.4x oneDNN's where oneDNN has no AVX512-BF16 (csrc/linear_fixed.cpp).
- float16: into the same fixed-order panels (widened to float32 exactly, each output rounded
  once), in place of `F.linear`, for the same reason.
- where the library is not built: oneDNN's packed weights
  (`torch.ops.mkldnn._reorder_linear_weight`), or `F.linear`.

On CUDA, with Triton installed, every matmul runs `kernels.triton_matmul.linear`: one tiling for
every batch size and K summed in one order, where cuBLAS picks its kernel by the batch
(docs/determinism.md). Not measured on a GPU; `TRITON_MATMUL = False` gives cuBLAS back for A/B
runs.

Results differ from `F.linear` by float32 summation order only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels import cpu_attention, cpu_ops

PACK_BATCH_HINT = 64  # oneDNN picks its blocking for this many rows
# False: CUDA matmuls take cuBLAS's `F.linear` (not batch-invariant; for A/B measurements)
TRITON_MATMUL = True


@functools.cache
def _triton_linear() -> Callable[..., torch.Tensor] | None:
    """`kernels.triton_matmul.linear`, or None without Triton."""
    try:
        from kernels import triton_matmul
    except ImportError:
        return None
    return triton_matmul.linear


@dataclass(frozen=True, slots=True)
class PackedWeight:
    """A weight's packed form (exactly one is set)."""

    panels: torch.Tensor | None = None  # `cpu_ops.pack_panels` layout (bf16, AVX512-BF16)
    fixed: torch.Tensor | None = None  # `cpu_ops.pack_fixed` layout (float32; bf16 elsewhere)
    onednn: torch.Tensor | None = None  # oneDNN's layout, where the library is not built


def can_pack(weight: torch.Tensor) -> bool:
    """True when oneDNN can pack this weight."""
    return (
        weight.device.type == "cpu"
        and weight.dtype in (torch.bfloat16, torch.float32)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def _pack_onednn(weight: torch.Tensor) -> torch.Tensor | None:
    if not can_pack(weight):
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_BATCH_HINT)
    except RuntimeError:  # oneDNN without bf16 support on this CPU (float32 always packs)
        return None


def pack_weight(weight: torch.Tensor) -> PackedWeight | None:
    """The weight [out, in] packed for `linear`, or None where packing does not apply."""
    if weight.device.type == "cpu" and weight.dtype in cpu_ops.FIXED_DTYPES:
        if weight.dtype == torch.bfloat16 and cpu_ops.linear_bf16_available():
            return PackedWeight(panels=cpu_ops.pack_panels(weight))
        if cpu_attention.load_kernel() is not None:
            return PackedWeight(fixed=cpu_ops.pack_fixed(weight))
    onednn = _pack_onednn(weight)
    return None if onednn is None else PackedWeight(onednn=onednn)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    packed: PackedWeight | None = None,
) -> torch.Tensor:
    """x [T, in] @ weight.T (+ bias) -> [T, out], through the packed weight when there is one,
    through the batch-invariant Triton matmul for CUDA tensors."""
    if x.device.type == "cuda" and TRITON_MATMUL and x.dtype == weight.dtype and x.dim() == 2:
        triton_linear = _triton_linear()
        if triton_linear is not None:
            return triton_linear(x, weight, bias)
    if packed is None or x.dtype != weight.dtype:
        return F.linear(x, weight, bias)
    if packed.panels is not None:
        return cpu_ops.linear_bf16(x.contiguous(), packed.panels, weight.shape[0], bias)
    if packed.fixed is not None:
        return cpu_ops.linear_fixed(x.contiguous(), packed.fixed, weight.shape[0], bias)
    assert packed.onednn is not None
    return torch.ops.mkldnn._linear_pointwise(x, packed.onednn, bias, "none", [], "")
