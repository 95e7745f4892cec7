"""Block manager: allocation, prefix caching, LRU revival, fork/CoW, namespaces, pins, no leaks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from engine.block_manager import PUBLIC_NAMESPACE, BlockManager, PinSpec, hash_block
from engine.errors import PinRefusedError


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


def test_public_prefix_blocks_are_shared_and_what_follows_is_not() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    public, tail = list(range(8)), [50, 51, 52, 53, 54]
    bm.allocate(1, [*public, 9], 9, namespace=PUBLIC_NAMESPACE)  # the public prefix, warmed
    assert bm.allocate(2, [*public, *tail], 13, namespace="a", shared_blocks=2) == 8
    assert bm.allocate(3, [*public, *tail], 13, namespace="b", shared_blocks=2) == 8
    assert bm.block_ids(2)[:2] == bm.block_ids(3)[:2] == bm.block_ids(1)[:2]
    assert bm.block_ids(2)[2] != bm.block_ids(3)[2]  # the tenant's own block after it
    assert bm.allocate(4, [*public, *tail], 13, namespace="a", shared_blocks=2) == 12
    assert bm.allocate(5, [*public, 9], 9, namespace="b") == 0  # not public: no hit


def test_freed_blocks_stay_revivable_until_reused() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.allocate(1, list(range(9)), 9)  # 3 blocks, 2 full and cached
    bm.free(1)
    assert bm.num_free_blocks == 4
    assert bm.allocate(2, list(range(9)), 9) == 8  # revived from the free queue
    bm.free(2)
    assert bm.stats().evictions == 0  # the revived blocks kept their content
    bm.allocate(3, [50 + i for i in range(16)], 16)  # takes all 4 blocks: evicts the cached ones
    assert bm.stats().evictions == 2
    bm.free(3)
    assert bm.allocate(4, list(range(9)), 9) == 0
    assert bm.stats().evictions == 5  # and 3 of seq 3's 4 cached blocks


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


def test_a_pool_of_one_block_serves() -> None:
    bm = BlockManager(num_blocks=1, block_size=4, max_pinned_blocks=0)
    assert bm.allocate(1, [1, 2, 3], 3) == 0
    assert bm.append_slots(1, [1, 2, 3, 4], 3, 1) == []


def test_appending_into_the_last_free_block_fits() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    bm.allocate(1, list(range(4)), 4)
    assert bm.append_slots(1, list(range(5)), 4, 1) == []  # needs 1 block, 1 free
    assert bm.num_free_blocks == 0 and len(bm.block_ids(1)) == 2


def test_a_prefix_hit_stops_at_the_first_miss() -> None:
    """A later block of a chain can stay cached after an earlier one was evicted (its holder has
    a private duplicate of the earlier one); the hit must not skip the gap."""
    bm = BlockManager(num_blocks=8, block_size=4)
    tokens = list(range(8))
    bm.allocate(1, tokens, 2)  # seq 1 is mid-prefill...
    bm.allocate(2, [*tokens[:4], 99], 5)  # ...when seq 2 registers block 0
    bm.append_slots(1, tokens, 2, 6)  # seq 1: a duplicate of block 0, registers block 1
    bm.free(2)
    flood(bm, 10)  # evicts the registered block 0; seq 1 still holds block 1
    assert bm.allocate(3, [*tokens, 9], 9) == 0


def test_reviving_a_hit_counts_against_the_free_blocks() -> None:
    bm = BlockManager(num_blocks=3, block_size=4)
    bm.allocate(1, [0, 1, 2, 3, 4], 5)  # block 0 full and cached, block 1 partial
    bm.free(1)
    bm.allocate(2, [50 + i for i in range(8)], 8)  # takes the two other free blocks
    assert [b.block_id for b in bm.free_queue] == [0]  # only the cached block is free
    # A hit on block 0 (reviving it) plus one new block: two blocks, one free.
    assert bm.allocate(3, [0, 1, 2, 3, 9], 5) is None
    assert bm.num_free_blocks == 1 and 3 not in bm.seqs


def test_usage_is_the_share_of_the_pool_held() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.stats().usage == 0.0
    bm.allocate(1, list(range(6)), 6)
    assert bm.stats().usage == 0.25


def test_a_chunk_inside_the_public_prefix_charges_nothing() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    tokens = [*range(12), 50, 51]  # three public blocks (not cached yet), then the tenant's own
    plan = bm.plan_allocation(tokens, 4, "a", "t", shared_blocks=3)  # a first chunk of 4 tokens
    assert (plan.num_new_blocks, plan.num_charged) == (1, 0)
    bm.commit_allocation(1, plan)
    assert bm.tenant_blocks == {}
    assert bm.append_charge(1, 4, 4) == 0  # the next chunk: still public


def test_cache_hits_count_toward_the_charge_of_the_tenant_taking_them() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    tokens = [*range(12), 50]
    bm.allocate(1, tokens, 13, namespace="n", tenant="x")
    bm.free(1)  # three cached blocks, nobody's now
    # A hit is charged to the tenant that takes it (3 hits and 1 new block), like a new block.
    plan = bm.plan_allocation(tokens, 13, "n", "t")
    assert (len(plan.hits), plan.num_charged) == (3, 4)


@pytest.mark.parametrize("shared_blocks", [0, 2])
def test_a_copy_on_write_counts_toward_the_tenants_charge(shared_blocks: int) -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    tokens = list(range(10))  # blocks 0 and 1 full (public or not), block 2 partial
    bm.allocate(1, tokens, 10, namespace="a", tenant="t", shared_blocks=shared_blocks)
    bm.fork(1, 2)
    own = 3 - shared_blocks
    assert bm.tenant_blocks["t"] == own  # shared by the tenant's two sequences: counted once
    # The child's next token lands in the shared partial block: a private copy, one more block.
    assert bm.append_charge(2, 10, 1) == 1
    assert bm.append_slots(2, [*tokens, 5], 10, 1) == [(bm.block_ids(1)[2], bm.block_ids(2)[2])]
    assert bm.tenant_blocks["t"] == own + 1


def test_a_token_after_a_shared_full_block_is_no_copy() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    bm.allocate(1, [*range(8), 99], 9, tenant="t")
    assert bm.allocate(2, [*range(8), 50], 9, tenant="t") == 8  # blocks 0 and 1 shared
    # Token 9 lands in seq 2's own partial block 2: nothing to copy, no block to add.
    assert bm.append_charge(2, 9, 1) == 0
    assert bm.append_slots(2, [*range(8), 50, 51], 9, 1) == []
    assert bm.tenant_blocks["t"] == 4


def test_append_charge_at_a_block_boundary_past_256_blocks() -> None:
    """Block indices past 256 are not shared int objects: an identity test in place of a
    comparison would index past the block table there."""
    bm = BlockManager(num_blocks=300, block_size=4)
    bm.allocate(1, list(range(1028)), 1028)  # 257 full blocks
    assert bm.append_charge(1, 1028, 1) == 1
    assert bm.append_slots(1, [*range(1028), 5], 1028, 1) == []
    assert len(bm.block_ids(1)) == 258


def test_double_release_is_refused() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    bm.allocate(1, [1, 2], 2)
    block = bm.blocks[bm.block_ids(1)[0]]
    bm.free(1)
    with pytest.raises(AssertionError):
        bm._release(block)


def flood(bm: BlockManager, first_id: int, rounds: int = 4) -> None:
    """Unique prompts that each take the whole free pool, then let go: evicts every free block."""
    for i in range(rounds):
        n = bm.num_free_blocks * bm.block_size
        assert bm.allocate(first_id + i, [1000 + 7 * i + t for t in range(n)], n) == 0
        bm.free(first_id + i)


def pinned_prefix(bm: BlockManager, key: str, tokens: list[int], seq_id: int, **kw: object) -> None:
    """Compute `tokens` as a sequence, pin its full blocks under `key`, let the sequence go."""
    bm.allocate(seq_id, tokens, len(tokens), **kw)  # type: ignore[arg-type]
    bm.pin(seq_id, PinSpec(key, len(tokens) // bm.block_size))
    bm.free(seq_id)


def test_pin_survives_pressure_and_unpinned_prefix_is_evicted() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    pinned, plain = list(range(9)), list(range(50, 59))
    pinned_prefix(bm, "p", pinned, 1)
    bm.allocate(2, plain, 9)
    bm.free(2)
    assert bm.num_pinned_blocks == 2 and bm.num_free_blocks == 6
    flood(bm, 10)
    assert bm.allocate(3, pinned, 9) == 8  # both pinned blocks hit
    assert bm.allocate(4, plain, 9) == 0  # the unpinned one was evicted
    bm.free(3)
    bm.free(4)
    assert bm.unpin("p") and not bm.unpin("p")
    assert bm.num_pinned_blocks == 0 and bm.num_free_blocks == 8
    assert bm.allocate(5, pinned, 9) == 8  # an ordinary cached block again: revivable...
    bm.free(5)
    flood(bm, 20)
    assert bm.allocate(6, pinned, 9) == 0  # ...until evicted


def test_pin_refs_and_per_tenant_accounting() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.allocate(1, list(range(9)), 9, namespace="a", tenant="acme")
    pin = bm.pin(1, PinSpec("acme/sys", 2))
    assert [bm.blocks[b].ref_cnt for b in pin.block_ids] == [2, 2]
    assert [bm.blocks[b].pin_cnt for b in pin.block_ids] == [1, 1]
    bm.free(1)
    assert [bm.blocks[b].ref_cnt for b in pin.block_ids] == [1, 1]
    assert bm.stats().pinned_blocks_by_tenant == {"acme": 2}
    assert bm.tenant_blocks == {}  # sequences' references are counted apart from pins
    bm.unpin("acme/sys")
    assert bm.stats().pinned_blocks_by_tenant == {} and bm.stats().num_pinned_blocks == 0


def test_pin_cap_refuses_and_changes_nothing() -> None:
    bm = BlockManager(num_blocks=8, block_size=4, max_pinned_blocks=3)
    pinned_prefix(bm, "a", list(range(9)), 1)  # 2 blocks
    with pytest.raises(PinRefusedError) as refused:
        bm.check_pin("b", list(range(100, 109)), None)
    assert (refused.value.cap, refused.value.requested) == (3, 4)
    assert "by 1" in refused.value.message
    with pytest.raises(PinRefusedError) as refused:
        bm.check_pin("b", list(range(100, 113)), None)  # 3 more blocks: 5 pinned
    assert refused.value.requested == 5 and "by 2" in refused.value.message
    with pytest.raises(PinRefusedError) as refused:
        bm.check_pin("b", list(range(100, 121)), None)  # 5 more blocks: 7 pinned
    assert refused.value.requested == 7 and "by 4" in refused.value.message
    bm.allocate(2, list(range(100, 109)), 9)
    before = [(b.ref_cnt, b.pin_cnt) for b in bm.blocks]
    with pytest.raises(PinRefusedError):
        bm.pin(2, PinSpec("b", 2))
    assert [(b.ref_cnt, b.pin_cnt) for b in bm.blocks] == before and set(bm.pins) == {"a"}
    bm.pin(2, PinSpec("b", 1))  # one block fits
    with pytest.raises(PinRefusedError) as refused:  # the pool at its cap: one block more
        bm.check_pin("d", list(range(200, 205)), None)
    assert refused.value.requested == 4 and "by 1" in refused.value.message
    # A pin sharing blocks with another adds only its new blocks to the count.
    assert bm.check_pin("c", list(range(4)), None) == 1
    bm.free(2)
    assert bm.num_pinned_blocks == 3


def test_repin_counts_a_block_another_pin_holds_as_staying_pinned() -> None:
    bm = BlockManager(num_blocks=16, block_size=4, max_pinned_blocks=3)
    pinned_prefix(bm, "a", list(range(8)), 1)  # blocks X, Y
    pinned_prefix(bm, "b", list(range(4)), 2)  # X again: 2 distinct pinned blocks
    # Re-pinning b on two new blocks lets go of X, but a still pins it: 4 pinned, over the cap.
    with pytest.raises(PinRefusedError) as refused:
        bm.check_pin("b", list(range(50, 58)), None)
    assert refused.value.requested == 4
    assert bm.check_pin("b", list(range(50, 54)), None) == 1  # one new block fits


def test_repin_extending_its_own_blocks_counts_only_the_new_ones() -> None:
    bm = BlockManager(num_blocks=16, block_size=4, max_pinned_blocks=3)
    pinned_prefix(bm, "a", list(range(8)), 1)  # 2 blocks
    # The same key on 4 blocks, the 2 pinned ones among them: 4 pinned after, over the cap.
    with pytest.raises(PinRefusedError) as refused:
        bm.check_pin("a", list(range(16)), None)
    assert refused.value.requested == 4
    assert bm.check_pin("a", list(range(12)), None) == 3


def test_repin_onto_other_blocks_lets_go_of_its_old_ones_once() -> None:
    bm = BlockManager(num_blocks=16, block_size=4, max_pinned_blocks=3)
    pinned_prefix(bm, "a", list(range(8)), 1)  # 2 blocks
    pinned_prefix(bm, "b", list(range(20, 24)), 2)  # 1 more: 3, the cap
    # a moves to 3 other blocks: 3 - 2 + 3 = 4 pinned after, over the cap.
    with pytest.raises(PinRefusedError) as refused:
        bm.check_pin("a", list(range(50, 62)), None)
    assert refused.value.requested == 4
    assert bm.check_pin("a", list(range(50, 58)), None) == 2


def test_a_pin_of_more_than_256_blocks() -> None:
    bm = BlockManager(num_blocks=600, block_size=4, max_pinned_blocks=300)
    bm.allocate(1, list(range(1029)), 1029)  # 257 full blocks and one token
    assert len(bm.pin(1, PinSpec("p", 257)).block_ids) == 257
    assert bm.num_pinned_blocks == 257


def test_block_hashes_are_stable_across_versions() -> None:
    """The chain is part of the replicas' wire protocol: gateways index the replicas' KV events
    by it and compute requests' chains themselves, so a gateway and a replica of different
    builds must agree (a deliberate change of the hash changes these values)."""
    from engine.block_manager import chain_hashes

    assert [h.hex()[:16] for h in chain_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4, None)] == [
        "1c322dd33278f408", "e09fdf9aba829606"
    ]  # fmt: skip
    assert [h.hex()[:16] for h in chain_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4, "acme", 1)] == [
        "f0d55f4bb7083090", "3dd3ee5f362e52ad"
    ]  # fmt: skip


def test_no_pins_at_all_is_a_valid_cap() -> None:
    bm = BlockManager(num_blocks=8, block_size=4, max_pinned_blocks=0)
    with pytest.raises(PinRefusedError):
        bm.check_pin("p", list(range(8)), None)


def test_default_cap_is_half_the_pool_and_caching_off_pins_nothing() -> None:
    assert BlockManager(num_blocks=9, block_size=4).max_pinned_blocks == 4
    bm = BlockManager(num_blocks=8, block_size=4, enable_caching=False)
    assert bm.max_pinned_blocks == 0  # what /metrics reports as the engine's pin cap
    bm.allocate(1, list(range(9)), 9)
    with pytest.raises(PinRefusedError, match="caching is off"):
        bm.pin(1, PinSpec("p", 2))
    with pytest.raises(PinRefusedError):
        bm.check_pin("p", list(range(9)), None)


def test_repin_replaces_and_keeps_shared_blocks() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    v1 = list(range(12))
    v2 = [*range(4), 70, 71, 72, 73]  # shares the first block with v1
    pinned_prefix(bm, "p", v1, 1)
    first = bm.pins["p"].blocks[0]
    pinned_prefix(bm, "p", v2, 2)
    assert bm.pins["p"].blocks[0] is first and first.ref_cnt == 1
    assert bm.num_pinned_blocks == 2 and bm.tenant_pinned == {"default": 2}
    assert bm.num_free_blocks == 6  # v1's two other blocks are ordinary cached blocks again


def test_pin_leases_expire() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    pinned_prefix(bm, "short", list(range(5)), 1)
    pinned_prefix(bm, "forever", list(range(20, 25)), 2)
    assert bm.extend_pin("short", 100.0) and not bm.extend_pin("missing", 1.0)
    assert bm.expire_pins(99.9) == []
    assert bm.expire_pins(100.0) == ["short"]
    assert set(bm.pins) == {"forever"} and bm.num_pinned_blocks == 1


@pytest.mark.parametrize("registrar_freed", [False, True])
def test_pin_takes_the_registered_block_not_a_private_duplicate(registrar_freed: bool) -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    tokens = list(range(8))
    bm.allocate(1, tokens, 2)  # seq 1 is mid-prefill when seq 2 computes the same blocks
    bm.allocate(2, tokens, 8)
    assert bm.append_slots(1, tokens, 2, 6) == []
    registered = bm.block_ids(2)
    if registrar_freed:  # the registered blocks wait in the free queue: the pin takes them out
        bm.free(2)
    assert bm.pin(1, PinSpec("p", 2)).block_ids == registered
    assert bm.num_free_blocks == 4
    assert not set(registered) & {b.block_id for b in bm.free_queue}
    bm.free(1)
    bm.free(2)
    flood(bm, 10)
    assert bm.allocate(3, [*tokens, 9], 9) == 8


def test_pin_registers_a_duplicate_whose_original_was_evicted() -> None:
    bm = BlockManager(num_blocks=6, block_size=4)
    tokens = list(range(8))
    bm.allocate(1, tokens, 2)
    bm.allocate(2, tokens, 8)
    bm.append_slots(1, tokens, 2, 6)
    own = bm.block_ids(1)[:2]
    bm.free(2)
    flood(bm, 10)  # evicts seq 2's blocks: the hashes now lead nowhere
    assert bm.pin(1, PinSpec("p", 2)).block_ids == own
    bm.free(1)
    flood(bm, 20)
    assert bm.allocate(3, [*tokens, 9], 9) == 8


class BlockManagerMachine(RuleBasedStateMachine):
    """Random allocate/append/fork/free/abort/pin/unpin/expire sequences, some on a public
    prefix (`shared_blocks`), against a model of the KV contents.

    The model writes each computed token into its slot, as the runner would, tagged with the
    namespace of the sequence that computed it, and copies blocks as copy-on-write asks. Every
    sequence must always read back exactly its own (namespace, token) pairs, which proves cache
    hits happen only on identical (namespace, tokens) chains (a hit across namespaces reads the
    right tokens under the wrong tag); every pin must keep its blocks cached with its tokens in
    them whatever the pressure, and never pass the cap.
    """

    BS = 4
    NB = 12
    CAP = 3

    def __init__(self) -> None:
        super().__init__()
        self.bm = BlockManager(self.NB, self.BS, max_pinned_blocks=self.CAP)
        # block id -> its slots' (namespace, token) pairs, None where nothing was written
        self.slots: dict[int, list[tuple[str, int] | None]] = {
            i: [None] * self.BS for i in range(self.NB)
        }
        self.seqs: dict[int, tuple[str, list[int], int]] = {}  # id -> (ns, tokens, computed)
        self.pins: dict[str, tuple[str, list[int], float | None]] = {}  # key -> (ns, tokens, end)
        self.shared: dict[int, int] = {}  # seq id -> its leading public blocks
        self.pin_shared: dict[str, int] = {}  # pin key -> the same, of the pinned sequence
        self.now = 0.0
        self.next_id = 0

    def _tags(self, ns: str, shared: int, tokens: list[int]) -> list[tuple[str, int]]:
        """What the slots of `tokens` must hold: a public prefix's blocks are tagged public."""
        return [
            (PUBLIC_NAMESPACE if pos // self.BS < shared else ns, t) for pos, t in enumerate(tokens)
        ]

    def _write(self, seq_id: int, ns: str, tokens: list[int], start: int, end: int) -> None:
        table = self.bm.block_ids(seq_id)
        tags = self._tags(ns, self.shared[seq_id], tokens)
        for pos in range(start, end):
            self.slots[table[pos // self.BS]][pos % self.BS] = tags[pos]

    @rule(
        tokens=st.lists(st.integers(0, 2), min_size=1, max_size=24),
        ns=st.sampled_from(["a", "b"]),
        chunk=st.integers(1, 24),
        shared=st.integers(0, 2),  # leading blocks of a public prefix
    )
    def allocate(self, tokens: list[int], ns: str, chunk: int, shared: int) -> None:
        seq_id = self.next_id
        self.next_id += 1
        cached = self.bm.allocate(seq_id, tokens, chunk, namespace=ns, shared_blocks=shared)
        if cached is None:
            return
        assert cached % self.BS == 0 and cached < len(tokens)
        computed = cached + min(chunk, len(tokens) - cached)
        self.shared[seq_id] = shared
        self._write(seq_id, ns, tokens, cached, computed)
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
        self._write(seq_id, ns, tokens, computed, len(tokens))
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
        self.shared[child] = self.shared[parent]

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:  # finish, abort and preemption all free
        seq_id = data.draw(st.sampled_from(sorted(self.seqs)))
        self.bm.free(seq_id)
        del self.seqs[seq_id]

    @precondition(lambda self: self.seqs)
    @rule(
        data=st.data(),
        key=st.sampled_from(["p", "q", "r"]),
        lease=st.one_of(st.none(), st.floats(0.5, 4.0)),
    )
    def pin(self, data: st.DataObject, key: str, lease: float | None) -> None:
        seq_id = data.draw(st.sampled_from(sorted(self.seqs)))
        ns, tokens, computed = self.seqs[seq_id]
        num_blocks = data.draw(st.integers(0, computed // self.BS))
        before = [(b.ref_cnt, b.pin_cnt) for b in self.bm.blocks]
        expires_at = None if lease is None else self.now + lease
        try:
            self.bm.pin(seq_id, PinSpec(key, num_blocks, expires_at))
        except PinRefusedError:
            assert [(b.ref_cnt, b.pin_cnt) for b in self.bm.blocks] == before
            return
        self.pins[key] = (ns, tokens[: num_blocks * self.BS], expires_at)
        self.pin_shared[key] = self.shared[seq_id]

    @precondition(lambda self: self.pins)
    @rule(data=st.data())
    def unpin(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.pins)))
        assert self.bm.unpin(key)
        del self.pins[key]

    @rule(step=st.floats(0.0, 2.0))
    def time_passes(self, step: float) -> None:
        self.now += step
        expired = set(self.bm.expire_pins(self.now))
        due = {k for k, (_, _, end) in self.pins.items() if end is not None and end <= self.now}
        assert expired == due
        for key in due:
            del self.pins[key]

    @invariant()
    def ref_counts_match_holders(self) -> None:
        held: dict[int, int] = {}
        pinned: dict[int, int] = {}
        for seq_id in self.seqs:
            for b in self.bm.block_ids(seq_id):
                held[b] = held.get(b, 0) + 1
        for pin in self.bm.pins.values():
            for b in pin.block_ids:
                pinned[b] = pinned.get(b, 0) + 1
        for block in self.bm.blocks:
            assert block.ref_cnt >= 0
            assert block.pin_cnt == pinned.get(block.block_id, 0)
            assert block.ref_cnt == held.get(block.block_id, 0) + block.pin_cnt
        free = {b.block_id for b in self.bm.free_queue}
        assert free == {b.block_id for b in self.bm.blocks if b.ref_cnt == 0}
        assert self.bm.num_free_blocks == len(free)
        assert self.bm.num_pinned_blocks == len(pinned) <= self.CAP
        assert sum(self.bm.tenant_pinned.values()) == sum(
            len(p.blocks) for p in self.bm.pins.values()
        )

    @invariant()
    def pins_keep_their_blocks_cached_and_intact(self) -> None:
        assert set(self.bm.pins) == set(self.pins)
        for key, (ns, tokens, _) in self.pins.items():
            blocks = self.bm.pins[key].blocks
            shared = self.pin_shared[key]
            hashes = list(self.bm.chain_hashes(tokens, ns, shared))
            assert [b.block_hash for b in blocks] == hashes
            tags = self._tags(ns, shared, tokens)
            for i, block in enumerate(blocks):
                assert self.bm.cached[block.block_hash] is block
                assert self.slots[block.block_id] == tags[i * self.BS : (i + 1) * self.BS]

    @invariant()
    def every_sequence_reads_its_own_tokens(self) -> None:
        for seq_id, (ns, tokens, computed) in self.seqs.items():
            table = self.bm.block_ids(seq_id)
            got = [self.slots[table[p // self.BS]][p % self.BS] for p in range(computed)]
            assert got == self._tags(ns, self.shared[seq_id], tokens[:computed])

    @invariant()
    def cached_blocks_hold_their_content(self) -> None:
        for h, block in self.bm.cached.items():
            assert block.block_hash == h

    def teardown(self) -> None:
        for seq_id in list(self.seqs):
            self.bm.free(seq_id)
        pinned = {b for p in self.bm.pins.values() for b in p.block_ids}
        assert self.bm.num_free_blocks == self.NB - len(pinned)  # nothing leaks but pins
        for key in list(self.pins):
            self.bm.unpin(key)
        assert self.bm.num_free_blocks == self.NB
        assert all(b.ref_cnt == 0 and b.pin_cnt == 0 for b in self.bm.blocks)
        assert sum(self.bm.tenant_blocks.values()) == 0 and not self.bm.tenant_pinned


# PREFIXGATE_MACHINE_EXAMPLES: fewer examples per run (tools/mutation.py runs this file once per
# mutant).
BlockManagerMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("PREFIXGATE_MACHINE_EXAMPLES", "300")),
    stateful_step_count=40,
    deadline=None,
)
TestBlockManagerMachine = BlockManagerMachine.TestCase
