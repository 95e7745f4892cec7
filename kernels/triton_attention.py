"""Triton paged attention for GPUs: the same API as `kernels.reference`, which stays the oracle.

    write_kv(key, value, kv_cache, slot_mapping)      reshape-and-cache into the paged blocks
    paged_attention(query, kv_cache, meta, scale)     a mixed batch: decodes and (chunked) prefills

`paged_attention` is batch-invariant (docs/determinism.md): every row of a step, decodes included,
goes to one kernel with one tiling (see `kernels.triton_kernels` for the kernels themselves):

    every row             _unified_kernel   grid (num_tiles, KVH)     BLOCK_Q tokens of one sequence
    write_kv              _write_kv_kernel  grid (cdiv(T, BLOCK_T),)

Decodes sharing a prefix's blocks (`meta.prefix_groups`), where it saves enough reads
(`shared_prefix_plan`), first attend the shared keys together, and the unified kernel goes on from
each row's state there; the output is the same bits as without:

    shared keys           _shared_prefix_kernel  grid (num_programs, KVH)  block_m // G decodes

A token's output is then the same bits whether it is a decode, the last token of a whole prompt or
inside a chunk over cached context, and whatever else the step holds. The host lists each
program's (sequence, first token) once per step (kept in `meta.derived["triton"]` for every
layer).

`BATCH_INVARIANT = False` (a module flag for A/B measurements, not a setting) sends decodes back
to the split-K flash-decoding kernels instead, whose number of splits follows the batch and the
GPU's SM count, so the sums' order, and the bits, depend on what else is batched:

    decodes (q_len == 1)  _decode_kernel    grid (S, KVH, num_splits) flash-decoding over context
                          _merge_kernel     grid (S, H)               only when the context is split
    prefills (q_len > 1)  _unified_kernel   grid (num_prefill_tiles, KVH)

Triton is optional (`pip install 'prefixgate[triton]'`): importing this module without it raises
ImportError, which `kernels.get_attention_backend("triton")` turns into a clear error. The kernels
need CUDA tensors, or CPU tensors when Triton runs its interpreter (`TRITON_INTERPRET=1` set before
this module is first imported), which is how the tests run them.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field

import torch

from kernels.metadata import KEY_BLOCK, AttentionMetadata

try:
    import triton

    from kernels import triton_kernels as _k
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "the 'triton' attention backend needs the triton package: pip install 'prefixgate[triton]'"
    ) from exc

__all__ = [
    "BATCH_INVARIANT",
    "GROUP_MIN_SAVED_BYTES",
    "SHARED_PREFIX",
    "DecodeConfig",
    "SharedPrefixPlan",
    "UnifiedConfig",
    "decode_attention",
    "merge_partitions_reference",
    "paged_attention",
    "shared_prefix_attention",
    "shared_prefix_plan",
    "tiling",
    "unified_attention",
    "write_kv",
]

# False: decodes take the split-K decode kernel (faster for long contexts at small batches, not
# batch-invariant; for A/B measurements, like `kernels.cpu_attention.BATCH_INVARIANT`)
BATCH_INVARIANT = True
# Decodes whose block tables start with the same blocks (`AttentionMetadata.prefix_groups`) read
# those keys once per program of a group (`_shared_prefix_kernel`) where that saves at least
# GROUP_MIN_SAVED_BYTES of K/V reads in the step's layer (see `shared_prefix_plan`). The output
# is the same bits either way; False reads them per decode (for A/B measurements and tests).
SHARED_PREFIX = True
# The second launch costs ~0.03-0.04 ms a layer on an H200 (4 December, `bench/attention.py
# --triton-shared`, docs/kernels.md): grouping lost wherever it saved under 92 MB (0.34-0.78x)
# and paid in 6 of the 8 cases saving 179 MB or more (1.56-5.53x; 0.52x and 0.90x in the others).
GROUP_MIN_SAVED_BYTES = 160 * 10**6


def _is_pow2_at_least_16(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


@dataclass(frozen=True, slots=True)
class DecodeConfig:
    """Tiling of the split-K decode kernel (only with `BATCH_INVARIANT` off).

    partition: context tokens per split (flash-decoding); a multiple of `block_n`.
    block_n: context tokens per K/V tile inside a split (a power of two, at least 16 for `tl.dot`).
    max_splits: a context longer than `partition * max_splits` gets longer partitions instead.
    programs_per_sm: split no further than it takes to give every SM this many programs (0: split
        by `partition` alone, whatever the batch).
    num_warps: warps per program on the GPU.
    """

    partition: int = 512
    block_n: int = 64
    max_splits: int = 64
    programs_per_sm: int = 4
    num_warps: int = 4

    def __post_init__(self) -> None:
        if not _is_pow2_at_least_16(self.block_n) or self.partition % self.block_n:
            raise ValueError("block_n must be a power of two >= 16 dividing partition")


@dataclass(frozen=True, slots=True)
class UnifiedConfig:
    """Tiling of the unified kernel: `block_m` query rows per program (`block_m // G` tokens x
    the G query heads of one KV head) against `block_n` keys per step (powers of two, at least
    16), on `num_warps` warps. One tiling for every program of every step: it is part of what
    fixes the order of each row's sums."""

    block_m: int = 32
    block_n: int = 64
    num_warps: int = 4

    def __post_init__(self) -> None:
        if not (_is_pow2_at_least_16(self.block_m) and _is_pow2_at_least_16(self.block_n)):
            raise ValueError("block_m and block_n must be powers of two >= 16")

    def block_q(self, group: int) -> int:
        """New tokens per program for `group` query heads per KV head."""
        if group > self.block_m:
            raise ValueError(f"block_m {self.block_m} is below the {group} query heads per KV head")
        return self.block_m // group


