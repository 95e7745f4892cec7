"""Grouped decodes in the C++ prefill kernel: decodes that share leading blocks attend those keys
once for the group, and every output bit is the one they get ungrouped. `prefix_groups` finds
the groups a step's block tables allow."""

from __future__ import annotations

import random

import pytest
import torch

from kernels import cpu_attention, reference
from kernels.metadata import KEY_BLOCK, PrefixGroups, prefix_groups
from tests.kernels.sharing import KV_HEADS, Step, bits, found, random_groups, shared_step


def attend(step: Step, groups: PrefixGroups | None) -> torch.Tensor:
    """Every row of the step through the prefill kernel, with or without `groups`."""
    out = torch.full(step.query.shape, float("nan"), dtype=step.cache.dtype)
    ids = torch.arange(step.meta.num_seqs)
    cpu_attention.paged_prefill(step.query, step.cache, step.meta, 0.125, out, ids, groups)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 3, 7, 16])
def test_grouped_decodes_are_bit_identical(kernel: object, dtype: torch.dtype, group: int) -> None:
    """Random sharing patterns, beside prefills, chunks over cached context and lone decodes:
    the grouped call writes exactly the ungrouped call's bits, in every row."""
    rng = random.Random(group)
    for trial in range(4):
        block_size = rng.choice([4, 16, 32])
        step = shared_step(
            random_groups(rng, rng.randint(1, 4)),
            [(rng.randint(2, 200), rng.randint(2, 40)) for _ in range(2)] + [(90, 1), (33, 1)],
            block_size, group, dtype, seed=trial,
        )  # fmt: skip
        groups = found(step)
        plain, grouped = attend(step, None), attend(step, groups)
        assert not grouped.isnan().any()
        assert torch.equal(bits(grouped), bits(plain))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [16, 32, 128, 24])
def test_every_head_dim_and_path(kernel: object, dtype: torch.dtype, head_dim: int) -> None:
    """The vector paths (16/32/128; bfloat16 on AMX tiles where the CPU has them) and the plain
    loops (24): grouped equals ungrouped, and both the reference."""
    step = shared_step([(200, [5, 0, 70, 3]), (64, [0, 1])], [(40, 9)], 16, 3, dtype, head_dim)
    plain, grouped = attend(step, None), attend(step, found(step))
    assert torch.equal(bits(grouped), bits(plain))
    want = reference.paged_attention(step.query.float(), step.cache.float(), step.meta, 0.125)
    tol = 1e-5 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(grouped.float(), want, atol=tol, rtol=tol)


def test_large_groups_split_on_any_thread_count(kernel: object) -> None:
    """64 decodes of one prefix (more than one item holds) give the same bits grouped and
    ungrouped, on one thread and on two."""
    step = shared_step([(800, list(range(64)))], [], 16, 3, torch.bfloat16, seed=3)
    groups = found(step)
    assert groups.shared_keys.tolist() == [768]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = attend(step, groups)
        torch.set_num_threads(2)
        two = attend(step, groups)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(bits(one), bits(two))
    assert torch.equal(bits(one), bits(attend(step, None)))


