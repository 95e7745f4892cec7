"""Packed weights (our bf16 panels, oneDNN) give `F.linear`'s results up to summation order."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.models.linear import PACK_BATCH_HINT, PackedWeight, linear, pack_weight


def test_other_dtypes_are_never_packed() -> None:
    assert pack_weight(torch.randn(8, 4, dtype=torch.float16)) is None
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


def require_small_linear() -> None:
    from kernels import cpu_attention

    if not cpu_attention.small_linear_available():
        pytest.skip("the C++ CPU kernels could not be built here")


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5])
@pytest.mark.parametrize(("out_features", "in_features"), [(96, 64), (37, 19), (8, 576), (13, 1)])
def test_small_linear_matches_f_linear(rows: int, out_features: int, in_features: int) -> None:
    """Weight-row tiles of 8 with ragged ends, K not a multiple of the vector width, odd rows."""
    require_small_linear()
    from kernels.cpu_attention import small_linear

    gen = torch.Generator().manual_seed(rows * 1000 + out_features)
    w = torch.randn(out_features, in_features, generator=gen)
    bias = torch.randn(out_features, generator=gen)
    wide = torch.randn(rows, in_features + 5, generator=gen)
    x = wide[:, 2 : 2 + in_features]  # rows strided, as a slice of a fused projection
    tol = {"rtol": 1e-5, "atol": 1e-6 * in_features}  # sums of K products: rounding grows
    torch.testing.assert_close(small_linear(x, w), F.linear(x, w), **tol)
    torch.testing.assert_close(small_linear(x, w, bias), F.linear(x, w, bias), **tol)


def test_small_fp32_batches_take_the_streaming_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    require_small_linear()
    from engine.models import linear as module
    from kernels import cpu_attention

    calls: list[int] = []
    real = cpu_attention.small_linear

    def counting(x: torch.Tensor, *args: torch.Tensor | None) -> torch.Tensor:
        calls.append(x.shape[0])
        return real(x, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(cpu_attention, "small_linear", counting)
    w = torch.randn(40, 24)
    if pack_weight(w) is None:
        pytest.skip("oneDNN is not available in this torch build")
    packed = onednn_only(w)
    for rows in (1, module.SMALL_LINEAR_MAX_ROWS, module.SMALL_LINEAR_MAX_ROWS + 1):
        x = torch.randn(rows, 24)
        torch.testing.assert_close(linear(x, w, None, packed), F.linear(x, w), rtol=1e-5, atol=1e-5)
    assert calls == [1, module.SMALL_LINEAR_MAX_ROWS]
    assert linear(torch.randn(2, 24, dtype=torch.float64), w.double()).dtype == torch.float64
