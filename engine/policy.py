"""Waiting-queue policies: small strategy classes picked from a table.

Each queue orders waiting sequences; preempted sequences come back through `push_front`, ahead of
everything of equal rank, so a preempted request resumes before newer ones.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterator
from typing import Protocol

from engine.request import Sequence


class WaitingQueue(Protocol):
    def push(self, seq: Sequence) -> None: ...
    def push_front(self, seq: Sequence) -> None: ...
    def peek(self) -> Sequence: ...
    def pop(self) -> Sequence: ...
    def remove(self, seq: Sequence) -> None: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[Sequence]: ...


class FCFSQueue:
    """First come, first served: arrival order; preempted sequences go back to the front."""

    def __init__(self) -> None:
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


class PriorityQueue:
    """Lowest `priority` value first, then arrival time; preempted ones first within a rank."""

    def __init__(self) -> None:
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


POLICIES: dict[str, type[FCFSQueue] | type[PriorityQueue]] = {
    "fcfs": FCFSQueue,
    "priority": PriorityQueue,
}


def make_waiting_queue(policy: str) -> WaitingQueue:
    try:
        return POLICIES[policy]()
    except KeyError:
        raise ValueError(
            f"unknown scheduling policy {policy!r}; known: {sorted(POLICIES)}"
        ) from None
