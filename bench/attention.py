"""Attention kernels: the device's kernel vs the PyTorch reference vs PyTorch SDPA on contiguous KV.

The kernel is Triton on CUDA and the C++ CPU kernels (`kernels.cpu_attention`: decode and prefill)
on CPU. For each case (decodes, prefills over an empty cache, chunked prefills over cached context,
and write_kv) it prints the time of each implementation, the ratios to the kernel, and the KV
bandwidth of the kernel, after checking its output against the reference. SDPA runs on contiguous
(not paged) K/V of the same lengths, a lower bound for what paging costs. On CPU the
implementations are timed interleaved (round-robin calls), since the machine is shared and noisy,
and the default shapes are SmolLM2-135M's (9 query heads, 3 KV heads, head_dim 64).

`--cpu-prefill` instead compares, on CPU, the C++ prefill kernel (`paged_prefill`) with the SDPA
path it replaced (`prefill_sdpa`: gather each context, then SDPA), both on the paged cache, for
SmolLM2's prompt lengths: fresh prompts of 160, 512 and 2048 tokens, 64 new tokens over 1024
cached ones, a 1920-token step of twelve 160-token prompts and one of eight 256-token prompts.
`--cpu-decode` compares, on CPU, the prefill kernel's one-token items (what decodes run where every
row goes to that kernel, `cpu_attention.one_kernel_for_all_rows`) with the decode kernel, for 16
and 64 decodes over ~300 tokens, each over 30 layers' caches (a step's worth, read from
memory). `--cpu-tenants` times, on CPU, 8 such decodes behind one system prompt against three
(interleaved or sorted by prompt), as bench/fairness.py's fcfs and fair batches read them.
`--build-flags` builds the library with other compiler flags than
the host's (`kernels._build.FLAG_SETS`), e.g. "-O3 -mavx2 -mfma -mf16c -mno-avx512f -fopenmp" to
measure the AVX2 code on an AVX-512 machine (with ATEN_CPU_CAPABILITY=avx2
MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 in the environment, so that SDPA runs its AVX2
code too). `--best` reports best-of-N instead of medians, for machines shared with other work.

Usage: python bench/attention.py [--dtype bfloat16] [--heads 32] [--kv-heads 8] [--head-dim 128]
                               [--block-size 16] [--quick] [--cpu-prefill] [--cpu-decode]
                               [--cpu-tenants]
                               [--build-flags FLAGS] [--best]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import _record
import torch
import torch.nn.functional as F

from kernels import reference
from kernels.metadata import AttentionMetadata

Row = tuple[str, dict[str, float]]  # a printed line and its figures
BEST = False  # --best: time_interleaved reports each function's fastest call, not the median


@dataclass(frozen=True)
class Shape:
    heads: int
    kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype
    device: torch.device


@dataclass(frozen=True)
class Case:
    name: str
    batch: list[tuple[int, int]]  # (seq_len after the step, q_len) per sequence


def decode_cases(quick: bool, device: torch.device) -> list[Case]:
    if device.type == "cpu":  # engine-like decode steps: ~250-token contexts
        grid = [(1, 250), (16, 250), (64, 250), (16, 1024)]
        return [Case(f"decode b={b} ctx={n}", [(n, 1)] * b) for b, n in grid]
    grid = [(1, 1024), (16, 1024), (64, 1024)] if quick else [
        (1, 512), (1, 4096), (1, 32768), (16, 1024), (16, 8192), (64, 512), (64, 4096),
        (256, 1024),
    ]  # fmt: skip
    return [Case(f"decode b={b} ctx={n}", [(n, 1)] * b) for b, n in grid]


def prefill_cases(quick: bool) -> list[Case]:
    grid = [(1, 0, 256), (2, 256, 64)] if quick else [
        (1, 0, 512), (1, 0, 4096), (8, 0, 1024), (1, 4096, 512), (4, 2048, 256), (16, 8192, 64),
    ]  # fmt: skip
    return [Case(f"prefill b={b} ctx={c} q={q}", [(c + q, q)] * b) for b, c, q in grid]


# ---------------------------------------------------------------------------------------------
# inputs


def make_inputs(case: Case, shape: Shape, seed: int = 0) -> dict[str, Any]:
    """A paged cache holding every sequence (blocks in shuffled order), queries, metadata, and
    the same K/V gathered into contiguous [S, KVH, L, D] tensors for SDPA (all lengths equal)."""
    gen = torch.Generator().manual_seed(seed)
    bs, dev = shape.block_size, shape.device
    per_seq = [-(-n // bs) for n, _ in case.batch]
    num_blocks = sum(per_seq) + 1
    order = torch.randperm(num_blocks - 1, generator=gen) + 1  # block 0 stays unused
    tables, start = [], 0
    for n in per_seq:
        tables.append(order[start : start + n].tolist())
        start += n
    cache = torch.randn(
        2, num_blocks, bs, shape.kv_heads, shape.head_dim, generator=gen, dtype=torch.float32
    ).to(dev, shape.dtype)
    meta = make_metadata(tables, case.batch, bs, dev)
    query = torch.randn(meta.num_tokens, shape.heads, shape.head_dim, generator=gen)
    return {
        "cache": cache,
        "meta": meta,
        "query": query.to(dev, shape.dtype),
        "dense": dense_kv(cache, tables, [n for n, _ in case.batch]),
    }


def make_metadata(
    tables: list[list[int]], batch: list[tuple[int, int]], block_size: int, device: torch.device
) -> AttentionMetadata:
    slots: list[int] = []
    starts = [0]
    for table, (seq_len, q_len) in zip(tables, batch, strict=True):
        for pos in range(seq_len - q_len, seq_len):
            slots.append(table[pos // block_size] * block_size + pos % block_size)
        starts.append(starts[-1] + q_len)
    width = max(len(t) for t in tables)
    padded = [t + [0] * (width - len(t)) for t in tables]
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor([n for n, _ in batch], dtype=torch.int32, device=device),
        block_tables=torch.tensor(padded, dtype=torch.int32, device=device),
        max_query_len=max(q for _, q in batch),
        max_seq_len=max(n for n, _ in batch),
        query_start_loc_list=starts,
        seq_lens_list=[n for n, _ in batch],
    )


def dense_kv(cache: torch.Tensor, tables: list[list[int]], lens: list[int]) -> torch.Tensor:
    """[2, S, KVH, L, D] contiguous copy of each sequence's context (equal lengths only)."""
    if len(set(lens)) != 1:
        raise ValueError("SDPA comparison needs equal lengths")
    idx = torch.tensor(tables, device=cache.device)  # [S, n]
    kv = cache[:, idx]  # [2, S, n, bs, KVH, D]
    kv = kv.flatten(2, 3)[:, :, : lens[0]]  # [2, S, L, KVH, D]
    return kv.transpose(2, 3).contiguous()


