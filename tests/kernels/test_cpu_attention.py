"""The C++ CPU decode kernel agrees with the PyTorch reference; the backend degrades gracefully."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import AttentionMetadata, _build, cpu_attention, get_attention_backend, reference
from kernels import options as kernel_options
from kernels.options import KernelOptions
from tests.helpers import ToyBlockAllocator

HEAD_DIM = 64
KV_HEADS = 3


def make_step(
    batch: list[tuple[int, int]],
    block_size: int,
    group: int,
    dtype: torch.dtype = torch.float32,
    head_dim: int = HEAD_DIM,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """A random cache holding `batch` = [(seq_len, q_len)] in shuffled blocks, the step's queries
    [T, H, D] and its metadata. Blocks not owned by any sequence hold huge values, so a kernel that
    reads past a sequence's length or through table padding is caught."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-n // block_size) for n, _ in batch) + 4
    alloc = ToyBlockAllocator(num_blocks, block_size, seed=seed)
    meta = alloc.step([(s, n, q) for s, (n, q) in enumerate(batch)])
    shape = (2, num_blocks, block_size, KV_HEADS, head_dim)
    cache = torch.full(shape, 1e4, dtype=dtype)
    for s, (n, _) in enumerate(batch):
        blocks = torch.tensor(alloc.tables[s])
        kv = torch.randn(2, len(blocks) * block_size, KV_HEADS, head_dim, generator=gen)
        kv[:, n:] = 1e4  # the unused tail of the last block
        cache[:, blocks] = kv.view(2, len(blocks), block_size, KV_HEADS, head_dim).to(dtype)
    num_tokens = sum(q for _, q in batch)
    query = torch.randn(num_tokens, KV_HEADS * group, head_dim, generator=gen).to(dtype)
    return query, cache, meta


def decodes(lens: list[int]) -> list[tuple[int, int]]:
    return [(n, 1) for n in lens]


RAGGED = decodes([1, 37, 250, 16, 17, 129, 3, 64])


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("group", [1, 3, 4])
def test_float32_decodes_match_reference(
    kernel: cpu_attention.Kernel, group: int, block_size: int
) -> None:
    query, cache, meta = make_step(RAGGED, block_size, group)
    scale = HEAD_DIM**-0.5
    out = cpu_attention.paged_decode(query, cache, meta.block_tables, meta.seq_lens, scale)
    want = reference.paged_attention(query, cache, meta, scale)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [1, 3])
def test_half_precision_decodes_match_float32(
    kernel: cpu_attention.Kernel, dtype: torch.dtype, group: int
) -> None:
    """The kernel accumulates in float32 (the bf16 probabilities of the AVX512-BF16 path are the
    only other rounding): its output is within a bf16 / fp16 rounding of the float32 answer."""
    query, cache, meta = make_step(RAGGED, 16, group, dtype=dtype)
    out = cpu_attention.paged_decode(query, cache, meta.block_tables, meta.seq_lens, 0.125)
    assert out.dtype == dtype
    want = reference.paged_attention(query.float(), cache.float(), meta, 0.125)
    torch.testing.assert_close(out.float(), want, atol=1e-2, rtol=1e-2)
    ref_half = reference.paged_attention(query, cache, meta, 0.125)  # rounds scores and probs
    torch.testing.assert_close(out.float(), ref_half.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("group", [1, 3, 5])
def test_bf16_decodes_weight_values_like_the_reference(
    kernel: cpu_attention.Kernel, head_dim: int, group: int
) -> None:
    """With AVX512-BF16, V rows are weighted by the probabilities rounded to bfloat16, as the
    reference's `softmax(scores).to(dtype) @ V` does: float32 scores, bf16 probabilities, float32
    sums. The output then equals that computation up to float32 summation order: nearly every
    element exactly, the rest within one bf16 rounding."""
    from kernels import cpu_ops

    if not cpu_ops.linear_bf16_available():
        pytest.skip("no AVX512-BF16 here: bf16 decodes keep float32 probabilities")
    query, cache, meta = make_step(RAGGED, 16, group, torch.bfloat16, head_dim, seed=3)
    out = cpu_attention.paged_decode(query, cache, meta.block_tables, meta.seq_lens, 0.2)
    bs, kvh = cache.shape[2], cache.shape[3]
    exact: list[float] = []
    for s, n in enumerate(meta.seq_lens.tolist()):
        rows = torch.cat([torch.arange(b * bs, b * bs + bs) for b in meta.block_tables[s]])[:n]
        k = cache[0].reshape(-1, kvh, head_dim)[rows].float()  # [n, KVH, D]
        v = cache[1].reshape(-1, kvh, head_dim)[rows].float()
        q = query[s].float().view(kvh, group, head_dim)
        probs = torch.softmax(torch.einsum("hgd,nhd->hgn", q, k) * 0.2, -1)
        want = torch.einsum("hgn,nhd->hgd", probs.to(torch.bfloat16).float(), v)
        got = out[s].float().view(kvh, group, head_dim)
        want = want.to(torch.bfloat16).float()
        torch.testing.assert_close(got, want, atol=1e-3, rtol=8e-3)
        exact.append((got == want).float().mean().item())
    assert min(exact) > 0.98, exact


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [16, 32, 64, 128])
@pytest.mark.parametrize("group", [1, 2, 5, 8])
def test_vector_head_dims_match_reference(
    kernel: cpu_attention.Kernel, dtype: torch.dtype, head_dim: int, group: int
) -> None:
    """The head dims with vector inner loops (AVX-512 or AVX2), for every cache dtype, with
    lengths that are not a multiple of the 8 or 16 tokens scored at once and query-head groups
    that split into several passes over V (5 = 3 + 2, 8 = 4 + 4)."""
    query, cache, meta = make_step(RAGGED, 16, group, dtype=dtype, head_dim=head_dim, seed=5)
    out = cpu_attention.paged_decode(query, cache, meta.block_tables, meta.seq_lens, 0.2)
    want = reference.paged_attention(query.float(), cache.float(), meta, 0.2)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("head_dim", [8, 24, 80, 128])
