"""Offline throughput: prefixgate's engine vs transformers `generate` with static batches.

Runs, in one process and on the same seeded workload:
  1. our engine (continuous batching, paged KV) and transformers `generate` on padded static
     batches; prints output tokens/s, total tokens/s and their ratio;
  2. KV utilization over our run: tokens stored / slots allocated to sequences, summed over steps;
  3. a shared-prefix workload (one ~1,000-token system prompt, 32 short questions) with prefix
     caching on vs off;
and before those a single request's inter-token latency, the peers' workload shape (64 requests
of ~160 prompt tokens, 64-128 output tokens) 16 and 64 at a time, and the roofline. The figures
go to a JSON record under bench/results/ (see bench/_record.py). Peers are measured side by side
with bench/serve.py --url (docs/performance.md), never against figures from another machine.

Usage: python bench/offline.py [--model DIR] [--dtype auto] [--requests 64] [--hf-batch 16]
       python bench/offline.py --invariance-ab 6    (the cost of batch invariance, interleaved A/B)
       python bench/offline.py --shared-ab 4        (grouped vs ungrouped shared-prefix decodes)
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Any

import _record
import torch

from engine import LLM, SamplingParams
from engine.llm_engine import LLMEngine

WORDS = (
    "the of and to in is was for on that with as by at from his her an which or be are this "
    "their has have had not but one all were they been who more when will would there about "
    "into time its than two other new some could these may first then after only over such "
    "system model request server cache memory block token tenant prompt question answer river "
    "mountain city history science music language market energy water garden planet ocean"
).split()


def make_text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)).capitalize() + "."


def workload(tok: Any, n: int, seed: int) -> list[tuple[list[int], int]]:
    """n (prompt ids, max_tokens) pairs: prompts of 64-256 tokens, 16-128 output tokens."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = tok.encode(make_text(rng, 400), add_special_tokens=False)[: rng.randint(64, 256)]
        out.append((ids, rng.randint(16, 128)))
    return out


def run_engine(
    llm: LLM, work: list[tuple[list[int], int]], namespace: str | None = None
) -> dict[str, float]:
    engine: LLMEngine = llm.engine
    for ids, max_tokens in work:
        engine.add_request(
            ids,
            SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
            namespace=namespace,
        )
    stored = allocated = steps = 0
    bs = engine.block_manager.block_size
    t0 = time.perf_counter()
    while engine.has_unfinished:
        engine.step()
        steps += 1
        for seq in engine.scheduler.running:
            stored += seq.num_computed_tokens
            allocated += len(engine.block_manager.block_ids(seq.seq_id)) * bs
    elapsed = time.perf_counter() - t0
    out_tokens = sum(m for _, m in work)
    in_tokens = sum(len(p) for p, _ in work)
    return {
        "seconds": elapsed,
        "output_tps": out_tokens / elapsed,
        "total_tps": (out_tokens + in_tokens) / elapsed,
        "kv_utilization": stored / max(allocated, 1),
        "steps": steps,
        "preemptions": engine.scheduler.num_preemptions,
    }


def run_transformers(model: Any, work: list[tuple[list[int], int]], batch: int, pad: int):
    """Static batching: left-pad each batch, run it to its longest max_tokens."""
    device = next(model.parameters()).device
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = pad
    t0 = time.perf_counter()
    for i in range(0, len(work), batch):
        chunk = work[i : i + batch]
        width = max(len(p) for p, _ in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (p, _) in enumerate(chunk):
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        with torch.inference_mode():
            model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max(m for _, m in chunk),
                do_sample=False,
            )
    elapsed = time.perf_counter() - t0
    out_tokens = sum(m for _, m in work)  # useful tokens only; padding steps are waste
    in_tokens = sum(len(p) for p, _ in work)
    return {
        "seconds": elapsed,
        "output_tps": out_tokens / elapsed,
        "total_tps": (out_tokens + in_tokens) / elapsed,
    }


