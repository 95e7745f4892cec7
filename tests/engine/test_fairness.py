"""Tenants share one engine: the fair policy's bound on service differences (asserted at every
step of a simulation of the scheduler alone), FCFS starving a light tenant in the same scenario,
cache locality close to longest-prefix-match, no banked credit, the preemption victims of each
policy, and greedy outputs that no policy changes."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from engine.block_manager import BlockManager
from engine.config import SchedulerConfig
from engine.fairness import TenantLedger
from engine.request import Request, TenantShare
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput

BLOCK = 4
MAX_PROMPT, MAX_OUTPUT = 40, 24
MAX_SEQS = 8
ALLOWANCE = 128.0
WEIGHTS = {"heavy": 1, "light": 1, "gold": 2}


def bound(config: SchedulerConfig) -> float:
    """`FairQueue`'s bound on |c_i - c_j| for two tenants that keep requests waiting:
    the allowance, plus what the running requests of one tenant (at most max_num_seqs of them)
    can still be charged after its last admission."""
    cost = config.prefill_weight * MAX_PROMPT + config.decode_weight * MAX_OUTPUT
    return config.fair_allowance + config.max_num_seqs * cost / min(WEIGHTS.values())


@dataclass
class Sim:
    """The scheduler alone: every sample appends a token, a sequence stops at its max_tokens."""

    s: Scheduler
    rng: random.Random
    service: dict[str, float] = field(default_factory=dict)  # weighted, measured from outputs
    ids: int = 0

    def add(self, tenant: str, prompt: list[int], max_tokens: int) -> Request:
        self.ids += 1
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        share = TenantShare(weight=WEIGHTS.get(tenant, 1))
        r = Request(f"{tenant}-{self.ids}", prompt, params, max_tokens, tenant=tenant, share=share)
        self.s.add_request(r)
        return r

    def step(self) -> SchedulerOutput:
        out = self.s.schedule()
        self.measure(out)
        for spec in out.samples:
            seq = self.s.seqs[spec.seq_id]
            seq.token_ids.append(self.rng.randrange(1000, 2000))
            if seq.num_output_tokens >= seq.request.max_tokens:
                self.s.finish(seq, "length")
        return out

    def measure(self, out: SchedulerOutput) -> None:
        """Weighted service of each tenant in this step, from what the step computes and
        samples (independently of the scheduler's own ledger)."""
        cfg = self.s.config
        for sched in out.seqs:
            request = self.s.seqs[sched.seq_id].request
            end = sched.start_pos + len(sched.token_ids)
            prompt = max(0, min(end, request.num_prompt_tokens) - sched.start_pos)
            charge = cfg.prefill_weight * prompt
            weight = WEIGHTS.get(request.tenant, 1)
            self.service[request.tenant] = self.service.get(request.tenant, 0.0) + charge / weight
        for spec in out.samples:
            request = self.s.seqs[spec.seq_id].request
            self.service[request.tenant] += cfg.decode_weight / WEIGHTS.get(request.tenant, 1)

    def waiting_tenants(self) -> set[str]:
        return {seq.request.tenant for seq in self.s.waiting}


def make_sim(seed: int, policy: str, num_blocks: int = 128, **cfg: object) -> Sim:
    config = SchedulerConfig(
        max_num_seqs=MAX_SEQS,
        max_num_batched_tokens=48,
        policy=policy,  # type: ignore[arg-type]
        fair_allowance=cfg.pop("fair_allowance", ALLOWANCE),  # type: ignore[arg-type]
        **cfg,  # type: ignore[arg-type]
    )
    return Sim(Scheduler(config, BlockManager(num_blocks, BLOCK)), random.Random(seed))


def heavy_and_light(sim: Sim, rounds: int, prefixes: dict[str, list[list[int]]]) -> None:
    """`heavy` sends 10 requests for each one of `light` and `gold`, interleaved in arrival
    order; random prompt (a tenant prefix, when given, plus a random tail) and output lengths."""
    rng = sim.rng
    for _ in range(rounds):
        for tenant in ["heavy"] * 10 + ["light", "gold"]:
            options = prefixes.get(tenant) or [[]]
            prefix = rng.choice(options)
            tail = rng.randint(1, MAX_PROMPT - len(prefix))
            prompt = prefix + [rng.randrange(3000, 60000) for _ in range(tail)]
            sim.add(tenant, prompt, rng.randint(1, MAX_OUTPUT))


def max_gap(sim: Sim, steps: int, check: float | None) -> tuple[float, int]:
    """Run `steps` steps; return the largest |service_i - service_j| (and the steps all three
    tenants kept requests waiting). With `check`, assert at every step, for every pair of tenants
    waiting since the start, that the gap is within `check` and that over any window of steps
    their service differs by at most 2 * `check`."""
    tenants = sorted(WEIGHTS)
    waiting = set(tenants)
    lo: dict[tuple[str, str], float] = {}
    hi: dict[tuple[str, str], float] = {}
    worst, backlogged_steps = 0.0, 0
    for _ in range(steps):
        sim.step()
        waiting &= sim.waiting_tenants()
        if waiting != set(tenants):
            continue
        backlogged_steps += 1
        for i, a in enumerate(tenants):
            for b in tenants[i + 1 :]:
                gap = sim.service.get(a, 0.0) - sim.service.get(b, 0.0)
                worst = max(worst, abs(gap))
                lo[a, b] = min(lo.get((a, b), gap), gap)
                hi[a, b] = max(hi.get((a, b), gap), gap)
                if check is not None:
                    assert abs(gap) <= check, (a, b, gap)
                    assert hi[a, b] - lo[a, b] <= 2 * check  # any window: D(t2) - D(t1)
    return worst, backlogged_steps


@pytest.mark.parametrize("seed", range(4))
def test_fair_service_gap_stays_within_the_bound_at_every_step(seed: int) -> None:
    sim = make_sim(seed, "fair")
    shared = {"heavy": [[7] * 16], "gold": [[8] * 24]}  # some cache hits, cheaper service
    heavy_and_light(sim, 300, shared)
    worst, steps = max_gap(sim, 300, check=bound(sim.s.config))
    assert steps == 300  # every tenant stayed backlogged throughout
    for tenant, st in sim.s.ledger.tenants.items():  # the ledger charged what was served
        assert st.counter == pytest.approx(sim.service[tenant])
    assert worst > 0


@pytest.mark.parametrize("seed", range(2))
def test_fcfs_starves_the_light_tenants_in_the_same_scenario(seed: int) -> None:
    config_bound = bound(make_sim(seed, "fair").s.config)
    sim = make_sim(seed, "fcfs")
    heavy_and_light(sim, 300, {})
    worst, steps = max_gap(sim, 300, check=None)
    assert steps == 300
    assert worst > 3 * config_bound
    assert sim.service["heavy"] > 4 * sim.service["light"]


def test_fair_keeps_cache_hit_rate_near_longest_prefix_match() -> None:
    """Per-tenant system prompts, a pool too small to keep them all: `fair` keeps at least 90%
    of the hit rate of a pure longest-prefix-match order (an unbounded allowance)."""

    def hit_rate(policy: str, allowance: float) -> float:
        sim = make_sim(3, policy, num_blocks=48, fair_allowance=allowance)
        rng = random.Random(11)
        prefixes = {
            t: [[rng.randrange(3000, 60000) for _ in range(24)] for _ in range(3)] for t in WEIGHTS
        }
        heavy_and_light(sim, 12, prefixes)
        while sim.s.has_work:
            sim.step()
        bm = sim.s.bm
        return bm.prefix_hits_tokens / bm.prefix_queries_tokens

    lpm = hit_rate("fair", float("inf"))
    fair = hit_rate("fair", ALLOWANCE)
    assert fair >= 0.9 * lpm
    assert lpm > 0.2  # the workload does share prefixes


def test_a_tenant_back_from_idle_has_banked_no_credit() -> None:
    ledger = TenantLedger(prefill_weight=1.0, decode_weight=2.0)

    def req(tenant: str, weight: int = 1) -> Request:
        p = SamplingParams(max_tokens=1)
        return Request(f"{tenant}", [1, 2], p, 1, tenant=tenant, share=TenantShare(weight))

    a, b = req("a"), req("b", weight=2)
    ledger.arrive(a)
    ledger.charge("a", 100, 10)  # 100 prompt tokens + 10 samples: 120
    assert ledger.counter("a") == 120
    ledger.arrive(b)  # new: starts level with the least served backlogged tenant
    assert ledger.counter("b") == 120
    ledger.charge("b", 40, 0)  # weight 2: half the charge
    assert ledger.counter("b") == 140
    ledger.leave(b)  # idle, ahead of the floor (120): remembered
    ledger.charge("a", 300, 0)
    ledger.arrive(req("b", 2))  # back: lifted to the floor, not left at 140
    assert ledger.counter("b") == ledger.counter("a") == 420
    ledger.leave(a)
    ledger.leave(b)
    assert ledger.tenants == {}  # nothing backlogged: all start level again


def _running_pair(policy: str) -> tuple[Scheduler, list[Request]]:
    """Two tenants' requests running in a full pool; `heavy` has been served more."""
    config = SchedulerConfig(policy=policy, max_num_batched_tokens=64)  # type: ignore[arg-type]
    s = Scheduler(config, BlockManager(6, BLOCK))
    params = SamplingParams(temperature=0.0, max_tokens=50)
    reqs = [
        Request("heavy-old", list(range(8)), params, 50, tenant="heavy", priority=0),
        Request("light", list(range(100, 108)), params, 50, tenant="light", priority=5),
        Request("heavy-new", list(range(200, 204)), params, 50, tenant="heavy", priority=0),
    ]
    for r in reqs:
        s.add_request(r)
    out = s.schedule()  # 2 + 2 + 1 blocks of 6: all three run
    assert len(out.seqs) == 3
    s.ledger.charge("heavy", 500, 0)
    for spec in out.samples:
        s.seqs[spec.seq_id].token_ids.append(9)
    return s, reqs


@pytest.mark.parametrize(
    ("policy", "victim"),
    [("fcfs", "heavy-new"), ("priority", "light"), ("fair", "heavy-new")],
)
def test_each_policy_preempts_its_own_victim(policy: str, victim: str) -> None:
    s, reqs = _running_pair(policy)
    for _ in range(4):  # decodes fill the blocks until one sequence must go
        out = s.schedule()
        if out.num_preempted:
            break
        for spec in out.samples:
            s.seqs[spec.seq_id].token_ids.append(9)
    assert out.num_preempted == 1
    preempted = [r.request_id for r in reqs if r.seqs[0].status.value == "waiting"]
    assert preempted == [victim]


def test_fair_prefers_the_longest_cached_prefix_within_the_allowance() -> None:
    sim = make_sim(0, "fair")
    system = list(range(500, 532))  # 8 blocks
    sim.add("a", [*system, 1], 1)
    while sim.s.has_work:
        sim.step()
    cold = sim.add("b", list(range(900, 933)), 1)
    warm = sim.add("a", [*system, 2], 1)
    s = sim.s
    assert s.waiting.peek() is warm.seqs[0]  # a is within the allowance: its hit goes first
    s.ledger.charge("a", int(ALLOWANCE) + 1, 0)  # now a is ahead by more than the allowance
    assert s.waiting.peek() is cold.seqs[0]


@pytest.mark.parametrize("band", [64.0, 0.0])
def test_fair_gives_the_oldest_request_of_nearly_level_tenants_the_slot(band: float) -> None:
    """Counters within `fair_tie_band` of the least served count as level: the request waiting
    longest goes first. Past the band (or with none) the least served goes first."""
    sim = make_sim(0, "fair", fair_tie_band=band)
    older = sim.add("b", list(range(900, 933)), 1)
    newer = sim.add("a", list(range(100, 133)), 1)
    s = sim.s
    s.ledger.charge("b", 30, 0)  # b ahead of a by 30: within a band of 64
    assert s.waiting.peek() is (older if band else newer).seqs[0]
    s.ledger.charge("b", 40, 0)  # ahead by 70: past the band, still within the allowance
    assert s.waiting.peek() is newer.seqs[0]


def test_greedy_outputs_do_not_depend_on_the_policy(tiny_dirs) -> None:
    """Three tenants with shared prefixes, small batches and a pool small enough to preempt:
    each policy orders the work its own way, and every output still equals transformers'
    greedy one."""
    from engine.llm import LLM
    from tests.engine.conftest import hf_greedy, hf_model

    rng = random.Random(5)
    work = []
    for i in range(9):
        tenant = ["heavy", "heavy", "light"][i % 3]
        prefix = [11 + (tenant == "light")] * 8
        prompt = prefix + [rng.randrange(3, 49000) for _ in range(rng.randint(3, 20))]
        work.append((tenant, prompt, i % 2))
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    hf = hf_model(tiny_dirs["llama"])
    expected = [hf_greedy(hf, prompt, 10) for _, prompt, _ in work]
    for policy in ("fcfs", "priority", "fair"):
        llm = LLM(
            tiny_dirs["llama"],
            dtype="float32",
            num_blocks=24,
            block_size=4,
            max_num_seqs=4,
            max_num_batched_tokens=24,
            policy=policy,  # type: ignore[arg-type]
        )
        engine = llm.engine
        requests = [
            engine.add_request(
                prompt,
                params,
                tenant=tenant,
                priority=priority,
                share=TenantShare(weight=1 + (tenant == "light")),
            )
            for tenant, prompt, priority in work
        ]
        while engine.has_unfinished:
            engine.step()
        assert [r.seqs[0].output_token_ids for r in requests] == expected, policy
        assert engine.scheduler.num_preemptions > 0
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_the_cache_probe_sees_a_public_prefix_cached_by_another_tenant() -> None:
    sim = make_sim(0, "fair")
    public = list(range(500, 508))  # 2 blocks, shared by every tenant
    first = Request("a-1", [*public, 1, 2, 3, 4, 5], SamplingParams(max_tokens=1), 1, tenant="a")
    first.shared_blocks, first.namespace = 2, "t:a"
    sim.s.add_request(first)
    while sim.s.has_work:
        sim.step()
    other = Request("b-1", [*public, 9, 9, 9, 9, 9], SamplingParams(max_tokens=1), 1, tenant="b")
    other.shared_blocks, other.namespace = 2, "t:b"
    private = Request("b-2", [*public, 9, 9, 9, 9, 9], SamplingParams(max_tokens=1), 1, tenant="b")
    private.namespace = "t:b"
    for r in (private, other):
        sim.s.add_request(r)
    assert sim.s.waiting.peek() is other.seqs[0]  # 2 cached public blocks beat 0
