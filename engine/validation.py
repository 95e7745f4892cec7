"""Request checks that need only the model's shape (vocabulary, context length): pure Python, so
the engine and a remote client of it (`gateway.replicas.remote`) reject the same requests with
the same errors before anything is sent or allocated."""

from __future__ import annotations

from engine.errors import ContextLengthError, InvalidRequestError
from engine.request import TenantShare
from engine.sampling_params import SamplingParams


def validate_request(
    prompt_token_ids: list[int],
    params: SamplingParams,
    *,
    vocab_size: int,
    max_model_len: int,
    block_size: int,
    share: TenantShare | None = None,
    shared_blocks: int = 0,
) -> int:
    """Check a request against the model and its tenant's KV cap (`share.max_kv_blocks`, see
    `check_kv_cap`); return its resolved max_tokens.

    Raises:
        InvalidRequestError / ContextLengthError naming the field.
    """
    n = len(prompt_token_ids)
    if n == 0:
        raise InvalidRequestError("prompt must not be empty", param="prompt")
    if any((not isinstance(t, int)) or t < 0 or t >= vocab_size for t in prompt_token_ids):
        raise InvalidRequestError(f"prompt token ids must be in [0, {vocab_size})", param="prompt")
    params.validate_for_model(vocab_size)
    if n >= max_model_len:
        raise ContextLengthError(
            f"This model's maximum context length is {max_model_len} tokens, but the "
            f"prompt has {n} tokens (at least one output token must fit).",
            param="prompt",
        )
    max_tokens = params.max_tokens
    if max_tokens is None:
        max_tokens = max_model_len - n
    elif n + max_tokens > max_model_len:
        raise ContextLengthError(
            f"This model's maximum context length is {max_model_len} tokens; the prompt "
            f"has {n} tokens and max_tokens asks for {max_tokens} more.",
            param="max_tokens",
        )
    if share is not None and share.max_kv_blocks is not None:
        check_kv_cap(
            n + max_tokens,
            max_tokens,
            params.num_seqs,
            cap=share.max_kv_blocks,
            shared_blocks=shared_blocks,
            block_size=block_size,
        )
    return max_tokens


def check_kv_cap(
    total_tokens: int,
    max_tokens: int,
    num_seqs: int,
    *,
    cap: int,
    shared_blocks: int,
    block_size: int,
) -> None:
    """Refuse a request that could outgrow its tenant's `max_kv_blocks` alone (it would wait
    forever): its first sequence's blocks at full length (`total_tokens`: prompt + max_tokens),
    each further sequence's own output blocks plus a copied one, a public prefix's blocks not at
    all.

    Raises:
        InvalidRequestError naming `max_tokens`, with the max_tokens that would fit.
    """
    bs = block_size
    need = -(-total_tokens // bs) + (num_seqs - 1) * (-(-max_tokens // bs) + 1) - shared_blocks
    if need <= cap:
        return
    n = total_tokens - max_tokens
    fits = (cap + shared_blocks) * bs - n
    hint = f"; max_tokens {fits} would fit" if num_seqs == 1 and fits > 0 else ""
    raise InvalidRequestError(
        f"This request may need {need} KV blocks of {bs} tokens ({n} prompt tokens, "
        f"max_tokens {max_tokens}, {num_seqs} sequence(s)), over its tenant's max_kv_blocks "
        f"of {cap}{hint}.",
        param="max_tokens",
    )