# ---------------------------------------------------------------------------------------------
# the implementations


def run_sdpa(inputs: dict[str, Any], case: Case, scale: float) -> torch.Tensor:
    """SDPA over contiguous K/V: q [S, H, Q, D] against [S, KVH, L, D] with a causal offset."""
    seq_len, q_len = case.batch[0]
    num_seqs = len(case.batch)
    q = inputs["query"].view(num_seqs, q_len, *inputs["query"].shape[1:]).transpose(1, 2)
    k, v = inputs["dense"][0], inputs["dense"][1]
    mask = None
    if 1 < q_len < seq_len:  # chunked prefill: new token i sees keys 0 .. seq_len - q_len + i
        pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        mask = torch.arange(seq_len, device=q.device) <= pos[:, None]
    causal = q_len == seq_len and q_len > 1
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True
    )
    return out.transpose(1, 2).reshape(-1, *inputs["query"].shape[1:])


def implementations(backend: Any) -> dict[str, Callable[[dict[str, Any], Case, float], Any]]:
    impls: dict[str, Callable[[dict[str, Any], Case, float], Any]] = {
        "torch": lambda x, c, s: reference.paged_attention(x["query"], x["cache"], x["meta"], s),
        "sdpa": run_sdpa,
    }
    if backend is not None:
        impls["kernel"] = lambda x, c, s: backend.paged_attention(
            x["query"], x["cache"], x["meta"], s
        )
    return impls


