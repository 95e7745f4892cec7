"""Continuous batching: which sequences compute how many tokens this step (pure Python, no torch).

One step's plan, under a token budget and a cap on running sequences:
  1. running sequences, decodes first, then chunked prefills still in progress (while requests
     wait, those compute at most `long_prefill_tokens` together, if set);
     when blocks run out, preempt a running sequence not yet planned this step, the one the
     policy picks (recompute: its blocks are freed but stay in the prefix cache, so the redo is
     mostly hits);
  2. if nothing was preempted for want of free blocks, admit waiting sequences in policy order
     while budget and blocks last; a long prompt is cut into chunks (chunked prefill).
Per-tenant KV cap (`TenantShare.max_kv_blocks`): a tenant's charge (`BlockManager.tenant_blocks`:
distinct blocks its sequences hold, public-prefix blocks excluded) never exceeds its cap. A
running sequence that would pass it preempts its own tenant's newest unplanned sequence (or
itself); a waiting one is passed over for the step, and the policy looks at other tenants.
A sequence samples a token in a step that computes its last known token. Every planned piece of
work is charged to its tenant as it is planned (`TenantLedger`), so the policy sees it at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.config import SchedulerConfig
from engine.errors import PinRefusedError
from engine.fairness import PrefixProbe, TenantLedger, TenantStats
from engine.policy import PolicyContext, make_waiting_queue
from engine.request import Request, SeqStatus, Sequence
from engine.sampling_params import SamplingParams


@dataclass(slots=True)
class ScheduledSeq:
    """One sequence's work in a step (plain data for the model runner)."""

    seq_id: int
    token_ids: list[int]  # the new tokens to compute this step
    start_pos: int  # position of the first new token (= tokens already in the cache)
    block_ids: list[int]  # the sequence's block table (read only)
    # prompt_logprobs requests: the prompt tokens that follow each new token (the targets of
    # its logits; shorter than token_ids where the chunk reaches the prompt's end), and top-k.
    prompt_targets: list[int] | None = None
    prompt_top_k: int = 0


@dataclass(slots=True)
class SampleSpec:
    """Sample one token for `seq_id` from the logits of scheduled row `row`'s last token."""

    seq_id: int
    row: int
    params: SamplingParams
    seed: int | None  # per-sequence seed (request seed + completion index), None: engine RNG
    token_ids: list[int]  # prompt + outputs so far (read only; for penalties)
    num_prompt_tokens: int
    grammar: object = None  # the request's compiled grammar (engine.structured), or None


@dataclass(slots=True)
class SchedulerOutput:
    seqs: list[ScheduledSeq] = field(default_factory=list)
    samples: list[SampleSpec] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst), before run
    finished_seq_ids: list[int] = field(default_factory=list)  # runner may drop their state
    num_batched_tokens: int = 0
    num_preempted: int = 0
    num_quota_preempted: int = 0  # of which to keep a tenant within its max_kv_blocks

    @property
    def empty(self) -> bool:
        return not self.seqs


