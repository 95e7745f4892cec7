"""The C++ CPU prefill kernel agrees with the reference; the backend routes prefills through it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kernels import AttentionMetadata, cpu_attention, reference
from tests.kernels.test_cpu_attention import KV_HEADS, make_step

# One bfloat16 step at 1.0 (8 significant bits): the kernel rounds its float32 result once, and
# its probabilities once for the P @ V dot products, as the reference and SDPA do.
BF16_STEP = 2**-7
FP32_TOL = 1e-5

# Ragged prompts, chunks over cached context and decodes, in one step: (seq_len, q_len).
MIXED = [(37, 1), (5, 5), (50, 13), (17, 1), (64, 64), (300, 1), (9, 2), (130, 129), (1, 1)]


def prefill_ids(meta: AttentionMetadata) -> torch.Tensor:
    starts = meta.query_start_loc_list
    return torch.tensor([s for s in range(meta.num_seqs) if starts[s + 1] - starts[s] > 1])


def run_kernel(
    query: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """The kernel's output for the step's prefill rows; the other rows stay NaN."""
    out = torch.full(query.shape, float("nan"), dtype=cache.dtype)
    cpu_attention.paged_prefill(query, cache, meta, scale, out, prefill_ids(meta))
    return out


def oracle(
    query: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """The reference's prefill rows in float32 (from the same, possibly bfloat16, inputs);
    the other rows NaN."""
    out = torch.full(query.shape, float("nan"))
    reference.prefill_attention(query.float(), cache.float(), meta, scale, out)
    return out


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("group", [1, 3, 4])
def test_float32_matches_reference(kernel: object, group: int, block_size: int) -> None:
    query, cache, meta = make_step(MIXED, block_size, group, seed=1)
    out = run_kernel(query, cache, meta, 0.125)
    torch.testing.assert_close(
        out, oracle(query, cache, meta, 0.125), atol=FP32_TOL, rtol=FP32_TOL, equal_nan=True
    )


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("group", [1, 3, 4])
def test_bfloat16_within_a_step_of_float32(kernel: object, group: int, block_size: int) -> None:
    query, cache, meta = make_step(MIXED, block_size, group, dtype=torch.bfloat16, seed=2)
    out = run_kernel(query, cache, meta, 0.125)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(
        out.float(),
        oracle(query, cache, meta, 0.125),
        atol=BF16_STEP,
        rtol=BF16_STEP,
        equal_nan=True,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("block_size", "head_dim"), [(16, 64), (4, 64), (16, 32), (32, 128)])
def test_nan_in_unused_slots_never_reaches_the_output(
    kernel: object, dtype: torch.dtype, block_size: int, head_dim: int
) -> None:
    """Slots no sequence owns hold NaN (a freed block's stale contents could): the keys past a
    sequence's length are never scored and the values past it never weighted, not even by a
    zero probability (0 * NaN is NaN), whichever path (AMX tiles pad key blocks to 16 and 32)."""
    query, cache, meta = make_step(MIXED, block_size, 3, dtype=dtype, head_dim=head_dim, seed=4)
    cache[cache == torch.tensor(1e4, dtype=dtype)] = float("nan")
    out = run_kernel(query, cache, meta, head_dim**-0.5)
    rows = torch.cat(
        [
            torch.arange(meta.query_start_loc_list[s], meta.query_start_loc_list[s + 1])
            for s in prefill_ids(meta).tolist()
        ]
    )
    assert not out[rows].isnan().any()
    tol = FP32_TOL if dtype == torch.float32 else BF16_STEP
    want = oracle(query, cache.nan_to_num(0.0), meta, head_dim**-0.5)
    torch.testing.assert_close(out[rows].float(), want[rows], atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [16, 32, 64, 128, 24, 80])
def test_head_dims(kernel: object, dtype: torch.dtype, head_dim: int) -> None:
    """16/32/64/128 take the vector path (with AVX-512 or AVX2; bfloat16 32/64/128 on AMX tiles
    where the CPU has them), 24 and 80 the plain loops."""
    query, cache, meta = make_step(MIXED, 16, 3, dtype=dtype, head_dim=head_dim, seed=3)
    out = run_kernel(query, cache, meta, head_dim**-0.5)
    tol = FP32_TOL if dtype == torch.float32 else BF16_STEP
    want = oracle(query, cache, meta, head_dim**-0.5)
    torch.testing.assert_close(out.float(), want, atol=tol, rtol=tol, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_prompts_of_every_length_class(kernel: object, dtype: torch.dtype) -> None:
    """Fresh prompts of 2..300 tokens: around the 16-row vectors, 64-row items and 64-key blocks,
    and long enough that one item spans several key blocks."""
    lengths = [2, 3, 15, 16, 17, 21, 22, 31, 33, 63, 64, 65, 100, 128, 129, 255, 300]
    query, cache, meta = make_step([(n, n) for n in lengths], 4, 3, dtype=dtype, seed=4)
    out = run_kernel(query, cache, meta, 0.125)
    tol = FP32_TOL if dtype == torch.float32 else BF16_STEP
    torch.testing.assert_close(out.float(), oracle(query, cache, meta, 0.125), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_chunked_prefills_over_cached_context(kernel: object, dtype: torch.dtype) -> None:
    """Chunks whose first new token is deep in the context: most key blocks are unmasked."""
    batch = [(1100, 64), (300, 7), (129, 128), (70, 69), (2000, 2)]
    query, cache, meta = make_step(batch, 16, 3, dtype=dtype, seed=5)
    out = run_kernel(query, cache, meta, 0.125)
    tol = FP32_TOL if dtype == torch.float32 else BF16_STEP
    torch.testing.assert_close(out.float(), oracle(query, cache, meta, 0.125), atol=tol, rtol=tol)


def test_one_token_sequences_when_listed(kernel: object) -> None:
    """Listed q_len == 1 sequences are attended too (a prompt of one token is such a row)."""
    query, cache, meta = make_step(MIXED, 4, 3, seed=6)
    out = torch.empty_like(query)
    every = torch.arange(meta.num_seqs)
    cpu_attention.paged_prefill(query, cache, meta, 0.125, out, every)
    want = reference.paged_attention(query, cache, meta, 0.125)
    torch.testing.assert_close(out, want, atol=FP32_TOL, rtol=FP32_TOL)


def test_strided_queries_and_int64_indices(kernel: object) -> None:
    """A query that is a view into the model's fused [T, H + KVH, D] tensor, an output with a row
    stride of its own, and int64 tables, starts, lengths and ids."""
    _, cache, meta = make_step(MIXED, 16, 3, seed=7)
    qk = torch.randn(meta.num_tokens, 3 * KV_HEADS + KV_HEADS, 64)
    query = qk[:, : 3 * KV_HEADS]
    wide_out = torch.full((meta.num_tokens, 3 * KV_HEADS + 1, 64), float("nan"))
    out = wide_out[:, : 3 * KV_HEADS]
    assert not query.is_contiguous() and not out.is_contiguous()
    torch.ops.prefixgate_cpu.paged_prefill_attention(
        out,
        query,
        cache,
        meta.block_tables.long(),
        meta.query_start_loc.long(),
        meta.seq_lens.long(),
        prefill_ids(meta).long(),
        0.125,
    )
    want = oracle(query, cache, meta, 0.125)
    torch.testing.assert_close(out, want, atol=FP32_TOL, rtol=FP32_TOL, equal_nan=True)
    assert wide_out[:, -1].isnan().all()  # nothing written past the heads


@pytest.mark.parametrize(("sharpness", "scale"), [(1.0, 0.125), (30.0, 1.0)])
def test_float32_is_about_as_exact_as_the_float32_reference(
    kernel: object, sharpness: float, scale: float
) -> None:
    """The float32 kernel is about as close to the float64 answer as the float32 reference is
    (both round scores, exponentials and sums, in their own orders; the kernel also rescales
    running sums once per 64 keys): within twice its error. Sharpness 30 puts scores hundreds
    apart: the exponentials underflow without NaN or inf, and one rounding of a score moves the
    output by ~1e-4 in either implementation."""
    query, cache, meta = make_step([(200, 150), (70, 70), (300, 64)], 16, 3, seed=8)
    query = query * sharpness
    out = run_kernel(query, cache, meta, scale)
    assert torch.isfinite(out).all()
    exact = torch.zeros(query.shape, dtype=torch.float64)
    reference.prefill_attention(query.double(), cache.double(), meta, scale, exact)
    kernel_err = (out.double() - exact).abs().max().item()
    reference_err = (oracle(query, cache, meta, scale).double() - exact).abs().max().item()
    assert kernel_err <= 2 * reference_err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_same_result_on_any_thread_count(kernel: object, dtype: torch.dtype) -> None:
    """Each row is computed the same way whichever thread takes it and however the rows are
    split into items: results are bitwise equal on 1 and 2 threads."""
    query, cache, meta = make_step([(200, 40), (33, 33), (90, 90)], 16, 3, dtype=dtype, seed=9)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_kernel(query, cache, meta, 0.125)
        torch.set_num_threads(2)
        two = run_kernel(query, cache, meta, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def refuse(name: str) -> Callable[..., None]:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{name} ran")

    return refuse


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 3])
def test_mixed_steps_through_the_backend(
    kernel: object, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, group: int
) -> None:
    """paged_attention sends decode rows to the decode kernel and every prefill row to the
    prefill kernel where it has vector code for SmolLM2's head dim (AVX-512 or AVX2), else to
    SDPA, and matches the reference."""
    if torch.ops.prefixgate_cpu.prefill_vectorized(64):
        monkeypatch.setattr(cpu_attention, "prefill_sdpa", refuse("SDPA"))
    else:
        monkeypatch.setattr(cpu_attention, "paged_prefill", refuse("the prefill kernel"))
    for batch in (MIXED, [(40, 40), (20, 3)]):
        query, cache, meta = make_step(batch, 16, group, dtype=dtype, seed=10)
        plain = AttentionMetadata(**{f: getattr(meta, f) for f in meta.__slots__ if f != "derived"})
        out = cpu_attention.paged_attention(query, cache, meta, 0.125)
        tol = FP32_TOL if dtype == torch.float32 else BF16_STEP
        want = reference.paged_attention(query.float(), cache.float(), plain, 0.125)
        torch.testing.assert_close(out.float(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_prefills_the_kernel_does_not_vectorize_run_sdpa(
    kernel: object, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    """Head dims without vector code (where the plain loops would be slower than SDPA) keep
    the SDPA path."""
    head_dim = 24
    monkeypatch.setattr(cpu_attention, "paged_prefill", refuse("the prefill kernel"))
    query, cache, meta = make_step(MIXED, 16, 3, dtype=dtype, head_dim=head_dim, seed=11)
    assert not cpu_attention.prefill_kernel_serves(cache)
    out = cpu_attention.paged_attention(query, cache, meta, 0.125)
    tol = FP32_TOL if dtype == torch.float32 else 1e-2
    want = reference.paged_attention(query.float(), cache.float(), meta, 0.125)
    torch.testing.assert_close(out.float(), want, atol=tol, rtol=tol)


def test_bad_inputs_are_refused(kernel: object) -> None:
    query, cache, meta = make_step([(20, 20)], 4, 3)
    ids, out = torch.tensor([0]), torch.empty_like(query)
    op = torch.ops.prefixgate_cpu.paged_prefill_attention
    args = (meta.block_tables, meta.query_start_loc, meta.seq_lens)
    tables = meta.block_tables.clone()
    tables[0, 1] = cache.shape[1]  # past the pool
    with pytest.raises(RuntimeError, match="out of range"):
        op(out, query, cache, tables, *args[1:], ids, 0.1)
    with pytest.raises(RuntimeError, match="exceeds the block table"):
        op(out, query, cache, args[0], args[1], meta.seq_lens + 100, ids, 0.1)
    with pytest.raises(RuntimeError, match="exceeds seq_len"):
        op(out, query, cache, args[0], args[1], meta.seq_lens - 1, ids, 0.1)
    with pytest.raises(RuntimeError, match="seq id"):
        op(out, query, cache, *args, torch.tensor([1]), 0.1)
    with pytest.raises(RuntimeError, match="share a dtype"):
        op(out, query.bfloat16(), cache, *args, ids, 0.1)
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        op(out.double(), query.double(), cache.double(), *args, ids, 0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [16, 32, 64, 128])
@pytest.mark.parametrize("group", [1, 2, 3, 4, 7, 16, 20])
def test_a_token_is_bit_identical_however_its_rows_are_split(
    kernel: object, head_dim: int, group: int, dtype: torch.dtype
) -> None:
    """The last token of a sequence gets the same bits as a decode (one new token: its keys in
    the lanes, up to 16 heads), as the last row of a whole prompt, and in chunks of 2-65 tokens
    over the cached rest (its heads among other rows in the lanes): the batch invariance of
    docs/determinism.md, in float32, bfloat16 and float16."""
    if not cpu_attention.prefill_kernel_serves(torch.empty(1, 1, 1, 1, head_dim, dtype=dtype)):
        pytest.skip("the prefill kernel has no vector code here")
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    for block_size in (4, 16):
        for length in (1, 2, 15, 64, 65, 130):
            query, cache, meta = make_step(
                [(length, length)], block_size, group, dtype, head_dim, seed=length
            )
            rows = []
            for q_len in sorted({1, min(2, length), min(7, length), min(65, length), length}):
                out = torch.zeros(q_len, *query.shape[1:], dtype=dtype)
                starts = torch.tensor([0, q_len], dtype=torch.int32)
                torch.ops.prefixgate_cpu.paged_prefill_attention(
                    out, query[length - q_len :], cache, meta.block_tables, starts,
                    meta.seq_lens, torch.tensor([0]), 0.125,
                )  # fmt: skip
                rows.append(out[-1].view(bits))
            assert all(torch.equal(r, rows[0]) for r in rows), (block_size, length)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [16, 32, 64, 128])
def test_a_token_is_bit_identical_beside_other_sequences(
    kernel: object, head_dim: int, dtype: torch.dtype
) -> None:
    """Each sequence's last token in a step of others (ragged prompts, chunks over cached
    context, decodes) gets the same bits as that token attended alone, as a decode."""
    if not cpu_attention.prefill_kernel_serves(torch.empty(1, 1, 1, 1, head_dim, dtype=dtype)):
        pytest.skip("the prefill kernel has no vector code here")
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    query, cache, meta = make_step(MIXED, 16, 3, dtype, head_dim, seed=12)
    together = torch.zeros_like(query)
    every = torch.arange(meta.num_seqs)
    cpu_attention.paged_prefill(query, cache, meta, head_dim**-0.5, together, every)
    starts, one = meta.query_start_loc_list, torch.tensor([0, 1], dtype=torch.int32)
    for s in range(meta.num_seqs):
        last = starts[s + 1] - 1
        alone = torch.zeros_like(query[last : last + 1])
        torch.ops.prefixgate_cpu.paged_prefill_attention(
            alone, query[last : last + 1], cache, meta.block_tables[s : s + 1], one,
            meta.seq_lens[s : s + 1], torch.tensor([0]), head_dim**-0.5,
        )  # fmt: skip
        assert torch.equal(alone[0].view(bits), together[last].view(bits)), s


def float32_path_outputs() -> list[torch.Tensor]:
    """The prefill kernel's output for every row of seeded mixed steps (decodes with their keys
    in the lanes or, 20 heads, in the rows; whole prompts; chunks over cached context), float32,
    bfloat16 and float16, head dims 16/32/64/128: the float32 path's bits (bfloat16 and float16
    widened), which every build of it (AVX-512, AVX2, the plain loops) must reproduce exactly."""
    outs = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for head_dim in (16, 32, 64, 128):
            for block_size, group in ((16, 3), (4, 20)):
                query, cache, meta = make_step(MIXED, block_size, group, dtype, head_dim, seed=3)
                out = torch.zeros_like(query)
                every = torch.arange(meta.num_seqs)
                cpu_attention.paged_prefill(query, cache, meta, head_dim**-0.5, out, every)
                outs.append(out)
    return outs


ISA_CHECK = """
import sys
from kernels.options import KernelOptions, configure
configure(KernelOptions(cache_dir=sys.argv[1]))  # the library is built under the test's tmp dir
import torch
from kernels import _build, cpu_attention, reference
from tests.kernels.test_cpu_attention import make_step
_build.FLAG_SETS = (sys.argv[2].split(),)  # one ISA, whatever the host has beyond it
assert cpu_attention.load_kernel() is not None
for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2**-7), (torch.float16, 2**-9)):
    for head_dim in (16, 64, 24):
        batch = [(37, 1), (5, 5), (50, 13), (130, 129)]
        query, cache, meta = make_step(batch, 4, 3, dtype=dtype, head_dim=head_dim)
        out = torch.full(query.shape, float("nan"), dtype=dtype)
        cpu_attention.paged_prefill(query, cache, meta, 0.125, out, torch.tensor([1, 2, 3]))
        want = torch.full(query.shape, float("nan"))
        reference.prefill_attention(query.float(), cache.float(), meta, 0.125, want)
        torch.testing.assert_close(out.float(), want, atol=tol, rtol=tol, equal_nan=True)
