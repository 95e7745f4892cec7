"""Per-tenant KV cap (`max_kv_blocks`): what a tenant is charged (shared blocks once, public-prefix
blocks never), the cap holding at every step (a hypothesis state machine over the scheduler and
the block manager), capped tenants waiting without blocking the others, and requests that could
never fit refused up front."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from engine.block_manager import BlockManager
from engine.config import SchedulerConfig
from engine.request import Request, SeqStatus, TenantShare
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput

BS = 4
CAPS = {"a": 5, "b": 9, "c": None}
PUBLIC = list(range(900, 908))  # two full blocks every tenant may share
_ids = itertools.count()


def make_request(
    tenant: str, prompt: list[int], max_tokens: int, shared_blocks: int = 0, n: int = 1
) -> Request:
    params = SamplingParams(temperature=0.0 if n == 1 else 1.0, max_tokens=max_tokens, n=n)
    r = Request(f"{tenant}-{next(_ids)}", prompt, params, max_tokens, tenant=tenant)
    r.namespace, r.shared_blocks = f"t:{tenant}", shared_blocks
    r.share = TenantShare(max_kv_blocks=CAPS.get(tenant))
    return r


def run_samples(s: Scheduler, out: SchedulerOutput) -> None:
    for spec in out.samples:
        seq = s.seqs[spec.seq_id]
        seq.token_ids.append(5)
        if seq.num_output_tokens >= seq.request.max_tokens:
            s.finish(seq, "length")


def charged(s: Scheduler) -> dict[str, int]:
    """Each tenant's charge recomputed from the sequences: distinct blocks, public ones out."""
    held: dict[str, set[int]] = {}
    for blocks in s.bm.seqs.values():
        ids = held.setdefault(blocks.tenant, set())
        ids.update(b.block_id for b in blocks.blocks[blocks.shared_blocks :])
    return {t: len(ids) for t, ids in held.items() if ids}


def test_blocks_shared_by_a_tenants_requests_count_once_and_public_ones_never() -> None:
    s = Scheduler(SchedulerConfig(), BlockManager(64, BS))
    private = list(range(100, 112))  # three full blocks
    first = make_request("c", [*private, 1, 2], 4)
    s.add_request(first)
    run_samples(s, s.schedule())
    second = make_request("c", [*private, 3, 4], 4)
    s.add_request(second)
    run_samples(s, s.schedule())
    assert second.num_cached_tokens == 12
    # 3 shared prefix blocks + one tail block each.
    assert s.bm.tenant_blocks["c"] == 5 == charged(s)["c"]
    public = make_request("b", [*PUBLIC, 7, 7], 4, shared_blocks=2)
    s.add_request(public)
    run_samples(s, s.schedule())
    assert s.bm.tenant_blocks["b"] == 1  # its tail only: the public prefix is nobody's
    other = make_request("a", [*PUBLIC, 8, 8], 4, shared_blocks=2)
    s.add_request(other)
    run_samples(s, s.schedule())
    assert other.num_cached_tokens == 8 and s.bm.tenant_blocks["a"] == 1
    assert s.bm.stats().kv_blocks_by_tenant == charged(s)


def test_a_capped_tenant_waits_while_the_others_run() -> None:
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=256), BlockManager(64, BS))
    for i in range(3):  # each needs 3 blocks to start: a's cap of 5 takes one at a time
        s.add_request(make_request("a", list(range(10 * i, 10 * i + 9)), 2))
    late = make_request("c", list(range(500, 509)), 2)
    s.add_request(late)  # behind a's requests in FCFS order
    out = s.schedule()
    running = {s.seqs[x.seq_id].request.request_id for x in out.seqs}
    assert late.request_id in running  # not blocked behind the capped tenant
    assert sum(r.startswith("a-") for r in running) == 1
    assert s.bm.tenant_blocks["a"] <= 5


def test_a_tenant_over_its_cap_preempts_its_own_newest() -> None:
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=256), BlockManager(64, BS))
    old = make_request("a", list(range(7)), 8)  # 2 blocks, grows to 4
    new = make_request("a", list(range(50, 53)), 8)  # 1 block, grows to 3
    # The tenant id as parsed from two requests: equal strings, not one object.
    old.tenant, new.tenant = "".join(["te", "nant"]), "".join(["ten", "ant"])
    old.share = new.share = TenantShare(max_kv_blocks=5)
    bystander = make_request("c", list(range(90, 97)), 8)
    other = make_request("c", list(range(70, 77)), 8)
    other.tenant = "zz"  # other tenants' ids on both sides of this one's
    for r in (old, new, bystander, other):
        s.add_request(r)
    preempted, victims, most = [], set(), 0
    while old.seqs[0].status is not SeqStatus.FINISHED:
        running = list(s.running)
        out = s.schedule()
        preempted.append(out.num_quota_preempted)
        assert out.num_preempted == out.num_quota_preempted  # every preemption is counted
        victims |= {x.request.request_id for x in running if x.status is SeqStatus.WAITING}
        most = max(most, s.bm.tenant_blocks["tenant"])
        assert most <= 5
        run_samples(s, out)
    assert most == 5  # the cap is there to be used up to its last block
    # One preemption, of the tenant's newest: never the growing old one, never another tenant's
    # (one preempted and readmitted within a step shows only in the count).
    assert sum(preempted) == 1 and victims == {new.request_id}
    assert bystander.seqs[0].finished and s.num_preemptions == sum(preempted)


