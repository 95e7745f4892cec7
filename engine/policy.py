"""Scheduling policies: small strategy classes picked from a table (`POLICIES`).

Each orders the waiting sequences (`peek`, then `pop` of what it showed) and picks the victim when
blocks run out (`victim`). `peek` can pass over tenants the scheduler cannot admit now (at their
`max_kv_blocks`). Preempted sequences come back through `push_front`, ahead of everything of equal
rank, so a preempted request resumes before newer ones.

- `fcfs`: arrival order; the newest running sequence is preempted.
- `priority`: the tenant's priority (lower first), then arrival; the lowest-priority, newest
  running sequence is preempted.
- `fair`: tenants share the engine by weight (`FairQueue`, docs/fairness.md); the newest running
  sequence of the tenant furthest ahead is preempted.
"""

from __future__ import annotations

import heapq
import itertools
import operator
from collections import deque
from collections.abc import Callable, Iterator, Set
from dataclasses import dataclass
from typing import Protocol

from engine.config import SchedulerConfig
from engine.fairness import CachedBlocks, TenantLedger
from engine.request import Sequence


class WaitingQueue(Protocol):
    def push(self, seq: Sequence) -> None: ...
    def push_front(self, seq: Sequence) -> None: ...
    def peek(self, skip: Set[str] = frozenset()) -> Sequence | None:
        """The next sequence to admit, passing over the tenants in `skip`; None if none."""
        ...

    def pop(self, seq: Sequence) -> None:
        """Take out `seq`, which `peek` just returned (admitted)."""
        ...

    def remove(self, seq: Sequence) -> None: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[Sequence]: ...

    def victim(self, seq: Sequence, others: list[Sequence]) -> Sequence:
        """The sequence to preempt so that running `seq` can grow.

        Args:
            seq: the running sequence that needs blocks.
            others: the running sequences that may be preempted instead, oldest first.

        Returns:
            One of `others`, or `seq` itself (it then waits).
        """
        ...


@dataclass(frozen=True, slots=True)
class PolicyContext:
    """What a policy may read besides its sequences: the tenants' service and the cache."""

    config: SchedulerConfig
    ledger: TenantLedger
    cached_blocks: CachedBlocks  # leading full blocks of a waiting sequence already cached
    forget: Callable[[Sequence], None]  # a sequence left the waiting queue: drop what was kept


class FCFSQueue:
    """First come, first served: arrival order; preempted sequences go back to the front."""

    def __init__(self, ctx: PolicyContext) -> None:
        self._q: deque[Sequence] = deque()

    def push(self, seq: Sequence) -> None:
        self._q.append(seq)

    def push_front(self, seq: Sequence) -> None:
        self._q.appendleft(seq)

    def peek(self, skip: Set[str] = frozenset()) -> Sequence | None:
        return next((s for s in self._q if s.request.tenant not in skip), None)

    def pop(self, seq: Sequence) -> None:
        if self._q[0] is seq:
            self._q.popleft()
        else:
            self._q.remove(seq)

    def remove(self, seq: Sequence) -> None:
        self._q.remove(seq)

    def __len__(self) -> int:
        return len(self._q)

    def __iter__(self) -> Iterator[Sequence]:
        return iter(self._q)

    def victim(self, seq: Sequence, others: list[Sequence]) -> Sequence:
        """The newest of `others`, else `seq`."""
        return others[-1] if others else seq


class PriorityQueue:
    """Lowest `priority` value first, then arrival time; preempted ones first within a rank.

    A heap with lazy removal: an entry taken out of the middle is marked (by its unique tie
    number, so a sequence pushed again later is not mistaken for it) and dropped when it surfaces.
    """

    def __init__(self, ctx: PolicyContext) -> None:
        self._heap: list[tuple[int, int, float, int, Sequence]] = []
        self._tie = itertools.count()
        self._live: dict[int, int] = {}  # seq_id -> tie of its entry in the heap
        self._removed: set[int] = set()  # ties of entries taken out, still in the heap

    def _push(self, seq: Sequence, front: bool) -> None:
        r, tie = seq.request, next(self._tie)
        self._live[seq.seq_id] = tie
        heapq.heappush(self._heap, (r.priority, 0 if front else 1, r.arrival_time, tie, seq))

    def push(self, seq: Sequence) -> None:
        self._push(seq, False)

    def push_front(self, seq: Sequence) -> None:
        self._push(seq, True)

    def _drop_removed(self) -> None:
        while self._heap and self._heap[0][3] in self._removed:
            self._removed.discard(heapq.heappop(self._heap)[3])

    def peek(self, skip: Set[str] = frozenset()) -> Sequence | None:
        self._drop_removed()
        if not skip:
            return self._heap[0][-1] if self._heap else None
        return next((s for s in self if s.request.tenant not in skip), None)

    def pop(self, seq: Sequence) -> None:
        self._drop_removed()
        if self._heap[0][-1] is seq:
            heapq.heappop(self._heap)
            del self._live[seq.seq_id]
        else:
            self.remove(seq)

    def remove(self, seq: Sequence) -> None:
        self._removed.add(self._live.pop(seq.seq_id))

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[Sequence]:
        return (e[-1] for e in sorted(self._heap) if e[3] not in self._removed)

    def victim(self, seq: Sequence, others: list[Sequence]) -> Sequence:
        """The lowest priority (largest value), newest first, of `others` and `seq`."""
        ranked = [*others, seq]
        return max(reversed(ranked), key=lambda s: (s.request.priority, s.request.arrival_time))