def test_layer_plan_passes_groups(kernel: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """paged_attention hands the step's groups to the prefill kernel for bfloat16 caches, unless
    SHARED_PREFIX is off; the output is the same."""
    step = shared_step([(130, [1, 2, 3])], [(20, 20)], 16, 3, torch.bfloat16)
    step.meta.prefix_groups = found(step)
    if not cpu_attention.one_kernel_for_all_rows(step.cache):
        pytest.skip("bfloat16 decodes take the decode kernel here")
    seen: list[PrefixGroups | None] = []
    real = cpu_attention.paged_prefill

    def spy(*args: object) -> None:
        seen.append(args[6])  # type: ignore[arg-type]
        real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(cpu_attention, "paged_prefill", spy)
    monkeypatch.setattr(cpu_attention, "GROUP_ALWAYS", True)  # 3 decodes: grouped on any CPU
    grouped = cpu_attention.paged_attention(step.query, step.cache, step.meta, 0.125)
    monkeypatch.setattr(cpu_attention, "SHARED_PREFIX", False)
    step.meta.derived.clear()
    plain = cpu_attention.paged_attention(step.query, step.cache, step.meta, 0.125)
    assert seen == [step.meta.prefix_groups, None]
    assert torch.equal(bits(grouped), bits(plain))


def test_bad_groups_are_refused(kernel: object) -> None:
    step = shared_step([(128, [70, 80])], [(20, 20)], 16, 3, torch.float32)
    good = found(step)
    op = torch.ops.prefixgate_cpu.paged_prefill_attention
    m = step.meta
    out = torch.empty_like(step.query)
    ids = torch.arange(m.num_seqs)

    def call(group_of: torch.Tensor, keys: torch.Tensor) -> None:
        op(out, step.query, step.cache, m.block_tables, m.query_start_loc, m.seq_lens, ids, 0.1,
           group_of, keys)  # fmt: skip

    call(good.group_of, good.shared_keys)
    with pytest.raises(RuntimeError, match="not a positive multiple"):
        call(good.group_of, good.shared_keys - 1)
    with pytest.raises(RuntimeError, match="differ in block"):
        call(good.group_of, good.shared_keys + KEY_BLOCK)  # past the shared blocks
    with pytest.raises(RuntimeError, match="new tokens, not 1"):
        call(torch.zeros_like(good.group_of), good.shared_keys)  # the prefill too
    with pytest.raises(RuntimeError, match="out of range"):
        call(good.group_of + 1, good.shared_keys)
    with pytest.raises(RuntimeError, match="go together"):
        op(out, step.query, step.cache, m.block_tables, m.query_start_loc, m.seq_lens, ids, 0.1,
           good.group_of)  # fmt: skip


def test_prefix_groups_save_the_most_reads() -> None:
    """Whole 64-key blocks only, decodes only, and the split that saves the most key reads."""
    bs = 16
    public = list(range(100, 104))  # 64 keys every sequence shares
    a = [*public, *range(200, 212)]  # 4 more blocks, then A's 256-key prompt
    b = [*public, *range(300, 312)]
    # 3 of tenant A (256 keys each, then a block of their own), 2 of B, a chunk, a lone decode
    tables = [[*a, 1000 + i] for i in range(3)] + [[*b, 2000 + i] for i in range(2)]
    tables += [[*a, 3000], [*public, 4000]]
    q_lens = [1, 1, 1, 1, 1, 5, 1]  # the 6th is a prefill chunk: never grouped
    lens = [16 * 16 + 3] * 5 + [16 * 16 + 8, 4 * 16 + 1]
    groups = prefix_groups(tables, q_lens, lens, bs)
    assert groups is not None
    of = groups.group_of.tolist()
    keys = groups.shared_keys.tolist()
    # A's three and B's two on their 256-key prompts beat all six on the 64 public keys
    assert of[5] == of[6] == -1
    assert len({of[0], of[1], of[2]}) == 1 and len({of[3], of[4]}) == 1 and of[0] != of[3]
    assert keys[of[0]] == keys[of[3]] == 256
    # a run ending mid-block of 64 keys shares the whole 64-key blocks before it
    short = prefix_groups([[*a[:6], 7], [*a[:6], 8]], [1, 1], [6 * 16 + 5] * 2, bs)
    assert short is not None and short.shared_keys.tolist() == [64]
    # nothing to share: less than 64 keys in common, or one decode alone
    assert prefix_groups([[*a[:3], 1], [*a[:3], 2]], [1, 1], [60, 60], bs) is None
    assert prefix_groups([a, b], [1, 1], [200, 200], bs) is not None  # public's 64 keys
    assert prefix_groups([a], [1], [200], bs) is None


def groups_of(sizes: list[int], keys: list[int], lone: int = 0) -> PrefixGroups:
    """Groups of these sizes sharing these keys, then `lone` ungrouped decodes."""
    of = [g for g, n in enumerate(sizes) for _ in range(n)] + [-1] * lone
    return PrefixGroups(torch.tensor(of, dtype=torch.int32), torch.tensor(keys, dtype=torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_groups_pay_on_the_vector_paths_only_when_many_share_long_prefixes(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without tiles, a step groups only the groups on `VECTOR_GROUP_MIN_KEYS` keys or more, and
    only with `VECTOR_GROUP_MIN_DECODES_PER_THREAD` such decodes per thread; on AMX tiles
    (bfloat16) every group, and with `GROUP_ALWAYS` every group on any path."""
    monkeypatch.setattr(cpu_attention, "_amx", lambda: False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    cache = torch.empty(2, 1, 16, KV_HEADS, 64, dtype=dtype)
    pay = cpu_attention.groups_that_pay
    assert pay(groups_of([8], [512]), cache) is None  # a tenant's 8 decodes on 512 keys
    assert pay(groups_of([4, 4, 4], [768] * 3), cache) is None  # 12 decodes: too few
    assert pay(groups_of([31], [1024]), cache) is None  # one short of 16 per thread
    big = groups_of([16, 16], [768, 1024], lone=3)
    assert pay(big, cache) is big
    # the groups on short prefixes are dropped, the others renumbered
    mixed = pay(groups_of([5, 32, 6], [512, 768, 64], lone=1), cache)
    assert mixed is not None
    assert mixed.group_of.tolist() == [-1] * 5 + [0] * 32 + [-1] * 7
    assert mixed.shared_keys.tolist() == [768]
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert pay(big, cache) is None  # 32 decodes on 4 threads
    small = groups_of([3], [64])
    monkeypatch.setattr(cpu_attention, "_amx", lambda: True)
    assert (pay(small, cache) is small) == (dtype == torch.bfloat16)  # tiles: bfloat16 only
    monkeypatch.setattr(cpu_attention, "_amx", lambda: False)
    monkeypatch.setattr(cpu_attention, "GROUP_ALWAYS", True)
    assert pay(small, cache) is small
