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
    policy = PrefixAware()  # weight 2: the holder keeps a whole hit while its load <= 3 b + 8
    for other_load, keeps_until in ((0, 8), (2, 14), (10, 38)):
        other = Candidate("b", load=other_load, cached_blocks=0)
        for load in range(keeps_until + 1):  # at the bound: a score of 0 against 0, cache wins
            holder = Candidate("a", load=load, cached_blocks=10)
            assert policy.pick([holder, other], prompt_blocks=10).replica_id == "a", load
        busy = Candidate("a", load=keeps_until + 1, cached_blocks=10)
        assert policy.pick([busy, other], prompt_blocks=10).replica_id == "b", other_load
        assert PrefixAware(0.0).pick([busy, other], 10).replica_id == "a"  # affinity only

    # Weight 3 tolerates 2:1 (a <= 2 b + 4); weight 1 never diverts a whole hit between two.
    def winner(weight: float, holder_load: int, other_load: int) -> str:
        pair = [Candidate("a", holder_load, 10), Candidate("b", other_load, 0)]
        return PrefixAware(weight).pick(pair, prompt_blocks=10).replica_id

    assert (winner(3.0, 24, 10), winner(3.0, 25, 10), winner(1.0, 500, 0)) == ("a", "b", "a")
    # A half hit goes to the idle replica sooner: 0.5 - 2 * (a/2) / (a/2 + 4) < 0 from a = 3.
    half = Candidate("b", 0, 0)
    assert PrefixAware().pick([Candidate("a", 2, 5), half], 10).replica_id == "a"
    assert PrefixAware().pick([Candidate("a", 3, 5), half], 10).replica_id == "b"
    # Among more replicas the mean is over all of them: an idle third pulls it down.
    three = [Candidate("a", 6, 10), Candidate("b", 0, 0), Candidate("c", 0, 0)]
    assert policy.pick(three, 10).replica_id != "a"  # 1 - 2 * 4/6 < 0
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
