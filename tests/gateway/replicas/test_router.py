"""The block index and the routing policies (pure Python)."""

from __future__ import annotations

from engine.block_manager import BlockManager
from gateway.replicas.router import (
    HASH_BYTES,
    BlockIndex,
    Candidate,
    LeastLoaded,
    PrefixAware,
    RoundRobin,
    prompt_chain,
)


def test_prompt_chain_is_the_engines_hash_chain_of_the_blocks_a_prompt_can_hit() -> None:
    manager = BlockManager(num_blocks=8, block_size=4)
    tokens = list(range(1, 14))  # 13 tokens: 3 full blocks, the last token always computed
    engine_chain = [h[:HASH_BYTES] for h in manager.chain_hashes(tokens, "ns", shared_blocks=1)]
    assert prompt_chain(tokens, 4, "ns", shared_blocks=1) == engine_chain
    assert len(prompt_chain(list(range(12)), 4, "ns")) == 2  # 12 tokens: the third block is
    # the one holding the token the engine must compute
    assert prompt_chain(tokens, 4, "a") != prompt_chain(tokens, 4, "b")


def test_index_counts_leading_blocks_per_replica() -> None:
    index = BlockIndex()
    chain = [b"a" * 8, b"b" * 8, b"c" * 8]
    index.stored("r1", chain)
    index.stored("r2", chain[:1])
    index.stored("r3", chain[1:])  # no first block: nothing usable
    assert index.cached_prefix(chain) == {"r1": 3, "r2": 1}
    index.evicted("r1", chain[1:2])
    assert index.cached_prefix(chain) == {"r1": 1, "r2": 1}
    index.snapshot("r2", chain)
    assert index.cached_prefix(chain) == {"r1": 1, "r2": 3}
    index.drop("r2")
    assert index.cached_prefix(chain) == {"r1": 1}
    assert index.blocks_of("r2") == 0


def test_prefix_policy_prefers_cached_blocks_until_load_outweighs_them() -> None:
    policy = PrefixAware()  # weight 2
    other = Candidate("b", load=2, cached_blocks=0)
    for load in (0, 1, 4, 8):  # at 8: 1 - 2 * 3/6 = 0 against 0, more cached blocks win
        holder = Candidate("a", load=load, cached_blocks=10)
        assert policy.pick([holder, other], prompt_blocks=10).replica_id == "a", load
    busy = Candidate("a", load=9, cached_blocks=10)  # 1 - 2 * 3.5/6.5 < 0
    assert policy.pick([busy, other], prompt_blocks=10).replica_id == "b"
    assert PrefixAware(0.0).pick([busy, other], 10).replica_id == "a"  # weight 0: affinity only
    # A stale report of one request does not outweigh two thirds of the prompt cached.
    stale = [Candidate("a", load=1, cached_blocks=2), Candidate("b", 0, 0)]
    assert policy.pick(stale, prompt_blocks=3).replica_id == "a"


def test_prefix_policy_spreads_requests_without_cached_blocks() -> None:
    policy = PrefixAware()
    picks = {policy.pick([Candidate("a", 0, 0), Candidate("b", 0, 0)], 4).replica_id
             for _ in range(4)}  # fmt: skip
    assert picks == {"a", "b"}


def test_least_loaded_and_round_robin() -> None:
    candidates = [Candidate("a", 3, 0), Candidate("b", 1, 9), Candidate("c", 1, 0)]
    least = LeastLoaded()
    assert {least.pick(candidates, 9).replica_id for _ in range(4)} == {"b", "c"}
    turn = RoundRobin()
    assert [turn.pick(candidates, 9).replica_id for _ in range(4)] == ["a", "b", "c", "a"]