# No register spills for H=32, KVH=8, D=128 on sm_80 and sm_90, nor for SmolLM2's H=9, KVH=3,
# D=64 (`python -m kernels.triton_compile --registers`). The decode tiling was tuned on an H200
# (bf16, H=32 KVH=8 D=128, block_size 16), as was the prefill kernel the unified one replaced
# (block_m 64, 4 warps). The unified kernel's block_m of 32 is a guess between a prefill's
# (larger tiles reuse each K/V tile for more rows) and a decode's (a decode uses G of the rows):
# not measured on a GPU. float32 multiplies exactly (no tensor cores), so it needs smaller tiles.
_TILING = {
    "half": (DecodeConfig(), UnifiedConfig()),
    "float32": (DecodeConfig(block_n=32, num_warps=8), UnifiedConfig(32, 32, num_warps=8)),
}
WRITE_KV_ELEMENTS = 4096  # elements of K (and of V) per write_kv program


def tiling(dtype: torch.dtype) -> tuple[DecodeConfig, UnifiedConfig]:
    """The default (decode, unified) tiling for a cache dtype."""
    return _TILING["float32" if dtype == torch.float32 else "half"]


def _check_device(tensor: torch.Tensor) -> None:
    if tensor.device.type != "cuda" and not _k.INTERPRETED:
        raise RuntimeError(
            f"the Triton attention kernels need CUDA tensors (got {tensor.device}); "
            "use the 'torch' backend on CPU, or set TRITON_INTERPRET=1 before kernels.triton_* "
            "is imported to run them slowly through the interpreter"
        )


