"""Tenants sharing one engine: fcfs vs priority vs fair on the same backlogged workload.

Three tenants, each with its own ~500-token system prompt; tenant A sends 10x the requests of B
and C. Every request is queued at the start (all three are backlogged), and the engine (in this
process, the bundled SmolLM2-135M unless --model) runs with few batch slots, so the order the
policy picks matters. One model load serves the three runs. Printed per policy:

  - per tenant: output tokens/s while all three tenants had work (the contended window), and
    TTFT p50 / p99 from the common start;
  - Jain's index over the three tenants' weighted service in that window (the fair policy's
    charge: prompt tokens computed + 2 x tokens sampled, over the tenant's weight; 1.0 is equal);
  - the prefix-cache hit rate and the total output throughput of the whole run;
  - the engine step at which each of B's and C's requests got its first token (the order the
    policy admitted them in, whatever the machine's speed).

`priority` gives A priority 1 and B, C priority 0 (served first). Targets on a CPU (issue 17):
Jain >= 0.95 under fair, total throughput >= 90% of fcfs's, the light tenants' TTFT p99 at
least 5x lower than under fcfs. The figures go to a JSON record under bench/results/
(bench/_record.py).

Usage: python bench/fairness.py [--model DIR] [--light-requests 6] [--max-num-seqs 8]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import _record
from _stats import percentile
from offline import make_text as text  # the same vocabulary as the engine benchmark

from engine import LLM, SamplingParams
from engine.llm_engine import LLMEngine
from engine.request import Request

TENANTS = ("A", "B", "C")
PRIORITY = {"A": 1, "B": 0, "C": 0}


@dataclass
class Work:
    tenant: str
    prompt: list[int]
    max_tokens: int


def workload(tok: Any, args: argparse.Namespace) -> list[Work]:
    """A's requests interleaved with B's and C's in arrival order, 10 of A's for each of theirs."""
    rng = random.Random(args.seed)
    systems = {
        t: tok.encode(text(rng, 700), add_special_tokens=False)[: args.system_tokens]
        for t in TENANTS
    }
    work = []
    for _ in range(args.light_requests):
        for tenant in ["A"] * args.heavy_ratio + ["B", "C"]:
            question = tok.encode(" " + text(rng, rng.randint(8, 30)), add_special_tokens=False)
            max_tokens = rng.randint(args.min_tokens, args.max_tokens)
            work.append(Work(tenant, systems[tenant] + question, max_tokens))
    return work


@dataclass
class Run:
    seconds: float = 0.0
    window_s: float = 0.0  # until the first tenant ran out of work
    ttft: dict[str, list[float]] = field(default_factory=dict)
    first_steps: dict[str, list[int]] = field(default_factory=dict)  # steps of first tokens
    window_output: dict[str, int] = field(default_factory=dict)
    window_service: dict[str, float] = field(default_factory=dict)
    output_tokens: int = 0
    hit_rate: float = 0.0
    preemptions: int = 0

    def figures(self) -> dict[str, Any]:
        per_tenant = {
            t: {
                "output_tps_contended": self.window_output.get(t, 0) / self.window_s,
                "ttft_p50_s": percentile(self.ttft[t], 50),
                "ttft_p99_s": percentile(self.ttft[t], 99),
                "first_token_steps": self.first_steps[t],
                "weighted_service_contended": self.window_service.get(t, 0.0),
            }
            for t in TENANTS
        }
        return {
            "tenants": per_tenant,
            "jain_contended": jain(list(self.window_service.values())),
            "contended_window_s": self.window_s,
            "seconds": self.seconds,
            "total_output_tps": self.output_tokens / self.seconds,
            "prefix_cache_hit_rate": self.hit_rate,
            "preemptions": self.preemptions,
        }


def jain(xs: list[float]) -> float:
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs)) if any(xs) else 1.0


def run_policy(policy: str, work: list[Work], loaded: Any, args: argparse.Namespace) -> Run:
    llm = LLM(
        args.model,
        dtype=args.dtype,
        num_blocks=args.num_blocks,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_batched_tokens,
        policy=policy,  # type: ignore[arg-type]
        loaded=loaded,
    )
    engine: LLMEngine = llm.engine
    requests: dict[str, Request] = {}
    for i, w in enumerate(work):
        params = SamplingParams(temperature=0.0, max_tokens=w.max_tokens, ignore_eos=True)
        r = engine.add_request(
            w.prompt, params, f"{w.tenant}-{i}", tenant=w.tenant, priority=PRIORITY[w.tenant]
        )
        requests[r.request_id] = r
    run = Run(ttft={t: [] for t in TENANTS}, first_steps={t: [] for t in TENANTS})
    unfinished = {t: sum(w.tenant == t for w in work) for t in TENANTS}
    contended = True
    ledger = engine.scheduler.ledger
    t0 = time.perf_counter()
    steps = 0
    while engine.has_unfinished:
        deltas = engine.step()
        steps += 1
        now = time.perf_counter() - t0
        for d in deltas:
            tenant = requests[d.request_id].tenant
            new = sum(len(x.token_ids) for x in d.deltas)
            if new and d.completion_tokens == new:  # the request's first tokens
                run.ttft[tenant].append(now)
                run.first_steps[tenant].append(steps)
            if contended:
                run.window_output[tenant] = run.window_output.get(tenant, 0) + new
            if d.finished:
                unfinished[tenant] -= 1
        if contended and min(unfinished.values()) == 0:
            contended = False
            run.window_s = now
            run.window_service = {t: ledger.counter(t) for t in TENANTS}
    run.seconds = time.perf_counter() - t0
    run.output_tokens = sum(w.max_tokens for w in work)
    stats = engine.stats()
    run.hit_rate = stats.prefix_hits_tokens / stats.prefix_queries_tokens
    run.preemptions = stats.num_preemptions
    return run


def print_table(results: dict[str, dict[str, Any]]) -> None:
    head = f"{'policy':<9}{'tenant':<7}{'out tok/s':>10}{'TTFT p50':>10}{'TTFT p99':>10}"
    print(head + f"{'Jain':>7}{'hit rate':>10}{'total tok/s':>12}")
    for policy, fig in results.items():
        for i, t in enumerate(TENANTS):
            row = fig["tenants"][t]
            line = (
                f"{policy if i == 0 else '':<9}{t:<7}{row['output_tps_contended']:>10.1f}"
                f"{row['ttft_p50_s']:>9.1f}s{row['ttft_p99_s']:>9.1f}s"
            )
            if i == 0:
                line += (
                    f"{fig['jain_contended']:>7.3f}{fig['prefix_cache_hit_rate']:>10.1%}"
                    f"{fig['total_output_tps']:>12.1f}"
                )
            print(line)
    for policy, fig in results.items():  # the order of admission, free of the machine's speed
        light = {t: fig["tenants"][t]["first_token_steps"] for t in TENANTS[1:]}
        print(f"{policy}: the light tenants' first tokens at engine steps {light}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="default: the bundled SmolLM2-135M")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--policies", default="fcfs,priority,fair")
    p.add_argument("--light-requests", type=int, default=6, help="requests of B and of C each")
    p.add_argument("--heavy-ratio", type=int, default=10, help="A's requests per B request")
    p.add_argument("--system-tokens", type=int, default=500)
    p.add_argument("--min-tokens", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--max-batched-tokens", type=int, default=512)
    p.add_argument("--num-blocks", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    _record.add_arguments(p)
    args = p.parse_args()
    first = LLM(args.model, dtype=args.dtype, num_blocks=args.num_blocks)
    loaded = first.engine.loaded
    work = workload(first.tokenizer, args)
    del first
    results: dict[str, dict[str, Any]] = {}
    for policy in args.policies.split(","):
        print(f"{policy}: {len(work)} requests", file=sys.stderr)
        results[policy] = run_policy(policy, work, loaded, args).figures()
    print_table(results)
    summary: dict[str, Any] = {}
    if {"fcfs", "fair"} <= results.keys():
        fcfs, fair = results["fcfs"], results["fair"]
        light = [
            fcfs["tenants"][t]["ttft_p99_s"] / fair["tenants"][t]["ttft_p99_s"] for t in ("B", "C")
        ]
        summary = {
            "fair_jain": fair["jain_contended"],
            "fcfs_jain": fcfs["jain_contended"],
            "fair_over_fcfs_throughput": fair["total_output_tps"] / fcfs["total_output_tps"],
            "light_ttft_p99_fcfs_over_fair": min(light),
        }
        print(
            f"\nfair: Jain {summary['fair_jain']:.3f} (fcfs {summary['fcfs_jain']:.3f}); "
            f"throughput {summary['fair_over_fcfs_throughput']:.0%} of fcfs; light tenants' "
            f"TTFT p99 {summary['light_ttft_p99_fcfs_over_fair']:.1f}x lower than fcfs"
        )
    config = {k: v for k, v in vars(args).items() if k not in ("record", "record_dir", "label")}
    _record.write(
        args,
        __file__,
        {"config": config, "requests": len(work), "policies": results, "summary": summary},
    )


if __name__ == "__main__":
    main()
