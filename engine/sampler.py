"""Batched sampling: logit bias, penalties, grammar masks, temperature, top-k / top-p / min-p,
seeds, logprobs.

All rows are processed together; only per-row seeds and penalties touch rows one at a time.
Sampling uses the exponential-race trick: argmax(p / E) with E ~ Exp(1) draws from p, so a seeded
row only needs its own noise vector from its own generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.outputs import TokenLogprob
from engine.scheduler import SampleSpec
from engine.structured import GrammarMasks
from kernels import cpu_ops


@dataclass(slots=True)
class SampledToken:
    seq_id: int
    token_id: int
    logprob: TokenLogprob | None
    # the token completed the sequence's grammar (its stop token): nothing may follow it
    grammar_done: bool = False


class Sampler:
    """Turns logits into tokens for a batch of `SampleSpec`s."""

    def __init__(
        self,
        vocab_size: int,
        eos_token_ids: Sequence[int],
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.device = torch.device(device)
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self._seq_generators: dict[int, torch.Generator] = {}
        self.grammar_masks = GrammarMasks(vocab_size)
        # the C++ row argmax (kernels.cpu_ops), ~15x torch's max(dim) on [16+, 49152] logits
        self._cpu_argmax = self.device.type == "cpu" and cpu_ops.fused_available(
            self.device, torch.float32
        )

    def forget(self, seq_ids: Sequence[int]) -> None:
        for seq_id in seq_ids:
            self._seq_generators.pop(seq_id, None)
        self.grammar_masks.forget(seq_ids)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, specs: Sequence[SampleSpec]) -> list[SampledToken]:
        """Sample one token per spec.

        Args:
            logits: [R, V] float32, row i belongs to specs[i].
            specs: what to sample for each row.
        """
        logits = logits[:, : self.vocab_size].float()
        raw_logprobs = None
        if any(s.params.sample_logprobs is not None for s in specs):
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        logits = self._apply_logit_bias(logits, specs)
        logits = self._apply_penalties(logits, specs)
        constrained = [(i, s.seq_id, s.grammar) for i, s in enumerate(specs) if s.grammar]
        if constrained:
            logits = logits.contiguous()
            self.grammar_masks.apply(logits, constrained)
        greedy = [s.params.greedy for s in specs]
        tokens = self._argmax(logits) if all(greedy) else self._sample(logits, specs, greedy)
        token_list = tokens.tolist()
        done = {
            i for i, seq_id, _ in constrained if self.grammar_masks.accept(seq_id, token_list[i])
        }
        return [
            SampledToken(
                s.seq_id, t, self._logprob(raw_logprobs, i, t, s.params.sample_logprobs), i in done
            )
            for i, (s, t) in enumerate(zip(specs, token_list, strict=True))
        ]

    # ---- steps -----------------------------------------------------------------------------
    def _argmax(self, x: torch.Tensor) -> torch.Tensor:
        """Row-wise first maximum of [R, V] (a NaN counts as the maximum), as
        `max(dim=-1).indices`, which is 2-3x faster than `argmax` on CPU but still slow."""
        if self._cpu_argmax and x.dtype == torch.float32 and x.stride(-1) == 1:
            return cpu_ops.argmax_rows(x)
        return x.max(dim=-1).indices

    def _apply_logit_bias(self, logits: torch.Tensor, specs: Sequence[SampleSpec]) -> torch.Tensor:
        rows = [i for i, s in enumerate(specs) if s.params.logit_bias]
        if not rows:
            return logits
        logits = logits.clone()
        for i in rows:
            bias = specs[i].params.logit_bias
            ids = torch.tensor(list(bias), dtype=torch.long, device=logits.device)
            logits[i, ids] += torch.tensor(list(bias.values()), device=logits.device)
        return logits

    def _apply_penalties(self, logits: torch.Tensor, specs: Sequence[SampleSpec]) -> torch.Tensor:
        rows = [i for i, s in enumerate(specs) if _has_penalty(s)]
        if not rows:
            return logits
        logits = logits.clone()
        for i in rows:
            s, p = specs[i], specs[i].params
            row = logits[i]
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(s.token_ids)), dtype=torch.long, device=row.device)
                vals = row[seen]
                row[seen] = torch.where(
                    vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty
                )
            out_ids = s.token_ids[s.num_prompt_tokens :]
            if out_ids and (p.presence_penalty or p.frequency_penalty):
                counts = torch.bincount(
                    torch.tensor(out_ids, dtype=torch.long, device=row.device),
                    minlength=self.vocab_size,
                )[: self.vocab_size].float()
                row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
            if p.min_tokens and len(out_ids) < p.min_tokens:
                banned = list(p.stop_token_ids) + ([] if p.ignore_eos else self.eos_token_ids)
                row[torch.tensor(banned, dtype=torch.long, device=row.device)] = float("-inf")
        return logits

    def _sample(
        self, logits: torch.Tensor, specs: Sequence[SampleSpec], greedy: list[bool]
    ) -> torch.Tensor:
        dev = logits.device
        temps = torch.tensor(
            [s.params.temperature if not g else 1.0 for s, g in zip(specs, greedy, strict=True)],
            device=dev,
        )
        scaled = logits / temps.unsqueeze(1)
        scaled = _filter_top_k_top_p(scaled, specs)
        min_ps = torch.tensor([s.params.min_p for s in specs], device=dev)
        probs = torch.softmax(scaled, dim=-1)
        if bool((min_ps > 0).any()):
            top = probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < min_ps.unsqueeze(1) * top, 0.0)
        noise = torch.empty_like(probs)
        unseeded = [i for i, s in enumerate(specs) if s.seed is None]
        if unseeded:
            noise[unseeded] = torch.empty(
                len(unseeded), probs.shape[1], device=probs.device
            ).exponential_(generator=self.generator)
        for i, s in enumerate(specs):
            if s.seed is not None:
                noise[i].exponential_(generator=self._seq_generator(s))
        sampled = self._argmax(probs / noise)
        greedy_t = torch.tensor(greedy, device=dev)
        return torch.where(greedy_t, self._argmax(logits), sampled)

    def _seq_generator(self, spec: SampleSpec) -> torch.Generator:
        gen = self._seq_generators.get(spec.seq_id)
        if gen is None:
            assert spec.seed is not None
            gen = torch.Generator(self.device).manual_seed(spec.seed)
            self._seq_generators[spec.seq_id] = gen
        return gen

    @staticmethod
    def _logprob(
        raw: torch.Tensor | None, row: int, token: int, k: int | None
    ) -> TokenLogprob | None:
        if raw is None or k is None:
            return None
        top: list[tuple[int, float]] = []
        if k > 0:
            vals, ids = raw[row].topk(k)
            top = list(zip(ids.tolist(), vals.tolist(), strict=True))
        return TokenLogprob(token, float(raw[row, token]), top)


def _has_penalty(s: SampleSpec) -> bool:
    p = s.params
    return bool(
        p.repetition_penalty != 1.0
        or p.presence_penalty
        or p.frequency_penalty
        or (p.min_tokens and len(s.token_ids) - s.num_prompt_tokens < p.min_tokens)
    )


def _filter_top_k_top_p(logits: torch.Tensor, specs: Sequence[SampleSpec]) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top-k and top-p nucleus. One sort for all rows."""
    top_ks = [s.params.top_k for s in specs]
    top_ps = [s.params.top_p for s in specs]
    if all(k <= 0 for k in top_ks) and all(p >= 1.0 for p in top_ps):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[1]
    ks = torch.tensor([k if k > 0 else vocab for k in top_ks], device=logits.device)
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
    mask = ranks >= ks.unsqueeze(1)
    ps = torch.tensor(top_ps, device=logits.device)
    if bool((ps < 1.0).any()):
        probs = torch.softmax(sorted_logits.masked_fill(mask, float("-inf")), dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass strictly before each token
        mask |= before >= ps.unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
