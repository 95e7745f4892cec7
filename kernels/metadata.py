"""Plain description of one step's attention work, shared by every backend.

Decodes whose block tables start with the same block ids (a shared system prompt, the forks of
n > 1) read the same keys there: `prefix_groups` finds them, for kernels that attend such a group's
shared keys once for all its queries (`PrefixGroups`; the CPU prefill kernel does).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

# Keys per block of the CPU prefill kernel (kKeys in csrc/prefill_attention.cpp), aligned to
# position 0: a group shares a whole number of them, so each key stays in the block it would be in
# without grouping (the kernel's output does not change).
KEY_BLOCK = 64


@dataclass(frozen=True, slots=True)
class PrefixGroups:
    """Decodes of a step whose first keys are the same cache rows (identical block ids)."""

    group_of: torch.Tensor  # [S] int32: each sequence's group, -1 for none
    shared_keys: torch.Tensor  # [num_groups] int32: the keys (a multiple of KEY_BLOCK) it shares


def prefix_groups(
    tables: Sequence[list[int]],
    query_lens: Sequence[int],
    seq_lens: Sequence[int],
    block_size: int,
) -> PrefixGroups | None:
    """The step's decodes (query length 1) grouped by shared leading blocks, or None when no two
    share a whole `KEY_BLOCK` of keys (then grouping saves nothing).

    Groups are picked to save the most key reads, (members - 1) x shared keys summed: decodes of
    one tenant's prompt beside another's, both after a prefix common to all, make two groups on
    the longer prefixes rather than one on the common one.

    Args:
        tables: each sequence's block ids (at least its seq_len's worth).
        query_lens, seq_lens: each sequence's new tokens and its length after the step.
        block_size: tokens per block.
    """
    firsts: dict[int, list[int]] = {}
    for s, (table, q_len) in enumerate(zip(tables, query_lens, strict=True)):
        if q_len == 1 and seq_lens[s] >= KEY_BLOCK:
            firsts.setdefault(table[0], []).append(s)
    found: list[tuple[list[int], int]] = []
    for members in firsts.values():
        if len(members) > 1:
            found += _best_groups(tables, seq_lens, block_size, members, 1)
    if not found:
        return None
    group_of = [-1] * len(tables)
    for g, (members, _) in enumerate(found):
        for s in members:
            group_of[s] = g
    return PrefixGroups(
        torch.tensor(group_of, dtype=torch.int32),
        torch.tensor([shared for _, shared in found], dtype=torch.int32),
    )


def _best_groups(
    tables: Sequence[list[int]],
    seq_lens: Sequence[int],
    block_size: int,
    members: list[int],
    known: int,
) -> list[tuple[list[int], int]]:
    """(members, shared keys) groups among `members` (>= 2, whose first `known` blocks are the
    same): all of them on their common blocks, or groups split at the first block where they
    differ, whichever saves more."""
    rows = [tables[s] for s in members]
    lo, hi = min(rows), max(rows)  # the common prefix of all is that of the extremes
    # blocks past a sequence's length are not its keys
    limit = min(min(seq_lens[s] for s in members) + block_size - 1, len(lo) * block_size)
    limit = min(limit // block_size, len(hi))
    n = known
    while n < limit and lo[n] == hi[n]:
        n += 1
    shared = min(n * block_size, *(seq_lens[s] for s in members)) // KEY_BLOCK * KEY_BLOCK
    whole = [(members, shared)] if shared > 0 else []
    if n >= limit:
        return whole
    by_next: dict[int, list[int]] = {}
    for s in members:
        if len(tables[s]) > n and seq_lens[s] > n * block_size:
            by_next.setdefault(tables[s][n], []).append(s)
    split = [
        group
        for sub in by_next.values()
        if len(sub) > 1
        for group in _best_groups(tables, seq_lens, block_size, sub, n + 1)
    ]
    return split if _saved(split) > _saved(whole) else whole


def _saved(groups: list[tuple[list[int], int]]) -> int:
    return sum((len(members) - 1) * shared for members, shared in groups)


@dataclass(slots=True)
class AttentionMetadata:
    """One engine step's flattened batch of sequences.

    The batch is T new tokens from S sequences, laid out sequence after sequence. Sequence s owns
    query rows `query_start_loc[s] : query_start_loc[s + 1]`; its context after this step is
    `seq_lens[s]` tokens, the last `q_len` of which are the new ones:

        |<------------------ seq_lens[s] ------------------>|
        | cached context (already in the paged KV cache)  | new tokens (q_len) |
                                                          ^ positions seq_lens[s]-q_len .. -1

    A decode is a sequence with q_len == 1. `write_kv` stores the new tokens' K/V first, so
    attention reads every key (cached and new) from the paged cache through `block_tables`.
    """

    slot_mapping: torch.Tensor  # [T] int64: block_id * block_size + offset of each new token
    query_start_loc: torch.Tensor  # [S + 1] int32: prefix sums of the query lengths
    seq_lens: torch.Tensor  # [S] int32: context length after this step (cached + new)
    block_tables: torch.Tensor  # [S, max_blocks_per_seq] int32, padded with 0
    max_query_len: int
    max_seq_len: int
    # The same numbers as Python lists, for backends that loop over sequences on the host.
    query_start_loc_list: list[int]
    seq_lens_list: list[int]
    # Decodes sharing leading blocks (`prefix_groups`); None: no grouping
    prefix_groups: PrefixGroups | None = None
    # What a backend derives from the above once per step (index tensors, masks) and reuses in
    # every layer, keyed by backend name.
    derived: dict[str, Any] = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_list)

    @property
    def num_tokens(self) -> int:
        return self.query_start_loc_list[-1]