from tests.kernels.test_grouped import attend, bits, found, shared_step
for dtype in (torch.float32, torch.bfloat16):  # grouped decodes: the ungrouped bits
    step = shared_step([(200, [5, 0, 70]), (64, [0, 1])], [(40, 9), (90, 1)], 16, 3, dtype)
    assert torch.equal(bits(attend(step, found(step))), bits(attend(step, None)))
op = cpu_attention.load_kernel()
for head_dim in (16, 64, 24):  # decode: one query over a paged context of 6 tokens
    q, cache = torch.randn(1, 2, head_dim), torch.randn(2, 3, 4, 1, head_dim)
    out = cpu_attention.paged_decode(q, cache, torch.tensor([[2, 1]]), torch.tensor([6]), 0.25, op)
    k, v = cache[:, [2, 1]].reshape(2, 8, head_dim)[:, :6]
    want = torch.softmax(q[0] @ k.T * 0.25, -1) @ v
    torch.testing.assert_close(out[0], want)
from tests.kernels.test_cpu_ops import fixed_linear_outputs
torch.save(fixed_linear_outputs(), sys.argv[1] + "/fixed_linear.pt")
from tests.kernels import test_cpu_prefill as t
vectorized = [bool(torch.ops.prefixgate_cpu.prefill_vectorized(d)) for d in (16, 32, 64, 128, 24)]
saved = {"vectorized": vectorized, "outputs": t.float32_path_outputs()}
torch.save(saved, sys.argv[1] + "/prefill.pt")
for head_dim, vector in zip((16, 32, 64, 128), vectorized):
    if vector:  # a token's bits, however its rows are split and whatever is beside it
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for group in (3, 20):
                t.test_a_token_is_bit_identical_however_its_rows_are_split(
                    None, head_dim, group, dtype
                )
            t.test_a_token_is_bit_identical_beside_other_sequences(None, head_dim, dtype)