def shared_prefix(llm_kwargs: dict[str, Any], loaded: Any, caching: bool, seed: int):
    llm = LLM(**llm_kwargs, enable_prefix_caching=caching, loaded=loaded)
    rng = random.Random(seed)
    tok = llm.tokenizer
    system = tok.encode(make_text(rng, 900), add_special_tokens=False)[:1000]
    questions = [
        tok.encode(" Question: " + make_text(rng, 12), add_special_tokens=False) for _ in range(32)
    ]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate([system + q for q in questions], params)
    elapsed = time.perf_counter() - t0
    tokens = sum(len(system) + len(q) + 16 for q in questions)
    cached = sum(o.num_cached_tokens for o in outs)
    return elapsed, tokens / elapsed, cached, outs


def gemm_gflops(dtype: torch.dtype, device: torch.device, n: int = 2048, reps: int = 5) -> float:
    """The device's matmul rate: a large square GEMM in `dtype` (8192 wide on GPUs)."""
    if device.type == "cuda":
        n, reps = 8192, 20
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    torch.mm(a, b)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def read_gbps(device: torch.device, mib: int = 256, reps: int = 5) -> float:
    """The device's memory read rate: the best of `reps` sums over a `mib` MiB float32 tensor."""
    x = torch.ones(mib * 2**18, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        x.sum()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flops_per_token(engine: LLMEngine, with_head: bool) -> float:
    """Matmul FLOPs per token of the decoder (2 x weights), plus the LM head when sampled."""
    mc = engine.model_config
    h, q, kv, ffn = (
        mc.hidden_size,
        mc.num_heads * mc.head_dim,
        mc.num_kv_heads * mc.head_dim,
        (mc.intermediate_size),
    )
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * ffn
    total = mc.num_layers * per_layer + (mc.vocab_size * h if with_head else 0)
    return 2.0 * total


def step_split(llm: LLM, batch: int, prompt_len: int = 160, steps: int = 8) -> dict[str, float]:
    """Per-phase ms of one decode step at `batch` running sequences (after their prefill), and
    where the step runs every row through the prefill kernel (bfloat16 on our CPU kernels),
    the attention's share of the model phase (the kernel alone over every layer's cache)."""
    engine = llm.engine
    rng = random.Random(batch)
    # Long enough that none finishes before the timed steps: the first prompts decode while
    # the last ones are prefilled (chunked), for as many steps as the prefill takes.
    max_tokens = engine.max_model_len - prompt_len
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for _ in range(batch):
        engine.add_request([rng.randrange(100, 40000) for _ in range(prompt_len)], params)
    while (
        any(s.num_uncomputed > 1 for s in engine.scheduler.running) or engine.scheduler.num_waiting
    ):
        engine.step()
    engine.step()  # warm
    if len(engine.scheduler.running) != batch:
        raise RuntimeError(f"{len(engine.scheduler.running)} sequences running, not {batch}")
    mc = engine.model_config
    kv_row = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * engine.dtype.itemsize
    contexts = sum(s.num_computed_tokens for s in engine.scheduler.running) + batch * steps / 2
    engine.timings = type(engine.timings)()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    wall = (time.perf_counter() - t0) / steps
    split = engine.timings.per_step_ms()
    from kernels import cpu_attention

    if cpu_attention.one_kernel_for_all_rows(engine.runner.kv_caches[0]):
        split["attention"] = 1000 * attention_step(llm, grouped=True)[0]  # inside "model"
    for rid in list(engine.scheduler.requests):
        engine.abort(rid)
    return split | {"total": wall * 1000, "kv_bytes": contexts * kv_row}


def prefill_rate(llm: LLM, tokens: int = 2048, runs: int = 3) -> float:
    """Prompt tokens/s of one full prefill step (caching off by using random prompts): the median
    of `runs` steps after one warm-up step (the first step of a new batch shape also pays for
    oneDNN building its kernels for it)."""
    engine = llm.engine
    rng = random.Random(7)
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    n = tokens // 256
    rates = []
    for _ in range(runs + 1):
        for _ in range(n):
            engine.add_request([rng.randrange(100, 40000) for _ in range(256)], params)
        t0 = time.perf_counter()
        engine.step()
        rates.append(n * 256 / (time.perf_counter() - t0))
        while engine.has_unfinished:
            engine.step()
    return statistics.median(rates[1:])


def roofline(llm: LLM) -> dict[str, Any]:
    """Achieved rates against the GEMM limit (the issue's roofline) and, for decode steps, against
    the memory floor: every weight and the batch's whole KV cache read once per step at the
    measured read rate (a decode step cannot beat it, whatever the GEMM rate)."""
    engine = llm.engine
    peak = gemm_gflops(engine.dtype, engine.device)
    gbps = read_gbps(engine.device)
    prefill = prefill_rate(llm)
    prefill_limit = peak * 1e9 / flops_per_token(engine, with_head=False)
    decoder, head = flops_per_token(engine, False), flops_per_token(engine, True)
    weight_bytes = head / 2 * engine.dtype.itemsize  # each matmul weight read once per step
    print(
        f"roofline: {engine.dtype} GEMM {peak:.0f} GFLOP/s, memory read {gbps:.1f} GB/s; decoder "
        f"{decoder / 1e6:.0f} MFLOP/token (+LM head {(head - decoder) / 1e6:.0f}), weights "
        f"{weight_bytes / 1e6:.0f} MB"
    )
    print(
        f"  prefill-heavy: {prefill:.0f} tok/s of a {prefill_limit:.0f} tok/s limit = "
        f"{prefill / prefill_limit:.0%}"
    )
    figures: dict[str, Any] = {
        "gemm_gflops": peak,
        "memory_read_gbps": gbps,
        "prefill_tokens_per_s": prefill,
        "prefill_of_gemm_limit": prefill / prefill_limit,
        "decode": {},
    }
    decode_limit = peak * 1e9 / flops_per_token(engine, with_head=True)
    for batch in (1, 16, 64):
        split = step_split(llm, batch)
        rate = batch / (split["total"] / 1000)
        parts = " ".join(f"{k} {v:.1f}" for k, v in split.items() if k not in ("total", "kv_bytes"))
        attention_gbps = None
        if "attention" in split:  # part of the model's time: its share printed beside
            attention_gbps = split["kv_bytes"] / (split["attention"] / 1000) / 1e9
            parts += (
                f" = {split['attention'] / split['model']:.0%} of model, K/V read at "
                f"{attention_gbps:.1f} GB/s"
            )
        floor_ms = (weight_bytes + split["kv_bytes"]) / (gbps * 1e9) * 1000
        print(
            f"  decode batch {batch:>2}: step {split['total']:.1f} ms ({parts}) -> "
            f"{rate:.0f} tok/s = {rate / decode_limit:.0%} of {decode_limit:.0f} tok/s limit; "
            f"memory floor {floor_ms:.1f} ms (KV {split['kv_bytes'] / 1e6:.0f} MB) = "
            f"{floor_ms / split['total']:.0%} of it"
        )
        figures["decode"][batch] = {
            "step_ms": split["total"],
            "split_ms": {k: v for k, v in split.items() if k not in ("total", "kv_bytes")},
            "of_gemm_limit": rate / decode_limit,
            "memory_floor_ms": floor_ms,
            "of_memory_floor": floor_ms / split["total"],
            "attention_kv_gbps": attention_gbps,
        }
    return figures


def peer_workload(
    llm: LLM,
    concurrency: int,
    requests: int = 64,
    namespace: str | None = None,
    quiet: bool = False,
) -> dict[str, float]:
    """The peers' workload: ~160-token prompts, up to 128 output tokens, `concurrency` at a time.
    Each concurrency gets its own prompts: a rerun of the same ones would hit the prefix cache
    (unless it runs in a `namespace` of its own)."""
    engine = llm.engine
    rng = random.Random(concurrency)
    tok = llm.tokenizer
    work = [
        (tok.encode(make_text(rng, 300), add_special_tokens=False)[:160], rng.randint(64, 128))
        for _ in range(requests)
    ]
    saved = engine.scheduler.config.max_num_seqs
    engine.scheduler.config.max_num_seqs = concurrency
    try:
        result = run_engine(llm, work, namespace)
    finally:
        engine.scheduler.config.max_num_seqs = saved
    if quiet:
        return result
    print(
        f"peer workload ({requests} requests, {concurrency} at a time): "
        f"output {result['output_tps']:.0f} tok/s, total {result['total_tps']:.0f} tok/s"
    )
    return result


def invariance_ab(llm: LLM, rounds: int) -> dict[str, Any]:
    """What batch invariance costs (docs/determinism.md): output tok/s of the peer workload, 16
    and 64 at a time, with the batch-invariant kernels (the default) and with the fastest
    non-invariant configuration (bfloat16 decodes on the decode kernel), interleaved in this
    process (ABBA...), each run in a prefix-cache namespace of its own; medians."""
    from kernels import cpu_attention

    runs: dict[str, dict[int, list[float]]] = {"invariant": {}, "fastest": {}}
    for r in range(rounds):
        for mode in ("invariant", "fastest") if r % 2 == 0 else ("fastest", "invariant"):
            cpu_attention.BATCH_INVARIANT = mode == "invariant"
            try:
                for c in (16, 64):
                    tps = peer_workload(llm, c, namespace=f"ab-{r}-{mode}", quiet=True)
                    runs[mode].setdefault(c, []).append(tps["output_tps"])
            finally:
                cpu_attention.BATCH_INVARIANT = True
    figures: dict[str, Any] = {"rounds": rounds}
    for c in (16, 64):
        inv, fast = (statistics.median(runs[m][c]) for m in ("invariant", "fastest"))
        figures[c] = {"invariant_tps": inv, "fastest_tps": fast, "cost": 1 - inv / fast}
        print(
            f"batch invariance, peers {c} at a time: invariant {inv:.0f} vs fastest {fast:.0f} "
            f"output tok/s (medians of {rounds}, interleaved): cost {1 - inv / fast:+.1%}"
        )
    return figures


# K groups x G sequences decoding on P-token prefixes that each group shares (issue #18)
SHARED_CASES = ((4, 16, 800), (1, 64, 800), (1, 32, 800), (4, 4, 800), (1, 8, 512))
AB_STEPS = 4  # decode steps per A/B sample


def shared_decodes(llm: LLM, groups: int, size: int, prefix: int, max_tokens: int) -> None:
    """Leave `groups` x `size` sequences decoding: each group's first `prefix` prompt tokens come
    from the prefix cache (the same blocks: its prompt ran once before), then a question of its
    own (4-40 tokens)."""
    engine = llm.engine
    rng = random.Random(groups * size + prefix)
    prompts = [[rng.randrange(100, 40000) for _ in range(prefix)] for _ in range(groups)]
    for p in prompts:
        engine.add_request(p, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    while engine.has_unfinished:
        engine.step()
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for p in prompts:
        for _ in range(size):
            engine.add_request(p + [rng.randrange(100, 40000) for _ in range(rng.randint(4, 40))],
                               params)  # fmt: skip
    sched = engine.scheduler
    while any(s.num_uncomputed > 1 for s in sched.running) or sched.num_waiting:
        engine.step()


def attention_step(llm: LLM, grouped: bool, reps: int = 3) -> tuple[float, int]:
    """The prefill kernel's attention of one decode token per running sequence over every
    layer's cache (the best of `reps`, seconds), and the K/V bytes it reads (each grouped item
    reads its shared keys once for its decodes, `csrc/prefill_attention.cpp`)."""
    from kernels import cpu_attention
    from kernels.metadata import AttentionMetadata, prefix_groups

    engine = llm.engine
    mc, bs = engine.model_config, engine.block_manager.block_size
    running = engine.scheduler.running
    tables = [engine.block_manager.block_ids(s.seq_id) for s in running]
    lens = [s.num_computed_tokens for s in running]  # the last computed token as the new one
    width = max(len(t) for t in tables)
    starts = list(range(len(lens) + 1))
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(len(lens), dtype=torch.long),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(lens, dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        max_query_len=1,
        max_seq_len=max(lens),
        query_start_loc_list=starts,
        seq_lens_list=lens,
    )
    groups = prefix_groups(tables, [1] * len(lens), lens, bs) if grouped else None
    query = torch.randn(len(lens), mc.num_heads, mc.head_dim).to(engine.dtype)
    out = torch.empty_like(query)
    ids = torch.arange(len(lens))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for cache in engine.runner.kv_caches:
            cpu_attention.paged_prefill(query, cache, meta, mc.head_dim**-0.5, out, ids, groups)
        best = min(best, time.perf_counter() - t0)
    keys = sum(lens)
    if groups is not None:
        per_item = 64 // (mc.num_heads // mc.num_kv_heads)  # decodes per grouped item
        of = groups.group_of.tolist()
        for g, shared in enumerate(groups.shared_keys.tolist()):
            n = of.count(g)
            keys -= (n - -(-n // per_item)) * shared  # read once per item, not once per decode
    kv_row = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * engine.dtype.itemsize
    return best, keys * kv_row


def shared_split(llm: LLM, rounds: int) -> dict[str, Any]:
    """Where the served shared-prefix workload's time goes, in one process: bench/serve.py's
    `--shared-prefixes 4 --shared-prefix-tokens 640` shape (64 requests, each one of 4 shared
    640-token prefixes and 160 tokens of its own, 32-128 output tokens, 16 at a time; fresh
    prefixes each round), every step counted as one with prompt tokens (a prefill chunk, with the
    decodes beside it) or a decode-only step: their number, wall time, tokens and ms per step."""
    engine = llm.engine
    sched = engine.scheduler
    rng = random.Random(640)
    schedule = sched.schedule
    batched: list[tuple[int, int]] = []  # (tokens, sequences) of the step being run

    def counted() -> Any:
        out = schedule()
        batched.append((out.num_batched_tokens, len(out.seqs)))
        return out

    saved = sched.config.max_num_seqs
    sched.config.max_num_seqs = 16
    sched.schedule = counted  # type: ignore[method-assign]
    runs = []
    try:
        for r in range(rounds + 1):  # the first warms up
            prefixes = [[rng.randrange(100, 40000) for _ in range(640)] for _ in range(4)]
            work = [
                (prefixes[i % 4] + [rng.randrange(100, 40000) for _ in range(160)],
                 rng.randint(32, 128))
                for i in range(64)
            ]  # fmt: skip
            for prompt, n in work:
                engine.add_request(
                    prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
                )
            kinds: dict[str, list[float]] = {"prompt": [0, 0.0, 0], "decode": [0, 0.0, 0]}
            t0 = time.perf_counter()
            while engine.has_unfinished:
                t = time.perf_counter()
                engine.step()
                tokens, seqs = batched.pop()
                kind = kinds["prompt" if tokens > seqs else "decode"]
                kind[0] += 1
                kind[1] += time.perf_counter() - t
                kind[2] += tokens
            wall = time.perf_counter() - t0
            run: dict[str, Any] = {
                "wall_s": wall,
                "total_tps": sum(len(p) + n for p, n in work) / wall,
                "output_tps": sum(n for _, n in work) / wall,
            }
            parts = []
            for name, (count, secs, computed) in kinds.items():
                k = run[name] = {
                    "steps": int(count),
                    "share_of_wall": secs / wall,
                    "ms_per_step": 1000 * secs / max(count, 1),
                    "tokens_per_step": computed / max(count, 1),
                }
                parts.append(
                    f"{name} steps {k['steps']} ({k['share_of_wall']:.0%} of the time, "
                    f"{k['ms_per_step']:.1f} ms, {k['tokens_per_step']:.0f} tokens each)"
                )
            if r == 0:
                continue
            runs.append(run)
            print(
                f"shared-prefix workload, round {r}: total {run['total_tps']:.0f} tok/s, output "
                f"{run['output_tps']:.0f} tok/s; " + "; ".join(parts)
            )
    finally:
        sched.schedule = schedule  # type: ignore[method-assign]
        sched.config.max_num_seqs = saved
    return {"rounds": runs}


def shared_ab(llm: LLM, rounds: int) -> dict[str, Any]:
    """Shared-prefix decodes (`SHARED_CASES`), grouped (`cpu_attention.GROUP_ALWAYS`) vs
    ungrouped (`SHARED_PREFIX` off), interleaved (ABBA...) on the same running sequences: per
    step, the attention kernel's time over every layer and the K/V bytes it reads, and the whole
    engine step's time; medians of `rounds` samples of each; and which of the two the engine
    picks by default (`cpu_attention.groups_that_pay`)."""
    from kernels import cpu_attention

    engine = llm.engine
    figures: dict[str, Any] = {"rounds": rounds, "steps_per_sample": AB_STEPS}
    for groups, size, prefix in SHARED_CASES:
        shared_decodes(llm, groups, size, prefix, 2 * rounds * AB_STEPS + 4)
        runs: dict[str, dict[str, list[float]]] = {"grouped": {}, "ungrouped": {}}
        for r in range(rounds):
            for mode in ("grouped", "ungrouped") if r % 2 == 0 else ("ungrouped", "grouped"):
                grouped = mode == "grouped"
                cpu_attention.SHARED_PREFIX = grouped
                cpu_attention.GROUP_ALWAYS = grouped  # whether the rule would group or not
                try:
                    t0 = time.perf_counter()
                    for _ in range(AB_STEPS):
                        engine.step()
                    step = (time.perf_counter() - t0) / AB_STEPS
                finally:
                    cpu_attention.SHARED_PREFIX, cpu_attention.GROUP_ALWAYS = True, False
                attn, kv = attention_step(llm, grouped)
                for key, v in (("step_ms", 1000 * step), ("attention_ms", 1000 * attn),
                               ("kv_mb", kv / 1e6)):  # fmt: skip
                    runs[mode].setdefault(key, []).append(v)
        rule = rule_groups(llm)
        for rid in list(engine.scheduler.requests):
            engine.abort(rid)
        case: dict[str, Any] = {
            m: {k: statistics.median(v) for k, v in runs[m].items()} for m in runs
        }
        case["rule_groups"] = rule
        figures[f"{groups}x{size} on {prefix}"] = case
        g, u = case["grouped"], case["ungrouped"]
        seqs, attn = groups * size, g["attention_ms"] / u["attention_ms"] - 1
        print(
            f"shared prefix, {groups} x {size} on {prefix} tokens: attention "
            f"{g['attention_ms']:.1f} vs {u['attention_ms']:.1f} ms per step ({attn:+.0%}),"
            f" K/V read {g['kv_mb']:.0f} vs {u['kv_mb']:.0f} MB; step {g['step_ms']:.1f} vs "
            f"{u['step_ms']:.1f} ms = {seqs / g['step_ms'] * 1000:.0f} vs "
            f"{seqs / u['step_ms'] * 1000:.0f} output tok/s (grouped vs ungrouped, medians of "
            f"{rounds} interleaved); by default {'grouped' if rule else 'ungrouped'}"
        )
    return figures


def rule_groups(llm: LLM) -> bool:
    """Whether the engine groups the running decodes' step (`cpu_attention.groups_that_pay`)."""
    from kernels import cpu_attention
    from kernels.metadata import prefix_groups

    engine = llm.engine
    running = engine.scheduler.running
    tables = [engine.block_manager.block_ids(s.seq_id) for s in running]
    lens = [s.num_computed_tokens + 1 for s in running]
    groups = prefix_groups(tables, [1] * len(lens), lens, engine.block_manager.block_size)
    cache = engine.runner.kv_caches[0]
    return groups is not None and cpu_attention.groups_that_pay(groups, cache) is not None


def single_stream_itl(llm: LLM, tokens: int = 64) -> float:
    """Median inter-token latency (ms) of one request decoding alone."""
    engine = llm.engine
    prompt = llm.encode(make_text(random.Random(3), 120))[:160]
    engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True))
    engine.step()  # prefill
    gaps = []
    while engine.has_unfinished:
        t0 = time.perf_counter()
        engine.step()
        gaps.append(time.perf_counter() - t0)
    gaps.sort()
    itl = 1000 * gaps[len(gaps) // 2]
    print(f"single-request inter-token latency: {itl:.1f} ms (p50)")
    return itl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="auto", help="auto: cuda when available, else cpu")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--hf-batch", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--only-roofline", action="store_true")
    ap.add_argument("--only-peers", action="store_true")
    ap.add_argument(
        "--invariance-ab",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="only the cost of batch invariance: ROUNDS interleaved A/B runs of the peer workload",
    )
    ap.add_argument(
        "--shared-ab",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="only shared-prefix decodes, grouped vs ungrouped: ROUNDS interleaved A/B samples",
    )
    ap.add_argument(
        "--shared-split",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="only the served shared-prefix workload: steps with prompt tokens vs decode-only",
    )
    _record.add_arguments(ap)
    args = ap.parse_args()
    torch.manual_seed(args.seed)

    kwargs: dict[str, Any] = dict(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        max_num_seqs=args.max_num_seqs,
        kv_cache_gib=1.0,
    )
    llm = LLM(**kwargs)
    engine = llm.engine
    print(
        f"model={engine.model_name} dtype={engine.dtype} device={engine.device} "
        f"blocks={engine.num_blocks} threads={torch.get_num_threads()}"
    )
    figures: dict[str, Any] = {
        "model": engine.model_name,
        "dtype": str(engine.dtype).removeprefix("torch."),
        "device": str(engine.device),
        "threads": torch.get_num_threads(),
    }
    measure(args, llm, kwargs, figures)
    _record.write(args, __file__, figures)


def measure(
    args: argparse.Namespace, llm: LLM, kwargs: dict[str, Any], figures: dict[str, Any]
) -> None:
    """Run the parts `args` asks for, adding each one's figures to `figures`."""
    engine = llm.engine
    if args.invariance_ab:
        figures["invariance_ab"] = invariance_ab(llm, args.invariance_ab)
        return
    if args.shared_ab:
        figures["shared_ab"] = shared_ab(llm, args.shared_ab)
        return
    if args.shared_split:
        figures["shared_split"] = shared_split(llm, args.shared_split)
        return
    figures["single_request_itl_ms"] = single_stream_itl(llm)
    figures["peer_workload"] = {c: peer_workload(llm, c) for c in (16, 64)}
    if args.only_peers:
        return
    figures["roofline"] = roofline(llm)
    if args.only_roofline:
        return
    work = workload(llm.tokenizer, args.requests, args.seed)
    ours = figures["engine"] = run_engine(llm, work)
    print(
        f"prefixgate   : {ours['seconds']:.1f}s  output {ours['output_tps']:.1f} tok/s  "
        f"total {ours['total_tps']:.1f} tok/s  steps {ours['steps']}  "
        f"preemptions {ours['preemptions']}"
    )
    print(f"KV utilization (tokens stored / slots allocated): {ours['kv_utilization']:.1%}")

    if not args.skip_hf:
        from transformers import AutoModelForCausalLM

        from engine.models.loader import gguf_to_hf_dir

        path = engine.loaded.path
        hf_dir = gguf_to_hf_dir(path, engine.config.cache_dir) if path.endswith(".gguf") else path
        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=engine.dtype)
        hf = hf.to(engine.device).eval()
        theirs = figures["transformers"] = run_transformers(hf, work, args.hf_batch, pad=0)
        theirs["static_batch"] = args.hf_batch
        figures["vs_transformers"] = {
            "output": ours["output_tps"] / theirs["output_tps"],
            "total": ours["total_tps"] / theirs["total_tps"],
        }
        print(
            f"transformers : {theirs['seconds']:.1f}s  output {theirs['output_tps']:.1f} tok/s "
            f" total {theirs['total_tps']:.1f} tok/s  (static batches of {args.hf_batch})"
        )
        print(
            f"ratio        : output {figures['vs_transformers']['output']:.2f}x  "
            f"total {figures['vs_transformers']['total']:.2f}x"
        )
        del hf

    off = shared_prefix(kwargs, engine.loaded, False, args.seed)
    on = shared_prefix(kwargs, engine.loaded, True, args.seed)
    same = sum(
        a.outputs[0].token_ids == b.outputs[0].token_ids for a, b in zip(on[3], off[3], strict=True)
    )
    figures["shared_prefix"] = {
        "caching_off_s": off[0],
        "caching_on_s": on[0],
        "speedup": off[0] / on[0],
        "cached_prompt_tokens": on[2],
        "identical_outputs": same,
        "requests": len(on[3]),
    }
    print(
        f"shared prefix (1000-token system prompt, 32 questions): caching off {off[0]:.1f}s "
        f"({off[1]:.0f} tok/s), on {on[0]:.1f}s ({on[1]:.0f} tok/s), "
        f"speedup {off[0] / on[0]:.2f}x, cached prompt tokens {on[2]}, "
        f"identical outputs {same}/{len(on[3])}"
    )


if __name__ == "__main__":
    main()
