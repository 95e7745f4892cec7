"""Packed weights (our bf16 panels, the fixed-order kernel's, oneDNN's) give `F.linear`'s results up
to summation order, and one kernel serves every batch of a weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.models.linear import PACK_BATCH_HINT, PackedWeight, linear, pack_weight


def test_other_dtypes_are_never_packed() -> None:
    assert pack_weight(torch.randn(8, 4, dtype=torch.float64)) is None


def onednn_only(weight: torch.Tensor) -> PackedWeight:
    """The weight packed for oneDNN alone (as on CPUs without AVX512-BF16)."""
    return PackedWeight(onednn=torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH_HINT))


@pytest.mark.parametrize("rows", [1, 3, 16, PACK_BATCH_HINT, 300])
def test_packed_fp32_matches_f_linear(rows: int) -> None:
    """Same products, another summation order: equal to float32 rounding."""
    w = torch.randn(96, 64)
    packed = pack_weight(w)
    if packed is None:
        pytest.skip("oneDNN is not available in this torch build")
    x = torch.randn(rows, 64)
    bias = torch.randn(96)
    torch.testing.assert_close(linear(x, w, None, packed), F.linear(x, w), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        linear(x, w, bias, packed), F.linear(x, w, bias), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("rows", [1, 3, 16, PACK_BATCH_HINT])
def test_onednn_bf16_matches_f_linear(rows: int) -> None:
    w = torch.randn(96, 64, dtype=torch.bfloat16)
    try:
        packed = onednn_only(w)
    except RuntimeError:
        pytest.skip("oneDNN bf16 packing is not available on this CPU")
    x = torch.randn(rows, 64, dtype=torch.bfloat16)
    bias = torch.randn(96, dtype=torch.bfloat16)
    assert torch.equal(linear(x, w, None, packed), F.linear(x, w))
    assert torch.equal(linear(x, w, bias, packed), F.linear(x, w, bias))


@pytest.mark.parametrize("rows", [1, 3, 16, PACK_BATCH_HINT, 300])
def test_packed_bf16_matches_f_linear(rows: int) -> None:
    """Whatever packing this CPU gets: float32 sums of exact bf16 products, one rounding."""
    w = torch.randn(96, 576, dtype=torch.bfloat16)
    packed = pack_weight(w)
    if packed is None:
        pytest.skip("no bf16 packing on this CPU")
    x = torch.randn(rows, 576, dtype=torch.bfloat16)
    bias = torch.randn(96, dtype=torch.bfloat16)
    for b in (None, bias):
        ref = F.linear(x.float(), w.float(), None if b is None else b.float())
        torch.testing.assert_close(linear(x, w, b, packed).float(), ref, rtol=2**-7, atol=0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_batch_of_a_weight_takes_one_kernel(dtype: torch.dtype) -> None:
    """float32 and float16 (and bfloat16 where the AVX512-BF16 panels do not run) pack for the
    fixed-order kernel, which then serves every batch size: a row's result is the same bits
    alone or among 300 (MKL and oneDNN, which float32 used to take beyond 16 rows, pick their
    blockings by batch size)."""
    from kernels import cpu_attention, cpu_ops

    if cpu_attention.load_kernel() is None:
        pytest.skip("the C++ CPU kernels could not be built here")
    w = torch.randn(96, 64).to(dtype)
    packed = pack_weight(w)
    assert packed is not None
    if dtype == torch.bfloat16 and cpu_ops.linear_bf16_available():
        assert packed.panels is not None and packed.fixed is None
    else:
        assert packed.fixed is not None and packed.panels is None and packed.onednn is None
    x, bias = torch.randn(300, 64).to(dtype), torch.randn(96).to(dtype)
    full = linear(x, w, bias, packed)
    for rows in (1, 2, 16, 17, 64, 299):
        assert torch.equal(linear(x[:rows], w, bias, packed), full[:rows])
    assert linear(torch.randn(2, 64, dtype=torch.float64), w.double()).dtype == torch.float64
