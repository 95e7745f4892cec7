"""Offline batch API: `LLM().generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from engine.config import CacheConfig, EngineConfig, SchedulerConfig, SchedulingPolicy
from engine.env import EngineEnv
from engine.llm_engine import LLMEngine
from engine.models.loader import LoadedModel
from engine.outputs import PrefixState, RequestOutput
from engine.request import Request
from engine.sampling_params import SamplingParams

Prompt = str | Sequence[int]


class LLM:
    """Generate completions for many prompts at once with continuous batching.

    `LLM()` loads the bundled SmolLM2-135M-Instruct; `model` may be a Hugging Face directory
    (safetensors) or a GGUF file. Built from these arguments, the engine also honours the
    variables of `engine.env.EngineEnv` (PREFIXGATE_CACHE_DIR, ...); a `config` given instead
    is used as it is.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        dtype: str = "auto",
        device: str = "auto",
        block_size: int = 16,
        num_blocks: int | None = None,
        kv_cache_gib: float = 1.0,
        enable_prefix_caching: bool = True,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        max_model_len: int | None = None,
        policy: SchedulingPolicy = "fcfs",
        attention_backend: str = "auto",
        seed: int = 0,
        config: EngineConfig | None = None,
        loaded: LoadedModel | None = None,
    ) -> None:
        if config is None:
            config = EngineEnv().apply(
                EngineConfig(
                    model=model,
                    dtype=dtype,
                    device=device,
                    attention_backend=attention_backend,
                    seed=seed,
                    cache=CacheConfig(block_size, num_blocks, kv_cache_gib, enable_prefix_caching),
                    scheduler=SchedulerConfig(
                        max_num_seqs,
                        max_num_batched_tokens,
                        max_model_len,
                        policy,
                        max_waiting=1 << 30,
                    ),
                )
            )
        self.engine = LLMEngine(config, loaded)

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        namespaces: Sequence[str | None] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in the prompts' order.

        Args:
            prompts: one prompt or a list; a prompt is text or a list of token ids.
            params: one `SamplingParams` for all, or one per prompt (default: greedy, 16 tokens).
            namespaces: optional prefix-cache namespace per prompt.
        """
        batch = _as_batch(prompts)
        if params is None:
            params = SamplingParams(temperature=0.0)
        plist = [params] * len(batch) if isinstance(params, SamplingParams) else list(params)
        if len(plist) != len(batch):
            raise ValueError("need one SamplingParams per prompt")
        ns = list(namespaces) if namespaces is not None else [None] * len(batch)
        requests: list[Request] = []
        for prompt, p, namespace in zip(batch, plist, ns, strict=True):
            ids = self.encode(prompt)
            requests.append(self.engine.add_request(ids, p, namespace=namespace))
        while self.engine.has_unfinished:
            self.engine.step()
        return [self.engine.final_output(r) for r in requests]

    def warm_prefix(
        self,
        prompt: Prompt,
        *,
        key: str | None = None,
        namespace: str | None = None,
        expires_at: float | None = None,
    ) -> PrefixState:
        """Compute `prompt` into the prefix cache now; with `key`, pin its full blocks so no
        memory pressure evicts them until `unpin_prefix(key)` or `expires_at` (epoch seconds).

        Raises:
            PinRefusedError: the engine's pin cap cannot take it.
        """
        request = self.engine.warm_prefix(
            self.encode(prompt), key=key, namespace=namespace, expires_at=expires_at
        )
        while not request.finished:
            self.engine.step()
        return self.engine.prefix_state(request)

    def unpin_prefix(self, key: str) -> bool:
        """End a pin; its blocks stay cached until evicted. False if `key` is not pinned."""
        return self.engine.unpin_prefix(key)

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt, add_special_tokens=False))
        return list(prompt)

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of `messages` rendered with the model's chat template."""
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)


def _as_batch(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    items: list[Any] = list(prompts)
    if items and all(isinstance(t, int) for t in items):
        return [items]  # one prompt of token ids
    return items
