"""Runs one scheduled step on the model: owns the paged KV cache, builds inputs, samples.

It sees only plain data from the scheduler (ids, tokens, block tables) and never calls the block
manager.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.config import CacheConfig, ModelConfig
from engine.outputs import TokenLogprob
from engine.sampler import SampledToken, Sampler
from engine.scheduler import ScheduledSeq, SchedulerOutput
from kernels.metadata import AttentionMetadata, prefix_groups

GIB = 1 << 30
PROMPT_LOGITS_ROWS = 256  # prompt logprobs: rows of [rows, vocab] logits computed at a time


def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return config.num_layers * 2 * block_size * config.num_kv_heads * config.head_dim * elem


def num_kv_blocks(config: ModelConfig, cache: CacheConfig, dtype: torch.dtype) -> int:
    """Pool size: `cache.num_blocks` if set, else as many blocks as `kv_cache_gib` holds."""
    if cache.num_blocks is not None:
        return cache.num_blocks
    return max(
        1, int(cache.kv_cache_gib * GIB) // kv_bytes_per_block(config, cache.block_size, dtype)
    )


@dataclass(slots=True)
class StepTimings:
    """Cumulative wall time per phase of `LLMEngine.step`, for the step-time split."""

    steps: int = 0
    phases: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(
            ("schedule", "prepare", "model", "sample", "output"), 0.0
        )
    )

    def add(self, phase: str, since: float) -> float:
        now = time.perf_counter()
        self.phases[phase] += now - since
        return now

    def per_step_ms(self) -> dict[str, float]:
        return {k: 1000 * v / max(self.steps, 1) for k, v in self.phases.items()}


@dataclass(slots=True)
class PromptLogprobs:
    """Logprobs of prompt tokens `start + 1 ...` of one sequence, from one step's chunk."""

    seq_id: int
    start: int  # the position of the chunk's first token; entry i is prompt token start + 1 + i
    logprobs: list[TokenLogprob]


@dataclass(slots=True)
class RunnerOutput:
    sampled: list[SampledToken] = field(default_factory=list)
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    meta: AttentionMetadata
    logits_rows: torch.Tensor  # [R] int64: token index whose logits each sampled row needs


