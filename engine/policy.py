"""Scheduling policies: small strategy classes picked from a table (`POLICIES`).

Each orders the waiting sequences (`peek`/`pop`) and picks the victim when blocks run out
(`victim`). Preempted sequences come back through `push_front`, ahead of everything of equal rank,
so a preempted request resumes before newer ones.

- `fcfs`: arrival order; the newest running sequence is preempted.
- `priority`: the tenant's priority (lower first), then arrival; the lowest-priority, newest
  running sequence is preempted.
- `fair`: tenants share the engine by weight (`FairQueue`, docs/fairness.md); the newest running
  sequence of the tenant furthest ahead is preempted.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from engine.config import SchedulerConfig
from engine.fairness import CachedBlocks, TenantLedger
from engine.request import Sequence


class WaitingQueue(Protocol):
    def push(self, seq: Sequence) -> None: ...
    def push_front(self, seq: Sequence) -> None: ...
    def peek(self) -> Sequence: ...
    def pop(self) -> Sequence: ...
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

    def peek(self) -> Sequence:
        return self._q[0]

    def pop(self) -> Sequence:
        return self._q.popleft()

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
    """Lowest `priority` value first, then arrival time; preempted ones first within a rank."""

    def __init__(self, ctx: PolicyContext) -> None:
        self._heap: list[tuple[int, int, float, int, Sequence]] = []
        self._tie = itertools.count()
        self._removed: set[int] = set()

    def _key(self, seq: Sequence, front: bool) -> tuple[int, int, float, int, Sequence]:
        r = seq.request
        return (r.priority, 0 if front else 1, r.arrival_time, next(self._tie), seq)

    def push(self, seq: Sequence) -> None:
        heapq.heappush(self._heap, self._key(seq, False))

    def push_front(self, seq: Sequence) -> None:
        heapq.heappush(self._heap, self._key(seq, True))

    def _drop_removed(self) -> None:
        while self._heap and self._heap[0][-1].seq_id in self._removed:
            self._removed.discard(heapq.heappop(self._heap)[-1].seq_id)

    def peek(self) -> Sequence:
        self._drop_removed()
        return self._heap[0][-1]

    def pop(self) -> Sequence:
        self._drop_removed()
        return heapq.heappop(self._heap)[-1]

    def remove(self, seq: Sequence) -> None:
        self._removed.add(seq.seq_id)

    def __len__(self) -> int:
        return len(self._heap) - len(self._removed)

    def __iter__(self) -> Iterator[Sequence]:
        return (e[-1] for e in sorted(self._heap) if e[-1].seq_id not in self._removed)

    def victim(self, seq: Sequence, others: list[Sequence]) -> Sequence:
        """The lowest priority (largest value), newest first, of `others` and `seq`."""
        ranked = [*others, seq]
        return max(reversed(ranked), key=lambda s: (s.request.priority, s.request.arrival_time))


class FairQueue:
    """Tenants share the engine by weight; within that, the longest cached prefix goes first.

    Waiting sequences sit in one FIFO per tenant (preempted ones at its front). `peek` looks at
    the tenants whose counter (`TenantLedger`) is within `fair_allowance` of the least counter
    among the tenants with waiting sequences, and among the first `window` sequences of each
    picks the one with the most cached leading blocks; ties go to the tenant least served, then
    to queue order. With no cache hits this is VTC (least served first); with an unbounded
    allowance it is longest-prefix-match. The choice is kept until the ledger or the queue
    changes, so `pop` returns what `peek` showed even after the scheduler allocated it.

    Fairness (docs/fairness.md): a tenant is admitted only while within the allowance `Q` of
    every tenant with waiting sequences, and after its last admission its running requests can
    add at most their remaining cost. So for two tenants i, j that keep sequences waiting,
    `c_i - c_j <= Q + K * C` at every step, where `K` is `max_num_seqs` and `C` the largest
    weighted cost of one request (`(prefill_weight * prompt + decode_weight * max_tokens) /
    weight`); over any window their weighted service differs by at most twice that.
    """

    window = 16  # sequences looked at per tenant (bounds the work of one `peek`)

    def __init__(self, ctx: PolicyContext) -> None:
        self.ctx = ctx
        self._queues: dict[str, deque[Sequence]] = {}
        self._len = 0
        self._choice: tuple[int, Sequence] | None = None  # (ledger version, chosen sequence)

    def push(self, seq: Sequence) -> None:
        self._queue(seq).append(seq)
        self._changed(1)

    def push_front(self, seq: Sequence) -> None:
        self._queue(seq).appendleft(seq)
        self._changed(1)

    def peek(self) -> Sequence:
        version = self.ctx.ledger.version
        if self._choice is None or self._choice[0] != version:
            self._choice = (version, self._choose())
        return self._choice[1]

    def pop(self) -> Sequence:
        seq = self.peek()
        self.remove(seq)
        return seq

    def remove(self, seq: Sequence) -> None:
        q = self._queues[seq.request.tenant]
        q.remove(seq)
        if not q:
            del self._queues[seq.request.tenant]
        self.ctx.forget(seq)
        self._changed(-1)

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

    def _changed(self, delta: int) -> None:
        self._len += delta
        self._choice = None

    def _choose(self) -> Sequence:
        ledger = self.ctx.ledger
        counters = {tenant: ledger.counter(tenant) for tenant in self._queues}
        limit = min(counters.values()) + self.ctx.config.fair_allowance
        best: tuple[int, float, int] | None = None
        chosen: Sequence | None = None
        for tenant, q in self._queues.items():
            if counters[tenant] > limit:
                continue
            for i, seq in enumerate(itertools.islice(q, self.window)):
                key = (-self.ctx.cached_blocks(seq), counters[tenant], i)
                if best is None or key < best:
                    best, chosen = key, seq
        if chosen is None:
            raise IndexError("peek at an empty waiting queue")
        return chosen


POLICIES: dict[str, type[FCFSQueue] | type[PriorityQueue] | type[FairQueue]] = {
    "fcfs": FCFSQueue,
    "priority": PriorityQueue,
    "fair": FairQueue,
}


def make_waiting_queue(ctx: PolicyContext) -> WaitingQueue:
    """The policy `ctx.config.policy` names (`SchedulerConfig` checked the name)."""
    return POLICIES[ctx.config.policy](ctx)
