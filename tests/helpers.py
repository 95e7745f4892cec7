"""Test helpers shared across suites: a toy paged-cache allocator and tiny random models."""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kernels.metadata import AttentionMetadata


def make_attention_metadata(
    block_tables: Sequence[Sequence[int]],
    seq_lens: Sequence[int],
    query_lens: Sequence[int],
    block_size: int,
    device: torch.device | str = "cpu",
) -> AttentionMetadata:
    """Metadata for a step where sequence s computes the last `query_lens[s]` of its tokens.

    `block_tables[s]` must cover `seq_lens[s]` tokens; tables are padded with 0 to the longest.
    """
    assert len(block_tables) == len(seq_lens) == len(query_lens)
    slots: list[int] = []
    for table, seq_len, q_len in zip(block_tables, seq_lens, query_lens, strict=True):
        assert 1 <= q_len <= seq_len and len(table) * block_size >= seq_len
        for pos in range(seq_len - q_len, seq_len):
            slots.append(table[pos // block_size] * block_size + pos % block_size)
    starts = [0]
    for q_len in query_lens:
        starts.append(starts[-1] + q_len)
    width = max(len(t) for t in block_tables)
    padded = [list(t) + [0] * (width - len(t)) for t in block_tables]
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(list(seq_lens), dtype=torch.int32, device=device),
        block_tables=torch.tensor(padded, dtype=torch.int32, device=device),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_start_loc_list=starts,
        seq_lens_list=list(seq_lens),
    )


class ToyBlockAllocator:
    """Hands out blocks in a shuffled order so block tables are non-contiguous, like a real pool.

    Block 0 is never handed out: tables are padded with 0, so a kernel that reads padding would
    read a block no sequence owns.
    """

    def __init__(self, num_blocks: int, block_size: int, seed: int = 0) -> None:
        self.block_size = block_size
        self.free = list(range(1, num_blocks))
        random.Random(seed).shuffle(self.free)
        self.tables: dict[int, list[int]] = {}

    def step(self, work: Sequence[tuple[int, int, int]]) -> AttentionMetadata:
        """Metadata for one step; `work` holds (seq_id, seq_len after the step, q_len) per sequence.

        Grows each sequence's block table to cover `seq_len` tokens.
        """
        for seq_id, seq_len, _ in work:
            table = self.tables.setdefault(seq_id, [])
            while len(table) * self.block_size < seq_len:
                table.append(self.free.pop())
        return make_attention_metadata(
            [self.tables[s] for s, _, _ in work],
            [n for _, n, _ in work],
            [q for _, _, q in work],
            self.block_size,
        )


TINY_SIZES: dict[str, Any] = {
    "vocab_size": 49152,  # the bundled SmolLM2 tokenizer's vocabulary
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    # Large random weights: sharp, untied logits so greedy token comparisons are stable.
    "initializer_range": 0.15,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

TINY_ARCHS = ("llama", "llama3", "qwen2")


def make_tiny_hf_model(arch: str = "llama", seed: int = 0, **overrides: Any) -> Any:
    """A tiny random transformers causal LM in float32, eval mode, eager attention.

    Args:
        arch: "llama" (tied embeddings), "llama3" (llama3 RoPE scaling, untied) or "qwen2"
            (q/k/v bias, untied).
        seed: torch seed for the random weights.
        overrides: config fields to change (e.g. `rope_parameters`, `num_hidden_layers`).
    """
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    fields = dict(TINY_SIZES)
    if arch == "llama":
        fields.update(tie_word_embeddings=True)
    elif arch == "llama3":
        fields.update(tie_word_embeddings=False, rope_parameters=dict(_LLAMA3_ROPE))
    elif arch != "qwen2":
        raise ValueError(f"unknown tiny arch {arch!r} (known: {TINY_ARCHS})")
    fields.update(overrides)
    torch.manual_seed(seed)
    config_cls: Any = Qwen2Config if arch == "qwen2" else LlamaConfig
    model_cls: Any = Qwen2ForCausalLM if arch == "qwen2" else LlamaForCausalLM
    if arch == "qwen2":
        fields.setdefault("tie_word_embeddings", False)
    model = model_cls(config_cls(**fields, attn_implementation="eager"))
    return model.eval()


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def make_tiny_model_dir(
    path: str | os.PathLike[str], arch: str = "llama", seed: int = 0, **overrides: Any
) -> str:
    """Save a tiny random model (see `make_tiny_hf_model`) as a Hugging Face directory.

    The directory gets float32 safetensors weights, config.json, and the bundled SmolLM2
    tokenizer files (real vocabulary and chat template), so `load_model(path)` serves it.
    Returns the directory as a string.
    """
    from engine.models.loader import bundled_model_dir

    out = Path(path)
    make_tiny_hf_model(arch, seed, **overrides).save_pretrained(out)
    tokenizer_dir = Path(bundled_model_dir())
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, out / name)
    return str(out)
