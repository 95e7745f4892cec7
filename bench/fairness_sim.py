"""bench/fairness.py's backlogged workload on the scheduler alone: the order a policy admits in,
measured in engine steps, in seconds of CPU instead of minutes.

The real `Scheduler` and `BlockManager` (no model: every scheduled sample appends a random token),
three tenants with their own `--system-tokens` system prompts and 10-40-token questions,
`--min-tokens` to `--max-tokens` output tokens; tenant A keeps `--heavy-ratio` times B's and C's
`--light-inflight` requests outstanding and every tenant sends a new request the moment one
finishes. After `--warmup-steps`, per tenant: TTFT p50 / p99 in steps (from the step a request
was sent to the step of its first token, as bench/fairness.py counts them), output tokens, and
Jain's index over the weighted service. The same figures in steps as bench/fairness.py's on the
engine (AMD Zen 4 and 5, Intel: fair 13 / 24-27 before the tie band, 13 / 23-24 with it; fcfs
120 / 127-135), so a policy change can be tried here first.

With `--reference` it also prints what a light tenant's TTFT would be if it got exactly its
share of the service as a fluid, with no batch slots: `pacing_reference` below. That wait is
what the share itself sets (through the spread of the tenant's own request sizes), whatever the
order; the fair policy's figures are read against it in docs/fairness.md.

Usage: python bench/fairness_sim.py [--policies fcfs,fair] [--seeds 3] [--allowance 256]
                                    [--tie-band 64] [--reference]
"""

from __future__ import annotations

import argparse
import random

from _stats import percentile

from engine.block_manager import BlockManager
from engine.config import SchedulerConfig
from engine.request import Request, TenantShare
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler

TENANTS = ("A", "B", "C")
QUESTION_TOKENS = (10, 40)  # each request's own tokens after its tenant's system prompt


