"""Pre-packed oneDNN weights give the same results as `F.linear` at decode batch sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.models.linear import PACK_BATCH_HINT, linear, pack_weight


def test_other_dtypes_are_never_packed() -> None:
    assert pack_weight(torch.randn(8, 4, dtype=torch.float16)) is None
    assert pack_weight(torch.randn(8, 4, dtype=torch.float64)) is None


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
def test_packed_bf16_matches_f_linear(rows: int) -> None:
    w = torch.randn(96, 64, dtype=torch.bfloat16)
    packed = pack_weight(w)
    if packed is None:
        pytest.skip("oneDNN bf16 packing is not available on this CPU")
    x = torch.randn(rows, 64, dtype=torch.bfloat16)
    bias = torch.randn(96, dtype=torch.bfloat16)
    assert torch.equal(linear(x, w, None, packed), F.linear(x, w))
    assert torch.equal(linear(x, w, bias, packed), F.linear(x, w, bias))
