"""The fused C++ layer ops equal the eager PyTorch chains they replace (`kernels.layer_ops`)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from kernels import layer_ops
from kernels import options as kernel_options
from kernels.options import KernelOptions

DTYPES = [torch.float32, torch.bfloat16]
FIXED_DTYPES = [*DTYPES, torch.float16]  # linear_fixed's


@pytest.fixture(scope="module")
def cpu_ops():  # type: ignore[no-untyped-def]
    from kernels import cpu_ops

    if not cpu_ops.fused_available("cpu", torch.float32):
        pytest.skip("the C++ CPU kernels could not be built here")
    return cpu_ops


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "hidden"), [(1, 576), (7, 64), (300, 576), (3, 19)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_eager(cpu_ops, dtype, tokens, hidden, with_residual) -> None:  # type: ignore[no-untyped-def]
    g = gen(tokens * hidden)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    res = torch.randn(tokens, hidden, generator=g).to(dtype) if with_residual else None
    w = (torch.rand(hidden, generator=g) + 0.5).to(dtype)
    x_fused, x_eager = x.clone(), x.clone()
    out = cpu_ops.rms_norm(x_fused, w, 1e-5, res)
    ref = layer_ops.rms_norm(x_eager, w, 1e-5, res)
    assert torch.equal(x_fused, x_eager)  # the residual add, in place, rounded alike
    if dtype == torch.bfloat16:  # the float32 sum of squares is summed in another order
        torch.testing.assert_close(out, ref, rtol=2**-6, atol=0)  # at most one bf16 step
        assert (out != ref).float().mean() < 0.01
    else:
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "head_dim"), [(1, 64), (9, 64), (5, 128), (4, 36)])
def test_rope_matches_eager_exactly(cpu_ops, dtype, tokens, head_dim) -> None:  # type: ignore[no-untyped-def]
    g = gen(tokens + head_dim)
    heads, kv_heads = 6, 2
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype)
    angles = torch.rand(tokens, head_dim, generator=g) * 100
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    qk_cols = (heads + kv_heads) * head_dim
    fused, eager = qkv.clone(), qkv.clone()
    cpu_ops.rope_(fused[:, :qk_cols].view(tokens, -1, head_dim), cos, sin)  # strided rows
    layer_ops.rope_(eager[:, :qk_cols].view(tokens, -1, head_dim), cos, sin)
    assert torch.equal(fused, eager)
    assert torch.equal(fused[:, qk_cols:], qkv[:, qk_cols:])  # v untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "inter"), [(1, 1536), (16, 1536), (3, 37), (40, 64)])
def test_silu_mul_matches_eager_exactly(cpu_ops, dtype, tokens, inter) -> None:  # type: ignore[no-untyped-def]
    gate_up = (torch.randn(tokens, 2 * inter, generator=gen(inter)) * 6).to(dtype)
    gate_up[0, :3] = torch.tensor([-200.0, 200.0, 0.0])  # exp over- and underflow
    assert torch.equal(cpu_ops.silu_mul(gate_up), layer_ops.silu_mul(gate_up))


def test_silu_mul_bf16_every_gate_value(cpu_ops) -> None:  # type: ignore[no-untyped-def]
    """Every one of bfloat16's 65,536 gate values gives eager PyTorch's silu (NaNs as NaN),
    except, where the build converts with AVX512-BF16 (its bf16 panels tell), where silu(gate)
    (about gate / 2) or the product is denormal: that conversion flushes those to zero, as
    every bf16 rounding in these kernels does there. Without it (AVX2-only CPUs), no exception."""
    gate = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    up = (torch.randn(gate.numel(), generator=gen(5)) * 3).bfloat16()
    gate_up = torch.cat([gate.view(-1, 1024), up.view(-1, 1024)], dim=1)  # 64 rows of 1,024
    out, ref = cpu_ops.silu_mul(gate_up), layer_ops.silu_mul(gate_up)
    normal = torch.finfo(torch.float32).tiny
    flushes = cpu_ops.linear_bf16_available()
    denormal = (gate_up[:, :1024].float().abs() < 2 * normal) | (ref.float().abs() < normal)
    flushed = denormal & flushes
    assert denormal.any() and not out[flushed].any()
    skip = (out.isnan() & ref.isnan()) | flushed
    assert torch.equal(out.masked_fill(skip, 0), ref.masked_fill(skip, 0))


def test_fused_ops_are_picked_on_cpu_for_float32_and_bf16(cpu_ops, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    assert layer_ops.get_layer_ops("cpu", torch.bfloat16) is cpu_ops
    assert layer_ops.get_layer_ops("cpu", torch.float16) is layer_ops
    assert layer_ops.get_layer_ops("meta", torch.float32) is layer_ops
    monkeypatch.setattr(kernel_options, "_options", KernelOptions(cpu_fused=False))
    assert layer_ops.get_layer_ops("cpu", torch.float32) is layer_ops


@pytest.fixture(scope="module")
def linear_bf16(cpu_ops):  # type: ignore[no-untyped-def]
    if not cpu_ops.linear_bf16_available():
        pytest.skip("this CPU has no AVX512-BF16")
    return cpu_ops.linear_bf16


def test_panels_layout(cpu_ops) -> None:  # type: ignore[no-untyped-def]
    w = torch.arange(35 * 5, dtype=torch.float32).view(35, 5).bfloat16()
    panels = cpu_ops.pack_panels(w)
    assert panels.shape == (2, 3, 32, 2)  # N padded to 64, K to 6
    assert torch.equal(panels[1, 2, 1], torch.stack([w[33, 4], torch.tensor(0).bfloat16()]))
    assert torch.equal(panels[0, 1, 7], w[7, 2:4])
    assert panels[1, :, 3:].abs().sum() == 0


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 33, 40, 64, 300])
@pytest.mark.parametrize(
    ("out_features", "in_features"), [(96, 64), (37, 19), (16, 576), (50, 1536), (3, 33)]
)
def test_linear_bf16_matches_float32_matmul(
    cpu_ops, linear_bf16, rows, out_features, in_features
) -> None:  # type: ignore[no-untyped-def]
    """Panels with ragged ends (N not a multiple of 32, odd K), row tiles of 8 with a remainder,
    strided input rows, with and without bias. With AMX, 4+ rows at K % 32 == 0 run on tiles of
    16 rows (a ragged last tile from a zero-padded copy), 300 rows in two passes (256 + 44)."""
    g = gen(rows * 1000 + out_features)
    w = torch.randn(out_features, in_features, generator=g).bfloat16()
    bias = torch.randn(out_features, generator=g).bfloat16()
    wide = torch.randn(rows, in_features + 5, generator=g).bfloat16()
    x = wide[:, 2 : 2 + in_features]
    panels = cpu_ops.pack_panels(w)
    for b in (None, bias):
        ref = F.linear(x.float(), w.float(), None if b is None else b.float())
        out = linear_bf16(x, panels, out_features, b)
        assert out.dtype == torch.bfloat16 and out.shape == (rows, out_features)
        # exact bf16 products summed in float32, then one rounding to bfloat16
        torch.testing.assert_close(out.float(), ref, rtol=2**-7, atol=1e-4 * in_features)


def test_linear_bf16_row_does_not_depend_on_the_batch(linear_bf16, cpu_ops) -> None:  # type: ignore[no-untyped-def]
    """A row's output is bit-identical whether it is computed alone or among 2 to 300 others
    (the panel kernel, and AMX tiles for every batch where the CPU has them)."""
    gen = torch.Generator().manual_seed(5)
    for in_features, out_features in ((64, 40), (576, 200), (72, 33)):
        w = torch.randn(out_features, in_features, generator=gen).bfloat16()
        bias = torch.randn(out_features, generator=gen).bfloat16()
        panels = cpu_ops.pack_panels(w)
        x = torch.randn(300, in_features, generator=gen).bfloat16()
        whole = linear_bf16(x, panels, out_features, bias)
        for start, rows in ((0, 1), (7, 1), (3, 2), (10, 3), (20, 4), (40, 17), (100, 64)):
            part = linear_bf16(x[start : start + rows], panels, out_features, bias)
            want = whole[start : start + rows]
            assert torch.equal(part.view(torch.int16), want.view(torch.int16))


def test_bf16_linears_take_the_panels(linear_bf16, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Every batch of every weight goes to the panel kernel (on AMX tiles where the CPU has them
    and the in-features are a multiple of 32): one kernel whatever the batch, so that a row's
    result does not depend on the rows beside it."""
    from engine.models import linear as module
    from kernels import cpu_ops

    calls: list[int] = []

    def counting(x: torch.Tensor, *args: Any) -> torch.Tensor:
        calls.append(x.shape[0])
        return linear_bf16(x, *args)  # type: ignore[no-any-return]

    monkeypatch.setattr(cpu_ops, "linear_bf16", counting)
    amx = "amx_bf16" in cpu_ops.cpu_flags()
    # built for this CPU (-march=native) with AMX, the library runs batches on tiles
    assert cpu_ops.linear_amx_available() == amx
    for in_features in (64, 72):
        w = torch.randn(40, in_features).bfloat16()
        packed = module.pack_weight(w)
        assert packed is not None and packed.panels is not None and packed.onednn is None
        calls.clear()
        for rows in (1, 4, 5, 300):
            x = torch.randn(rows, in_features).bfloat16()
            torch.testing.assert_close(
                module.linear(x, w, None, packed).float(),
                F.linear(x, w).float(),
                rtol=2**-7,
                atol=0.05,
            )
        assert calls == [1, 4, 5, 300]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "vocab"), [(1, 49152), (16, 1000), (5, 17), (3, 1)])
