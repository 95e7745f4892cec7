"""`ReplicaPool`: one `EngineClient` over several engine replicas, routing each request.

Replicas join and leave through a discovery source (a fixed URL list, or the heartbeats in
Redis: `gateway.replicas.discovery`); the pool keeps a `BlockIndex` of what each one caches and
asks the routing policy where each request goes. A request is sent to exactly one replica:
only a replica refusing it before anything was sent (already known lost) sends it on to the
next.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any

from engine.errors import EngineOverloadedError
from engine.fairness import TenantStats
from engine.grammar import GrammarSpec
from engine.outputs import PrefixState
from engine.sampling_params import SamplingParams
from engine.service.protocol import ReplicaStats
from gateway.replicas.remote import RemoteEngine, RemoteStream, ReplicaLostError, check_grammar
from gateway.replicas.router import BlockIndex, Candidate, make_policy, prompt_chain

logger = logging.getLogger("prefixgate.replicas")


class ReplicaPool:
    """Routes requests over live `RemoteEngine`s (an `EngineClient`).

    Args:
        routing: a name of `gateway.replicas.router.POLICIES`.
        load_weight: the prefix policy's weight of load.
        model_name: the model every replica must serve (others are refused).
    """

    def __init__(self, routing: str = "prefix", load_weight: float = 2.0, *, model_name: str):
        self.policy = make_policy(routing, load_weight)
        self.index = BlockIndex()
        self.replicas: dict[str, RemoteEngine] = {}
        self.model_name = model_name
        self.tokenizer: Any = None
        self.max_model_len = 0
        self.block_size = 0
        self.routed: dict[str, int] = {}  # requests sent to each replica by this gateway
        self._stoppers: list[Any] = []  # discovery sources, closed at shutdown

    # ---- membership ---------------------------------------------------------------------------
    def add(self, engine: RemoteEngine) -> bool:
        """Put a connected replica in rotation; False (and logged) if it serves another model."""
        if engine.model_name != self.model_name:
            line = {"event": "replica_refused", "replica": engine.replica_id,
                    "model": engine.model_name, "expected": self.model_name}  # fmt: skip
            logger.error(json.dumps(line))
            return False
        if not self.block_size:  # the first replica: every other serves the same model
            self.tokenizer = self.tokenizer or engine.tokenizer
            self.max_model_len = engine.max_model_len
            self.block_size = engine.block_size
        old = self.replicas.get(engine.replica_id)
        if old is not None and old is not engine:
            self.remove(engine.replica_id, "replaced by a new process")
        self.replicas[engine.replica_id] = engine
        logger.info(json.dumps({"event": "replica_joined", "replica": engine.replica_id,
                                "url": engine.url}))  # fmt: skip
        return True

    def remove(self, replica_id: str, reason: str) -> None:
        """Take a replica out of rotation; its open streams end with `ReplicaLostError`."""
        engine = self.replicas.pop(replica_id, None)
        self.index.drop(replica_id)
        if engine is not None:
            engine.mark_lost(reason)
            engine.shutdown()

    def live(self) -> list[RemoteEngine]:
        return [e for e in self.replicas.values() if e.lost is None and not e.last_stats.draining]

    def on_close(self, stopper: Any) -> None:
        """Call `stopper()` at shutdown (a discovery source's task canceller)."""
        self._stoppers.append(stopper)

    # ---- EngineClient -------------------------------------------------------------------------
    def start(self) -> None:
        """Replicas are started as they join."""

    def shutdown(self) -> None:
        for stop in self._stoppers:
            stop()
        for replica_id in list(self.replicas):
            engine = self.replicas.pop(replica_id)
            engine.shutdown()

    def add_request(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        request_id: str | None = None,
        **kwargs: Any,
    ) -> RemoteStream:
        """Route, then send to that one replica.

        Raises:
            EngineOverloadedError: no replica is live (HTTP 503 with retry-after).
            InvalidRequestError / ContextLengthError: as the engine would.
        """
        chain = self._chain(prompt_token_ids, kwargs)
        for engine in self._ranked(chain):
            try:
                stream = engine.add_request(
                    prompt_token_ids, params, request_id=request_id, **kwargs
                )
            except ReplicaLostError:  # known lost before anything was sent: the next one
                continue
            self.index.stored(engine.replica_id, chain)  # until its KV events say otherwise
            self.routed[engine.replica_id] = self.routed.get(engine.replica_id, 0) + 1
            return stream
        raise EngineOverloadedError("no engine replica is available; retry later", 1.0)

    async def compile_grammar(self, spec: GrammarSpec) -> None:
        """Checked here; the replica the request goes to compiles it (`check_grammar`)."""
        await check_grammar(spec)

    def abort(self, request_id: str) -> None:
        for engine in self.live():
            if request_id in engine.streams:
                engine.abort(request_id)

    async def warm_prefix(self, token_ids: list[int], **kwargs: Any) -> PrefixState:
        """Warm (and pin) on the replica the router sends this prefix's requests to."""
        chain = self._chain([*token_ids, 0], kwargs)
        ranked = self._ranked(chain)
        if not ranked:
            raise EngineOverloadedError("no engine replica is available; retry later", 1.0)
        state = await ranked[0].warm_prefix(token_ids, **kwargs)
        self.index.stored(ranked[0].replica_id, chain)
        return state

    async def unpin_prefix(self, key: str) -> bool:
        return any([await e.unpin_prefix(key) for e in self.live()])

    async def extend_pin(self, key: str, expires_at: float | None) -> bool:
        return any([await e.extend_pin(key, expires_at) for e in self.live()])

    def stats(self) -> ReplicaStats:
        """The sum over live replicas (`kv_usage` over all their blocks)."""
        return sum_stats(e.stats() for e in self.live())

    # ---- routing ------------------------------------------------------------------------------
    def _chain(self, token_ids: list[int], kwargs: dict[str, Any]) -> list[bytes]:
        """The request's block chain as the engine will hash it (namespace, shared blocks)."""
        if not self.policy.needs_chain or not self.block_size:
            return []
        namespace, shared = kwargs.get("namespace"), kwargs.get("shared_blocks", 0)
        return prompt_chain(token_ids, self.block_size, namespace, shared)

    def _ranked(self, chain: list[bytes]) -> list[RemoteEngine]:
        """Live replicas, the policy's pick first."""
        live = self.live()
        if not live:
            return []
        runs = self.index.cached_prefix(chain)
        candidates = [Candidate(e.replica_id, load(e), runs.get(e.replica_id, 0)) for e in live]
        pick = self.policy.pick(candidates, len(chain))
        first = self.replicas[pick.replica_id]
        return [first, *(e for e in live if e is not first)]


def load(engine: RemoteEngine) -> int:
    """Running + waiting requests: the replica's last report, or this gateway's open streams
    on it when more (reports lag by up to a heartbeat)."""
    reported = engine.last_stats.num_running + engine.last_stats.num_waiting
    return max(reported, len(engine.streams))


def sum_stats(all_stats: Iterable[ReplicaStats]) -> ReplicaStats:
    total = ReplicaStats(0, 0, 0, 0, 0.0, 0, 0, 0)
    for s in all_stats:
        total.num_running += s.num_running
        total.num_waiting += s.num_waiting
        total.num_blocks += s.num_blocks
        total.num_free_blocks += s.num_free_blocks
        total.prefix_queries_tokens += s.prefix_queries_tokens
        total.prefix_hits_tokens += s.prefix_hits_tokens
        total.num_preemptions += s.num_preemptions
        total.num_pinned_blocks += s.num_pinned_blocks
        total.max_pinned_blocks += s.max_pinned_blocks
        for tenant, n in s.pinned_blocks_by_tenant.items():
            total.pinned_blocks_by_tenant[tenant] = total.pinned_blocks_by_tenant.get(tenant, 0) + n
        for tenant, stats in s.tenants.items():
            total.tenants.setdefault(tenant, TenantStats()).add(stats)
        total.kv_usage += s.kv_usage * s.num_blocks
    if total.num_blocks:
        total.kv_usage /= total.num_blocks
    return total