class Scheduler:
    """Owns waiting and running sequences and their blocks (through the block manager)."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.bm = block_manager
        self.ledger = TenantLedger(config.prefill_weight, config.decode_weight)
        probe = PrefixProbe(block_manager)
        self.waiting = make_waiting_queue(
            PolicyContext(config, self.ledger, probe.cached_blocks, probe.forget)
        )
        self.running: list[Sequence] = []
        self.requests: dict[str, Request] = {}
        self.seqs: dict[int, Sequence] = {}  # unfinished sequences by id
        self.num_preemptions = 0
        self._finished_seq_ids: list[int] = []

    # ---- requests --------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        assert request.request_id not in self.requests, "duplicate request id"
        self.requests[request.request_id] = request
        self.seqs[request.seqs[0].seq_id] = request.seqs[0]
        self.ledger.arrive(request)
        self.waiting.push(request.seqs[0])

    def abort_request(self, request_id: str) -> Request | None:
        """Finish every sequence of the request with reason "abort" and free its blocks."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        request.forked = True  # no siblings will be forked any more
        for seq in request.seqs:
            if not seq.finished:
                self.finish(seq, "abort")
        return request

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        if seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        elif seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
            if seq.request.pin is not None and reason != "abort":
                self._pin(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        self.bm.free(seq.seq_id)
        self.seqs.pop(seq.seq_id, None)
        self._finished_seq_ids.append(seq.seq_id)
        if seq.request.finished and self.requests.pop(seq.request.request_id, None) is not None:
            self.ledger.leave(seq.request)

    def _pin(self, seq: Sequence) -> None:
        """A warm request's prompt is computed: pin its blocks before the sequence lets go."""
        request = seq.request
        assert request.pin is not None
        try:
            request.pinned = self.bm.pin(seq.seq_id, request.pin)
        except PinRefusedError as exc:
            request.pin_error = exc

    @property
    def has_work(self) -> bool:
        return bool(self.running) or len(self.waiting) > 0

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def tenant_stats(self) -> dict[str, TenantStats]:
        """Every tenant with unfinished requests or blocks: sequences, charge, cap, lead."""
        floor = self.ledger.floor()
        out = {
            t: TenantStats(max_kv_blocks=st.max_kv_blocks, service_lead=st.counter - floor)
            for t, st in self.ledger.tenants.items()
            if st.num_requests
        }
        for seq in self.running:
            out.setdefault(seq.request.tenant, TenantStats()).running += 1
        for seq in self.waiting:
            out.setdefault(seq.request.tenant, TenantStats()).waiting += 1
        for tenant, blocks in self.bm.tenant_blocks.items():
            out.setdefault(tenant, TenantStats()).kv_blocks = blocks
        return out

    # ---- one step --------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_seq_ids=self._finished_seq_ids)
        self._finished_seq_ids = []
        plan: list[tuple[Sequence, int]] = []
        capped: set[str] = set()  # tenants not to admit this step: at their max_kv_blocks
        budget = self._schedule_running(plan, out, self.config.max_num_batched_tokens, capped)
        if out.num_preempted == out.num_quota_preempted:
            self._schedule_waiting(plan, budget, capped)
        self._emit(plan, out)
        return out

    def _schedule_running(
        self, plan: list[tuple[Sequence, int]], out: SchedulerOutput, budget: int, capped: set[str]
    ) -> int:
        planned: set[int] = set()
        room = self.config.long_prefill_tokens  # prefill tokens left to the running ones
        capping = room > 0 and len(self.waiting) > 0
        for seq in sorted(self.running, key=lambda s: s.num_uncomputed > 1):  # decodes first
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING:  # preempted earlier in this loop
                continue
            num_new = min(seq.num_uncomputed, budget)
            prefill = capping and seq.num_uncomputed > 1
            if prefill:  # leave the rest of the budget to the waiting
                num_new = min(num_new, room)
                if num_new == 0:
                    continue
            if not self._fit_quota(seq, num_new, planned, out, capped):
                continue
            copies = self._make_room(seq, num_new, planned, out)
            if copies is None:
                continue
            out.block_copies.extend(copies)
            planned.add(seq.seq_id)
            self._plan(plan, seq, num_new)
            budget -= num_new
            if prefill:
                room -= num_new
        return budget

    def _fit_quota(
        self,
        seq: Sequence,
        num_new: int,
        planned: set[int],
        out: SchedulerOutput,
        capped: set[str],
    ) -> bool:
        """Keep `seq`'s tenant within its max_kv_blocks as `seq` grows by `num_new` tokens:
        preempt the tenant's newest unplanned sequences, then `seq` itself (False)."""
        tenant = seq.request.tenant
        cap = self.ledger.tenants[tenant].max_kv_blocks
        if cap is None:
            return True
        held = self.bm.tenant_blocks
        while (
            held[tenant] + self.bm.append_charge(seq.seq_id, seq.num_computed_tokens, num_new) > cap
        ):
            own = [
                s
                for s in self.running
                if s.request.tenant == tenant and s.seq_id not in planned and s is not seq
            ]
            victim = own[-1] if own else seq
            self._preempt(victim)
            out.num_preempted += 1
            out.num_quota_preempted += 1
            capped.add(tenant)
            if victim is seq:
                return False
        return True

    def _make_room(
        self, seq: Sequence, num_new: int, planned: set[int], out: SchedulerOutput
    ) -> list[tuple[int, int]] | None:
        """Append slots for `seq`, preempting newer unplanned sequences until it fits."""
        while True:
            copies = self.bm.append_slots(
                seq.seq_id, seq.token_ids, seq.num_computed_tokens, num_new
            )
            if copies is not None:
                return copies
            others = [s for s in self.running if s.seq_id not in planned and s is not seq]
            victim = self.waiting.victim(seq, others)
            self._preempt(victim)
            out.num_preempted += 1
            if victim is seq:
                return None

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.status = SeqStatus.WAITING
        self.waiting.push_front(seq)
        self.num_preemptions += 1

    def _running_slots(self) -> int:
        return sum(1 if s.request.forked else s.request.params.num_seqs for s in self.running)

    def _schedule_waiting(
        self, plan: list[tuple[Sequence, int]], budget: int, capped: set[str]
    ) -> None:
        slots = self._running_slots()
        while budget > 0 and (seq := self.waiting.peek(capped)) is not None:
            request = seq.request
            need = 1 if request.forked else request.params.num_seqs
            if slots + need > self.config.max_num_seqs:
                break
            alloc = self.bm.plan_allocation(
                seq.token_ids, budget, request.namespace, request.tenant, request.shared_blocks
            )
            cap = self.ledger.tenants[request.tenant].max_kv_blocks
            if cap is not None and self.bm.tenant_blocks[request.tenant] + alloc.num_charged > cap:
                capped.add(request.tenant)
                continue
            if alloc.num_free_needed > self.bm.num_free_blocks:
                break
            num_cached = self.bm.commit_allocation(seq.seq_id, alloc)
            self.waiting.pop(seq)
            if seq.index == 0 and seq.num_output_tokens == 0:
                request.num_cached_tokens = num_cached
            seq.num_computed_tokens = num_cached
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            slots += need
            num_new = min(seq.num_uncomputed, budget)
            self._plan(plan, seq, num_new)
            budget -= num_new

    def _plan(self, plan: list[tuple[Sequence, int]], seq: Sequence, num_new: int) -> None:
        """Plan `num_new` tokens of `seq` for this step and charge them to its tenant: the
        prompt tokens computed (never cache hits: those are not computed) and the samples."""
        plan.append((seq, num_new))
        request = seq.request
        start = seq.num_computed_tokens
        prompt = max(0, min(start + num_new, request.num_prompt_tokens) - start)
        samples = 0
        if num_new == seq.num_uncomputed:
            samples = 1 if request.forked else request.params.num_seqs
        self.ledger.charge(request.tenant, prompt, samples)

    def _emit(self, plan: list[tuple[Sequence, int]], out: SchedulerOutput) -> None:
        for row, (seq, num_new) in enumerate(plan):
            start = seq.num_computed_tokens
            scheduled = ScheduledSeq(
                seq.seq_id,
                seq.token_ids[start : start + num_new],
                start,
                self.bm.block_ids(seq.seq_id),
            )
            top_k = seq.request.params.prompt_logprobs
            if top_k is not None and seq.index == 0 and start + 1 < seq.num_prompt_tokens:
                end = min(start + num_new, seq.num_prompt_tokens - 1)
                scheduled.prompt_targets = seq.token_ids[start + 1 : end + 1]
                scheduled.prompt_top_k = top_k
            out.seqs.append(scheduled)
            seq.num_computed_tokens += num_new
            out.num_batched_tokens += num_new
            if seq.num_uncomputed == 0:
                for sampler in self._fork_if_due(seq):
                    out.samples.append(self._sample_spec(sampler, row))

    def _fork_if_due(self, seq: Sequence) -> list[Sequence]:
        """The sequences that sample from `seq`'s logits: itself, plus its num_seqs - 1 new
        siblings."""
        request = seq.request
        if request.forked:
            return [seq]
        request.forked = True
        for index in range(1, request.params.num_seqs):
            child = Sequence(request, index, list(seq.token_ids))
            child.num_computed_tokens = seq.num_computed_tokens
            child.status = SeqStatus.RUNNING
            self.bm.fork(seq.seq_id, child.seq_id)
            request.seqs.append(child)
            self.seqs[child.seq_id] = child
            self.running.append(child)
        return request.seqs

    @staticmethod
    def _sample_spec(seq: Sequence, row: int) -> SampleSpec:
        params = seq.request.params
        seed = None if params.seed is None else params.seed + seq.index
        return SampleSpec(
            seq.seq_id, row, params, seed, seq.token_ids, seq.num_prompt_tokens,
            seq.request.grammar,
        )  # fmt: skip
