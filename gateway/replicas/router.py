"""Picking an engine replica for a request: a block index fed by the replicas' KV events, and
three policies (`POLICIES`, chosen with `PREFIXGATE_ROUTING`).

The index maps a block's content hash (the engine's own `chain_hashes` over the same
tokenizer, namespace and block size, cut to its first `HASH_BYTES` bytes) to the replicas that
hold the block. A request's chain is walked from its first block; a replica's cached prefix is
the run of leading blocks it holds.

Prefix rule (`PrefixAware`), for each live replica r:

    hit(r)    = cached_blocks(r) / prompt_blocks                          (0..1)
    excess(r) = max(0, load(r) - mean_load) / (mean_load + LOAD_SLACK)   (0 at or below the mean)
    score(r)  = hit(r) - weight * excess(r)

where load(r) is r's running + waiting requests (its last report, or this gateway's open streams
on it when more), mean_load their mean over live replicas, `weight` is
`PREFIXGATE_ROUTING_LOAD_WEIGHT` (default 2) and `LOAD_SLACK` = 4 requests. The highest score
wins; ties go to the replica with more cached blocks, then the lower load, then in turn.

Only replicas above the mean pay, and the slack keeps a handful of requests from counting as
busy: a miss recomputes the whole prompt (a 512-token prompt is about the work of 512 decoded
tokens), while each request more in a batch adds one token to its steps. Between two replicas
with loads a >= b, one holding the whole prompt keeps it while (weight > 1; at 1 or less it
always keeps it)

    a <= b * (weight + 1) / (weight - 1) + 2 * LOAD_SLACK / (weight - 1)

i.e. with weight 2 until it runs 3 b + 8 (against an idle replica, 8; against one running 2,
14). The weight sets the imbalance tolerated under load (a 3:1 ratio at 2, 2:1 at 3), the slack
the load below which the cache alone decides; weight 0 is pure cache affinity.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

from engine.block_manager import chain_hashes
from engine.service.discovery import HASH_BYTES

LOAD_SLACK = 4.0  # requests: the module docstring's rule


def prompt_chain(
    token_ids: Sequence[int], block_size: int, namespace: str | None, shared_blocks: int = 0
) -> list[bytes]:
    """Index keys of the blocks a prompt could hit: its full blocks but the last token's (the
    engine always computes at least one token, `BlockManager.find_cached_prefix`)."""
    usable = token_ids[: len(token_ids) - 1]
    return [h[:HASH_BYTES] for h in chain_hashes(usable, block_size, namespace, shared_blocks)]


class BlockIndex:
    """Block hash -> replicas holding it, maintained from KV events and snapshots."""

    def __init__(self) -> None:
        self._holders: dict[bytes, set[str]] = {}
        self._blocks: dict[str, set[bytes]] = {}  # replica -> its hashes

    def __len__(self) -> int:
        return len(self._holders)

    def stored(self, replica: str, hashes: Iterable[bytes]) -> None:
        own = self._blocks.setdefault(replica, set())
        for h in hashes:
            own.add(h)
            self._holders.setdefault(h, set()).add(replica)

    def evicted(self, replica: str, hashes: Iterable[bytes]) -> None:
        own = self._blocks.get(replica)
        if own is None:
            return
        for h in hashes:
            own.discard(h)
            holders = self._holders.get(h)
            if holders is not None:
                holders.discard(replica)
                if not holders:
                    del self._holders[h]

    def snapshot(self, replica: str, hashes: Iterable[bytes]) -> None:
        """Replace what `replica` holds (a periodic full snapshot, or a new replica)."""
        self.drop(replica)
        self.stored(replica, hashes)

    def drop(self, replica: str) -> None:
        self.evicted(replica, list(self._blocks.get(replica, ())))
        self._blocks.pop(replica, None)

    def blocks_of(self, replica: str) -> int:
        return len(self._blocks.get(replica, ()))

    def cached_prefix(self, chain: Sequence[bytes]) -> dict[str, int]:
        """Replica -> number of leading blocks of `chain` it holds (replicas with none omitted)."""
        run: dict[str, int] = {}
        for i, h in enumerate(chain):
            holders = self._holders.get(h)
            if not holders:
                break
            extended = False
            for replica in holders:
                if run.get(replica, 0) == i:
                    run[replica] = i + 1
                    extended = True
            if not extended:
                break
        return run


@dataclass(frozen=True, slots=True)
class Candidate:
    """A live replica as a policy sees it."""

    replica_id: str
    load: int  # running + waiting requests
    cached_blocks: int  # leading blocks of the request's chain it holds


class Policy(Protocol):
    needs_chain: bool

    def pick(self, candidates: Sequence[Candidate], prompt_blocks: int) -> Candidate: ...


class RoundRobin:
    needs_chain: ClassVar[bool] = False

    def __init__(self, load_weight: float = 0.0) -> None:
        self._turn = itertools.count()

    def pick(self, candidates: Sequence[Candidate], prompt_blocks: int) -> Candidate:
        ordered = sorted(candidates, key=lambda c: c.replica_id)
        return ordered[next(self._turn) % len(ordered)]


class LeastLoaded:
    needs_chain: ClassVar[bool] = False

    def __init__(self, load_weight: float = 0.0) -> None:
        self._turn = itertools.count()

    def pick(self, candidates: Sequence[Candidate], prompt_blocks: int) -> Candidate:
        turn = next(self._turn)
        least = min(c.load for c in candidates)
        tied = sorted((c for c in candidates if c.load == least), key=lambda c: c.replica_id)
        return tied[turn % len(tied)]


class PrefixAware:
    """The module docstring's rule."""

    needs_chain: ClassVar[bool] = True

    def __init__(self, load_weight: float = 2.0) -> None:
        self.load_weight = load_weight
        self._turn = itertools.count()

    def score(self, c: Candidate, prompt_blocks: int, mean_load: float) -> float:
        hit = c.cached_blocks / prompt_blocks if prompt_blocks else 0.0
        excess = max(0.0, c.load - mean_load) / (mean_load + LOAD_SLACK)
        return hit - self.load_weight * excess

    def pick(self, candidates: Sequence[Candidate], prompt_blocks: int) -> Candidate:
        mean = sum(c.load for c in candidates) / len(candidates)
        turn = next(self._turn)
        ordered = sorted(candidates, key=lambda c: c.replica_id)
        ordered = ordered[turn % len(ordered) :] + ordered[: turn % len(ordered)]
        return max(
            ordered, key=lambda c: (self.score(c, prompt_blocks, mean), c.cached_blocks, -c.load)
        )


POLICIES: dict[str, type[RoundRobin | LeastLoaded | PrefixAware]] = {
    "prefix": PrefixAware,
    "least-loaded": LeastLoaded,
    "round-robin": RoundRobin,
}


def make_policy(name: str, load_weight: float) -> RoundRobin | LeastLoaded | PrefixAware:
    return POLICIES[name](load_weight)
