"""Block manager: allocation, prefix caching, LRU revival, fork/CoW, namespaces, no leaks."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from engine.block_manager import BlockManager, hash_block


def test_imports_without_torch() -> None:
    code = (
        "import sys, engine.block_manager, engine.scheduler, engine.request, engine.policy;"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_hash_is_stable_and_namespaced() -> None:
    h = hash_block(None, [1, 2, 3, 4], None)
    assert h == hash_block(None, [1, 2, 3, 4], None)
    assert h.hex() == hash_block(None, [1, 2, 3, 4], "").hex()
    assert h != hash_block(None, [1, 2, 3, 4], "tenant-a")
    assert hash_block(h, [5], None) != hash_block(None, [5], None)


def test_prefix_hit_and_cached_token_count() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    tokens = list(range(10))
    assert bm.allocate(1, tokens, 10) == 0
    # Same first 8 tokens: two full blocks hit; the partial third block is never shared.
    assert bm.allocate(2, [*tokens[:8], 99, 98], 10) == 8
    assert bm.block_ids(2)[:2] == bm.block_ids(1)[:2]
    assert bm.block_ids(2)[2] != bm.block_ids(1)[2]
    assert bm.blocks[bm.block_ids(1)[0]].ref_cnt == 2
    stats = bm.stats()
    assert (stats.prefix_queries_tokens, stats.prefix_hits_tokens) == (20, 8)


def test_fully_cached_prompt_leaves_last_block_to_compute() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.allocate(1, list(range(8)), 8)
    assert bm.allocate(2, list(range(8)), 8) == 4


def test_namespaces_never_share() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.allocate(1, list(range(9)), 9, namespace="a")
    assert bm.allocate(2, list(range(9)), 9, namespace="b") == 0
    assert bm.allocate(3, list(range(9)), 9, namespace="a") == 8
    assert set(bm.block_ids(1)).isdisjoint(bm.block_ids(2))


def test_freed_blocks_stay_revivable_until_reused() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.allocate(1, list(range(9)), 9)  # 3 blocks, 2 full and cached
    bm.free(1)
    assert bm.num_free_blocks == 4
    assert bm.allocate(2, list(range(9)), 9) == 8  # revived from the free queue
    bm.free(2)
    bm.allocate(3, [50 + i for i in range(16)], 16)  # takes all 4 blocks: evicts the cached ones
    bm.free(3)
    assert bm.allocate(4, list(range(9)), 9) == 0
    assert bm.stats().evictions >= 2


def test_lru_evicts_tail_blocks_first() -> None:
    bm = BlockManager(num_blocks=6, block_size=2)
    bm.allocate(1, [1, 2, 3, 4, 5, 6, 7], 7)  # 4 blocks, 3 cached
    bm.free(1)
    # Uncached (partial) block first, then the sequence's cached blocks tail first.
    order = [b.block_id for b in bm.free_queue]
    ids = [0, 1, 2, 3]  # allocation order of seq 1's blocks (fresh pool pops 0, 1, 2, 3)
    assert order[-3:] == [ids[2], ids[1], ids[0]]
    bm.allocate(2, [9, 9, 9, 9, 9, 9, 9], 7)  # needs 4 blocks: 2 never-used + partial + 1 evicted
    bm.free(2)
    assert bm.allocate(3, [1, 2, 3, 4, 5], 5) == 4  # the two leading blocks survived


def test_fork_shares_and_copies_partial_block_on_write() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    tokens = list(range(6))
    bm.allocate(1, tokens, 6)
    bm.fork(1, 2)
    assert bm.block_ids(1) == bm.block_ids(2)
    shared_last = bm.block_ids(1)[1]
    assert bm.blocks[shared_last].ref_cnt == 2
    copies = bm.append_slots(2, [*tokens, 7], 6, 1)
    assert copies is not None and len(copies) == 1 and copies[0][0] == shared_last
    assert bm.block_ids(2)[1] == copies[0][1]
    assert bm.blocks[shared_last].ref_cnt == 1
    assert bm.append_slots(1, [*tokens, 8], 6, 1) == []  # sole owner now: no copy


def test_out_of_blocks_changes_nothing() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    assert bm.allocate(1, list(range(8)), 8) == 0
    assert bm.allocate(2, [7, 7, 7], 3) is None
    assert bm.append_slots(1, list(range(9)), 8, 1) is None
    assert bm.num_free_blocks == 0 and len(bm.block_ids(1)) == 2


def test_double_release_is_refused() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    bm.allocate(1, [1, 2], 2)
    block = bm.blocks[bm.block_ids(1)[0]]
    bm.free(1)
    with pytest.raises(AssertionError):
        bm._release(block)


class BlockManagerMachine(RuleBasedStateMachine):
    """Random allocate/append/fork/free/abort sequences against a model of the KV contents.

    The model writes each computed token into its slot, as the runner would, and copies blocks as
    copy-on-write asks. Every sequence must always read back exactly its own tokens, which proves
    cache hits happen only on identical (namespace, tokens) chains.
    """

    BS = 4
    NB = 12

    def __init__(self) -> None:
        super().__init__()
        self.bm = BlockManager(self.NB, self.BS)
        self.slots: dict[int, list[int | None]] = {i: [None] * self.BS for i in range(self.NB)}
        self.seqs: dict[int, tuple[str, list[int], int]] = {}  # id -> (ns, tokens, computed)
        self.next_id = 0

    def _write(self, seq_id: int, tokens: list[int], start: int, end: int) -> None:
        table = self.bm.block_ids(seq_id)
        for pos in range(start, end):
            self.slots[table[pos // self.BS]][pos % self.BS] = tokens[pos]

    @rule(
        tokens=st.lists(st.integers(0, 2), min_size=1, max_size=24),
        ns=st.sampled_from(["a", "b"]),
        chunk=st.integers(1, 24),
    )
    def allocate(self, tokens: list[int], ns: str, chunk: int) -> None:
        seq_id = self.next_id
        self.next_id += 1
        cached = self.bm.allocate(seq_id, tokens, chunk, namespace=ns)
        if cached is None:
            return
        assert cached % self.BS == 0 and cached < len(tokens)
        computed = cached + min(chunk, len(tokens) - cached)
        self._write(seq_id, tokens, cached, computed)
        self.seqs[seq_id] = (ns, list(tokens), computed)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), token=st.integers(0, 2))
    def append(self, data: st.DataObject, token: int) -> None:
        seq_id = data.draw(st.sampled_from(sorted(self.seqs)))
        ns, tokens, computed = self.seqs[seq_id]
        if computed == len(tokens):
            tokens = [*tokens, token]
        copies = self.bm.append_slots(seq_id, tokens, computed, len(tokens) - computed)
        if copies is None:
            return
        for src, dst in copies:
            self.slots[dst] = list(self.slots[src])
        self._write(seq_id, tokens, computed, len(tokens))
        self.seqs[seq_id] = (ns, tokens, len(tokens))

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        parent = data.draw(st.sampled_from(sorted(self.seqs)))
        child = self.next_id
        self.next_id += 1
        self.bm.fork(parent, child)
        ns, tokens, computed = self.seqs[parent]
        self.seqs[child] = (ns, list(tokens), computed)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:  # finish, abort and preemption all free
        seq_id = data.draw(st.sampled_from(sorted(self.seqs)))
        self.bm.free(seq_id)
        del self.seqs[seq_id]

    @invariant()
    def ref_counts_match_holders(self) -> None:
        held: dict[int, int] = {}
        for seq_id in self.seqs:
            for b in self.bm.block_ids(seq_id):
                held[b] = held.get(b, 0) + 1
        for block in self.bm.blocks:
            assert block.ref_cnt >= 0
            assert block.ref_cnt == held.get(block.block_id, 0)
        free = {b.block_id for b in self.bm.free_queue}
        assert free == {b.block_id for b in self.bm.blocks if b.ref_cnt == 0}
        assert self.bm.num_free_blocks == len(free)

    @invariant()
    def every_sequence_reads_its_own_tokens(self) -> None:
        for seq_id, (_, tokens, computed) in self.seqs.items():
            table = self.bm.block_ids(seq_id)
            got = [self.slots[table[p // self.BS]][p % self.BS] for p in range(computed)]
            assert got == tokens[:computed]

    @invariant()
    def cached_blocks_hold_their_content(self) -> None:
        for h, block in self.bm.cached.items():
            assert block.block_hash == h

    def teardown(self) -> None:
        for seq_id in list(self.seqs):
            self.bm.free(seq_id)
        assert self.bm.num_free_blocks == self.NB
        assert all(b.ref_cnt == 0 for b in self.bm.blocks)
        assert sum(self.bm.tenant_blocks.values()) == 0


BlockManagerMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None
)
TestBlockManagerMachine = BlockManagerMachine.TestCase