# ---------------------------------------------------------------------------------------------
# timing and report


def time_interleaved(fns: dict[str, Callable[[], Any]], budget_s: float = 3.0) -> dict[str, float]:
    """Median (fastest with `BEST`) wall time of each function in ms, calling them round-robin
    (CPU, noisy machines)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    deadline = time.perf_counter() + budget_s
    while min(len(t) for t in times.values()) < 5 or (
        time.perf_counter() < deadline and min(len(t) for t in times.values()) < 200
    ):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: sorted(t)[0 if BEST else len(t) // 2] for name, t in times.items()}


def time_ms(fn: Callable[[], Any], device: torch.device, budget_s: float = 1.0) -> float:
    """Median wall time of `fn` in ms (CUDA: triton's do_bench with its cache flush)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def kv_bytes(case: Case, shape: Shape) -> int:
    elem = torch.empty((), dtype=shape.dtype).element_size()
    return sum(n for n, _ in case.batch) * 2 * shape.kv_heads * shape.head_dim * elem


def bench_attention(case: Case, shape: Shape, backend: Any) -> Row:
    inputs = make_inputs(case, shape)
    scale = shape.head_dim**-0.5
    impls = implementations(backend)
    want = impls["torch"](inputs, case, scale).float()
    for name in impls.keys() - {"torch"}:  # check before timing
        err = (impls[name](inputs, case, scale).float() - want).abs().max().item()
        if err > 5e-2:
            raise AssertionError(f"{case.name}: {name} differs from the reference by {err:.3g}")
    calls = {name: (lambda f=fn: f(inputs, case, scale)) for name, fn in impls.items()}
    if shape.device.type == "cpu":
        ms = time_interleaved(calls)
    else:
        ms = {name: time_ms(call, shape.device) for name, call in calls.items()}
    line = f"{case.name:<32}" + "".join(f"{ms[n]:>10.3f}" for n in ("torch", "sdpa"))
    figures = {f"{name}_ms": t for name, t in ms.items()}
    if "kernel" in ms:
        t = ms["kernel"]
        gbs = figures["kernel_kv_read_gbps"] = kv_bytes(case, shape) / (t * 1e-3) / 1e9
        line += f"{t:>10.3f}{ms['torch'] / t:>9.2f}x{ms['sdpa'] / t:>9.2f}x{gbs:>9.0f}"
    return line, figures


def bench_write_kv(tokens: int, shape: Shape, backend: Any) -> Row:
    gen = torch.Generator().manual_seed(0)
    num_blocks = -(-tokens // shape.block_size) + 1
    cache = torch.zeros(
        2, num_blocks, shape.block_size, shape.kv_heads, shape.head_dim, dtype=shape.dtype
    ).to(shape.device)
    kv = torch.randn(2, tokens, shape.kv_heads, shape.head_dim, generator=gen)
    kv = kv.to(shape.device, shape.dtype)
    slots = (torch.randperm(tokens, generator=gen) + shape.block_size).to(shape.device)
    ref = time_ms(lambda: reference.write_kv(kv[0], kv[1], cache, slots), shape.device)
    line = f"{f'write_kv T={tokens}':<32}{ref:>10.3f}{'-':>10}"
    figures = {"torch_ms": ref}
    if backend is not None:
        t = figures["kernel_ms"] = time_ms(
            lambda: backend.write_kv(kv[0], kv[1], cache, slots), shape.device
        )
        line += f"{t:>10.3f}{ref / t:>9.2f}x{'-':>10}"
    return line, figures


def cpu_prefill_cases() -> list[Case]:
    fresh = [Case(f"prompt L={n}", [(n, n)]) for n in (160, 512, 2048)]
    step = Case("12 prompts of 160 (one step)", [(160, 160)] * 12)
    eight = Case("8 prompts of 256 (one step)", [(256, 256)] * 8)
    return [*fresh, Case("64 new over 1024 cached", [(1088, 64)]), step, eight]


def bench_cpu_prefill(case: Case, shape: Shape) -> Row:
    """The prefill kernel vs the SDPA path on the same paged inputs: ms, ratio, kernel GFLOP/s
    (causal: 4 * D flops per query head and visible key)."""
    from kernels import cpu_attention

    x = make_inputs(case, shape)
    query, cache, meta = x["query"], x["cache"], x["meta"]
    scale, ids = shape.head_dim**-0.5, torch.arange(meta.num_seqs)

    def kernel() -> torch.Tensor:
        out = torch.empty_like(query)
        cpu_attention.paged_prefill(query, cache, meta, scale, out, ids)
        return out

    def sdpa() -> torch.Tensor:
        out = torch.empty_like(query)
        cpu_attention.prefill_sdpa(query, cache, meta, scale, out)
        return out

    err = (kernel().float() - sdpa().float()).abs().max().item()
    if err > 5e-2:
        raise AssertionError(f"{case.name}: the kernel differs from SDPA by {err:.3g}")
    ms = time_interleaved({"sdpa": sdpa, "kernel": kernel})
    visible = sum(q * (n - q) + q * (q + 1) // 2 for n, q in case.batch)  # keys seen, per head
    gflops = 4 * shape.head_dim * shape.heads * visible / (ms["kernel"] * 1e-3) / 1e9
    ratio = ms["sdpa"] / ms["kernel"]
    line = f"{case.name:<32}{ms['sdpa']:>10.3f}{ms['kernel']:>10.3f}{ratio:>9.2f}x{gflops:>9.0f}"
    return line, {"sdpa_ms": ms["sdpa"], "kernel_ms": ms["kernel"], "kernel_gflops": gflops}


DECODE_LAYERS = 30  # SmolLM2-135M's: `--cpu-decode` times a step's attention over all of them


def cpu_decode_cases() -> list[Case]:
    return [Case(f"{b} decodes ctx={n}", [(n, 1)] * b) for b, n in ((16, 300), (64, 300))]


def bench_cpu_decode(case: Case, shape: Shape) -> Row:
    """The prefill kernel's one-token items vs the decode kernel on the same decodes: ms, ratio."""
    from kernels import cpu_attention

    x = make_inputs(case, shape)
    query, cache, meta = x["query"], x["cache"], x["meta"]
    scale, ids = shape.head_dim**-0.5, torch.arange(meta.num_seqs)
    # one cache per layer, as in a step: one layer's cache alone stays in the CPU's caches and
    # hides the reads from memory that decode attention waits on (up to 1.6x, docs/determinism.md)
    caches = [cache, *(torch.randn_like(cache) for _ in range(DECODE_LAYERS - 1))]

    def tokens() -> torch.Tensor:
        out = torch.empty_like(query)
        for c in caches:
            cpu_attention.paged_prefill(query, c, meta, scale, out, ids)
        return out

    def decode() -> torch.Tensor:
        for c in caches:  # the last layer's output is checked, as tokens() leaves it
            out = cpu_attention.paged_decode(query, c, meta.block_tables, meta.seq_lens, scale)
        return out

    err = (tokens().float() - decode().float()).abs().max().item()
    if err > 5e-2:
        raise AssertionError(
            f"{case.name}: the token items differ from the decode kernel by {err:.3g}"
        )
    ms = time_interleaved({"decode": decode, "tokens": tokens})
    ratio = ms["tokens"] / ms["decode"]
    line = f"{case.name:<32}{ms['decode']:>10.3f}{ms['tokens']:>10.3f}{ratio:>9.2f}x"
    return line, {"decode_ms": ms["decode"], "token_items_ms": ms["tokens"]}


def require_cpu_prefill(shape: Shape) -> None:
    """Exit unless the C++ prefill kernel is built and serves `shape.dtype`."""
    from kernels import cpu_attention

    if shape.dtype not in cpu_attention.PREFILL_DTYPES or not cpu_attention.kernel_available():
        raise SystemExit("the CPU prefill kernel is unavailable for this dtype or build")


def main_cpu_tenants(shape: Shape, figures: dict[str, dict[str, float]]) -> None:
    """8 decodes over SmolLM2's 30 layers, each behind a system prompt: one prompt for all (one
    tenant's batch, as fcfs makes it in bench/fairness.py) against three prompts (three tenants',
    as fair makes it), their rows interleaved or sorted by prompt. Same rows, same lengths: only
    the number of distinct prompt blocks read per layer differs."""
    require_cpu_prefill(shape)
    print(f"CPU decodes behind system prompts, {torch.get_num_threads()} threads, "
          f"{DECODE_LAYERS} layers (ms per step)")  # fmt: skip
    print(f"{'prompt tokens':<16}{'one prompt':>12}{'3 interleaved':>15}{'3 sorted':>10}")
    for prompt_tokens in (304, 512):
        ms = bench_cpu_tenants(prompt_tokens, shape)
        print(f"{prompt_tokens:<16}{ms['one']:>12.3f}{ms['interleaved']:>15.3f}"
              f"{ms['sorted']:>10.3f}")  # fmt: skip
        figures[f"8 decodes, {prompt_tokens}-token prompts"] = {
            "one_prompt_ms": ms["one"],
            "three_interleaved_ms": ms["interleaved"],
            "three_sorted_ms": ms["sorted"],
        }


def bench_cpu_tenants(prompt_tokens: int, shape: Shape, rows: int = 8) -> dict[str, float]:
    """ms per step of `rows` decodes behind one prompt, and behind three (interleaved, sorted)."""
    from kernels import cpu_attention

    bs, blocks = shape.block_size, prompt_tokens // shape.block_size
    gen = torch.Generator().manual_seed(prompt_tokens)
    tails = [-(-int(torch.randint(20, 60, (1,), generator=gen)) // bs) for _ in range(rows)]
    lens = [blocks * bs + t * bs - 1 for t in tails]
    layouts = {"one": [0] * rows, "interleaved": [r % 3 for r in range(rows)]}
    layouts["sorted"] = sorted(layouts["interleaved"])
    first_tail = 1 + 3 * blocks  # block 0 unused, then the three prompts' blocks
    tail_starts = [first_tail + sum(tails[:r]) for r in range(rows)]

    def table(prompt: int, row: int) -> list[int]:
        tail = tail_starts[row]
        return [
            *range(1 + prompt * blocks, 1 + (prompt + 1) * blocks),
            *range(tail, tail + tails[row]),
        ]

    batch = [(n, 1) for n in lens]
    metas = {
        name: make_metadata([table(p, r) for r, p in enumerate(prompts)], batch, bs, shape.device)
        for name, prompts in layouts.items()
    }
    # stored head-major, as the engine allocates its cache (engine/model_runner.py)
    size = (2, first_tail + sum(tails), shape.kv_heads, bs, shape.head_dim)
    caches = [
        torch.randn(size, generator=gen).to(shape.dtype).transpose(2, 3)
        for _ in range(DECODE_LAYERS)
    ]
    query = torch.randn(rows, shape.heads, shape.head_dim, generator=gen).to(shape.dtype)
    scale, ids = shape.head_dim**-0.5, torch.arange(rows)

    def step(meta: AttentionMetadata) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            out = torch.empty_like(query)
            for cache in caches:
                cpu_attention.paged_prefill(query, cache, meta, scale, out, ids)
            return out

        return run

    return time_interleaved({name: step(meta) for name, meta in metas.items()})


def report(row: Row, name: str, figures: dict[str, dict[str, float]]) -> None:
    """Print the row's line and keep its figures under the case's name."""
    line, figures[name] = row
    print(line, flush=True)


def main_cpu_prefill(shape: Shape, figures: dict[str, dict[str, float]]) -> None:
    require_cpu_prefill(shape)
    print(f"CPU prefill, {torch.get_num_threads()} threads")
    print(f"{'case':<32}{'sdpa ms':>10}{'kernel ms':>10}{'sdpa/ker':>10}{'GFLOP/s':>9}")
    for case in cpu_prefill_cases():
        report(bench_cpu_prefill(case, shape), case.name, figures)


def main_cpu_decode(shape: Shape, figures: dict[str, dict[str, float]]) -> None:
    require_cpu_prefill(shape)
    print(f"CPU decodes, {torch.get_num_threads()} threads")
    print(f"over {DECODE_LAYERS} layers' caches (ms per step)")
    print(f"{'case':<32}{'decode ms':>10}{'items ms':>10}{'item/dec':>10}")
    for case in cpu_decode_cases():
        report(bench_cpu_decode(case, shape), case.name, figures)


def shared_cases(quick: bool) -> list[tuple[int, int, int]]:
    """(groups, decodes per group, shared prefix tokens) for `--triton-shared`."""
    if quick:
        return [(1, 8, 256), (2, 12, 512)]
    return [
        (4, 16, 800), (1, 64, 800), (1, 32, 800), (4, 4, 800), (1, 8, 512),
        (1, 64, 4096), (8, 32, 2048), (2, 128, 8192),
    ]  # fmt: skip


def make_shared_inputs(
    groups: int, members: int, prefix: int, shape: Shape, seed: int = 0
) -> dict[str, Any]:
    """Decodes in `groups` groups whose block tables start with the same blocks (the prefix's
    whole blocks), each with 0-64 tokens of its own after the prefix, on a random paged cache."""
    from kernels.metadata import prefix_groups

    gen = torch.Generator().manual_seed(seed)
    bs, dev = shape.block_size, shape.device
    lens = [prefix + int(t) + 1 for t in torch.randint(0, 65, (groups * members,), generator=gen)]
    whole = prefix // bs
    per_seq = [-(-n // bs) - whole for n in lens]
    num_blocks = groups * whole + sum(per_seq) + 1
    pool = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()  # block 0 stays unused
    tables = []
    for g in range(groups):
        common = [pool.pop() for _ in range(whole)]
        for i in range(g * members, (g + 1) * members):
            tables.append(common + [pool.pop() for _ in range(per_seq[i])])
    cache = torch.randn(
        2, num_blocks, bs, shape.kv_heads, shape.head_dim, generator=gen, dtype=torch.float32
    ).to(dev, shape.dtype)
    batch = [(n, 1) for n in lens]
    meta = make_metadata(tables, batch, bs, dev)
    meta.prefix_groups = prefix_groups(tables, [1] * len(lens), lens, bs)
    query = torch.randn(len(lens), shape.heads, shape.head_dim, generator=gen)
    return {"cache": cache, "meta": meta, "query": query.to(dev, shape.dtype), "batch": batch}


def bench_triton_shared(groups: int, members: int, prefix: int, shape: Shape) -> Row:
    """Triton's paged attention for one step of grouped decodes, their shared keys read once
    per program (`_shared_prefix_kernel`) vs once per decode; the bits must agree."""
    from kernels import triton_attention as ta

    inputs = make_shared_inputs(groups, members, prefix, shape)
    cache, query, scale = inputs["cache"], inputs["query"], shape.head_dim**-0.5
    group = shape.heads // shape.kv_heads
    config = ta.tiling(shape.dtype)[1]
    elem = torch.empty((), dtype=shape.dtype).element_size()
    per_token = 2 * shape.kv_heads * shape.head_dim * elem
    fresh = dataclasses.replace(inputs["meta"], derived={})
    picked = ta.shared_prefix_plan(fresh, group, config, per_token) is not None  # the rule
    saved = ta.SHARED_PREFIX, ta.GROUP_MIN_SAVED_BYTES
    ta.GROUP_MIN_SAVED_BYTES = 0
    outs, ms = {}, {}
    try:
        for name, on in (("grouped", True), ("ungrouped", False)):
            ta.SHARED_PREFIX = on
            meta = dataclasses.replace(inputs["meta"], derived={})

            def call(meta: AttentionMetadata = meta) -> torch.Tensor:
                return ta.paged_attention(query, cache, meta, scale)

            outs[name] = call()
            ms[name] = time_ms(call, shape.device)
        plan = ta.shared_prefix_plan(meta, group, config, per_token)
    finally:
        ta.SHARED_PREFIX, ta.GROUP_MIN_SAVED_BYTES = saved
    if not torch.equal(outs["grouped"], outs["ungrouped"]):
        raise AssertionError(f"{groups}x{members} on {prefix}: grouped bits differ")
    lens = [n for n, _ in inputs["batch"]]
    plain = sum(lens) * per_token
    shared = 0 if plan is None else sum(plan.programs[2].tolist()) * per_token
    resumed = 0 if plan is None else sum(plan.resume.tolist()) * per_token
    grouped = plain - resumed + shared
    name = f"{groups} x {members} on {prefix}"
    line = (
        f"{name:<22}{ms['grouped']:>10.3f}{ms['ungrouped']:>10.3f}"
        f"{ms['ungrouped'] / ms['grouped']:>9.2f}x{grouped / 1e6:>10.1f}{plain / 1e6:>10.1f}"
        f"{'grouped' if picked else 'ungrouped':>11}"
    )
    figures = {
        "grouped_ms": ms["grouped"],
        "ungrouped_ms": ms["ungrouped"],
        "grouped_kv_mb": grouped / 1e6,
        "ungrouped_kv_mb": plain / 1e6,
        "rule_groups": float(picked),
    }
    return line, figures


def main_triton_shared(shape: Shape, quick: bool, figures: dict[str, dict[str, float]]) -> None:
    if shape.device.type == "cuda":
        load_backend(shape.device, shape.dtype)
    else:  # Triton's interpreter: set before kernels.triton_* is first imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
    print(f"{'decodes':<22}{'grouped':>10}{'ungrouped':>10}{'speedup':>10}"
          f"{'KV MB':>10}{'KV MB':>10}{'rule':>11}")  # fmt: skip
    for groups, members, prefix in shared_cases(quick):
        row = bench_triton_shared(groups, members, prefix, shape)
        report(row, f"{groups}x{members} on {prefix}", figures)


def load_backend(device: torch.device, dtype: torch.dtype) -> tuple[str, Any]:
    """("triton", backend) on CUDA, ("cpu", backend) on CPU when the C++ kernel builds."""
    from kernels import get_attention_backend

    if device.type == "cuda":
        backend = get_attention_backend("triton", device)
        print("tiling (decode, unified):", *backend.tiling(dtype), "\n")
        return "triton", backend
    from kernels import cpu_attention

    t0 = time.perf_counter()
    if not cpu_attention.kernel_available():
        print("The CPU kernel is unavailable: measuring the reference and SDPA only.\n")
        return "", None
    print(f"CPU kernel loaded (or built) in {time.perf_counter() - t0:.1f} s\n")
    return "cpu", cpu_attention


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--heads", type=int, help="default: 32 on CUDA, 9 on CPU (SmolLM2)")
    ap.add_argument("--kv-heads", type=int, help="default: 8 on CUDA, 3 on CPU")
    ap.add_argument("--head-dim", type=int, help="default: 128 on CUDA, 64 on CPU")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--quick", action="store_true", help="small cases (the default on CPU)")
    ap.add_argument(
        "--cpu-prefill", action="store_true", help="the CPU prefill kernel vs the SDPA path"
    )
    ap.add_argument(
        "--cpu-decode",
        action="store_true",
        help="the CPU prefill kernel's one-token items vs the decode kernel",
    )
    ap.add_argument(
        "--cpu-tenants",
        action="store_true",
        help="decodes behind one system prompt vs three (bench/fairness.py's fcfs vs fair)",
    )
    ap.add_argument(
        "--build-flags", help="compiler flags for the C++ library instead of the host's"
    )
    ap.add_argument(
        "--best",
        action="store_true",
        help="CPU: report each implementation's fastest call (best-of-N), not the median; on a "
        "machine shared with other work the median also measures the neighbours",
    )
    ap.add_argument(
        "--triton-shared",
        action="store_true",
        help="Triton (CUDA, or the interpreter with --quick): decodes sharing a prefix, grouped "
        "vs ungrouped",
    )
    _record.add_arguments(ap)
    args = ap.parse_args()
    global BEST
    BEST = args.best
    if args.build_flags:
        from kernels import _build

        _build.FLAG_SETS = (args.build_flags.split(),)
    on_cpu = args.cpu_prefill or args.cpu_decode or args.cpu_tenants
    device = torch.device("cpu" if on_cpu or not torch.cuda.is_available() else "cuda")
    defaults = (32, 8, 128) if device.type == "cuda" else (9, 3, 64)
    heads, kv_heads, head_dim = (
        given or default
        for given, default in zip((args.heads, args.kv_heads, args.head_dim), defaults, strict=True)
    )
    shape = Shape(
        heads,
        kv_heads,
        head_dim,
        args.block_size,
        getattr(torch, args.dtype),
        device,
    )
    quick = args.quick or device.type != "cuda"
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{name}, {args.dtype}, H={shape.heads} KVH={shape.kv_heads} D={shape.head_dim} "
          f"block_size={shape.block_size}")  # fmt: skip
    figures: dict[str, dict[str, float]] = {}
    if args.cpu_prefill:
        kernel = "cpu prefill"
        main_cpu_prefill(shape, figures)
    elif args.cpu_decode:
        kernel = "cpu decode"
        main_cpu_decode(shape, figures)
    elif args.cpu_tenants:
        kernel = "cpu prefill (decodes behind system prompts)"
        main_cpu_tenants(shape, figures)
    elif args.triton_shared:
        kernel = "triton shared prefix"
        main_triton_shared(shape, quick, figures)
    else:
        kernel = main_attention(shape, quick, figures)
    record = {"shape": dataclasses.asdict(shape), "kernel": kernel, "cases": figures}
    if args.build_flags:
        record["build_flags"] = args.build_flags
    record["statistic"] = "best" if args.best else "median"
    _record.write(args, __file__, record)


def main_attention(shape: Shape, quick: bool, figures: dict[str, dict[str, float]]) -> str:
    """Every case of the device's kernel against the reference and SDPA; returns the kernel's
    name ("" when only the reference and SDPA ran)."""
    kernel, backend = load_backend(shape.device, shape.dtype)
    header = f"{'case':<32}{'torch ms':>10}{'sdpa ms':>10}"
    if backend is not None:
        k = kernel[:3]
        header += f"{kernel + ' ms':>10}{'torch/' + k:>10}{'sdpa/' + k:>10}{'KV GB/s':>9}"
    print(header)
    for case in decode_cases(quick, shape.device) + prefill_cases(quick):
        report(bench_attention(case, shape, backend), case.name, figures)
    for tokens in (16, 4096) if not quick else (16, 512):
        report(bench_write_kv(tokens, shape, backend), f"write_kv T={tokens}", figures)
    return kernel


if __name__ == "__main__":
    main()
