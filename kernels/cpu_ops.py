"""Fused CPU ops for a decoder layer (C++ in `csrc/row_ops.cpp` and `csrc/linear.cpp`, built with
the attention kernels).

Each op does in one pass what eager PyTorch does in several, with the same bfloat16 roundings
(results equal the eager chain up to float32 summation order):

    rms_norm(x, w, eps, residual)   x += residual in place, then RMSNorm as transformers does it
    rope_(qk, cos, sin)             rotary embedding of q and k heads, in place
    silu_mul(gate_up)               SwiGLU's silu(gate) * up
    linear_bf16(x, panels, n, bias) bfloat16 matmul against a weight packed by `pack_panels`
                                    (AVX512-BF16), from one decode row to prefill batches
    linear_fixed(x, panels, n, bias) float32, float16 (and bfloat16 without AVX512-BF16) matmul
                                    against a weight packed by `pack_fixed`, each output summed
                                    over K in one order whatever the batch (csrc/linear_fixed.cpp)
    argmax_rows(x)                  x.max(dim=-1).indices (first maximum, NaN the largest) for
                                    greedy sampling, at memory speed
    mask_rows(x, bitmask, rows)     x[r, j] = -inf for r in rows where bit j of bitmask[r] is 0 (a
                                    grammar's token mask, in xgrammar's bit layout)
    layer_stack(...)                a step's whole stack of Llama layers in one call
                                    (csrc/layer_stack.cpp): these ops and the attention
                                    kernels

They run on CPU tensors of float32 or bfloat16 (`fused_available`), `linear_fixed` on float16 too.
The model falls back to the eager ops elsewhere and when `KernelOptions.cpu_fused` is False
(`PREFIXGATE_CPU_FUSED=0`).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from kernels.cpu_attention import StackAttention, load_kernel
from kernels.options import options

DTYPES = (torch.float32, torch.bfloat16)
FIXED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # of `linear_fixed`


def fused_available(device: torch.device | str, dtype: torch.dtype) -> bool:
    """True when the fused ops serve tensors of `dtype` on `device`."""
    return (
        torch.device(device).type == "cpu"
        and dtype in DTYPES
        and options().cpu_fused
        and load_kernel() is not None
    )


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@functools.cache
def linear_bf16_available() -> bool:
    """True when the library is built with the AVX512-BF16 matmul (`linear_bf16`)."""
    return load_kernel() is not None and bool(torch.ops.prefixgate_cpu.has_linear_bf16())


@functools.cache
def linear_amx_available() -> bool:
    """True when `linear_bf16` runs batches of 4+ rows on AMX tiles (built with AMX-BF16, and
    Linux lets this process use tile data)."""
    return linear_bf16_available() and bool(torch.ops.prefixgate_cpu.has_linear_amx())


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """x [T, H] (rows contiguous): with `residual`, first x += residual (in place, rounded to
    x's dtype); returns RMSNorm(x) * weight as a new [T, H] tensor."""
    out = torch.empty(x.shape, dtype=x.dtype)
    torch.ops.prefixgate_cpu.rms_norm(out, x, residual, weight, eps)
    return out


def rope_(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate qk [T, heads, D] (D contiguous) in place; cos, sin [T, D] contiguous."""
    torch.ops.prefixgate_cpu.rope(qk, cos, sin)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2 I] = [gate | up] -> silu(gate) * up [T, I]."""
    out = torch.empty(gate_up.shape[0], gate_up.shape[1] // 2, dtype=gate_up.dtype)
    torch.ops.prefixgate_cpu.silu_mul(out, gate_up)
    return out


PANEL = 32  # output columns per panel


def pack_panels(weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K] bfloat16 -> [ceil(N / 32), ceil(K / 2), 32, 2] for `linear_bf16`: for each
    panel of 32 columns and each pair of k, the columns' two weights side by side (zero padded)."""
    n, k = weight.shape
    padded = torch.zeros(-(-n // PANEL) * PANEL, k + k % 2, dtype=torch.bfloat16)
    padded[:n, :k] = weight
    return padded.view(-1, PANEL, padded.shape[1] // 2, 2).permute(0, 2, 1, 3).contiguous()


def linear_bf16(
    x: torch.Tensor, panels: torch.Tensor, out_features: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [M, K] (rows contiguous) @ weight.T (+ bias) -> [M, out_features] in bfloat16, with
    `panels = pack_panels(weight)`. Needs `linear_bf16_available()`."""
    out = torch.empty(x.shape[0], out_features, dtype=torch.bfloat16)
    torch.ops.prefixgate_cpu.linear_bf16(out, x, panels, bias)
    return out


def pack_fixed(weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K] of `FIXED_DTYPES` -> [ceil(N / 32), K, 32] for `linear_fixed`: for each
    panel of 32 columns, each k's 32 weights contiguous (N zero padded)."""
    n, k = weight.shape
    padded = torch.zeros(-(-n // PANEL) * PANEL, k, dtype=weight.dtype)
    padded[:n] = weight
    return padded.view(-1, PANEL, k).transpose(1, 2).contiguous()


def linear_fixed(
    x: torch.Tensor,
    panels: torch.Tensor,
    out_features: int,
    bias: torch.Tensor | None = None,
    *,
    plain: bool = False,
) -> torch.Tensor:
    """x [M, K] (rows contiguous) @ weight.T (+ bias) -> [M, out_features] in x's dtype (one of
    `FIXED_DTYPES`), with `panels = pack_fixed(weight)`: each output one chain of fused
    multiply-adds over k in order, so a row's result is the same bits whatever the batch, the
    build's instruction set, or `plain` (the portable loops) (csrc/linear_fixed.cpp)."""
    out = torch.empty(x.shape[0], out_features, dtype=x.dtype)
    torch.ops.prefixgate_cpu.linear_fixed(out, x, panels, bias, plain)
    return out


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x [R, V] float32 or bfloat16 (rows contiguous) -> int64 [R]: each row's first maximum,
    as `x.max(dim=-1).indices` (a NaN counts as the maximum)."""
    out = torch.empty(x.shape[0], dtype=torch.int64)
    torch.ops.prefixgate_cpu.argmax_rows(out, x)
    return out


def mask_rows(x: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """In place, for each r in rows: x[r, j] = -inf wherever bit j % 32 of bitmask[r, j // 32]
    is 0, for j < min(V, 32 * W) (xgrammar's `apply_token_bitmask_inplace` with `indices`);
    x [R, V] float32 or bfloat16, bitmask int32 [K, W], rows int64, each below R and K."""
    torch.ops.prefixgate_cpu.mask_rows(x, bitmask, rows)


def layer_stack(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    qkv_biases: list[torch.Tensor],
    kv_caches: list[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    slot_mapping: torch.Tensor,
    attention: StackAttention,
    shape: tuple[int, int, int, int],
    eps: float,
    scale: float,
) -> torch.Tensor:
    """Every decoder layer of a step in one C++ call, with the ops of the Python layer.

    Args:
        x: [T, hidden] bfloat16 embeddings; the residual stream is updated in place.
        weights: per layer, its input norm, qkv panels, o panels, post-attention norm, gate_up
            panels and down panels (`pack_panels`).
        qkv_biases: empty, or one per layer.
        kv_caches: per layer [2, num_blocks, block_size, KVH, D]; each token's K/V is written
            at its slot, then the attention kernels read the caches.
        cos, sin: [T, D]; slot_mapping [T] int64.
        attention: which rows the decode kernel and which sequences the prefill kernel attend
            (`kernels.cpu_attention.stack_attention`).
        shape: (num_heads, kv_heads, head_dim, intermediate_size).

    Returns:
        The last layer's MLP output [T, hidden]: the final norm adds it to x.
    """
    heads, kv_heads, head_dim, inter = shape
    a = attention
    groups = (None, None) if a.groups is None else (a.groups.group_of, a.groups.shared_keys)
    out: torch.Tensor = torch.ops.prefixgate_cpu.layer_stack(
        x, None, weights, qkv_biases, kv_caches, cos, sin, slot_mapping,
        a.decode_rows, a.decode_tables, a.decode_lens, a.prefill_ids,
        a.block_tables, a.query_start_loc, a.seq_lens,
        heads, kv_heads, head_dim, inter, eps, scale, *groups,
    )  # fmt: skip
    return out
