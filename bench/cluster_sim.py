"""Planning past one machine: the gateway's real routing code (`gateway.replicas.router`: the
block-hash chain, the block index fed by KV events, the three policies) over simulated engine
replicas, at 4, 16 and 64 replicas with hundreds of tenants.

    python bench/cluster_sim.py                       # 4, 16, 64 replicas, all three policies
    python bench/cluster_sim.py --replicas 16 --requests 20000

Each simulated replica has `--slots` concurrent sequences and an LRU prefix cache of
`--cache-blocks` blocks of 16 tokens; a request waits for a free slot, computes its uncached
prompt tokens at `--prefill-tok-s`, then decodes `--output-tokens` at `--itl-ms` each (an M/G/k
queue: the batch's slowdown with size is folded into the ITL, taken at batch 16). Defaults are
SmolLM2-135M figures on the Zen 5 dev machine (docs/performance.md: ~30 ms per output token with
16 streams; prefill of a few thousand tokens/s). Tenants each have a distinct system prompt of
`--system-tokens` tokens in their own namespace, drawn Zipf-like; requests arrive as a Poisson
process scaled with the replica count to `--utilization` of the cluster.

The router sees what a gateway sees: each routed request's chain is indexed at once (as
`ReplicaPool` does), and each replica's evictions reach the index as KV events. Printed per
(replicas, policy): prompt-cache hit rate, TTFT p50/p99, output tok/s, the busiest replica's
share of requests over the mean (load balance); and what the design costs at that scale: KV
events per second and their bytes (8 per block hash, what a replica XADDs), and the index's
memory (what router.py allocated, measured with tracemalloc).
"""

from __future__ import annotations

import argparse
import heapq
import random
import sys
import tracemalloc
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _record
from _stats import percentile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.replicas.router import BlockIndex, Candidate, make_policy, prompt_chain

BLOCK = 16


@dataclass
class Replica:
    name: str
    capacity: int  # cache blocks
    slots: list[float] = field(default_factory=list)  # heap of slot-free times
    cache: OrderedDict[bytes, None] = field(default_factory=OrderedDict)
    finishes: list[float] = field(default_factory=list)  # heap: requests in the system
    served: int = 0

    def load(self, now: float) -> int:
        while self.finishes and self.finishes[0] <= now:
            heapq.heappop(self.finishes)
        return len(self.finishes)

    def admit(self, chain: list[bytes]) -> tuple[int, list[bytes]]:
        """Leading cached blocks of `chain`; stores the rest. Returns (hits, evicted hashes)."""
        hits = 0
        for h in chain:
            if h not in self.cache:
                break
            self.cache.move_to_end(h)
            hits += 1
        evicted = []
        for h in chain[hits:]:
            self.cache[h] = None
            if len(self.cache) > self.capacity:
                old, _ = self.cache.popitem(last=False)
                evicted.append(old)
        return hits, evicted


def workload(args: argparse.Namespace, replicas: int) -> list[tuple[float, int, list[int]]]:
    """(arrival s, tenant, prompt tokens), seeded."""
    rng = random.Random(args.seed)
    tenants = args.tenants_per_replica * replicas
    systems = [[rng.randrange(1000, 40000) for _ in range(args.system_tokens)]
               for _ in range(tenants)]  # fmt: skip
    weights = [1 / (i + 1) ** args.zipf for i in range(tenants)]
    service = args.system_tokens / args.prefill_tok_s + args.output_tokens * args.itl_ms / 1000
    rate = args.utilization * replicas * args.slots / service  # requests/s
    t, out = 0.0, []
    for tenant in rng.choices(range(tenants), weights, k=args.requests):
        t += rng.expovariate(rate)
        user = [rng.randrange(1000, 40000) for _ in range(args.user_tokens)]
        out.append((t, tenant, systems[tenant] + user))
    return out


def simulate(args: argparse.Namespace, replicas: int, policy_name: str) -> dict[str, Any]:
    fleet = [Replica(f"r{i:02d}", args.cache_blocks, [0.0] * args.slots) for i in range(replicas)]
    by_name = {r.name: r for r in fleet}
    policy = make_policy(policy_name, args.load_weight)
    requests = workload(args, replicas)
    tracemalloc.start()
    index = BlockIndex()
    ttfts, hits_tokens, prompt_tokens, event_hashes = [], 0, 0, 0
    for arrival, tenant, prompt in requests:
        chain = prompt_chain(prompt, BLOCK, f"tenant-{tenant}")
        runs = index.cached_prefix(chain) if policy.needs_chain else {}
        candidates = [Candidate(r.name, r.load(arrival), runs.get(r.name, 0)) for r in fleet]
        replica = by_name[policy.pick(candidates, len(chain)).replica_id]
        hits, evicted = replica.admit(chain)
        index.stored(replica.name, chain)
        if evicted:
            index.evicted(replica.name, evicted)
        event_hashes += len(chain) - hits + len(evicted)
        start = max(arrival, heapq.heappop(replica.slots))
        prefill = (len(prompt) - hits * BLOCK) / args.prefill_tok_s
        finish = start + prefill + args.output_tokens * args.itl_ms / 1000
        heapq.heappush(replica.slots, finish)
        heapq.heappush(replica.finishes, finish)
        replica.served += 1
        ttfts.append(start - arrival + prefill)
        hits_tokens += hits * BLOCK
        prompt_tokens += len(prompt)
    router_code = tracemalloc.Filter(True, "*gateway/replicas/router.py")
    traces = tracemalloc.take_snapshot().filter_traces([router_code])
    memory = sum(stat.size for stat in traces.statistics("filename"))
    tracemalloc.stop()
    span = requests[-1][0] - requests[0][0]
    served = [r.served for r in fleet]
    return {
        "replicas": replicas,
        "policy": policy_name,
        "tenants": args.tenants_per_replica * replicas,
        "hit_rate": round(hits_tokens / prompt_tokens, 3),
        "ttft_p50_ms": round(percentile(ttfts, 50) * 1000, 1),
        "ttft_p99_ms": round(percentile(ttfts, 99) * 1000, 1),
        "output_tok_s": round(len(requests) * args.output_tokens / span),
        "busiest_over_mean": round(max(served) / (sum(served) / len(served)), 2),
        "kv_event_hashes_per_s": round(event_hashes / span),
        "kv_event_bytes_per_s": round(event_hashes * 8 / span),
        "index_entries": len(index),
        "index_mib": round(memory / 2**20, 1),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--replicas", type=int, nargs="+", default=[4, 16, 64])
    p.add_argument("--policies", nargs="+", default=["prefix", "least-loaded", "round-robin"])
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--tenants-per-replica", type=int, default=50)
    p.add_argument("--system-tokens", type=int, default=512)
    p.add_argument("--user-tokens", type=int, default=64)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--zipf", type=float, default=1.0, help="tenant popularity exponent")
    p.add_argument("--slots", type=int, default=16, help="concurrent sequences per replica")
    p.add_argument("--cache-blocks", type=int, default=2048, help="prefix cache per replica")
    p.add_argument("--prefill-tok-s", type=float, default=4000.0)
    p.add_argument("--itl-ms", type=float, default=30.0)
    p.add_argument("--utilization", type=float, default=0.7)
    p.add_argument("--load-weight", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    _record.add_arguments(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rows = []
    for replicas in args.replicas:
        for policy in args.policies:
            row = simulate(args, replicas, policy)
            rows.append(row)
            print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    _record.write(args, __file__, {"rows": rows})


if __name__ == "__main__":
    main()
