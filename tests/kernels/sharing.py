"""Steps of decodes that share leading blocks, for the grouped-attention tests of every backend
(`test_grouped` for the C++ prefill kernel, `test_triton` for `_shared_prefix_kernel`)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from kernels import AttentionMetadata
from kernels.metadata import PrefixGroups, prefix_groups
from tests.helpers import make_attention_metadata

KV_HEADS = 3


@dataclass
class Step:
    query: torch.Tensor  # [T, H, D]
    cache: torch.Tensor  # [2, num_blocks, block_size, KVH, D]
    meta: AttentionMetadata
    tables: list[list[int]]
    q_lens: list[int]


def shared_step(
    groups: list[tuple[int, list[int]]],
    others: list[tuple[int, int]],
    block_size: int,
    group: int,
    dtype: torch.dtype,
    head_dim: int = 64,
    seed: int = 0,
) -> Step:
    """A step of decodes in groups, each group's first `prefix` tokens in the same blocks
    (its whole blocks: the rest of a partly filled one is each member's own copy), each member
    with `tail` tokens of its own before its new one; and `others`, (seq_len, q_len) sequences
    of their own blocks (prefills, chunks, lone decodes). Sequences in a shuffled order, blocks
    from a shuffled pool (block 0 is never used: tables are padded with it); unused slots hold
    1e4, so reading one shows."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    lens = [prefix + tail + 1 for prefix, tails in groups for tail in tails] + [
        n for n, _ in others
    ]
    pool = list(range(1, sum(-(-n // block_size) for n in lens) + 1))
    rng.shuffle(pool)
    seqs: list[tuple[list[int], int, int, torch.Tensor]] = []  # table, seq_len, q_len, kv
    for prefix, tails in groups:
        whole = prefix // block_size
        blocks = [pool.pop() for _ in range(whole)]
        common = torch.randn(2, whole * block_size, KV_HEADS, head_dim, generator=gen)
        for tail in tails:
            n = prefix + tail + 1
            own = torch.randn(2, n - whole * block_size, KV_HEADS, head_dim, generator=gen)
            table = blocks + [pool.pop() for _ in range(-(-n // block_size) - whole)]
            seqs.append((table, n, 1, torch.cat([common, own], dim=1)))
    for n, q in others:
        table = [pool.pop() for _ in range(-(-n // block_size))]
        seqs.append((table, n, q, torch.randn(2, n, KV_HEADS, head_dim, generator=gen)))
    rng.shuffle(seqs)
    num_blocks = max(b for table, *_ in seqs for b in table) + 1
    cache = torch.full((2, num_blocks * block_size, KV_HEADS, head_dim), 1e4)
    pos = [torch.arange(n) for _, n, _, _ in seqs]
    slots = [torch.tensor(seq[0])[p // block_size] * block_size + p % block_size
             for seq, p in zip(seqs, pos, strict=True)]  # fmt: skip
    cache[:, torch.cat(slots)] = torch.cat([kv for *_, kv in seqs], dim=1)
    cache = cache.view(2, num_blocks, block_size, KV_HEADS, head_dim)
    tables = [table for table, *_ in seqs]
    q_lens = [q for _, _, q, _ in seqs]
    meta = make_attention_metadata(tables, [n for _, n, _, _ in seqs], q_lens, block_size)
    query = torch.randn(sum(q_lens), KV_HEADS * group, head_dim, generator=gen)
    return Step(query.to(dtype), cache.to(dtype), meta, tables, q_lens)


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int16 if x.dtype == torch.bfloat16 else torch.int32)


def found(step: Step) -> PrefixGroups:
    groups = prefix_groups(step.tables, step.q_lens, step.meta.seq_lens_list, step.cache.shape[2])
    assert groups is not None
    return groups


def random_groups(rng: random.Random, count: int) -> list[tuple[int, list[int]]]:
    """`count` groups: prefixes of 64-300 tokens (runs ending mid-block and mid-64-key block),
    1-25 members with tails of 0-80 tokens."""
    return [
        (rng.randint(64, 300), [rng.randint(0, 80) for _ in range(rng.randint(1, 25))])
        for _ in range(count)
    ]
