"""Our Llama-family forward over the paged cache matches transformers token for token."""

from __future__ import annotations

from typing import Any, cast

import pytest
import torch

from engine.config import ModelConfig
from engine.models.llama import LlamaDecoderLayer, LlamaForCausalLM, rope_inv_freq
from tests.helpers import TINY_ARCHS, ToyBlockAllocator, make_tiny_hf_model

BLOCK_SIZE = 4


@pytest.fixture(scope="module", params=TINY_ARCHS)
def hf_model(request: pytest.FixtureRequest) -> Any:
    return make_tiny_hf_model(request.param)


def build_ours(hf: Any, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    model = LlamaForCausalLM(ModelConfig.from_hf(hf.config), "torch", dtype=dtype)
    model.load_hf_state_dict(hf.state_dict())
    return model.eval()


@torch.inference_mode()
def hf_logits(hf: Any, tokens: torch.Tensor) -> torch.Tensor:
    """[L] -> [L, vocab] float32 logits of a plain transformers forward."""
    return hf(tokens[None]).logits[0].float()


@torch.inference_mode()
def run_steps(
    model: LlamaForCausalLM,
    sequences: dict[int, torch.Tensor],
    steps: list[list[tuple[int, int]]],
) -> dict[int, torch.Tensor]:
    """Run engine-like steps; each step lists (seq_id, number of new tokens) in batch order.

    Returns every sequence's logits for the tokens computed so far, [computed, vocab].
    """
    cfg = model.config
    dtype = model.embed_tokens.dtype
    alloc = ToyBlockAllocator(num_blocks=64, block_size=BLOCK_SIZE, seed=1)
    shape = (2, 64, BLOCK_SIZE, cfg.num_kv_heads, cfg.head_dim)
    kv_caches = [torch.zeros(shape, dtype=dtype) for _ in range(cfg.num_layers)]
    done = dict.fromkeys(sequences, 0)
    logits: dict[int, list[torch.Tensor]] = {s: [] for s in sequences}
    for step in steps:
        meta = alloc.step([(s, done[s] + n, n) for s, n in step])
        ids = torch.cat([sequences[s][done[s] : done[s] + n] for s, n in step])
        positions = torch.cat([torch.arange(done[s], done[s] + n) for s, n in step])
        out = model.compute_logits(model(ids, positions, kv_caches, meta))
        assert out.dtype == torch.float32 and out.shape == (len(ids), cfg.vocab_size)
        for (s, n), rows in zip(step, out.split([n for _, n in step]), strict=True):
            logits[s].append(rows)
            done[s] += n
    return {s: torch.cat(rows) for s, rows in logits.items()}


def random_tokens(length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 49152, (length,), generator=torch.Generator().manual_seed(seed))


def test_prefill_then_decodes_match_hf(hf_model: Any) -> None:
    tokens = random_tokens(20, seed=0)
    ours = run_steps(build_ours(hf_model), {0: tokens}, [[(0, 13)]] + [[(0, 1)]] * 7)
    torch.testing.assert_close(ours[0], hf_logits(hf_model, tokens), atol=1e-4, rtol=1e-4)


def test_chunked_prefill_matches_hf(hf_model: Any) -> None:
    tokens = random_tokens(18, seed=1)
    ours = run_steps(build_ours(hf_model), {0: tokens}, [[(0, 7)], [(0, 11)]])
    torch.testing.assert_close(ours[0], hf_logits(hf_model, tokens), atol=1e-4, rtol=1e-4)


def test_mixed_batch_matches_hf(hf_model: Any) -> None:
    """Decodes, a chunked prefill and a fresh prefill sharing steps."""
    seqs = {0: random_tokens(11, seed=2), 1: random_tokens(15, seed=3), 2: random_tokens(6, seed=4)}
    steps = [
        [(0, 9), (1, 6)],
        [(0, 1), (1, 9), (2, 5)],
        [(2, 1), (0, 1)],
    ]
    ours = run_steps(build_ours(hf_model), seqs, steps)
    for s, tokens in seqs.items():
        torch.testing.assert_close(ours[s], hf_logits(hf_model, tokens), atol=1e-4, rtol=1e-4)


def test_bfloat16_close_to_float32_hf(hf_model: Any) -> None:
    tokens = random_tokens(16, seed=5)
    ours = run_steps(
        build_ours(hf_model, torch.bfloat16), {0: tokens}, [[(0, 10)], *[[(0, 1)]] * 6]
    )
    expected = hf_logits(hf_model, tokens)
    err = (ours[0] - expected).abs().max().item()
    assert err < 0.05 * expected.abs().max().item(), err
    agree = (ours[0].argmax(-1) == expected.argmax(-1)).float().mean().item()
    assert agree >= 0.9


def test_linear_rope_scaling_matches_hf() -> None:
    hf = make_tiny_hf_model(
        "llama", rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
    )
    tokens = random_tokens(12, seed=6)
    ours = run_steps(build_ours(hf), {0: tokens}, [[(0, 8)], [(0, 1)], [(0, 3)]])
    torch.testing.assert_close(ours[0], hf_logits(hf, tokens), atol=1e-4, rtol=1e-4)


def test_unsupported_rope_scaling_is_rejected() -> None:
    cfg = ModelConfig.from_hf(make_tiny_hf_model("llama").config)
    cfg.rope_scaling = {"rope_type": "yarn", "factor": 2.0}
    with pytest.raises(NotImplementedError, match="yarn"):
        rope_inv_freq(cfg)


def test_fused_weights_and_tying(hf_model: Any) -> None:
    ours = build_ours(hf_model)
    sd = hf_model.state_dict()
    layer = cast(LlamaDecoderLayer, ours.layers[1])
    q = sd["model.layers.1.self_attn.q_proj.weight"]
    assert torch.equal(layer.qkv_proj[: q.shape[0]], q)
    assert torch.equal(layer.gate_up_proj[128:], sd["model.layers.1.mlp.up_proj.weight"])
    assert (layer.qkv_bias is not None) == (hf_model.config.model_type == "qwen2")
    assert (ours.lm_head is None) == hf_model.config.tie_word_embeddings


def test_load_rejects_missing_and_unknown_weights(hf_model: Any) -> None:
    sd = dict(hf_model.state_dict())
    ours = LlamaForCausalLM(ModelConfig.from_hf(hf_model.config), "torch")
    with pytest.raises(ValueError, match="missing"):
        ours.load_hf_state_dict({k: v for k, v in sd.items() if "down_proj" not in k})
    with pytest.raises(ValueError, match="does not use"):
        ours.load_hf_state_dict({**sd, "model.layers.0.self_attn.o_proj.bias": torch.zeros(64)})