class ModelRunner:
    """Executes `SchedulerOutput`s over KV `[layers, 2, num_blocks, block_size, kv_heads, hd]`."""

    def __init__(
        self,
        model: Any,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        seed: int = 0,
    ) -> None:
        self.model = model
        self.config = config
        self.block_size = block_size
        self.device = device
        # [layers, 2, num_blocks, block_size, KVH, D] as the kernels take it, stored head-major:
        # a KV head's rows of a block are one contiguous run (block_size x D), so the attention
        # kernels, which read one KV head at a time, stream whole runs instead of a 128-byte
        # slice of every token row (docs/kernels.md). The kernels follow the strides.
        self.kv_cache = torch.zeros(
            config.num_layers,
            2,
            num_blocks,
            config.num_kv_heads,
            block_size,
            config.head_dim,
            dtype=dtype,
            device=device,
        ).transpose(3, 4)
        self.kv_caches = list(self.kv_cache.unbind(0))  # per-layer views
        self.sampler = Sampler(config.vocab_size, config.eos_token_ids, seed, device)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, timings: StepTimings | None = None) -> RunnerOutput:
        """Run one step: one sampled token per `out.samples` entry, and the prompt logprobs of
        the scheduled sequences that asked for them."""
        timings = timings or StepTimings()
        t = time.perf_counter()
        self.sampler.forget(out.finished_seq_ids)
        if out.block_copies:
            src = torch.tensor([s for s, _ in out.block_copies], device=self.device)
            dst = torch.tensor([d for _, d in out.block_copies], device=self.device)
            self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]
        if out.empty:
            return RunnerOutput()
        inputs = self.prepare(out)
        t = timings.add("prepare", t)
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta)
        result = RunnerOutput(prompt_logprobs=self._prompt_logprobs(out, inputs, hidden))
        if not out.samples:
            timings.add("model", t)
            return result
        logits = self.model.compute_logits(hidden[inputs.logits_rows])
        t = timings.add("model", t)
        result.sampled = self.sampler(logits, out.samples)
        timings.add("sample", t)
        return result

    def _prompt_logprobs(
        self, out: SchedulerOutput, inputs: StepInputs, hidden: torch.Tensor
    ) -> list[PromptLogprobs]:
        starts = inputs.meta.query_start_loc_list
        return [
            PromptLogprobs(s.seq_id, s.start_pos, self._token_logprobs(hidden, starts[row], s))
            for row, s in enumerate(out.seqs)
            if s.prompt_targets
        ]

    def _token_logprobs(
        self, hidden: torch.Tensor, first: int, s: ScheduledSeq
    ) -> list[TokenLogprob]:
        """Logprob (and top k) of each target given the tokens up to it, a slice at a time."""
        assert s.prompt_targets is not None
        result: list[TokenLogprob] = []
        for lo in range(0, len(s.prompt_targets), PROMPT_LOGITS_ROWS):
            targets = s.prompt_targets[lo : lo + PROMPT_LOGITS_ROWS]
            rows = hidden[first + lo : first + lo + len(targets)]
            logprobs = torch.log_softmax(
                self.model.compute_logits(rows)[:, : self.config.vocab_size].float(), dim=-1
            )
            target_t = torch.tensor(targets, device=logprobs.device).unsqueeze(1)
            chosen = logprobs.gather(1, target_t).squeeze(1).tolist()
            top_vals, top_ids = logprobs.topk(max(s.prompt_top_k, 1), dim=-1)
            top = [
                list(zip(ids[: s.prompt_top_k], vals[: s.prompt_top_k], strict=True))
                for ids, vals in zip(top_ids.tolist(), top_vals.tolist(), strict=True)
            ]
            result += [
                TokenLogprob(t, lp, k) for t, lp, k in zip(targets, chosen, top, strict=True)
            ]
        return result

    def prepare(self, out: SchedulerOutput) -> StepInputs:
        """Flatten the scheduled sequences into one batch (see `AttentionMetadata`)."""
        # Plain lists, then one tensor each: per-sequence tensors cost more than the data here.
        input_ids: list[int] = []
        positions: list[int] = []
        starts = [0]
        seq_lens: list[int] = []
        bs = self.block_size
        max_blocks = max(len(s.block_ids) for s in out.seqs)
        table_rows: list[list[int]] = []
        for s in out.seqs:
            input_ids.extend(s.token_ids)
            n = len(s.token_ids)
            positions.extend(range(s.start_pos, s.start_pos + n))
            starts.append(starts[-1] + n)
            seq_lens.append(s.start_pos + n)
            table_rows.append(s.block_ids + [0] * (max_blocks - len(s.block_ids)))
        tables = torch.tensor(table_rows, dtype=torch.int32)
        pos_t = torch.tensor(positions, dtype=torch.long)
        if len(positions) == len(out.seqs):  # all decodes: one slot per sequence
            pairs = zip(table_rows, positions, strict=True)
            slots = torch.tensor([row[p // bs] * bs + p % bs for row, p in pairs])
        else:
            lens = torch.tensor([len(s.token_ids) for s in out.seqs])
            row_of_token = torch.repeat_interleave(torch.arange(len(out.seqs)), lens)
            slots = tables[row_of_token, pos_t // bs].long() * bs + pos_t % bs
        meta = AttentionMetadata(
            slot_mapping=slots.to(self.device),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=self.device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=self.device),
            block_tables=tables.to(self.device),
            max_query_len=max(len(s.token_ids) for s in out.seqs),
            max_seq_len=max(seq_lens),
            query_start_loc_list=starts,
            seq_lens_list=seq_lens,
            prefix_groups=prefix_groups(
                [s.block_ids for s in out.seqs], [len(s.token_ids) for s in out.seqs], seq_lens, bs
            ),
        )
        logits_rows = torch.tensor([starts[spec.row + 1] - 1 for spec in out.samples])
        return StepInputs(
            torch.tensor(input_ids, dtype=torch.long, device=self.device),
            pos_t.to(self.device),
            meta,
            logits_rows.to(self.device),
        )