def simulate(policy: str, seed: int, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """One policy, one seed: per tenant TTFT p50 / p99 (steps), output tokens, service."""
    rng = random.Random(seed)
    config = SchedulerConfig(
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_batched_tokens,
        policy=policy,  # type: ignore[arg-type]
        fair_allowance=args.allowance,
        fair_tie_band=args.tie_band,
    )
    sched = Scheduler(config, BlockManager(args.num_blocks, args.block_size))
    systems = {t: [rng.randrange(3000, 60000) for _ in range(args.system_tokens)] for t in TENANTS}
    sent: dict[str, int] = {}
    ttft: dict[str, list[float]] = {t: [] for t in TENANTS}
    output = dict.fromkeys(TENANTS, 0)
    service = dict.fromkeys(TENANTS, 0.0)

    def send(tenant: str, step: int) -> None:
        question = [rng.randrange(3000, 60000) for _ in range(rng.randint(*QUESTION_TOKENS))]
        max_tokens = rng.randint(args.min_tokens, args.max_tokens)
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        request_id = f"{tenant}-{len(sent)}"
        share = TenantShare(weight=1)
        prompt = systems[tenant] + question
        request = Request(request_id, prompt, params, max_tokens, tenant=tenant, share=share)
        sched.add_request(request)
        sent[request_id] = step

    inflight = {"A": args.heavy_ratio * args.light_inflight, "B": args.light_inflight}
    inflight["C"] = args.light_inflight
    for tenant in TENANTS:
        for _ in range(inflight[tenant]):
            send(tenant, 0)
    for step in range(1, args.warmup_steps + args.steps + 1):
        out = sched.schedule()
        measuring = step > args.warmup_steps
        for s in out.seqs if measuring else ():
            request = sched.seqs[s.seq_id].request
            end = s.start_pos + len(s.token_ids)
            prompt_tokens = max(0, min(end, request.num_prompt_tokens) - s.start_pos)
            service[request.tenant] += config.prefill_weight * prompt_tokens
        for spec in out.samples:
            seq = sched.seqs[spec.seq_id]
            seq.token_ids.append(rng.randrange(1000, 2000))
            tenant = seq.request.tenant
            if measuring:
                output[tenant] += 1
                service[tenant] += config.decode_weight
                if seq.num_output_tokens == 1:
                    ttft[tenant].append(float(step - sent[seq.request.request_id]))
            if seq.num_output_tokens >= seq.request.max_tokens:
                sched.finish(seq, "length")
                send(tenant, step)
    return {
        t: {
            "p50": percentile(ttft[t], 50),
            "p99": percentile(ttft[t], 99),
            "output": output[t],
            "service": service[t],
        }
        for t in TENANTS
    }


def pacing_reference(seed: int, args: argparse.Namespace, n: int = 200_000) -> tuple[float, float]:
    """TTFT p50 / p99 in steps of a light tenant paced exactly at its share, as a fluid.

    The tenant keeps `--light-inflight` requests outstanding and gets a third of the service
    (`--max-num-seqs` / 3 slots' worth, all weights 1): its requests run in order, request j
    starting the moment its cumulative charge (prompt tokens computed x prefill_weight + output
    tokens x decode_weight, as the fair policy charges) fits in the service it has been due,
    i.e. at (charge of requests 0..j-1) / r, where r is its share's service per step, and never
    before it is sent, when request j - inflight ends (a tenant with nothing waiting is lifted
    to the present, as the policy lifts it: no banked credit). A request of n output tokens runs
    n steps (the first token is sampled by its prefill's step). So the wait is set by the share
    and by the spread of request sizes alone: no batch slots (one frees every few steps in the
    engine), no other tenant's timing. TTFT counts from the step it was sent to the step of its
    first token, as `simulate` does: the wait plus one."""
    rng = random.Random(seed)
    config = SchedulerConfig()
    uncached_system = args.system_tokens % args.block_size  # its last block holds the question
    sizes = [rng.randint(args.min_tokens, args.max_tokens) for _ in range(n)]
    charges = [
        config.prefill_weight * (uncached_system + rng.randint(*QUESTION_TOKENS))
        + config.decode_weight * size
        for size in sizes
    ]
    slots = args.max_num_seqs / len(TENANTS)
    rate = sum(charges) / sum(sizes) * slots  # the share's charge served per step
    starts: list[float] = []
    due = 0.0
    ttft = []
    for j in range(n):
        sent = (
            starts[j - args.light_inflight] + sizes[j - args.light_inflight]
            if j >= args.light_inflight
            else 0.0
        )
        starts.append(max(sent, due / rate))
        due = starts[j] * rate + charges[j]  # an idle tenant banks no credit
        if j >= n // 100:  # past the start-up
            ttft.append(starts[j] - sent + 1)
    return percentile(ttft, 50), percentile(ttft, 99)


def add_workload_arguments(p: argparse.ArgumentParser) -> None:
    """The workload's and the engine's shape, the same in bench/fairness.py."""
    p.add_argument(
        "--light-inflight", type=int, default=4, help="backlogged: requests B and C keep sent"
    )
    p.add_argument("--heavy-ratio", type=int, default=10, help="A's load over B's (and C's)")
    p.add_argument("--system-tokens", type=int, default=500)
    p.add_argument("--min-tokens", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--max-batched-tokens", type=int, default=512)
    p.add_argument("--num-blocks", type=int, default=512)
    band = SchedulerConfig().fair_tie_band
    p.add_argument("--tie-band", type=float, default=band, help="the fair policy's fair_tie_band")


def jain(xs: list[float]) -> float:
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs)) if any(xs) else 1.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--policies", default="fcfs,fair")
    p.add_argument("--seeds", type=int, default=3, help="runs per policy, seeds 0..N-1")
    p.add_argument("--steps", type=int, default=4000, help="steps measured")
    p.add_argument("--warmup-steps", type=int, default=300)
    p.add_argument("--allowance", type=float, default=256.0, help="fair_allowance")
    add_workload_arguments(p)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument(
        "--reference",
        action="store_true",
        help="also print a light tenant's TTFT paced exactly at its share (no slots)",
    )
    args = p.parse_args()
    print("policy  seed  " + "  ".join(f"{t}: TTFT p50/p99 steps, out" for t in TENANTS) + "  Jain")
    for policy in args.policies.split(","):
        for seed in range(args.seeds):
            r = simulate(policy, seed, args)
            cells = "  ".join(
                f"{r[t]['p50']:5.0f} / {r[t]['p99']:5.1f}, {r[t]['output']:6.0f}" for t in TENANTS
            )
            print(
                f"{policy:6s}  {seed:4d}  {cells}  {jain([r[t]['service'] for t in TENANTS]):.3f}"
            )
    for seed in range(args.seeds if args.reference else 0):
        p50, p99 = pacing_reference(seed, args)
        print(
            f"paced at its share, no slots, seed {seed}: light TTFT p50 / p99 {p50:.1f} / {p99:.1f}"
        )


if __name__ == "__main__":
    main()