if vectorized[2]:  # the engine's outputs, end to end on this build's kernels
    import pytest
    engine = "tests/engine/test_batch_invariance.py"
    assert pytest.main(["-q", "-x", "-p", "no:cacheprovider", engine]) == 0, "not invariant"
"""


def _host_has(*flags: str) -> bool:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    words = {w for line in info.splitlines() if line.startswith("flags") for w in line.split()}
    return all(flag in words for flag in flags)


PORTABLE = "-O3 -fopenmp"  # no -march: plain loops


@pytest.fixture(scope="session")
def isa_build(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Runs ISA_CHECK once per set of flags in this session (a fresh process building the library
    with those flags only); returns the folder of its saved outputs."""
    built: dict[str, Path] = {}

    def build(flags: str) -> Path:
        if flags not in built:
            folder = tmp_path_factory.mktemp("isa")
            env = {"PATH": str(Path(sys.executable).parent) + ":/usr/local/bin:/usr/bin:/bin"}
            done = subprocess.run(
                [sys.executable, "-c", ISA_CHECK, str(folder), flags],
                cwd=Path(__file__).resolve().parents[2],
                env=env,
                text=True,
                capture_output=True,
                timeout=600,
            )
            assert done.returncode == 0, done.stdout + done.stderr
            built[flags] = folder
        return built[flags]

    return build