def test_argmax_rows_matches_torch_max(cpu_ops, dtype, rows, vocab) -> None:  # type: ignore[no-untyped-def]
    g = gen(rows * vocab)
    # integers make ties: the first maximum must win, as in torch
    x = torch.randint(-4, 5, (rows, vocab + 3), generator=g).to(dtype)[:, :vocab]
    assert torch.equal(cpu_ops.argmax_rows(x), x.max(dim=-1).indices)
    x = torch.randn(rows, vocab, generator=g).to(dtype)
    assert torch.equal(cpu_ops.argmax_rows(x), x.max(dim=-1).indices)


def test_argmax_rows_nan_and_inf(cpu_ops) -> None:  # type: ignore[no-untyped-def]
    x = torch.randn(5, 40)
    x[0, 33], x[0, 35] = float("nan"), float("nan")  # the first NaN counts as the maximum
    x[1, :] = float("-inf")
    x[2, 39] = float("inf")
    x[3, 2], x[3, 37] = 1e30, 1e30
    x[4, 0] = float("nan")
    expected = torch.tensor([33, 0, 39, 2, 0])
    assert torch.equal(cpu_ops.argmax_rows(x), expected)
    assert torch.equal(x.max(dim=-1).indices, expected)


def test_argmax_rows_refuses_bad_input(cpu_ops) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(RuntimeError, match="rows contiguous"):
        cpu_ops.argmax_rows(torch.randn(8, 4).t())
    with pytest.raises(RuntimeError, match="V > 0"):
        cpu_ops.argmax_rows(torch.randn(2, 0))
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        cpu_ops.argmax_rows(torch.randn(2, 4, dtype=torch.float64))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "vocab", "words"), [(16, 49152, 1536), (5, 70, 3), (4, 100, 2)])
def test_mask_rows_matches_xgrammar(cpu_ops, dtype, rows, vocab, words) -> None:  # type: ignore[no-untyped-def]
    """The grammar mask equals xgrammar's own `apply_token_bitmask_inplace` with `indices`:
    only the listed rows change, each by its own bitmask row; words of all 1s, all 0s and
    mixed bits; a vocabulary that ends inside a word (70) or past the mask's bits (100 > 64)."""
    import xgrammar as xgr

    g = gen(rows * words)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (rows, words), generator=g, dtype=torch.int32)
    bitmask[:, ::3] = -1  # a free word
    bitmask[:, 1::3] = 0  # a pinned word
    bitmask[0, 2 % words] = 0x5  # tokens 0 and 2 of the word only
    x = torch.randn(rows, vocab, generator=g).to(dtype)
    indices = [r for r in range(rows) if r % 2 == 0] + [rows - 1]
    want = x.clone()
    xgr.apply_token_bitmask_inplace(
        want, bitmask, vocab_size=min(vocab, 32 * words), indices=indices
    )
    cpu_ops.mask_rows(x, bitmask, torch.tensor(indices))
    assert torch.equal(x, want)
    assert torch.isinf(x).any() and torch.isfinite(x[1]).all()


