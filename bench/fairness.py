"""Tenants sharing one engine: fcfs vs priority vs fair on the same backlogged workload.

Three tenants, each with its own ~500-token system prompt; tenant A sends 10x the load of B and
C. The engine (in this process, the bundled SmolLM2-135M unless --model) runs with few batch
slots, so the order the policy picks matters. One model load serves the three runs. Two modes:

  - `backlogged` (default): every tenant keeps a fixed number of requests outstanding (B and C
    `--light-inflight` each, A ten times that), sending a new one the moment one finishes, for
    `--duration` seconds after `--warmup`: all three are backlogged the whole window (each keeps
    more requests than its share of the batch slots). TTFT is from each request's submission.
  - `burst`: every request is queued at the start (A 10x the requests of B and C); the window is
    until the first tenant runs out of work, TTFT from the common start.

Printed per policy:

  - per tenant: output tokens/s in the window, and TTFT p50 / p99 in seconds and in engine steps
    (the order the policy admitted them in, whatever the machine's speed);
  - Jain's index over the three tenants' weighted service in the window (the fair policy's
    charge: prompt tokens computed + 2 x tokens sampled, over the tenant's weight; 1.0 is equal);
  - the prefix-cache hit rate and the total output throughput.

`priority` gives A priority 1 and B, C priority 0 (served first). Targets on a CPU (issue 17):
Jain >= 0.95 under fair, total throughput >= 90% of fcfs's, the light tenants' TTFT p99 at
least 5x lower than under fcfs. The figures go to a JSON record under bench/results/
(bench/_record.py).

Usage: python bench/fairness.py [--mode backlogged|burst] [--model DIR] [--max-num-seqs 8]
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
from fairness_sim import TENANTS, add_workload_arguments, jain
from offline import make_text as text  # the same vocabulary as the engine benchmark

from engine import LLM, SamplingParams
from engine.llm_engine import LLMEngine

PRIORITY = {"A": 1, "B": 0, "C": 0}


@dataclass
class Work:
    tenant: str
    prompt: list[int]
    max_tokens: int


class Source:
    """Each tenant's requests in order: its system prompt plus an 8-30-word question, the same
    sequence for every policy whatever order the policy consumes them in."""

    def __init__(self, tok: Any, args: argparse.Namespace) -> None:
        rng = random.Random(args.seed)
        self.tok, self.args = tok, args
        self.systems = {
            t: tok.encode(text(rng, 700), add_special_tokens=False)[: args.system_tokens]
            for t in TENANTS
        }
        self.rngs = {t: random.Random(f"{args.seed}-{t}") for t in TENANTS}

    def next(self, tenant: str) -> Work:
        rng = self.rngs[tenant]
        words = text(rng, rng.randint(8, 30))
        question = self.tok.encode(" " + words, add_special_tokens=False)
        max_tokens = rng.randint(self.args.min_tokens, self.args.max_tokens)
        return Work(tenant, self.systems[tenant] + question, max_tokens)


@dataclass
class Run:
    window_s: float = 0.0
    ttft: dict[str, list[float]] = field(default_factory=dict)  # seconds
    ttft_steps: dict[str, list[int]] = field(default_factory=dict)  # engine steps
    output: dict[str, int] = field(default_factory=dict)  # tokens in the window
    service: dict[str, float] = field(default_factory=dict)  # weighted, in the window
    total_output_tps: float = 0.0  # backlogged: in the window; burst: the whole run
    hit_rate: float = 0.0
    preemptions: int = 0

    def figures(self) -> dict[str, Any]:
        per_tenant = {
            t: {
                "output_tps": self.output[t] / self.window_s,
                "ttft_p50_s": percentile(self.ttft[t], 50),
                "ttft_p99_s": percentile(self.ttft[t], 99),
                "ttft_p50_steps": percentile([float(x) for x in self.ttft_steps[t]], 50),
                "ttft_p99_steps": percentile([float(x) for x in self.ttft_steps[t]], 99),
                "first_tokens": len(self.ttft[t]),
                "weighted_service": self.service[t],
            }
            for t in TENANTS
        }
        return {
            "tenants": per_tenant,
            "jain": jain(list(self.service.values())),
            "window_s": self.window_s,
            "total_output_tps": self.total_output_tps,
            "prefix_cache_hit_rate": self.hit_rate,
            "preemptions": self.preemptions,
        }


def run_policy(policy: str, source: Source, loaded: Any, args: argparse.Namespace) -> Run:
    """One policy on a fresh engine; the window's figures."""
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
    engine.scheduler.config.fair_tie_band = args.tie_band  # not among LLM's arguments
    run = Run(
        ttft={t: [] for t in TENANTS},
        ttft_steps={t: [] for t in TENANTS},
        output=dict.fromkeys(TENANTS, 0),
        service=dict.fromkeys(TENANTS, 0.0),
    )
    measuring = args.mode == "burst"
    ledger = engine.scheduler.ledger
    charge = ledger.charge

    def counted(tenant: str, prompt_tokens: int, sampled: int) -> None:
        """The ledger's charge, summed per tenant while measuring (a counter alone would also
        show the lift of a tenant back from idle)."""
        before = ledger.counter(tenant)
        charge(tenant, prompt_tokens, sampled)
        if measuring:
            run.service[tenant] += ledger.counter(tenant) - before

    ledger.charge = counted  # type: ignore[method-assign]
    tenant_of: dict[str, str] = {}
    sent: dict[str, tuple[float, int]] = {}  # request id -> (time, step) it was sent at
    unfinished = dict.fromkeys(TENANTS, 0)
    count = 0
    t0 = time.perf_counter()
    steps = 0

    def send(tenant: str) -> None:
        nonlocal count
        w = source.next(tenant)
        params = SamplingParams(temperature=0.0, max_tokens=w.max_tokens, ignore_eos=True)
        rid = f"{tenant}-{count}"
        count += 1
        engine.add_request(w.prompt, params, rid, tenant=tenant, priority=PRIORITY[tenant])
        tenant_of[rid] = tenant
        sent[rid] = (0.0 if args.mode == "burst" else time.perf_counter() - t0, steps)
        unfinished[tenant] += 1

    inflight = {"A": args.heavy_ratio * args.light_inflight}
    inflight |= {t: args.light_inflight for t in TENANTS[1:]}
    if args.mode == "burst":
        for _ in range(args.light_requests):
            for tenant in ["A"] * args.heavy_ratio + ["B", "C"]:
                send(tenant)
    else:
        for tenant in TENANTS:
            for _ in range(inflight[tenant]):
                send(tenant)
    window_start = 0.0
    hits0 = queries0 = preempted0 = 0
    total_tokens = 0
    while engine.has_unfinished:
        deltas = engine.step()
        steps += 1
        now = time.perf_counter() - t0
        for d in deltas:
            tenant = tenant_of[d.request_id]
            new = sum(len(x.token_ids) for x in d.deltas)
            total_tokens += new
            at, step = sent[d.request_id]
            first = new and d.completion_tokens == new  # the request's first tokens
            if first and (measuring or args.mode == "burst"):
                run.ttft[tenant].append(now - at)
                run.ttft_steps[tenant].append(steps - step)
            if measuring:
                run.output[tenant] += new
            if d.finished:
                unfinished[tenant] -= 1
                if args.mode == "backlogged" and now < args.warmup + args.duration:
                    send(tenant)  # keeps the tenant's requests outstanding
        if args.mode == "burst":
            if measuring and min(unfinished.values()) == 0:  # one tenant ran out of work
                measuring, run.window_s = False, now
        elif not measuring and now >= args.warmup:
            measuring, window_start = True, now
            st = engine.stats()
            hits0, queries0 = st.prefix_hits_tokens, st.prefix_queries_tokens
            preempted0 = st.num_preemptions
        elif measuring and now >= args.warmup + args.duration:
            run.window_s = now - window_start
            break
    st = engine.stats()
    run.hit_rate = (st.prefix_hits_tokens - hits0) / max(1, st.prefix_queries_tokens - queries0)
    run.preemptions = st.num_preemptions - preempted0
    if args.mode == "burst":  # the whole run, every tenant's work done
        run.total_output_tps = total_tokens / (time.perf_counter() - t0)
    else:
        run.total_output_tps = sum(run.output.values()) / run.window_s
    return run


