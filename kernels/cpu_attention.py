"""CPU attention backend: C++ kernels that read the paged cache in place.

The reference (`kernels.reference`) gathers every decoding sequence's whole context into a padded
copy in every layer of every step. The kernels in `csrc/decode_attention.cpp` (decodes) and
`csrc/prefill_attention.cpp` (prefills) instead walk each sequence's block table and read K and V
rows where they lie, once per KV head for all the query heads of its group, with float32 scores,
softmax and accumulation.

    decode rows  (q_len == 1)   -> C++ decode kernel    [S_d, H, D] -> [S_d, H, D]
    prefill rows (q_len > 1)    -> C++ prefill kernel, all prefills in one call (`paged_prefill`);
                                   `scaled_dot_product_attention` per sequence where that kernel
                                   has no vector code (`prefill_sdpa`, `prefill_kernel_serves`)
    wherever the prefill        -> the prefill kernel for every row, decodes included
    kernel serves                  (`one_kernel_for_all_rows`: batch-invariant output); decodes
                                   that share leading blocks (`AttentionMetadata.prefix_groups`)
                                   attend those keys once per group where it pays
                                   (`groups_that_pay`, `SHARED_PREFIX`)
    write_kv                    -> reference

The library is compiled on first use (`kernels._build`). When it cannot be built (no compiler, no
ninja) one warning is logged and the reference runs instead. `KernelOptions.cpu_attention=False`
(`PREFIXGATE_CPU_ATTENTION=torch`) forces the reference.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels import _build, reference
from kernels.metadata import AttentionMetadata, PrefixGroups
from kernels.options import options
from kernels.reference import write_kv

__all__ = [
    "kernel_available",
    "load_kernel",
    "paged_attention",
    "paged_decode",
    "paged_prefill",
    "prefill_kernel_serves",
    "write_kv",
]

log = logging.getLogger(__name__)

# cache dtypes of the prefill kernel (float16 runs its float32 path, widened)
PREFILL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# False: decodes take the decode kernel again (not batch-invariant; for A/B benchmarks, see
# bench/offline.py --invariance-ab)
BATCH_INVARIANT = True
# False: decodes sharing leading blocks are attended one by one, as if no block were shared (the
# output is the same bits either way; for A/B benchmarks and tests, see bench/offline.py --shared)
SHARED_PREFIX = True
# True: group every decode that shares a whole key block, where it pays or not
# (`groups_that_pay`; for A/B benchmarks and tests)
GROUP_ALWAYS = False

# Where a group's shared keys run as vectors, not tiles (no AMX, or a float32 cache), grouping
# pays only for many decodes on long prefixes: see `groups_that_pay`.
VECTOR_GROUP_MIN_KEYS = 768
VECTOR_GROUP_MIN_DECODES_PER_THREAD = 16

Kernel = Callable[..., None]  # (out, query, kv_cache, block_tables, seq_lens, scale) -> None

_lock = threading.Lock()
_kernel: Kernel | None = None
_tried = False


def load_kernel() -> Kernel | None:
    """The compiled decode kernel, built on first call; None (after one warning) if it can't be."""
    global _kernel, _tried
    with _lock:
        if not _tried:
            _tried = True
            try:
                _build.build()
                _kernel = torch.ops.prefixgate_cpu.paged_decode_attention
            except Exception as exc:  # any build failure falls back, it never fails the engine
                log.warning("CPU attention kernel unavailable, using the reference: %s", exc)
    return _kernel


def kernel_available() -> bool:
    """True when decodes on CPU run through the C++ kernel (built, and not switched off)."""
    return options().cpu_attention and load_kernel() is not None


def paged_decode(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    kernel: Kernel | None = None,
) -> torch.Tensor:
    """Attention of one new token per sequence over its paged context, with the C++ kernel.

    Args:
        query: [S, H, D] in the cache dtype (the last dim contiguous).
        kv_cache: [2, num_blocks, block_size, KVH, D] for one layer.
        block_tables: [S, max_blocks] int32 or int64; seq_lens: [S] int32 or int64.
        scale: softmax scale.
        kernel: the loaded kernel (default: `load_kernel()`, which must succeed).

    Returns:
        [S, H, D] in the cache dtype.
    """
    kernel = kernel or load_kernel()
    if kernel is None:
        raise RuntimeError("the CPU attention kernel is not available")
    out = torch.empty(query.shape, dtype=kv_cache.dtype)
    kernel(out, query, kv_cache, block_tables, seq_lens, scale)
    return out


