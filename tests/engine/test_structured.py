"""Grammar-constrained decoding in the engine: the tiny random model's output matches a JSON
schema, a regex and a choice list whatever it would have said; the mask is per row (the same
tokens alone or in a batch); bad grammars are refused naming the grammar; the compiled-grammar
cache is bounded and keyed by the spec."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import threading

import pytest

from engine import LLM, GrammarSpec, InvalidRequestError, SamplingParams
from engine.structured import Grammars
from tests.engine.test_generation import prompts

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "size": {"type": "string", "enum": ["S", "M", "L"]},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["name", "size", "n"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def llm(tiny_dirs) -> LLM:
    return LLM(tiny_dirs["llama"], dtype="float32", num_blocks=256, block_size=4)


def _params(spec: GrammarSpec, **kw) -> SamplingParams:
    kw.setdefault("max_tokens", 60)
    return SamplingParams(temperature=kw.pop("temperature", 0.7), seed=kw.pop("seed", 1),
                          grammar=spec, **kw)  # fmt: skip


def test_json_schema_output_parses_and_matches(llm: LLM) -> None:
    outs = llm.generate(prompts(21, 6), _params(GrammarSpec.json_schema(SCHEMA), n=2))
    for out in outs:
        for completion in out.outputs:
            assert completion.finish_reason == "stop", completion.text
            value = json.loads(completion.text)
            assert list(value) == ["name", "size", "n"]  # the schema's order
            assert value["size"] in ("S", "M", "L") and 0 <= value["n"] <= 99
    unconstrained = llm.generate(prompts(21, 6), SamplingParams(temperature=0.7, seed=1))
    assert not any(_parses(o.outputs[0].text) for o in unconstrained)  # the test can fail


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def test_regex_and_choice(llm: LLM) -> None:
    pattern = r"[a-c]{2}-[0-9]{3}"
    for out in llm.generate(prompts(22, 4), _params(GrammarSpec("regex", pattern))):
        assert re.fullmatch(pattern, out.outputs[0].text), out.outputs[0].text
    choices = ["red", "green", "blue"]
    for out in llm.generate(prompts(23, 4), _params(GrammarSpec.choice(choices))):
        assert out.outputs[0].text in choices


def test_the_mask_is_per_row_same_tokens_alone_or_in_a_batch(llm: LLM) -> None:
    spec = GrammarSpec.json_schema(SCHEMA)
    batch = prompts(24, 5)
    mixed = [_params(spec, temperature=0.0), SamplingParams(temperature=0.0, max_tokens=20)] * 2
    mixed.append(_params(GrammarSpec("json_object"), temperature=0.9, seed=4))
    together = llm.generate(batch, mixed)
    for prompt, params, out in zip(batch, mixed, together, strict=True):
        alone = llm.generate([prompt], params)[0]
        assert alone.outputs[0].token_ids == out.outputs[0].token_ids


@pytest.mark.parametrize(
    "spec",
    [
        GrammarSpec("json_schema", '{"type": "objectx"}'),
        GrammarSpec("json_schema", "{not json"),
        GrammarSpec("regex", "(unclosed"),
        GrammarSpec("choice", "[]"),
    ],
    ids=["unknown-type", "not-json", "regex", "no-choices"],
)
def test_bad_grammars_are_refused_with_the_reason(llm: LLM, spec: GrammarSpec) -> None:
    with pytest.raises(InvalidRequestError) as err:
        llm.generate([[5, 6, 7]], _params(spec))
    assert err.value.param == spec.kind
    assert err.value.message.startswith("The grammar could not be compiled: ")
    assert ".cc:" not in err.value.message
    assert not llm.engine.has_unfinished


def test_the_cache_is_an_lru_keyed_by_spec(llm: LLM) -> None:
    grammars = Grammars(llm.tokenizer, llm.engine.model_config.vocab_size, [0], max_entries=2)
    a, b, c = (GrammarSpec("regex", f"[a-z]{{{k}}}") for k in (1, 2, 3))
    first = grammars.compile(a)
    assert grammars.compile(GrammarSpec("regex", "[a-z]{1}")) is first  # equal spec, one entry
    grammars.compile(b)
    grammars.compile(a)  # a is now the most recent
    grammars.compile(c)  # evicts b
    assert len(grammars) == 2 and grammars.get(b) is None and grammars.get(a) is first
    assert GrammarSpec.json_schema({"b": 1, "a": 2}) == GrammarSpec.json_schema({"b": 1, "a": 2})
    # Key order is the output's property order: a reordered schema is another grammar.
    assert GrammarSpec.json_schema({"b": 1, "a": 2}) != GrammarSpec.json_schema({"a": 2, "b": 1})


def test_compile_async_runs_on_one_lowest_priority_thread(llm: LLM) -> None:
    """The gateway's compile path: off the event loop and the step loop, on one thread at
    nice 19 (Linux), so a new schema takes the CPU the step's threads leave rather than
    slowing their tokens (bench/structured.py's compile probe); the result lands in the
    cache, and a spec that does not compile is refused with the compiler's reason."""
    grammars = Grammars(llm.tokenizer, llm.engine.model_config.vocab_size, [0])
    seen: list[tuple[str, int]] = []
    compile_in_thread = grammars.compile

    def spy(spec: GrammarSpec) -> object:
        tid = threading.get_native_id()
        seen.append((threading.current_thread().name, os.getpriority(os.PRIO_PROCESS, tid)))
        return compile_in_thread(spec)

    grammars.compile = spy  # type: ignore[method-assign]
    specs = [GrammarSpec("regex", f"[a-z]{{{k}}}") for k in (1, 2, 3)]

    async def main() -> None:
        await asyncio.gather(*(grammars.compile_async(spec) for spec in specs))
        await grammars.compile_async(specs[0])  # cached: no second compile
        with pytest.raises(InvalidRequestError, match="could not be compiled"):
            await grammars.compile_async(GrammarSpec("regex", "[a-"))

    try:
        asyncio.run(main())
    finally:
        grammars.close()
    assert all(grammars.get(spec) is not None for spec in specs)
    assert len(seen) == 4 and len({name for name, _ in seen}) == 1
    assert seen[0][0] != threading.current_thread().name
    if sys.platform == "linux":
        assert {nice for _, nice in seen} == {19}


@pytest.mark.parametrize("extra", [{"ignore_eos": True}, {"min_tokens": 50}])
def test_a_grammar_that_ended_ends_its_sequence(llm: LLM, extra: dict[str, object]) -> None:
    """ignore_eos, or a min_tokens past the grammar's end, cannot keep a constrained sequence
    going once its grammar accepted its stop token (xgrammar refuses a mask after it: asking
    crashed the engine loop, every other request with it), and other requests go on."""
    pattern = r"[a-c]{2}-[0-9]{3}"
    params = [_params(GrammarSpec("regex", pattern), **extra), SamplingParams(max_tokens=60)]
    outs = llm.generate(prompts(24, 2), params)
    constrained, free = (o.outputs[0] for o in outs)
    assert constrained.finish_reason == "stop"
    assert re.fullmatch(pattern, constrained.text), constrained.text
    assert free.finish_reason == "length" and len(free.token_ids) == 60