def print_table(results: dict[str, dict[str, Any]]) -> None:
    head = f"{'policy':<9}{'tenant':<7}{'out tok/s':>10}{'TTFT p50':>10}{'TTFT p99':>10}"
    print(head + f"{'(steps)':>14}{'Jain':>7}{'hit rate':>10}{'total tok/s':>12}")
    for policy, fig in results.items():
        for i, t in enumerate(TENANTS):
            row = fig["tenants"][t]
            line = (
                f"{policy if i == 0 else '':<9}{t:<7}{row['output_tps']:>10.1f}"
                f"{row['ttft_p50_s']:>9.2f}s{row['ttft_p99_s']:>9.2f}s"
                f"{row['ttft_p50_steps']:>7.0f}/{row['ttft_p99_steps']:<6.0f}"
            )
            if i == 0:
                line += (
                    f"{fig['jain']:>7.3f}{fig['prefix_cache_hit_rate']:>10.1%}"
                    f"{fig['total_output_tps']:>12.1f}"
                )
            print(line)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="default: the bundled SmolLM2-135M")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--mode", choices=("backlogged", "burst"), default="backlogged")
    p.add_argument("--policies", default="fcfs,priority,fair")
    p.add_argument("--warmup", type=float, default=5.0, help="backlogged: seconds not measured")
    p.add_argument(
        "--duration",
        type=float,
        default=120.0,
        help="backlogged: seconds measured (a light tenant's p99 over 40 s rests on its three "
        "slowest requests)",
    )
    p.add_argument("--light-requests", type=int, default=6, help="burst: requests of B and of C")
    add_workload_arguments(p)
    p.add_argument("--seed", type=int, default=0)
    _record.add_arguments(p)
    args = p.parse_args()
    first = LLM(args.model, dtype=args.dtype, num_blocks=args.num_blocks)
    loaded, tokenizer = first.engine.loaded, first.tokenizer
    del first
    results: dict[str, dict[str, Any]] = {}
    for policy in args.policies.split(","):
        print(f"{policy}: {args.mode}", file=sys.stderr)
        source = Source(tokenizer, args)  # the same requests for every policy
        results[policy] = run_policy(policy, source, loaded, args).figures()
    print_table(results)
    summary: dict[str, Any] = {}
    if {"fcfs", "fair"} <= results.keys():
        fcfs, fair = results["fcfs"], results["fair"]
        light = [
            fcfs["tenants"][t]["ttft_p99_s"] / fair["tenants"][t]["ttft_p99_s"] for t in ("B", "C")
        ]
        summary = {
            "fair_jain": fair["jain"],
            "fcfs_jain": fcfs["jain"],
            "fair_over_fcfs_throughput": fair["total_output_tps"] / fcfs["total_output_tps"],
            "light_ttft_p99_fcfs_over_fair": min(light),
        }
        print(
            f"\nfair: Jain {summary['fair_jain']:.3f} (fcfs {summary['fcfs_jain']:.3f}); "
            f"throughput {summary['fair_over_fcfs_throughput']:.0%} of fcfs; light tenants' "
            f"TTFT p99 {summary['light_ttft_p99_fcfs_over_fair']:.1f}x lower than fcfs"
        )
    config = {k: v for k, v in vars(args).items() if k not in ("record", "record_dir", "label")}
    _record.write(args, __file__, {"config": config, "policies": results, "summary": summary})


if __name__ == "__main__":
    main()