def prefill_kernel_serves(kv_cache: torch.Tensor) -> bool:
    """True when the library is loaded and runs prefills over this cache faster than SDPA: a
    float32, bfloat16 or float16 CPU cache, and a head dim its vector code covers (AVX-512 or
    AVX2 + FMA: 16, 32, 64, 128). Its plain-loop fallback is exact but slower than SDPA, so the
    backend avoids it."""
    return (
        kv_cache.device.type == "cpu"
        and kv_cache.dtype in PREFILL_DTYPES
        and load_kernel() is not None
        and bool(torch.ops.prefixgate_cpu.prefill_vectorized(kv_cache.shape[-1]))
    )


def one_kernel_for_all_rows(kv_cache: torch.Tensor) -> bool:
    """True when the prefill kernel attends every row of a step, decodes included: caches of
    every dtype where it serves (`prefill_kernel_serves`), unless `BATCH_INVARIANT` is off.

    Its rows come out bit-identical however the step is made up (a decode, a prompt's last
    token in a prefill, in a chunk over cached context, beside other sequences): fixed key
    blocks aligned to position 0, and one arithmetic whether a token's heads fill the lanes or
    its keys do (`csrc/prefill_attention.cpp`). The decode kernel sums in another order, so a
    token's output would change with the way its step was made up (docs/determinism.md).
    """
    return BATCH_INVARIANT and prefill_kernel_serves(kv_cache)


@functools.cache
def _amx() -> bool:
    """True when the prefill kernel runs bfloat16 items on AMX tiles (its `uses_amx`)."""
    return bool(torch.ops.prefixgate_cpu.has_linear_amx())


def groups_that_pay(groups: PrefixGroups, kv_cache: torch.Tensor) -> PrefixGroups | None:
    """The step's decode groups the prefill kernel should attend grouped; None: none of them.

    Grouping changes no bit of the output (`csrc/prefill_attention.cpp`, "Grouped items"), only
    the time. A grouped item runs its shared keys as rows of whole 16-row vectors or tiles,
    while an ungrouped decode runs with its keys in the lanes. On AMX tiles (bfloat16 caches)
    the ungrouped decode is a 16-row tile of its 3 heads too, so grouping always pays. On the
    vector paths the ungrouped decode is memory-bound and fast, the grouped item compute-bound,
    and the items are few (one per KV head per 21 decodes): measured on AMD Zen 5 (AVX512-BF16,
    2 threads, `bench/offline.py --shared-ab`), grouping took 4-79% more attention time for 3 to
    16 decodes per group on 512-1024-token prefixes and 8 on 2048, and 9-19% less only with 32
    or more decodes on 768+ shared keys. So on those paths a group needs at least
    `VECTOR_GROUP_MIN_KEYS` shared keys and the step at least
    `VECTOR_GROUP_MIN_DECODES_PER_THREAD` decodes in such groups per thread (few large items
    leave a thread idle); otherwise every decode runs ungrouped.
    """
    head_dim = kv_cache.shape[-1]
    tiles = kv_cache.dtype == torch.bfloat16 and head_dim % 32 == 0 and head_dim <= 128
    if GROUP_ALWAYS or (tiles and _amx()):
        return groups
    of = groups.group_of.tolist()
    sizes = [of.count(g) for g in range(len(groups.shared_keys))]
    keep = [
        g
        for g, keys in enumerate(groups.shared_keys.tolist())
        if keys >= VECTOR_GROUP_MIN_KEYS and sizes[g] > 1
    ]
    decodes = sum(sizes[g] for g in keep)
    if decodes < VECTOR_GROUP_MIN_DECODES_PER_THREAD * torch.get_num_threads():
        return None
    if len(keep) == len(sizes):
        return groups
    new = {g: i for i, g in enumerate(keep)}
    return PrefixGroups(
        torch.tensor([new.get(g, -1) for g in of], dtype=torch.int32),
        groups.shared_keys[keep],
    )


