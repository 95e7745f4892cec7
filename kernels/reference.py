"""PyTorch reference attention over a paged KV cache: the oracle for the other backends.

Shapes used throughout (one layer):

    T          new tokens in the step (all sequences, flattened)
    H / KVH    query heads / key-value heads, H = KVH * G (grouped-query attention)
    D          head_dim
    kv_cache   [2, num_blocks, block_size, KVH, D]   index 0 = K, 1 = V

Attention matmuls run in the cache dtype with queries grouped per KV head (no repeated K/V), and the
softmax runs in float32. The CPU default (`kernels.cpu_attention`) is faster: a C++ kernel for
decodes (this gathers every context into a copy in every layer) and a C++ prefill kernel (SDPA where
that kernel does not apply).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.metadata import AttentionMetadata


def write_kv(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store the new tokens' keys and values into their cache slots, in place.

    Args:
        key, value: [T, KVH, D] for the T new tokens.
        kv_cache: [2, num_blocks, block_size, KVH, D] for one layer (any strides).
        slot_mapping: [T] int64, `block_id * block_size + offset` of each token; a negative
            slot is skipped (as the Triton kernel does).
    """
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        slot_mapping, key, value = slot_mapping[valid], key[valid], value[valid]
    block_size = kv_cache.shape[2]
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    kv_cache[0, blocks, offsets] = key.to(kv_cache.dtype)
    kv_cache[1, blocks, offsets] = value.to(kv_cache.dtype)