def _dot_f32(dtype: torch.dtype) -> bool:
    """Multiply in float32 for float32 caches (IEEE, not TF32), and for bfloat16 under the
    interpreter, whose `tl.dot` does not handle bfloat16 operands."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and _k.INTERPRETED)


def _pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, triton.next_power_of_2(n))


def _cache_strides(kv_cache: torch.Tensor) -> tuple[int, int, int, int]:
    """(kv, block, token, head) strides of a [2, num_blocks, block_size, KVH, D] cache."""
    if kv_cache.dim() != 5 or kv_cache.stride(-1) != 1:
        raise ValueError("kv_cache must be [2, num_blocks, block_size, KVH, D] with contiguous D")
    return kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def write_kv(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store the new tokens' keys and values into their cache slots, in place.

    Same contract as `kernels.reference.write_kv`; a negative slot skips its token.

    Args:
        key, value: [T, KVH, D] for the T new tokens (any strides with contiguous D).
        kv_cache: [2, num_blocks, block_size, KVH, D] for one layer.
        slot_mapping: [T] int64, `block_id * block_size + offset` of each token.
    """
    _check_device(kv_cache)
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    key, value = _last_dim_contiguous(key), _last_dim_contiguous(value)
    _, block_size, kv_heads, head_dim = kv_cache.shape[1:]
    block_hd = _pow2(kv_heads * head_dim)
    block_t = _pow2(min(num_tokens, max(1, WRITE_KV_ELEMENTS // block_hd)))
    _k._write_kv_kernel[(triton.cdiv(num_tokens, block_t),)](
        key,
        value,
        kv_cache,
        slot_mapping,
        num_tokens,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        *_cache_strides(kv_cache),
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        HD=kv_heads * head_dim,
        BLOCK_T=block_t,
        BLOCK_HD=block_hd,
    )


def paged_attention(
    query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Causal attention of every new token over its sequence's paged context.

    Same contract as `kernels.reference.paged_attention`: `write_kv` must already have stored this
    step's keys and values. Every row goes to the unified kernel; with `BATCH_INVARIANT` off,
    decode rows go to the split-K decode kernel instead (both write disjoint rows of one output).

    Args:
        query: [T, H, D] for the flattened batch described by `meta`.
        kv_cache: [2, num_blocks, block_size, KVH, D] for one layer.
        meta: the step's batch layout (query ranges, context lengths, block tables).
        scale: softmax scale, usually D ** -0.5.

    Returns:
        [T, H, D] attention output in the cache dtype (the query is cast to it, as in the
        reference).
    """
    out = torch.empty(query.shape, dtype=kv_cache.dtype, device=query.device)
    plan = _plan(meta)
    split_decodes = not BATCH_INVARIANT and plan.num_decodes > 0
    if split_decodes:
        decode_attention(query, kv_cache, meta, scale, out=out, plan=plan)
    if not split_decodes or meta.max_query_len > 1:
        shared = None
        if not split_decodes and SHARED_PREFIX:
            shared = shared_prefix_attention(query, kv_cache, meta, scale)
        unified_attention(
            query, kv_cache, meta, scale, out=out, decodes=not split_decodes, shared=shared
        )
    return out


@dataclass(slots=True)
class SharedPrefixPlan:
    """The grouped decodes of a step, as `_shared_prefix_kernel` takes them.

    programs: [3, num_programs] int32: each program's first index into `members`, its number of
        members (at most block_m // G) and their shared keys (a multiple of block_n).
    members: int32, the grouped decodes' sequence indices, program after program.
    resume: [S] int32, the shared keys of each sequence's group, 0 for a sequence in none.
    state: [S, H, D + 2] float32 rows (acc, m, l) that the kernel fills once per layer for the
        unified kernel to go on from (allocated at the first layer, reused by the others).
    """

    programs: torch.Tensor
    members: torch.Tensor
    resume: torch.Tensor
    state: torch.Tensor | None = None


def shared_prefix_plan(
    meta: AttentionMetadata, group: int, config: UnifiedConfig, key_bytes: int
) -> SharedPrefixPlan | None:
    """The step's decode groups cut into programs of at most `config.block_m // group` members
    (a larger group is split evenly), each group's shared keys rounded down to whole key tiles;
    None when that saves less than GROUP_MIN_SAVED_BYTES of reads, at `key_bytes` (K and V, all
    KV heads) a key: (members - programs) x shared keys, summed over the groups.

    Raises:
        ValueError: groups that `kernels.metadata.prefix_groups` would not make (a member that is
            not a decode, shared keys past a member's own or not whole KEY_BLOCKs, a group index
            out of range). That members' tables name the same blocks is not checked here: the
            tables may be on the GPU.
    """
    groups = meta.prefix_groups
    if groups is None:
        return None
    plan = _plan(meta)
    key = (group, config.block_m, config.block_n)
    if key in plan.shared:
        return plan.shared[key]
    shared_keys = groups.shared_keys.tolist()
    by_group: dict[int, list[int]] = {}
    for seq, g in enumerate(groups.group_of.tolist()):
        if g >= len(shared_keys):
            raise ValueError(f"sequence {seq}'s group {g} is out of range")
        if g < 0:
            continue
        if plan.q_lens[seq] != 1:
            raise ValueError(f"grouped sequence {seq} has {plan.q_lens[seq]} new tokens, not 1")
        if shared_keys[g] >= meta.seq_lens_list[seq]:
            raise ValueError(f"group {g} shares {shared_keys[g]} keys, past sequence {seq}'s own")
        by_group.setdefault(g, []).append(seq)
    if any(keys <= 0 or keys % KEY_BLOCK for keys in shared_keys):
        raise ValueError(f"shared keys {shared_keys} are not all positive multiples of {KEY_BLOCK}")
    per = config.block_m // group
    programs: list[tuple[int, int, int]] = []
    members: list[int] = []
    resume = [0] * meta.num_seqs
    saved = 0
    for g, seqs in by_group.items():
        shared = shared_keys[g] // config.block_n * config.block_n
        if len(seqs) < 2 or shared == 0:
            continue
        parts = -(-len(seqs) // per)
        saved += (len(seqs) - parts) * shared
        for i in range(parts):
            chunk = seqs[i * len(seqs) // parts : (i + 1) * len(seqs) // parts]
            programs.append((len(members), len(chunk), shared))
            members += chunk
        for seq in seqs:
            resume[seq] = shared
    found = None
    if programs and saved * key_bytes >= GROUP_MIN_SAVED_BYTES:
        device = meta.query_start_loc.device
        found = SharedPrefixPlan(
            torch.tensor(programs, dtype=torch.int32).T.contiguous().to(device),
            torch.tensor(members, dtype=torch.int32).to(device),
            torch.tensor(resume, dtype=torch.int32).to(device),
        )
    plan.shared[key] = found
    return found


def shared_prefix_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    *,
    config: UnifiedConfig | None = None,
) -> SharedPrefixPlan | None:
    """Attend each decode group's shared keys once for all its members' query rows, leaving
    each row's running softmax state in the returned plan's `state` for `unified_attention`
    (its `shared` argument) to finish; None (nothing launched) when the step has no group
    worth it (`shared_prefix_plan`)."""
    _check_device(query)
    if config is None:
        config = tiling(kv_cache.dtype)[1]
    _, _, block_size, kv_heads, head_dim = kv_cache.shape
    num_heads = query.shape[1]
    group = num_heads // kv_heads
    key_bytes = 2 * kv_heads * head_dim * kv_cache.element_size()
    shared = shared_prefix_plan(meta, group, config, key_bytes)
    if shared is None:
        return None
    if shared.state is None:
        shape = (meta.num_seqs, num_heads, head_dim + 2)
        shared.state = torch.empty(shape, dtype=torch.float32, device=query.device)
    num_programs = shared.programs.shape[1]
    _k._shared_prefix_kernel[(num_programs, kv_heads)](
        shared.state,
        query,
        kv_cache,
        meta.block_tables,
        meta.query_start_loc,
        shared.programs,
        shared.members,
        num_programs,
        scale * _k.LOG2E,
        shared.state.stride(0),
        query.stride(0),
        query.stride(1),
        *_cache_strides(kv_cache),
        meta.block_tables.stride(0),
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_M=config.block_m,
        BLOCK_D=_pow2(head_dim, 16),
        BLOCK_N=config.block_n,
        DOT_F32=_dot_f32(kv_cache.dtype),
        num_warps=config.num_warps,
    )
    return shared


@dataclass(frozen=True, slots=True)
class _Plan:
    """What the launchers derive from a step's metadata once, for every layer."""

    num_decodes: int  # sequences with q_len == 1
    max_decode_len: int  # their longest context (0 without decodes)
    q_lens: list[int]  # new tokens of each sequence
    # the unified kernel's programs, by (tokens per program, decodes included): [2, num_tiles]
    # int32 on the metadata's device, each program's sequence then its first new token
    tiles: dict[tuple[int, bool], torch.Tensor] = field(default_factory=dict)
    # grouped decodes by (G, block_m, block_n) (`shared_prefix_plan`)
    shared: dict[tuple[int, int, int], SharedPrefixPlan | None] = field(default_factory=dict)

    def tiles_for(self, meta: AttentionMetadata, block_q: int, decodes: bool) -> torch.Tensor:
        """The programs covering every sequence's new tokens, `block_q` at a time, in sequence
        order; without `decodes`, only the sequences with q_len > 1."""
        tiles = self.tiles.get((block_q, decodes))
        if tiles is None:
            seqs: list[int] = []
            firsts: list[int] = []
            for seq, q_len in enumerate(self.q_lens):
                if decodes or q_len > 1:
                    starts = range(0, q_len, block_q)
                    seqs += [seq] * len(starts)
                    firsts += starts
            host = torch.tensor([seqs, firsts], dtype=torch.int32).reshape(2, -1)
            tiles = host.to(meta.query_start_loc.device, non_blocking=True)
            self.tiles[(block_q, decodes)] = tiles
        return tiles


def _plan(meta: AttentionMetadata) -> _Plan:
    plan = meta.derived.get("triton")
    if plan is None:
        starts, lens = meta.query_start_loc_list, meta.seq_lens_list
        q_lens = [b - a for a, b in itertools.pairwise(starts)]
        decode_lens = [n for n, q in zip(lens, q_lens, strict=True) if q == 1]
        plan = _Plan(len(decode_lens), max(decode_lens, default=0), q_lens)
        meta.derived["triton"] = plan
    return plan


@functools.cache
def _num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 0 elsewhere (the interpreter)."""
    if device.type != "cuda":
        return 0
    return torch.cuda.get_device_properties(device).multi_processor_count


def _num_splits(
    max_len: int, programs: int, config: DecodeConfig, num_sms: int = 0
) -> tuple[int, int]:
    """(partition, num_splits) for decode contexts of up to `max_len` tokens.

    Contexts are cut every `config.partition` tokens, but into no more splits than it takes to
    give each of `num_sms` SMs `config.programs_per_sm` programs (`programs` = decodes x KV heads
    without splitting), and at most `config.max_splits`; the partition grows by whole tiles.
    """
    splits = -(-max_len // config.partition)
    if num_sms and config.programs_per_sm:
        splits = min(splits, -(-num_sms * config.programs_per_sm // programs))
    splits = max(1, min(splits, config.max_splits))
    per_split = -(-max_len // splits)
    partition = -(-per_split // config.block_n) * config.block_n
    return partition, -(-max_len // partition)


def decode_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    config: DecodeConfig | None = None,
    plan: _Plan | None = None,
) -> torch.Tensor:
    """Attention for the decode rows (q_len == 1) of `meta`'s batch; other rows are left as is.

    The context of each decode is cut into partitions (see `_num_splits`); a single partition
    writes the output directly, several are merged by a second kernel (flash-decoding). The
    number of partitions follows the batch and the GPU, so a decode's bits depend on what else
    is batched: `paged_attention` takes this path only with `BATCH_INVARIANT` off.

    Args:
        query, kv_cache, meta, scale: as in `paged_attention`.
        out: [T, H, D] output to fill (allocated in the cache dtype when None).
        config: tiling (default: `tiling(kv_cache.dtype)`; tests use small partitions to exercise
            the split path).
        plan: the step's plan (derived from `meta` when None).

    Returns:
        `out`.
    """
    _check_device(query)
    if out is None:
        out = torch.empty(query.shape, dtype=kv_cache.dtype, device=query.device)
    if config is None:
        config = tiling(kv_cache.dtype)[0]
    if plan is None:
        plan = _plan(meta)
    if plan.num_decodes == 0:
        return out
    num_seqs = meta.num_seqs
    _, _, block_size, kv_heads, head_dim = kv_cache.shape
    num_heads = query.shape[1]
    group = num_heads // kv_heads
    programs = plan.num_decodes * kv_heads
    partition, splits = _num_splits(plan.max_decode_len, programs, config, _num_sms(query.device))
    split = splits > 1
    part_out = part_lse = out  # placeholders: the kernel does not touch them without SPLIT
    if split:
        part_lse = torch.empty(num_seqs, num_heads, splits, dtype=torch.float32, device=out.device)
        part_out = torch.empty(
            num_seqs, num_heads, splits, head_dim, dtype=torch.float32, device=out.device
        )
    block_d = _pow2(head_dim, 16)
    _k._decode_kernel[(num_seqs, kv_heads, splits)](
        out,
        part_out,
        part_lse,
        query,
        kv_cache,
        meta.block_tables,
        meta.seq_lens,
        meta.query_start_loc,
        scale * _k.LOG2E,
        splits,
        partition,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        *_cache_strides(kv_cache),
        meta.block_tables.stride(0),
        NUM_HEADS=num_heads,
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        SPLIT=split,
        BLOCK_G=_pow2(group, 16),
        BLOCK_D=block_d,
        BLOCK_N=config.block_n,
        DOT_F32=_dot_f32(kv_cache.dtype),
        num_warps=config.num_warps,
    )
    if split:
        _k._merge_kernel[(num_seqs, num_heads)](
            out,
            part_out,
            part_lse,
            meta.seq_lens,
            meta.query_start_loc,
            splits,
            partition,
            out.stride(0),
            out.stride(1),
            NUM_HEADS=num_heads,
            HEAD_DIM=head_dim,
            BLOCK_SPLITS=_pow2(splits),
            BLOCK_D=block_d,
        )
    return out


def unified_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    config: UnifiedConfig | None = None,
    decodes: bool = True,
    shared: SharedPrefixPlan | None = None,
) -> torch.Tensor:
    """Causal attention of `meta`'s rows over cached context plus the new tokens, every sequence
    through the same kernel and tiling.

    Args:
        query, kv_cache, meta, scale: as in `paged_attention`.
        out: [T, H, D] output to fill (allocated in the cache dtype when None).
        config: tiling (default: `tiling(kv_cache.dtype)`).
        decodes: also the decode rows (q_len == 1); False leaves them as they are in `out`.
        shared: what `shared_prefix_attention` (with the same config) did for this layer: its
            decodes go on from their groups' state instead of key 0.

    Returns:
        `out`.
    """
    _check_device(query)
    if out is None:
        out = torch.empty(query.shape, dtype=kv_cache.dtype, device=query.device)
    if config is None:
        config = tiling(kv_cache.dtype)[1]
    _, _, block_size, kv_heads, head_dim = kv_cache.shape
    group = query.shape[1] // kv_heads
    block_q = config.block_q(group)
    tiles = _plan(meta).tiles_for(meta, block_q, decodes)
    num_tiles = tiles.shape[1]
    if num_tiles == 0:
        return out
    state = shared.state if shared is not None else None
    _k._unified_kernel[(num_tiles, kv_heads)](
        out,
        query,
        kv_cache,
        meta.block_tables,
        meta.seq_lens,
        meta.query_start_loc,
        tiles,
        out if state is None else state,  # placeholders: not read without RESUME
        tiles if shared is None else shared.resume,
        num_tiles,
        scale * _k.LOG2E,
        0 if state is None else state.stride(0),
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        *_cache_strides(kv_cache),
        meta.block_tables.stride(0),
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_M=config.block_m,
        BLOCK_Q=block_q,
        BLOCK_D=_pow2(head_dim, 16),
        BLOCK_N=config.block_n,
        DOT_F32=_dot_f32(kv_cache.dtype),
        RESUME=state is not None,
        num_warps=config.num_warps,
    )
    return out


def merge_partitions_reference(
    part_out: torch.Tensor, part_lse: torch.Tensor, used: torch.Tensor
) -> torch.Tensor:
    """PyTorch twin of `_merge_kernel`: softmax-weighted sum of split outputs.

    Args:
        part_out: [S, H, splits, D] each split's normalized output.
        part_lse: [S, H, splits] each split's log2-sum-exp of its (log2-domain) scores.
        used: [S] number of leading splits that held tokens for each sequence.

    Returns:
        [S, H, D] float32.
    """
    splits = part_lse.shape[-1]
    unused = torch.arange(splits, device=used.device) >= used[:, None]  # [S, splits]
    lse = part_lse.float().masked_fill(unused[:, None, :], float("-inf"))
    weight = torch.softmax(lse * math.log(2.0), dim=-1)  # 2^lse, normalized
    return (weight[..., None] * part_out.float().nan_to_num()).sum(dim=2)
