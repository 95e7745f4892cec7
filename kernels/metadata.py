"""Plain description of one step's attention work, shared by every backend."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


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
    # What a backend derives from the above once per step (index tensors, masks) and reuses in
    # every layer, keyed by backend name.
    derived: dict[str, Any] = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_list)

    @property
    def num_tokens(self) -> int:
        return self.query_start_loc_list[-1]
