"""logit_bias, best_of and echo through the official `openai` client, on the real engine with a
tiny random model (real SmolLM2 tokenizer) behind a real uvicorn server."""

from __future__ import annotations

import re
from collections.abc import Iterator

import openai
import pytest

from tests.gateway.openai.test_server import Served, serve_engine

PROMPT = "The quick brown fox jumps over the lazy dog"


@pytest.fixture
def served(tiny_engine) -> Iterator[Served]:
    yield from serve_engine(tiny_engine)


@pytest.fixture
def client(served: Served) -> openai.OpenAI:
    return served.sync_client()


def test_logit_bias_bans_and_forces_tokens(client: openai.OpenAI, served: Served) -> None:
    plain = client.completions.create(
        model=served.model, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=0
    )
    assert plain.choices[0].logprobs and plain.choices[0].logprobs.tokens
    first = served.engine.tokenizer.encode(plain.choices[0].logprobs.tokens[0])[0]
    banned = client.completions.create(
        model=served.model, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=0,
        logit_bias={str(first): -100},
    )  # fmt: skip
    assert banned.choices[0].logprobs and banned.choices[0].logprobs.tokens
    assert banned.choices[0].logprobs.tokens[0] != plain.choices[0].logprobs.tokens[0]
    forced_id = served.engine.tokenizer.encode(" banana")[0]
    forced = client.chat.completions.create(
        model=served.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
        temperature=0.8, seed=1, logit_bias={str(forced_id): 100},
    )  # fmt: skip
    assert forced.choices[0].message.content == " banana" * 5


def test_logit_bias_outside_the_vocabulary_is_a_400(client: openai.OpenAI, served: Served) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(
            model=served.model, prompt=PROMPT, max_tokens=2, logit_bias={"999999": 5}
        )
    assert err.value.body["param"] == "logit_bias"  # type: ignore[index]


def test_best_of_returns_the_best_candidate(client: openai.OpenAI, served: Served) -> None:
    knobs = dict(model=served.model, prompt=PROMPT, max_tokens=5, temperature=1.0, seed=5)
    every = client.completions.create(n=4, logprobs=0, **knobs)  # seeds 5..8: the 4 candidates
    totals = [sum(c.logprobs.token_logprobs) for c in every.choices]  # type: ignore[union-attr,arg-type]
    best = client.completions.create(best_of=4, **knobs)
    assert len(best.choices) == 1
    assert best.choices[0].text == every.choices[totals.index(max(totals))].text
    assert best.usage and best.usage.completion_tokens == 4 * 5  # all candidates are billed


@pytest.mark.parametrize("stream", [False, True])
def test_echo_returns_the_prompt_first_with_its_logprobs(
    client: openai.OpenAI, served: Served, stream: bool
) -> None:
    knobs = dict(model=served.model, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=1)
    plain = client.completions.create(**knobs)
    if stream:
        chunks = list(client.completions.create(echo=True, stream=True, **knobs))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        first = chunks[0].choices[0].logprobs
    else:
        echoed = client.completions.create(echo=True, **knobs)
        text = echoed.choices[0].text
        first = echoed.choices[0].logprobs
    assert text == PROMPT + plain.choices[0].text
    n_prompt = len(served.engine.tokenizer.encode(PROMPT))
    assert first is not None and first.tokens and first.token_logprobs and first.top_logprobs
    assert "".join(first.tokens[:n_prompt]) == PROMPT
    assert first.token_logprobs[0] is None and first.top_logprobs[0] is None
    assert all(lp is not None and lp <= 0 for lp in first.token_logprobs[1:n_prompt])
    assert all(len(top or {}) >= 1 for top in first.top_logprobs[1:n_prompt])
    assert first.text_offset and first.text_offset[n_prompt - 1] < len(PROMPT)


def test_guided_choice_and_regex_on_the_tiny_engine(client: openai.OpenAI, served: Served) -> None:
    choices = ["alpha", "beta", "gamma"]
    for seed in range(3):
        out = client.completions.create(
            model=served.model, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=seed,
            extra_body={"guided_choice": choices},
        )  # fmt: skip
        assert out.choices[0].text in choices
    chat = client.chat.completions.create(
        model=served.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=12,
        temperature=1.0, seed=3, extra_body={"guided_regex": "[0-9]{3}-[a-z]{2}"},
    )  # fmt: skip
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", chat.choices[0].message.content or "")
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(
            model=served.model, prompt=PROMPT, max_tokens=2, extra_body={"guided_regex": "(x"}
        )
    assert err.value.body["param"] == "guided_regex"  # type: ignore[index]
    assert "could not be compiled" in err.value.body["message"]  # type: ignore[index]