def paged_prefill(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    out: torch.Tensor,
    seq_ids: torch.Tensor,
    groups: PrefixGroups | None = None,
) -> None:
    """Causal attention of the new tokens of sequences `seq_ids` over their paged contexts, with
    the C++ prefill kernel, written into their rows of `out` (the other rows are left untouched).

    Needs `load_kernel()` to have succeeded and a cache of `PREFILL_DTYPES`.

    Args:
        query: [T, H, D] in the cache dtype (the last dim contiguous), the whole step's rows.
        kv_cache: [2, num_blocks, block_size, KVH, D] for one layer.
        meta: the step's layout; sequence s owns rows `query_start_loc[s]:query_start_loc[s+1]`.
        scale: softmax scale.
        out: [T, H, D] in the cache dtype (the last dim contiguous).
        seq_ids: [P] int32 or int64, the sequences to attend (usually those with q_len > 1).
        groups: decodes among them whose shared leading keys are attended once for the group
            (the same output as without).
    """
    torch.ops.prefixgate_cpu.paged_prefill_attention(
        out,
        query,
        kv_cache,
        meta.block_tables,
        meta.query_start_loc,
        meta.seq_lens,
        seq_ids,
        scale,
        None if groups is None else groups.group_of,
        None if groups is None else groups.shared_keys,
    )


