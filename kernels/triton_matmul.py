"""A batch-invariant matmul for GPUs: `linear(x, weight, bias)` = x @ weight.T + bias in Triton.

cuBLAS (`F.linear`) picks its kernel, tiling and split-K by the problem's shape, so a token's
projections change bits with the number of rows in its step. This kernel reduces each output the
same way whatever M is (docs/determinism.md):

    out [M, N] = x [M, K] @ weight[N, K].T (+ bias [N])
    grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)): one [BLOCK_M, BLOCK_N] output tile per program
    K in BLOCK_K steps from 0, in order, into one float32 accumulator; no split-K; bias added
    once at the end; rows past M read as zeros and are not stored

One tiling (`MatmulConfig`) per dtype, for every M: a row's sums never depend on which tile it
falls in or what the other rows hold. Its readable twin is `linear_reference`. Not measured on a
GPU (none was available): the tiling is a guess, and small batches leave most of a 64-row tile
empty.

Imports Triton unconditionally, like `kernels.triton_attention`; CPU tensors run only under
`TRITON_INTERPRET=1` (the tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from kernels import triton_kernels as _k

__all__ = ["MatmulConfig", "config_for", "linear", "linear_reference"]


@dataclass(frozen=True, slots=True)
class MatmulConfig:
    """Output tile `block_m` x `block_n`, K step `block_k` (powers of two, at least 16)."""

    block_m: int = 64
    block_n: int = 64
    block_k: int = 64
    num_warps: int = 4

    def __post_init__(self) -> None:
        for n in (self.block_m, self.block_n, self.block_k):
            if n < 16 or n & (n - 1):
                raise ValueError("block_m, block_n and block_k must be powers of two >= 16")


_CONFIGS = {"half": MatmulConfig(), "float32": MatmulConfig(32, 64, 32, num_warps=4)}


def config_for(dtype: torch.dtype) -> MatmulConfig:
    """The tiling every matmul of this dtype runs, whatever its number of rows."""
    return _CONFIGS["float32" if dtype == torch.float32 else "half"]


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: MatmulConfig | None = None,
) -> torch.Tensor:
    """x @ weight.T (+ bias), each output row the same bits whatever the other rows.

    Args:
        x: [M, K] (contiguous last dim), in the weight's dtype.
        weight: [N, K] (contiguous last dim).
        bias: [N] or None.
        config: tiling (default: `config_for(weight.dtype)`).

    Returns:
        [M, N] in the weight's dtype.
    """
    if x.device.type != "cuda" and not _k.INTERPRETED:
        raise RuntimeError(f"the Triton matmul needs CUDA tensors (got {x.device})")
    if config is None:
        config = config_for(weight.dtype)
    x = x if x.stride(-1) == 1 else x.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    (m, k), n = x.shape, weight.shape[0]
    out = torch.empty(m, n, dtype=weight.dtype, device=x.device)
    if m == 0:
        return out
    grid = (triton.cdiv(m, config.block_m), triton.cdiv(n, config.block_n))
    _k._linear_kernel[grid](
        x,
        weight,
        weight if bias is None else bias,  # not read without HAS_BIAS
        out,
        m,
        n,
        k,
        x.stride(0),
        weight.stride(0),
        out.stride(0),
        HAS_BIAS=bias is not None,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        DOT_F32=weight.dtype == torch.float32
        or (weight.dtype == torch.bfloat16 and _k.INTERPRETED),
        num_warps=config.num_warps,
    )
    return out


def linear_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """PyTorch twin of `linear`: float32 products and sums, rounded once to the weight's dtype."""
    out = x.float() @ weight.float().T  # [M, K] @ [K, N] -> [M, N]
    if bias is not None:
        out = out + bias.float()
    return out.to(weight.dtype)
