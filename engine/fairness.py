"""Per-tenant service accounting for scheduling (pure Python, no torch).

The `TenantLedger` keeps, for every tenant with unfinished requests (and idle ones still ahead of
the others), a virtual service counter in the spirit of VTC (Sheng et al., OSDI'24):

    charge(step) = prefill_weight * (prompt tokens the step computes: cache misses)
                 + decode_weight  * (tokens the step samples)
    counter     += charge / weight          (weight: the tenant's quota `weight`, default 1)

Prompt tokens served from the prefix cache are never computed, so never charged: sharing a prefix
makes a tenant cheaper. A prompt token is charged each time it is computed (a preempted request's
recompute is mostly cache hits); an output token once, when it is sampled.

No banked credit: a tenant that becomes backlogged again (its first unfinished request) is lifted
to `floor()`, the least counter of the backlogged tenants, so time spent idle is not saved up
against the others. Idle tenants at or below the floor are forgotten (a return lifts them to it
anyway); when no tenant is backlogged every state is forgotten and all start level.

Invariant: counters only grow, and `floor()` never decreases while some tenant is backlogged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from engine.block_manager import BlockManager
from engine.request import Request, Sequence


@dataclass(slots=True)
class TenantState:
    weight: int = 1  # from the newest request's `TenantShare`
    max_kv_blocks: int | None = None  # likewise; None: no cap
    num_requests: int = 0  # unfinished requests (waiting or running); > 0: backlogged
    counter: float = 0.0  # weighted service (charges / weight), lifted on return from idle


@dataclass(slots=True)
class TenantStats:
    """One tenant's share of the engine right now (plain data for `/metrics`)."""

    running: int = 0  # sequences running
    waiting: int = 0  # sequences waiting
    kv_blocks: int = 0  # its charge: distinct KV blocks its sequences hold, public ones out
    max_kv_blocks: int | None = None  # its cap; None: none
    service_lead: float = 0.0  # weighted tokens it is ahead of the least served backlogged one

    def add(self, other: TenantStats) -> None:
        """Fold in another replica's figures: counts add up; the cap and the lead are each
        engine's own, so the largest is kept."""
        self.running += other.running
        self.waiting += other.waiting
        self.kv_blocks += other.kv_blocks
        caps = [c for c in (self.max_kv_blocks, other.max_kv_blocks) if c is not None]
        self.max_kv_blocks = max(caps) if caps else None
        self.service_lead = max(self.service_lead, other.service_lead)


class TenantLedger:
    """Virtual service counters per tenant (see the module docstring).

    Args:
        prefill_weight: charge per prompt token computed.
        decode_weight: charge per token sampled.
    """

    def __init__(self, prefill_weight: float = 1.0, decode_weight: float = 2.0) -> None:
        self.prefill_weight = prefill_weight
        self.decode_weight = decode_weight
        self.tenants: dict[str, TenantState] = {}

    def counter(self, tenant: str) -> float:
        st = self.tenants.get(tenant)
        return st.counter if st is not None else self.floor()

    def floor(self) -> float:
        """Least counter of the backlogged tenants; with none backlogged, the greatest of all."""
        backlogged = [s.counter for s in self.tenants.values() if s.num_requests > 0]
        if backlogged:
            return min(backlogged)
        return max((s.counter for s in self.tenants.values()), default=0.0)

    def arrive(self, request: Request) -> None:
        """A request joins: its tenant's weight and KV cap are updated, and a tenant returning
        from idle is lifted to the floor."""
        st = self.tenants.get(request.tenant)
        if st is None:
            st = self.tenants[request.tenant] = TenantState(counter=self.floor())
        elif st.num_requests == 0:
            st.counter = max(st.counter, self.floor())
        if request.share is not None:
            st.weight = request.share.weight
            st.max_kv_blocks = request.share.max_kv_blocks
        st.num_requests += 1

    def leave(self, request: Request) -> None:
        """A request finished (or was aborted)."""
        st = self.tenants[request.tenant]
        st.num_requests -= 1
        assert st.num_requests >= 0
        if st.num_requests == 0:
            floor = self.floor()
            for tenant in [t for t, s in self.tenants.items() if not s.num_requests]:
                if self.tenants[tenant].counter <= floor:
                    del self.tenants[tenant]

    def charge(self, tenant: str, prompt_tokens: int, sampled: int) -> None:
        """Charge `prompt_tokens` computed and `sampled` tokens to the tenant's counter."""
        if prompt_tokens == 0 and sampled == 0:
            return
        st = self.tenants[tenant]
        cost = self.prefill_weight * prompt_tokens + self.decode_weight * sampled
        st.counter += cost / st.weight


class PrefixProbe:
    """How many leading full blocks of a waiting sequence are in the prefix cache right now.

    The hash chain of a sequence is computed once (per length: a preempted sequence comes back
    longer) and kept until `forget`; each probe is then dictionary lookups up to the first miss.
    """

    def __init__(self, bm: BlockManager) -> None:
        self.bm = bm
        self._chains: dict[int, tuple[int, list[bytes]]] = {}  # seq_id -> (length, hashes)

    def cached_blocks(self, seq: Sequence) -> int:
        chain = self._chains.get(seq.seq_id)
        if chain is None or chain[0] != len(seq.token_ids):
            # As `BlockManager.find_cached_prefix`: the last token is always computed.
            tokens = seq.token_ids[: len(seq.token_ids) - 1]
            request = seq.request
            hashes = self.bm.chain_hashes(tokens, request.namespace, request.shared_blocks)
            chain = (len(seq.token_ids), list(hashes))
            self._chains[seq.seq_id] = chain
        cached = self.bm.cached if self.bm.enable_caching else {}
        n = 0
        for h in chain[1]:
            if h not in cached:
                break
            n += 1
        return n

    def forget(self, seq: Sequence) -> None:
        self._chains.pop(seq.seq_id, None)


CachedBlocks = Callable[[Sequence], int]