def test_of_several_sequences_of_a_capped_tenant_the_newest_goes_first() -> None:
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=256), BlockManager(64, BS))
    old, mid, new = (
        make_request("a", list(range(f, f + n)), 6) for f, n in ((0, 3), (9, 4), (19, 4))
    )
    for r in (old, mid, new):
        s.add_request(r)
    victims = []
    while s.has_work:
        running = list(s.running)
        run_samples(s, s.schedule())
        victims += [x.request.request_id for x in running if x.status is SeqStatus.WAITING]
    assert victims == [new.request_id]  # the newest, not the older mid one


class KVQuotaMachine(RuleBasedStateMachine):
    """Random requests of three tenants (two capped; private and public prefixes), steps, and
    aborts: at every step no capped tenant holds more than its cap, the charge equals the
    distinct non-public blocks of its sequences, and in the end everything runs to completion
    and every block is free."""

    def __init__(self) -> None:
        super().__init__()
        config = SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=16, policy="fair")
        self.s = Scheduler(config, BlockManager(40, BS))

    @rule(
        tenant=st.sampled_from(sorted(CAPS)),
        public=st.booleans(),
        private=st.integers(0, 2),
        tail=st.integers(1, 5),
        max_tokens=st.integers(1, 6),
    )
    def add(self, tenant: str, public: bool, private: int, tail: int, max_tokens: int) -> None:
        prompt = (PUBLIC if public else []) + list(range(200, 200 + 4 * private))
        prompt += list(range(300 + next(_ids) % 50, 300 + next(_ids) % 50 + tail))
        shared = 2 if public else 0
        cap = CAPS[tenant]
        need = -(-(len(prompt) + max_tokens) // BS) - shared
        if cap is not None and need > cap:
            return  # the engine refuses such a request up front (test below)
        self.s.add_request(make_request(tenant, prompt, max_tokens, shared))

    @rule()
    def step(self) -> None:
        run_samples(self.s, self.s.schedule())

    @rule(index=st.integers(0, 20))
    def abort(self, index: int) -> None:
        ids = sorted(self.s.requests)
        if ids:
            self.s.abort_request(ids[index % len(ids)])

    @invariant()
    def within_caps(self) -> None:
        held = self.s.bm.tenant_blocks
        for tenant, cap in CAPS.items():
            if cap is not None:
                assert held[tenant] <= cap
        assert dict(held) == charged(self.s)

    def teardown(self) -> None:
        for _ in range(2000):
            if not self.s.has_work:
                break
            self.step()
            self.within_caps()
        assert not self.s.has_work  # nothing waits forever behind a cap
        bm = self.s.bm
        assert bm.num_free_blocks == bm.num_blocks and not bm.tenant_blocks


TestKVQuotaMachine = KVQuotaMachine.TestCase
TestKVQuotaMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


def test_a_request_that_could_never_fit_its_tenants_cap_is_refused(tiny_dirs) -> None:
    from engine.errors import InvalidRequestError
    from engine.llm import LLM

    engine = LLM(tiny_dirs["llama"], dtype="float32", num_blocks=64, block_size=4).engine
    share = TenantShare(max_kv_blocks=4)
    params = SamplingParams(max_tokens=8)
    engine.add_request(list(range(3, 11)), params, tenant="a", share=share)  # 16 tokens: 4
    with pytest.raises(InvalidRequestError, match="max_kv_blocks of 4; max_tokens 8 would fit"):
        engine.add_request(list(range(3, 11)), SamplingParams(max_tokens=9), share=share)
    with pytest.raises(InvalidRequestError, match="max_kv_blocks") as refused:
        engine.add_request(list(range(3, 11)), SamplingParams(), share=share)  # no max_tokens
    assert refused.value.param == "max_tokens"


def test_tenant_stats_count_sequences_charge_cap_and_lead() -> None:
    s = Scheduler(SchedulerConfig(max_num_seqs=2), BlockManager(64, BS))
    for tenant, first in (("a", 0), ("a", 20), ("c", 40)):
        s.add_request(make_request(tenant, list(range(first, first + 6)), 3))
    run_samples(s, s.schedule())
    stats = s.tenant_stats()
    assert (stats["a"].running, stats["a"].waiting, stats["c"].waiting) == (2, 0, 1)
    assert stats["a"].kv_blocks == 4 and stats["a"].max_kv_blocks == 5
    assert stats["c"].max_kv_blocks is None and stats["c"].service_lead == 0.0
    assert stats["a"].service_lead == 2 * 6 + 2 * 2  # its prompts and first samples


def test_service_lead_is_over_the_least_served_backlogged_tenant() -> None:
    s = Scheduler(SchedulerConfig(), BlockManager(64, BS))
    two, one = make_request("a", list(range(6)), 3, n=2), make_request("c", list(range(40, 44)), 3)
    s.add_request(two)
    s.add_request(one)
    run_samples(s, s.schedule())  # a: 6 prompt tokens and 2 samples, c: 4 and 1 sample
    stats = s.tenant_stats()
    assert (stats["a"].service_lead, stats["c"].service_lead) == (4, 0)
    for seq in [*two.seqs, *one.seqs]:
        s.finish(seq, "stop")
    assert s.tenant_stats() == {}  # finished tenants leave the ledger


def test_a_request_that_brings_its_tenant_exactly_to_its_cap_is_admitted() -> None:
    """The cap is the most blocks a tenant may hold: a request that needs exactly the rest of it
    starts at once."""
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=256), BlockManager(64, BS))
    first = make_request("a", list(range(7)), 1)  # 2 blocks of a's 5
    s.add_request(first)
    s.schedule()
    rest = make_request("a", list(range(100, 111)), 1)  # 3 blocks: 5 in all
    s.add_request(rest)
    out = s.schedule()
    assert rest.seqs[0].seq_id in {x.seq_id for x in out.seqs}
    assert s.bm.tenant_blocks["a"] == 5