@pytest.mark.parametrize(
    ("flags", "vectorized"),
    [
        pytest.param(PORTABLE, False, id="portable"),
        pytest.param(
            "-O3 -march=skylake-avx512 -fopenmp",
            True,
            id="avx512-no-bf16",  # the float32 path for bfloat16 too, as on Intel Skylake
            marks=pytest.mark.skipif(
                not _host_has("avx512f", "avx512bw", "avx512vl", "avx512dq"),
                reason="the CPU has no AVX-512",
            ),
        ),
        pytest.param(
            "-O3 -mavx2 -mfma -mf16c -mno-avx512f -fopenmp",
            True,
            id="avx2",  # the AVX2 + FMA branches, never compiled by -march=native on AVX-512
            marks=pytest.mark.skipif(
                not _host_has("avx2", "fma", "f16c"), reason="the CPU has no AVX2 + FMA"
            ),
        ),
    ],
)
def test_build_for_an_isa_matches_reference(
    kernel: object, isa_build: Callable[[str], Path], flags: str, vectorized: bool
) -> None:
    """The library built for one instruction set only, in a fresh process, against the
    reference: prefill over every dtype and head size above, grouped decodes against ungrouped,
    a token's bits however its rows are split and beside other sequences (where the build has
    vector code: head dims 16/32/64/128 with AVX-512 or AVX2), and bit for bit against the
    native build: the fixed-order linear, and the prefill kernel's float32 path (float32 and
    float16 caches here and in the plain-loop build; bfloat16 ones widened, against the plain
    loops', as the native build may run bfloat16 on AMX tiles). Where it
    vectorizes, the engine's batch-invariance tests pass on its kernels too."""
    folder = isa_build(flags)
    from tests.kernels.test_cpu_ops import fixed_linear_outputs

    built = torch.load(folder / "fixed_linear.pt")
    assert all(torch.equal(a, b) for a, b in zip(built, fixed_linear_outputs(), strict=True))
    prefill = torch.load(folder / "prefill.pt")
    assert prefill["vectorized"] == [vectorized] * 4 + [False]
    native, plain = float32_path_outputs(), torch.load(isa_build(PORTABLE) / "prefill.pt")
    for i, out in enumerate(prefill["outputs"]):
        want = plain["outputs"][i] if out.dtype == torch.bfloat16 else native[i]
        assert torch.equal(out, want), (i, out.dtype)