def paged_attention(
    query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Decode rows through the C++ decode kernel, prefill rows through the C++ prefill kernel
    (`paged_prefill`; SDPA where `prefill_kernel_serves` says no, see `prefill_sdpa`).

    Without the kernel (no compiler, or switched off in `kernels.options`) the whole step runs
    the reference.
    """
    plan = _plan(meta, kv_cache)
    if plan.kernel is None:
        return reference.paged_attention(query, kv_cache, meta, scale)
    query = query.to(kv_cache.dtype)
    if plan.seq_lens is not None and plan.rows is None:  # all decodes
        return paged_decode(query, kv_cache, plan.block_tables, plan.seq_lens, scale, plan.kernel)
    out = torch.empty_like(query)
    if plan.seq_lens is not None:
        out[plan.rows] = paged_decode(
            query[plan.rows], kv_cache, plan.block_tables, plan.seq_lens, scale, plan.kernel
        )
    if plan.prefills is not None:
        paged_prefill(query, kv_cache, meta, scale, out, plan.prefills, plan.groups)
    else:
        prefill_sdpa(query, kv_cache, meta, scale, out)
    return out


@dataclass(frozen=True, slots=True)
class StackAttention:
    """A step's attention as `cpu_ops.layer_stack` runs it in every layer, as `paged_attention`
    would: the decode kernel for the one-token sequences, the prefill kernel for the others."""

    decode_rows: torch.Tensor | None  # [S_d] their query rows; None when every row is one
    decode_tables: torch.Tensor | None  # [S_d, max_blocks]; None when there are no decodes
    decode_lens: torch.Tensor | None  # [S_d]
    prefill_ids: torch.Tensor | None  # [S_p] sequences with more new tokens; None: no prefills
    block_tables: torch.Tensor  # the step's: [S, max_blocks], [S + 1], [S]
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    groups: PrefixGroups | None = None  # prefill-kernel decodes sharing leading blocks


def stack_attention(meta: AttentionMetadata, kv_cache: torch.Tensor) -> StackAttention | None:
    """The step's attention for `cpu_ops.layer_stack` when the C++ kernels serve every row
    (built, not switched off, and the prefill kernel vectorized for this cache); else None."""
    plan = _plan(meta, kv_cache)
    has_prefills = plan.rows is not None or plan.seq_lens is None
    if plan.kernel is None or (has_prefills and plan.prefills is None):
        return None
    decodes = plan.seq_lens is not None
    return StackAttention(
        plan.rows,
        plan.block_tables if decodes else None,
        plan.seq_lens,
        plan.prefills,
        meta.block_tables,
        meta.query_start_loc,
        meta.seq_lens,
        plan.groups,
    )


def prefill_sdpa(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    out: torch.Tensor,
) -> None:
    """Write the prefill rows (q_len > 1) of `out` with PyTorch's fused CPU attention.

    Each prefill or chunk gathers its own context once ([L, KVH, D], small next to the step's
    matmuls) and runs `scaled_dot_product_attention` with grouped query heads: causal when the
    whole context is new, else with a mask that lets new token i see the cached context and new
    tokens up to itself. On CPU this fused kernel is 3-12x faster than the reference's
    matmul + float32 softmax for prefills of 256-2048 tokens; `paged_prefill` is faster still,
    and this runs only where it isn't (see `prefill_kernel_serves`).
    """
    kv_heads, head_dim = kv_cache.shape[3], kv_cache.shape[4]
    for p in reference.step_plan(meta, kv_cache).prefills:
        kv = kv_cache.index_select(1, p.blocks).view(2, -1, kv_heads, head_dim)[:, : p.seq_len]
        q = query[p.start : p.end].transpose(0, 1).unsqueeze(0)  # [1, H, Q, D]
        k = kv[0].transpose(0, 1).unsqueeze(0)  # [1, KVH, L, D]
        v = kv[1].transpose(0, 1).unsqueeze(0)
        if p.end - p.start == p.seq_len:
            o = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=scale, enable_gqa=True
            )
        else:
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=~p.future, scale=scale, enable_gqa=True
            )
        out[p.start : p.end] = o[0].transpose(0, 1)  # [Q, H, D]


@dataclass(slots=True)
class _Plan:
    """The step's decode and prefill sequences, found once and reused by every layer."""

    kernel: Kernel | None  # None: run the reference for the whole step
    rows: torch.Tensor | None  # [S_d] query rows of the decodes; None when every row is one
    block_tables: torch.Tensor  # [S_d, max_blocks] their block tables
    seq_lens: torch.Tensor | None  # [S_d] their context lengths; None when there are no decodes
    # [S_p] ids of the q_len > 1 sequences for the prefill kernel; None: none, or they run SDPA
    prefills: torch.Tensor | None = None
    groups: PrefixGroups | None = None  # decodes among `prefills` that share leading blocks


def _plan(meta: AttentionMetadata, kv_cache: torch.Tensor) -> _Plan:
    """The step's plan, made by the first layer that asks and reused by the others."""
    plan: _Plan | None = meta.derived.get("cpu")
    if plan is None:
        plan = meta.derived["cpu"] = _make_plan(meta, kv_cache)
    return plan


def _make_plan(meta: AttentionMetadata, kv_cache: torch.Tensor) -> _Plan:
    kernel = load_kernel() if kv_cache.device.type == "cpu" and kernel_available() else None
    if kernel is not None and one_kernel_for_all_rows(kv_cache):
        groups = None
        if SHARED_PREFIX and meta.prefix_groups is not None:
            groups = groups_that_pay(meta.prefix_groups, kv_cache)
        return _Plan(kernel, None, meta.block_tables, None, torch.arange(meta.num_seqs), groups)
    starts = meta.query_start_loc_list
    decodes = [s for s in range(meta.num_seqs) if starts[s + 1] - starts[s] == 1]
    prefill_ids = [s for s in range(meta.num_seqs) if starts[s + 1] - starts[s] > 1]
    prefills = None
    if kernel is not None and prefill_ids and prefill_kernel_serves(kv_cache):
        prefills = torch.tensor(prefill_ids)
    if kernel is None or not decodes:
        return _Plan(kernel, None, meta.block_tables, None, prefills)
    if len(decodes) == meta.num_tokens:
        return _Plan(kernel, None, meta.block_tables, meta.seq_lens)
    index = torch.tensor(decodes)
    return _Plan(
        kernel,
        rows=torch.tensor([starts[s] for s in decodes]),
        block_tables=meta.block_tables.index_select(0, index),
        seq_lens=meta.seq_lens.index_select(0, index),
        prefills=prefills,
    )
