"""The reference paged attention agrees with plain dense causal attention."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import get_attention_backend, reference
from tests.helpers import ToyBlockAllocator

HEAD_DIM = 16
KV_HEADS = 2


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """Naive causal attention for one sequence in float64.

    q [Q, H, D] are the last Q positions of k, v [L, KVH, D]. Returns [Q, H, D].
    """
    q_len, num_heads, _ = q.shape
    seq_len, kv_heads, _ = k.shape
    k = k.double().repeat_interleave(num_heads // kv_heads, dim=1)  # [L, H, D]
    v = v.double().repeat_interleave(num_heads // kv_heads, dim=1)
    scores = torch.einsum("qhd,lhd->hql", q.double(), k) * scale
    pos = torch.arange(seq_len - q_len, seq_len)
    scores = scores.masked_fill(torch.arange(seq_len) > pos[:, None], float("-inf"))
    return torch.einsum("hql,lhd->qhd", torch.softmax(scores, dim=-1), v)


def run_case(
    batch: list[tuple[int, int]],
    block_size: int,
    group: int,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a step of `batch` = [(seq_len, q_len)] through the paged path and the dense oracle.

    The cached prefix of each sequence is written in an earlier "step"; this step writes the new
    tokens and attends. Returns (paged output, dense output), both [T, H, D].
    """
    gen = torch.Generator().manual_seed(seed)
    num_heads = KV_HEADS * group
    total_blocks = sum(-(-n // block_size) for n, _ in batch) + 8
    alloc = ToyBlockAllocator(total_blocks, block_size, seed=seed)
    cache = torch.zeros(2, total_blocks, block_size, KV_HEADS, HEAD_DIM, dtype=dtype)
    scale = HEAD_DIM**-0.5

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    keys = [rand(n, KV_HEADS, HEAD_DIM) for n, _ in batch]
    values = [rand(n, KV_HEADS, HEAD_DIM) for n, _ in batch]
    queries = [rand(q, num_heads, HEAD_DIM) for _, q in batch]
    cached = [(s, n - q, n - q) for s, (n, q) in enumerate(batch) if n > q]
    if cached:
        meta = alloc.step(cached)
        reference.write_kv(
            torch.cat([keys[s][:c] for s, c, _ in cached]),
            torch.cat([values[s][:c] for s, c, _ in cached]),
            cache,
            meta.slot_mapping,
        )
    meta = alloc.step([(s, n, q) for s, (n, q) in enumerate(batch)])
    reference.write_kv(
        torch.cat([k[n - q :] for k, (n, q) in zip(keys, batch, strict=True)]),
        torch.cat([v[n - q :] for v, (n, q) in zip(values, batch, strict=True)]),
        cache,
        meta.slot_mapping,
    )
    out = reference.paged_attention(torch.cat(queries), cache, meta, scale)
    expected = torch.cat(
        [dense_attention(q, k, v, scale) for q, k, v in zip(queries, keys, values, strict=True)]
    )
    return out, expected


BATCHES = {
    "one-decode": [(1, 1)],
    "decodes": [(5, 1), (33, 1), (1, 1), (70, 1)],
    "prefills": [(7, 7), (40, 40)],
    "chunked": [(50, 13), (20, 2)],
    "mixed": [(37, 1), (5, 5), (50, 13), (17, 1), (64, 64), (100, 1), (9, 2)],
    "long-context": [(300, 1), (260, 20)],
}


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("batch", list(BATCHES), ids=list(BATCHES))
def test_float32_matches_dense(batch: str, group: int, block_size: int) -> None:
    out, expected = run_case(BATCHES[batch], block_size, group)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch", ["decodes", "mixed", "long-context"])
def test_bfloat16_close_to_dense(batch: str) -> None:
    out, expected = run_case(BATCHES[batch], 16, 3, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected, atol=3e-2, rtol=3e-2)


@settings(max_examples=25, deadline=None)
@given(
    batch=st.lists(
        st.integers(1, 60).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n))),
        min_size=1,
        max_size=6,
    ),
    block_size=st.sampled_from([1, 2, 8, 16]),
    group=st.sampled_from([1, 2, 3]),
    seed=st.integers(0, 1000),
)
def test_random_batches_match_dense(
    batch: list[tuple[int, int]], block_size: int, group: int, seed: int
) -> None:
    out, expected = run_case(batch, block_size, group, seed=seed)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_write_kv_stores_each_token_at_its_slot() -> None:
    cache = torch.zeros(2, 4, 2, 1, 3)
    key = torch.arange(9.0).view(3, 1, 3)
    reference.write_kv(key, -key, cache, torch.tensor([5, 0, 2]))  # (2,1), (0,0), (1,0)
    assert torch.equal(cache[0, 2, 1, 0], key[0, 0])
    assert torch.equal(cache[0, 0, 0, 0], key[1, 0])
    assert torch.equal(cache[1, 1, 0, 0], -key[2, 0])
    assert cache[0].abs().sum() == key.sum()


def test_backend_table() -> None:
    from kernels import cpu_attention

    assert get_attention_backend() is cpu_attention  # "auto" on CPU: the C++ decode path
    assert get_attention_backend("torch", "cpu") is reference
    assert get_attention_backend("auto", torch.device("cpu")) is cpu_attention
    with pytest.raises(ValueError, match="unknown attention backend"):
        get_attention_backend("nope")
