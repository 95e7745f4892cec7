"""PyTorch reference attention over a paged KV cache: the CPU path, and the oracle for others.

Shapes used throughout (one layer):

    T          new tokens in the step (all sequences, flattened)
    H / KVH    query heads / key-value heads, H = KVH * G (grouped-query attention)
    D          head_dim
    kv_cache   [2, num_blocks, block_size, KVH, D]   index 0 = K, 1 = V

Attention matmuls run in the cache dtype with queries grouped per KV head (no repeated K/V), and the
softmax runs in float32. On CPU this is much faster in bfloat16 than `scaled_dot_product_attention`.
"""

from __future__ import annotations

import torch

from kernels.metadata import AttentionMetadata


def write_kv(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store the new tokens' keys and values into their cache slots, in place.

    Args:
        key, value: [T, KVH, D] for the T new tokens.
        kv_cache: [2, num_blocks, block_size, KVH, D] for one layer (contiguous).
        slot_mapping: [T] int64, `block_id * block_size + offset` of each token.
    """
    kv_heads, head_dim = kv_cache.shape[-2:]
    kv_cache[0].view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, key.to(kv_cache.dtype))
    kv_cache[1].view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, value.to(kv_cache.dtype))


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
        [T, H, D] attention output in the query's dtype.
    """
    query = query.to(kv_cache.dtype)
    starts = meta.query_start_loc_list
    seq_lens = meta.seq_lens_list
    if meta.max_query_len == 1:  # all decodes: a single batched call, no copies of the output
        return _decode_attention(query, kv_cache, meta.block_tables, seq_lens, scale)
    out = torch.empty_like(query)
    decodes = [s for s in range(meta.num_seqs) if starts[s + 1] - starts[s] == 1]
    if decodes:
        rows = torch.tensor([starts[s] for s in decodes], device=query.device)
        out[rows] = _decode_attention(
            query[rows], kv_cache, meta.block_tables[decodes], [seq_lens[s] for s in decodes], scale
        )
    for s in range(meta.num_seqs):
        start, end = starts[s], starts[s + 1]
        if end - start > 1:
            out[start:end] = _prefill_attention(
                query[start:end], kv_cache, meta.block_tables[s], seq_lens[s], scale
            )
    return out


def _decode_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: list[int],
    scale: float,
) -> torch.Tensor:
    """One new token per sequence. query [S, H, D], block_tables [S, >=blocks] -> [S, H, D]."""
    num_seqs, num_heads, head_dim = query.shape
    block_size, kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = num_heads // kv_heads
    max_len = max(seq_lens)
    num_blocks = -(-max_len // block_size)
    # [2, S, n, bs, KVH, D] -> K, V as [S, KVH, L, D] with L = n * bs (padded past each seq_len)
    kv = kv_cache[:, block_tables[:, :num_blocks].long()]
    kv = kv.view(2, num_seqs, num_blocks * block_size, kv_heads, head_dim).transpose(2, 3)
    q = query.view(num_seqs, kv_heads, group, head_dim)  # [S, KVH, G, D]
    scores = torch.matmul(q, kv[0].transpose(-1, -2)).float()  # [S, KVH, G, L]
    lens = torch.tensor(seq_lens, device=query.device)
    pad = torch.arange(num_blocks * block_size, device=query.device) >= lens[:, None]  # [S, L]
    scores.mul_(scale).masked_fill_(pad[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(query.dtype)
    return torch.matmul(probs, kv[1]).view(num_seqs, num_heads, head_dim)  # [S, KVH, G, D]


def _prefill_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_len: int,
    scale: float,
) -> torch.Tensor:
    """One sequence's q_len new tokens over its whole context. query [Q, H, D] -> [Q, H, D]."""
    q_len, num_heads, head_dim = query.shape
    block_size, kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = num_heads // kv_heads
    num_blocks = -(-seq_len // block_size)
    # [2, n, bs, KVH, D] -> K, V as [KVH, L, D], L = seq_len
    kv = kv_cache[:, block_table[:num_blocks].long()].view(2, -1, kv_heads, head_dim)
    kv = kv[:, :seq_len].transpose(1, 2)
    # [Q, KVH, G, D] -> [KVH, G*Q, D]: the group's queries share one matmul against their K
    q = query.view(q_len, kv_heads, group, head_dim).permute(1, 2, 0, 3)
    q = q.reshape(kv_heads, group * q_len, head_dim)
    scores = torch.matmul(q, kv[0].transpose(-1, -2)).float()  # [KVH, G*Q, L]
    # new token i sits at position seq_len - q_len + i and sees keys 0..that position
    pos = torch.arange(seq_len - q_len, seq_len, device=query.device)
    future = torch.arange(seq_len, device=query.device) > pos[:, None]  # [Q, L]
    scores.mul_(scale).masked_fill_(future.repeat(group, 1), float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(query.dtype)
    out = torch.matmul(probs, kv[1])  # [KVH, G*Q, D]
    out = out.view(kv_heads, group, q_len, head_dim).permute(2, 0, 1, 3)  # [Q, KVH, G, D]
    return out.reshape(q_len, num_heads, head_dim)