def paged_attention(
    query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Causal attention of every new token over its sequence's paged context.

    `write_kv` must already have stored this step's keys and values. Decodes (q_len == 1) run as
    one batched matmul; prefills and chunked prefills run one sequence at a time.

    Args:
        query: [T, H, D] for the flattened batch described by `meta`.
        kv_cache: [2, num_blocks, block_size, KVH, D] for one layer.
        meta: the step's batch layout (query ranges, context lengths, block tables).
        scale: softmax scale, usually D ** -0.5.

    Returns:
        [T, H, D] attention output in the cache dtype.
    """
    query = query.to(kv_cache.dtype)
    plan = step_plan(meta, kv_cache)
    decode = plan.decode
    if decode is not None and decode.rows is None:  # all decodes: no scatter into an output
        return _decode_attention(query, kv_cache, decode, scale)
    out = torch.empty_like(query)
    if decode is not None:
        out[decode.rows] = _decode_attention(query[decode.rows], kv_cache, decode, scale)
    prefill_attention(query, kv_cache, meta, scale, out)
    return out


def prefill_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    out: torch.Tensor,
) -> None:
    """Write the output rows of the step's prefills (q_len > 1) into `out`, in place.

    Decode rows of `out` are left untouched, for a backend that computes them another way.

    Args:
        query: [T, H, D] in the cache dtype; out: [T, H, D] the same.
        kv_cache, meta, scale: as for `paged_attention`.
    """
    for p in step_plan(meta, kv_cache).prefills:
        out[p.start : p.end] = _prefill_attention(query[p.start : p.end], kv_cache, p, scale)


@dataclass(slots=True)
class _DecodePlan:
    """Every q_len == 1 sequence of a step, attended in one batch of S_d sequences."""

    rows: torch.Tensor | None  # [S_d] their query rows; None when every row is a decode
    blocks: torch.Tensor  # [S_d * n] int64 block ids, row-major; n = blocks of the longest context
    pad: torch.Tensor  # [S_d, 1, 1, n * block_size] True past each sequence's length


@dataclass(slots=True)
class _PrefillPlan:
    """One sequence with q_len > 1 (a prefill or a chunk of one)."""

    start: int  # query rows start:end
    end: int
    seq_len: int
    blocks: torch.Tensor  # [n] int64 block ids covering seq_len
    future: torch.Tensor  # [Q, seq_len] True where the key comes after the query's position


@dataclass(slots=True)
class _StepPlan:
    decode: _DecodePlan | None
    prefills: list[_PrefillPlan]


def step_plan(meta: AttentionMetadata, kv_cache: torch.Tensor) -> _StepPlan:
    """The step's plan, made by the first layer and reused by the others."""
    plan = meta.derived.get("torch")
    if plan is None:
        plan = meta.derived["torch"] = _make_plan(meta, kv_cache.shape[2], kv_cache.device)
    return plan


def _make_plan(meta: AttentionMetadata, block_size: int, device: torch.device) -> _StepPlan:
    starts, seq_lens = meta.query_start_loc_list, meta.seq_lens_list
    tables = meta.block_tables.to(device=device, dtype=torch.int64)
    decodes = [s for s in range(meta.num_seqs) if starts[s + 1] - starts[s] == 1]
    decode = None
    if decodes:
        lens = [seq_lens[s] for s in decodes]
        num_blocks = -(-max(lens) // block_size)
        all_rows = len(decodes) == meta.num_tokens
        positions = torch.arange(num_blocks * block_size, device=device)
        pad = positions >= torch.tensor(lens, device=device)[:, None]  # [S_d, L]
        decode = _DecodePlan(
            rows=None if all_rows else torch.tensor([starts[s] for s in decodes], device=device),
            blocks=(tables if all_rows else tables[decodes])[:, :num_blocks].reshape(-1),
            pad=pad[:, None, None, :],
        )
    prefills = []
    for s in range(meta.num_seqs):
        start, end, seq_len = starts[s], starts[s + 1], seq_lens[s]
        if end - start > 1:
            # new token i sits at position seq_len - q_len + i and sees keys 0..that position
            pos = torch.arange(seq_len - (end - start), seq_len, device=device)
            future = torch.arange(seq_len, device=device) > pos[:, None]  # [Q, L]
            blocks = tables[s, : -(-seq_len // block_size)]
            prefills.append(_PrefillPlan(start, end, seq_len, blocks, future))
    return _StepPlan(decode, prefills)


def _decode_attention(
    query: torch.Tensor, kv_cache: torch.Tensor, plan: _DecodePlan, scale: float
) -> torch.Tensor:
    """One new token per sequence: query [S, H, D] -> [S, H, D]."""
    num_seqs, num_heads, head_dim = query.shape
    kv_heads = kv_cache.shape[3]
    group = num_heads // kv_heads
    # Gather whole blocks into a new token-major tensor, [2, S * n, bs, KVH, D] -> [2, S, L, KVH,
    # D] with L = n * bs (padded past each seq_len); the matmuls read K, V through permuted views.
    kv = kv_cache.index_select(1, plan.blocks).reshape(2, num_seqs, -1, kv_heads, head_dim)
    q = query.view(num_seqs, kv_heads, group, head_dim)  # [S, KVH, G, D]
    scores = torch.matmul(q, kv[0].permute(0, 2, 3, 1)).float()  # [S, KVH, G, L]
    scores.mul_(scale).masked_fill_(plan.pad, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(query.dtype)
    out = torch.matmul(probs, kv[1].transpose(1, 2))  # [S, KVH, G, D]
    return out.reshape(num_seqs, num_heads, head_dim)


def _prefill_attention(
    query: torch.Tensor, kv_cache: torch.Tensor, plan: _PrefillPlan, scale: float
) -> torch.Tensor:
    """One sequence's q_len new tokens over its whole context: query [Q, H, D] -> [Q, H, D]."""
    q_len, num_heads, head_dim = query.shape
    kv_heads = kv_cache.shape[3]
    group = num_heads // kv_heads
    # [2, n, bs, KVH, D] -> K, V as [KVH, L, D], L = seq_len
    kv = kv_cache.index_select(1, plan.blocks).reshape(2, -1, kv_heads, head_dim)[:, : plan.seq_len]
    kv = kv.transpose(1, 2)
    # [Q, KVH, G, D] -> [KVH, G*Q, D]: the group's queries share one matmul against their K
    q = query.view(q_len, kv_heads, group, head_dim).permute(1, 2, 0, 3)
    q = q.reshape(kv_heads, group * q_len, head_dim)
    scores = torch.matmul(q, kv[0].transpose(-1, -2)).float()  # [KVH, G*Q, L]
    scores = scores.view(kv_heads, group, q_len, plan.seq_len)
    scores.mul_(scale).masked_fill_(plan.future, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(query.dtype).view(kv_heads, group * q_len, -1)
    out = torch.matmul(probs, kv[1])  # [KVH, G*Q, D]
    out = out.view(kv_heads, group, q_len, head_dim).permute(2, 0, 1, 3)  # [Q, KVH, G, D]
    return out.reshape(q_len, num_heads, head_dim)