def test_head_dims_that_are_not_a_vector_multiple(
    kernel: cpu_attention.Kernel, head_dim: int
) -> None:
    query, cache, meta = make_step(RAGGED[:4], 4, 3, head_dim=head_dim)
    out = cpu_attention.paged_decode(query, cache, meta.block_tables, meta.seq_lens, 0.3)
    torch.testing.assert_close(out, reference.paged_attention(query, cache, meta, 0.3))


def test_index_dtypes_and_strided_queries(kernel: cpu_attention.Kernel) -> None:
    """int64 tables and lengths, and a query that is a view into a wider [T, H + KVH, D] tensor
    (as the model's rotated q/k are)."""
    _, cache, meta = make_step(RAGGED, 16, 3, seed=1)
    qk = torch.randn(len(RAGGED), 3 * KV_HEADS + KV_HEADS, HEAD_DIM)
    query = qk[:, : 3 * KV_HEADS]
    assert not query.is_contiguous()
    tables, lens = meta.block_tables.long(), meta.seq_lens.long()
    out = cpu_attention.paged_decode(query, cache, tables, lens, 0.125)
    want = reference.paged_attention(query.contiguous(), cache, meta, 0.125)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_sharp_softmax_is_exact(kernel: cpu_attention.Kernel) -> None:
    """Scores hundreds apart: the exponentials underflow without NaN or inf."""
    query, cache, meta = make_step(decodes([200, 5]), 16, 3, seed=2)
    out = cpu_attention.paged_decode(query * 30, cache, meta.block_tables, meta.seq_lens, 1.0)
    want = reference.paged_attention(query * 30, cache, meta, 1.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


MIXED = [(37, 1), (5, 5), (50, 13), (17, 1), (64, 64), (300, 1), (9, 2), (1, 1)]


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("group", [1, 3, 4])
def test_mixed_batches_through_the_backend(
    kernel: cpu_attention.Kernel, group: int, block_size: int
) -> None:
    """Decode rows go through the kernel, prefill rows through the reference, in one step."""
    query, cache, meta = make_step(MIXED, block_size, group, seed=3)
    plain = AttentionMetadata(**{f: getattr(meta, f) for f in meta.__slots__ if f != "derived"})
    out = cpu_attention.paged_attention(query, cache, meta, 0.125)
    assert meta.derived["cpu"].kernel is not None
    want = reference.paged_attention(query, cache, plain, 0.125)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_prefill_only_and_decode_only_steps(kernel: cpu_attention.Kernel) -> None:
    for batch in ([(40, 40), (20, 3)], RAGGED):
        query, cache, meta = make_step(batch, 4, 3, seed=4)
        out = cpu_attention.paged_attention(query, cache, meta, 0.125)
        want = reference.paged_attention(query, cache, meta, 0.125)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_switched_off_kernel_leaves_the_step_to_the_reference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`KernelOptions(cpu_attention=False)`, what PREFIXGATE_CPU_ATTENTION=torch sets."""
    monkeypatch.setattr(kernel_options, "_options", KernelOptions(cpu_attention=False))

    def refuse(*args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("the kernel ran although switched off")

    monkeypatch.setattr(cpu_attention, "paged_decode", refuse)
    query, cache, meta = make_step(MIXED, 4, 3)
    out = cpu_attention.paged_attention(query, cache, meta, 0.125)
    assert meta.derived["cpu"].kernel is None
    torch.testing.assert_close(out, reference.paged_attention(query, cache, meta, 0.125))


def test_build_failure_warns_once_and_falls_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> None:
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(_build, "build", broken)
    monkeypatch.setattr(cpu_attention, "_tried", False)
    monkeypatch.setattr(cpu_attention, "_kernel", None)
    with caplog.at_level(logging.WARNING, logger="kernels.cpu_attention"):
        for _ in range(2):
            query, cache, meta = make_step(RAGGED, 16, 3)
            out = cpu_attention.paged_attention(query, cache, meta, 0.125)
            torch.testing.assert_close(out, reference.paged_attention(query, cache, meta, 0.125))
    assert [r.getMessage() for r in caplog.records] == [
        "CPU attention kernel unavailable, using the reference: "
        "Ninja is required to load C++ extensions"
    ]
    assert not cpu_attention.kernel_available()


def test_bad_inputs_are_refused(kernel: cpu_attention.Kernel) -> None:
    query, cache, meta = make_step(decodes([20]), 4, 3)
    tables = meta.block_tables.clone()
    tables[0, 1] = cache.shape[1]  # past the pool
    with pytest.raises(RuntimeError, match="out of range"):
        cpu_attention.paged_decode(query, cache, tables, meta.seq_lens, 0.1)
    with pytest.raises(RuntimeError, match="exceeds the block table"):
        cpu_attention.paged_decode(query, cache, meta.block_tables, meta.seq_lens + 100, 0.1)
    with pytest.raises(RuntimeError, match="share a dtype"):
        cpu_attention.paged_decode(query.double(), cache, meta.block_tables, meta.seq_lens, 0.1)


def test_backend_table_picks_the_kernel_on_cpu() -> None:
    assert get_attention_backend("cpu") is cpu_attention
    assert get_attention_backend("auto", "cpu") is cpu_attention
    assert get_attention_backend("torch", "cpu") is reference


BUILD_AND_RUN = """
import sys
from kernels.options import KernelOptions, configure
configure(KernelOptions(cache_dir=sys.argv[1]))  # the library is built under the test's tmp dir
import torch
from kernels import cpu_attention
op = cpu_attention.load_kernel()
assert op is not None
q, cache = torch.randn(1, 2, 16), torch.randn(2, 3, 4, 1, 16)
out = cpu_attention.paged_decode(
    q, cache, torch.tensor([[2, 1]]), torch.tensor([6]), 0.25, op
)
k, v = cache[:, [2, 1]].reshape(2, 8, 16)[:, :6]
want = torch.softmax(q[0] @ k.T * 0.25, -1) @ v
torch.testing.assert_close(out[0], want)
"""


def test_concurrent_first_builds_share_one_cache(kernel: object, tmp_path: Path) -> None:
    """Two fresh processes race to build into an empty cache: both load a working kernel."""
    root = Path(__file__).resolve().parents[2]
    env = {"PATH": str(Path(sys.executable).parent) + ":/usr/local/bin:/usr/bin:/bin"}
    procs = [
        subprocess.Popen([sys.executable, "-c", BUILD_AND_RUN, str(tmp_path)], cwd=root, env=env,
                         text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(2)
    ]  # fmt: skip
    for p in procs:
        output, _ = p.communicate(timeout=600)
        assert p.returncode == 0, output
    assert len(list((tmp_path / "torch_extensions").glob("*/prefixgate_cpu_attention.so"))) == 1
