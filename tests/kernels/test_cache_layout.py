"""The KV cache's layout is the strides' business: the engine stores it head-major (a KV head's
rows of a block contiguous) and every CPU path, the reference and the C++ kernels (decodes,
prefills, grouped shared-prefix decodes), writes and reads it to the same bits as the
token-major layout. (The Triton kernels: tests/kernels/test_triton.py.)"""

from __future__ import annotations

import pytest
import torch

from engine.config import ModelConfig
from engine.model_runner import ModelRunner
from kernels import AttentionMetadata, cpu_attention, reference
from tests.kernels.test_cpu_attention import MIXED, RAGGED, make_step
from tests.kernels.test_grouped import attend, bits, found, shared_step


def head_major(cache: torch.Tensor) -> torch.Tensor:
    """The same [2, num_blocks, block_size, KVH, D] values, stored [2, num_blocks, KVH,
    block_size, D]."""
    out = cache.transpose(2, 3).contiguous().transpose(2, 3)
    assert torch.equal(out, cache) and out.stride(3) == cache.shape[2] * cache.shape[4]
    return out


def test_model_runner_stores_the_cache_head_major() -> None:
    config = ModelConfig(
        vocab_size=32, hidden_size=24, intermediate_size=48, num_layers=2, num_heads=6,
        num_kv_heads=3, head_dim=4, max_position_embeddings=64, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=True, eos_token_ids=[0],
    )  # fmt: skip
    runner = ModelRunner(None, config, 5, 16, torch.float32, torch.device("cpu"))
    cache = runner.kv_caches[1]
    assert cache.shape == (2, 5, 16, 3, 4)
    assert cache.stride()[2:] == (4, 16 * 4, 1)  # token, head, dim
    assert runner.kv_cache.untyped_storage().nbytes() == 2 * 2 * 5 * 16 * 3 * 4 * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_writes_and_reads_either_layout(dtype: torch.dtype) -> None:
    query, cache, meta = make_step(MIXED, 4, 3, dtype, seed=1)
    hm = head_major(cache)
    gen = torch.Generator().manual_seed(2)
    kv = torch.randn(2, meta.num_tokens, cache.shape[3], cache.shape[4], generator=gen)
    slots = meta.slot_mapping.clone()
    slots[1] = -1  # skipped
    for c in (cache, hm):
        reference.write_kv(kv[0], kv[1], c, slots)
    assert torch.equal(cache, hm)
    assert torch.equal(
        reference.paged_attention(query, cache, meta, 0.125),
        reference.paged_attention(query, hm, fresh(meta), 0.125),
    )


def fresh(meta: AttentionMetadata) -> AttentionMetadata:
    """The same step without what a backend derived from it (plans are kept per step)."""
    return AttentionMetadata(**{f: getattr(meta, f) for f in meta.__slots__ if f != "derived"})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("batch", [MIXED, RAGGED], ids=["mixed", "decodes"])
def test_cpu_kernels_give_the_same_bits_on_either_layout(
    kernel: object, batch: list[tuple[int, int]], block_size: int, dtype: torch.dtype
) -> None:
    query, cache, meta = make_step(batch, block_size, 3, dtype, seed=5)
    want = cpu_attention.paged_attention(query, cache, meta, 0.125)
    got = cpu_attention.paged_attention(query, head_major(cache), fresh(meta), 0.125)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_decodes_give_the_same_bits_on_either_layout(
    kernel: object, dtype: torch.dtype
) -> None:
    step = shared_step([(130, [3, 0, 17]), (70, [5, 9])], [(40, 7), (21, 1)], 16, 3, dtype)
    groups = found(step)
    assert groups.shared_keys.numel() == 2
    want = attend(step, groups)
    step.cache = head_major(step.cache)
    assert torch.equal(bits(attend(step, groups)), bits(want))
    assert torch.equal(bits(attend(step, None)), bits(want))