def test_mask_rows_refuses_bad_input(cpu_ops) -> None:  # type: ignore[no-untyped-def]
    x, bitmask = torch.randn(2, 64), torch.zeros(2, 2, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="out of range"):
        cpu_ops.mask_rows(x, bitmask, torch.tensor([2]))
    with pytest.raises(RuntimeError, match="int32"):
        cpu_ops.mask_rows(x, bitmask.long(), torch.tensor([0]))
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        cpu_ops.mask_rows(x.double(), bitmask, torch.tensor([0]))


def fixed_linear_outputs() -> list[torch.Tensor]:
    """`linear_fixed` on seeded inputs (ragged N and K, a bias, strided rows), float32, bfloat16
    and float16: the bits every build of the library must reproduce (test_cpu_prefill's ISA
    builds compare theirs with the native build's)."""
    from kernels import cpu_ops

    g = gen(7)
    outs = []
    for dtype in FIXED_DTYPES:
        w = torch.randn(70, 45, generator=g).to(dtype)
        wide = torch.randn(13, 50, generator=g).to(dtype)
        bias = torch.randn(70, generator=g).to(dtype)
        outs.append(cpu_ops.linear_fixed(wide[:, 2:47], cpu_ops.pack_fixed(w), 70, bias))
    return outs


@pytest.mark.parametrize("dtype", FIXED_DTYPES)
@pytest.mark.parametrize(("n", "k"), [(96, 64), (70, 45), (8, 576), (13, 1), (960, 576)])
def test_linear_fixed_is_one_fma_chain_per_output(cpu_ops, dtype, n, k) -> None:  # type: ignore[no-untyped-def]
    """Every row's result is the same bits in a batch of 1 to 300 rows (the vector tiles and
    their ragged tails), in the portable loops, and against a float64 reference up to the
    rounding of K fused multiply-adds (and of the output, in bfloat16 and float16)."""
    g = gen(n * 7 + k)
    w = torch.randn(n, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    x = torch.randn(300, k, generator=g).to(dtype)
    panels = cpu_ops.pack_fixed(w)
    assert panels.shape == (-(-n // 32), k, 32)
    for b in (None, bias):
        full = cpu_ops.linear_fixed(x, panels, n, b)
        assert torch.equal(full, cpu_ops.linear_fixed(x, panels, n, b, plain=True))
        for start, rows in ((0, 1), (5, 2), (7, 11), (20, 12), (3, 13), (40, 25), (100, 200)):
            assert torch.equal(cpu_ops.linear_fixed(x[start : start + rows], panels, n, b),
                               full[start : start + rows])  # fmt: skip
        want = x.double() @ w.double().T + (0 if b is None else b.double())
        tol = {torch.float32: 1e-6 * k, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
        torch.testing.assert_close(full.double(), want, rtol=tol, atol=tol)


def test_linear_fixed_sums_in_k_order(cpu_ops) -> None:  # type: ignore[no-untyped-def]
    """The order is k ascending, each step rounded: 1 + 2^-24 rounds to 1 (a tie, to even), so
    1, 2^-24, -1 sums to 0, while from the other end (-1 + 2^-24 is exact) it is 2^-24."""
    w = torch.ones(1, 3)
    x = torch.tensor([[1.0, 2.0**-24, -1.0]])
    assert cpu_ops.linear_fixed(x, cpu_ops.pack_fixed(w), 1).item() == 0.0
    x = torch.tensor([[2.0**-24, 1.0, -1.0]])
    assert cpu_ops.linear_fixed(x, cpu_ops.pack_fixed(w), 1).item() == 0.0
    x = torch.tensor([[1.0, -1.0, 2.0**-24]])
    assert cpu_ops.linear_fixed(x, cpu_ops.pack_fixed(w), 1).item() == 2.0**-24


def test_linear_fixed_refuses_bad_input(cpu_ops) -> None:  # type: ignore[no-untyped-def]
    panels = cpu_ops.pack_fixed(torch.randn(40, 8))
    with pytest.raises(RuntimeError, match="do not fit"):
        cpu_ops.linear_fixed(torch.randn(2, 9), panels, 40)
    with pytest.raises(RuntimeError, match="share a dtype"):
        cpu_ops.linear_fixed(torch.randn(2, 8, dtype=torch.bfloat16), panels, 40)
    with pytest.raises(RuntimeError, match="bias"):
        cpu_ops.linear_fixed(torch.randn(2, 8), panels, 40, torch.randn(39))