_first = operator.itemgetter(0)


def _arrival(seq: Sequence) -> float:
    return seq.request.arrival_time


class FairQueue:
    """Tenants share the engine by weight; within that, the longest cached prefix goes first.

    Waiting sequences sit in one FIFO per tenant (preempted ones at its front). `peek` looks at
    the tenants whose counter (`TenantLedger`) is within `fair_allowance` of the least counter
    among the tenants with waiting sequences; each offers the first of its first `window`
    sequences with the most cached leading blocks, and the offers with the most cached blocks
    of all compete. Among those, the tenants within `fair_tie_band` of the least served of them
    count as level, and the offer that has waited longest goes first. With no cache hits and no
    band this is VTC (least served first); with an unbounded allowance it is
    longest-prefix-match.

    The band is for waiting times: at the moment a batch slot frees, a counter a few tokens
    above another's is noise (it moves with how many requests each tenant has running that
    step), so the band (default 64 weighted tokens, under one typical request's charge) orders
    such near-ties by age rather than by that noise; measured, it cut the light tenants' TTFT
    p99 on a backlogged workload by 2-3 steps at the same share (docs/fairness.md).

    Fairness (docs/fairness.md): a tenant is admitted only while within the allowance `Q` of
    every tenant with waiting sequences (the band only chooses among those), and after its last
    admission its running requests can add at most their remaining cost. So for two tenants
    i, j that keep sequences waiting, `c_i - c_j <= Q + K * C` at every step, where `K` is
    `max_num_seqs` and `C` the largest weighted cost of one request (`(prefill_weight * prompt
    + decode_weight * max_tokens) / weight`); over any window their weighted service differs
    by at most twice that.
    """

    window = 16  # sequences looked at per tenant (bounds the work of one `peek`)

    def __init__(self, ctx: PolicyContext) -> None:
        self.ctx = ctx
        self._queues: dict[str, deque[Sequence]] = {}
        self._len = 0

    def push(self, seq: Sequence) -> None:
        self._queue(seq).append(seq)
        self._len += 1

    def push_front(self, seq: Sequence) -> None:
        self._queue(seq).appendleft(seq)
        self._len += 1

    def peek(self, skip: Set[str] = frozenset()) -> Sequence | None:
        ledger = self.ctx.ledger
        counters = {t: ledger.counter(t) for t in self._queues if t not in skip}
        if not counters:
            return None
        config = self.ctx.config
        limit = min(counters.values()) + config.fair_allowance
        offers: list[tuple[int, float, Sequence]] = []  # (cached blocks, counter, sequence)
        for tenant, counter in counters.items():
            if counter > limit:
                continue
            window = itertools.islice(self._queues[tenant], self.window)
            cached, seq = max(((self.ctx.cached_blocks(s), s) for s in window), key=_first)
            offers.append((cached, counter, seq))
        most = max(cached for cached, _, _ in offers)
        level = [(counter, seq) for cached, counter, seq in offers if cached == most]
        band = min(counter for counter, _ in level) + config.fair_tie_band
        return min((seq for counter, seq in level if counter <= band), key=_arrival)

    def pop(self, seq: Sequence) -> None:
        self.remove(seq)

    def remove(self, seq: Sequence) -> None:
        q = self._queues[seq.request.tenant]
        q.remove(seq)
        if not q:
            del self._queues[seq.request.tenant]
        self.ctx.forget(seq)
        self._len -= 1

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[Sequence]:
        ledger = self.ctx.ledger
        for tenant in sorted(self._queues, key=ledger.counter):
            yield from self._queues[tenant]

    def victim(self, seq: Sequence, others: list[Sequence]) -> Sequence:
        """The newest sequence of the tenant furthest ahead (largest counter) among `others`
        and `seq`."""
        ledger = self.ctx.ledger
        ranked = [*others, seq]
        return max(reversed(ranked), key=lambda s: ledger.counter(s.request.tenant))

    def _queue(self, seq: Sequence) -> deque[Sequence]:
        return self._queues.setdefault(seq.request.tenant, deque())


POLICIES: dict[str, type[FCFSQueue] | type[PriorityQueue] | type[FairQueue]] = {
    "fcfs": FCFSQueue,
    "priority": PriorityQueue,
    "fair": FairQueue,
}


def make_waiting_queue(ctx: PolicyContext) -> WaitingQueue:
    """The policy `ctx.config.policy` names (`SchedulerConfig` checked the name)."""
    return POLICIES[ctx.config.policy](ctx)
