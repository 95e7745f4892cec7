"""Sampler on hand-built logits: each penalty against its formula, each knob's effect on draws."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from engine import SamplingParams
from engine.sampler import Sampler
from engine.scheduler import SampleSpec

# Six tokens: positive, negative (one in (-1, 0)) and zero logits, so the repetition penalty's
# two branches show.
LOGITS = [2.0, -0.5, 0.5, 3.0, -2.0, 0.0]
PROMPT = [1, 2, 4]
OUTPUTS = [3, 3, 1, 5]  # token 3 twice, token 1 in both prompt and outputs, 0 and 2 unseen here
EOS = 0


def spec(params: SamplingParams, seq_id: int = 0, token_ids: list[int] | None = None) -> SampleSpec:
    ids = [*PROMPT, *OUTPUTS] if token_ids is None else token_ids
    return SampleSpec(seq_id, seq_id, params, params.seed, ids, len(PROMPT))


def penalized(params: SamplingParams, token_ids: list[int] | None = None) -> list[float]:
    sampler = Sampler(vocab_size=len(LOGITS), eos_token_ids=[EOS])
    out = sampler._apply_penalties(torch.tensor([LOGITS]), [spec(params, token_ids=token_ids)])
    return out[0].tolist()


def by_formula(rep: float = 1.0, freq: float = 0.0, presence: float = 0.0) -> list[float]:
    """The documented formulas: repetition divides positive logits and multiplies negative ones
    of every token seen in prompt or output; frequency subtracts `freq * count` and presence
    subtracts `presence` once, counting output tokens only."""
    seen = set(PROMPT) | set(OUTPUTS)
    counts = Counter(OUTPUTS)
    want = []
    for tok, x in enumerate(LOGITS):
        if tok in seen:
            x = x / rep if x > 0 else x * rep
        x -= freq * counts[tok] + presence * (counts[tok] > 0)
        want.append(x)
    return want


@pytest.mark.parametrize(
    "knobs",
    [
        dict(repetition_penalty=2.0),
        dict(repetition_penalty=0.5),
        dict(frequency_penalty=0.75),
        dict(frequency_penalty=-0.5),
        dict(presence_penalty=1.25),
        dict(repetition_penalty=1.5, frequency_penalty=0.5, presence_penalty=0.25),
    ],
)
def test_penalties_follow_the_formula(knobs: dict) -> None:
    params = SamplingParams(temperature=0, **knobs)
    want = by_formula(
        knobs.get("repetition_penalty", 1.0),
        knobs.get("frequency_penalty", 0.0),
        knobs.get("presence_penalty", 0.0),
    )
    assert penalized(params) == pytest.approx(want, abs=1e-6)
    assert want != LOGITS


def test_penalties_move_the_greedy_choice() -> None:
    """Token 3 (logit 3.0) wins unpenalized; each penalty alone hands the win to token 0 (2.0)."""
    sampler = Sampler(vocab_size=len(LOGITS), eos_token_ids=[EOS])
    knobs = [
        dict(),
        dict(repetition_penalty=2.0),
        dict(frequency_penalty=0.6),
        dict(presence_penalty=1.1),
    ]
    specs = [spec(SamplingParams(temperature=0, **k), seq_id=i) for i, k in enumerate(knobs)]
    got = sampler(torch.tensor([LOGITS] * len(knobs)), specs)
    assert [t.token_id for t in got] == [3, 0, 0, 0]


@pytest.mark.parametrize("min_tokens", [2, 4])  # 4 outputs so far: reached, or just reached
def test_min_tokens_beside_another_penalty_bans_nothing_once_reached(min_tokens: int) -> None:
    params = SamplingParams(temperature=0, min_tokens=min_tokens, presence_penalty=0.5)
    assert penalized(params) == pytest.approx(by_formula(presence=0.5), abs=1e-6)


def test_min_tokens_after_a_one_token_prompt() -> None:
    sampler = Sampler(vocab_size=len(LOGITS), eos_token_ids=[EOS])
    params = SamplingParams(temperature=0, min_tokens=1)
    one = SampleSpec(0, 0, params, None, [4], 1)  # no output yet
    assert sampler._apply_penalties(torch.tensor([LOGITS]), [one])[0, EOS] == float("-inf")


def test_logit_bias_adds_to_its_tokens_in_its_row_only() -> None:
    sampler = Sampler(vocab_size=len(LOGITS), eos_token_ids=[EOS])
    biased = SamplingParams(temperature=0, logit_bias={0: 1.5, 4: -3.0})
    logits = torch.tensor([LOGITS, LOGITS])
    specs = [spec(biased), spec(SamplingParams(temperature=0), seq_id=1)]
    got = sampler._apply_logit_bias(logits, specs)
    want = [LOGITS[0] + 1.5, *LOGITS[1:4], LOGITS[4] - 3.0, LOGITS[5]]
    assert got[0].tolist() == pytest.approx(want) and got[1].tolist() == LOGITS
    assert logits.tolist() == [LOGITS, LOGITS]  # the caller's logits are left alone
    # Token 0 (2.0 + 1.5) now beats token 3 (3.0) in the biased row only.
    assert [t.token_id for t in sampler(logits, specs)] == [0, 3]


def test_logits_past_the_vocabulary_are_never_sampled() -> None:
    """A model's logits may be padded past the tokenizer's vocabulary: those columns never win,
    greedy or sampled, and logprobs are over the vocabulary only."""
    sampler = Sampler(vocab_size=4, eos_token_ids=[99])
    padded = torch.tensor([[0.0, 1.0, 2.0, 0.5, 50.0, 60.0]] * 2)
    specs = [
        SampleSpec(0, 0, SamplingParams(temperature=0, logprobs=1), None, [7], 1),
        SampleSpec(1, 1, SamplingParams(temperature=1.0, top_k=1), None, [7], 1),
    ]
    got = sampler(padded, specs)
    assert [t.token_id for t in got] == [2, 2]
    lp = got[0].logprob
    assert lp is not None and lp.logprob == pytest.approx(float(padded[0, :4].log_softmax(-1)[2]))


def test_greedy_through_torch_max_as_off_the_cpu() -> None:
    """Without the C++ argmax (another device, or the fused ops turned off) the picks are
    torch's, row by row."""
    sampler = Sampler(vocab_size=len(LOGITS), eos_token_ids=[EOS])
    sampler._cpu_argmax = False
    logits = torch.tensor([LOGITS, LOGITS[::-1]])
    specs = [spec(SamplingParams(temperature=0)), spec(SamplingParams(temperature=0), seq_id=1)]
    assert [t.token_id for t in sampler(logits, specs)] == [3, 2]


def test_logprobs_top_k_sizes() -> None:
    sampler = Sampler(vocab_size=len(LOGITS), eos_token_ids=[EOS])
    logits = torch.tensor([LOGITS] * 3)
    specs = [
        SampleSpec(i, i, SamplingParams(temperature=0, logprobs=k), None, [4], 1)
        for i, k in enumerate((0, 1, 2))
    ]
    got = sampler(logits, specs)
    assert [len(t.logprob.top) if t.logprob else None for t in got] == [0, 1, 2]
    assert got[1].logprob is not None and got[1].logprob.top[0][0] == 3


def test_no_output_tokens_means_no_frequency_or_presence_penalty() -> None:
    params = SamplingParams(temperature=0, frequency_penalty=2.0, presence_penalty=2.0)
    assert penalized(params, token_ids=list(PROMPT)) == LOGITS


def test_min_tokens_bans_eos_and_stop_tokens_until_reached() -> None:
    params = SamplingParams(temperature=0, min_tokens=5, stop_token_ids=[3])
    banned = penalized(params)  # 4 outputs so far: one short of min_tokens
    assert banned[EOS] == float("-inf") and banned[3] == float("-inf")
    assert banned[1:3] == LOGITS[1:3] and banned[4:] == LOGITS[4:]
    assert penalized(SamplingParams(temperature=0, min_tokens=4, stop_token_ids=[3])) == LOGITS
    keep_eos = penalized(SamplingParams(temperature=0, min_tokens=5, ignore_eos=True))
    assert keep_eos == LOGITS  # with ignore_eos there is nothing to ban


# ---- each knob's effect on what is drawn ---------------------------------------------------
# Probabilities 0.5, 0.3, 0.15, 0.05 over four tokens.
PROBS = [0.5, 0.3, 0.15, 0.05]
DRAWS = 4000


def draw(params: SamplingParams, probs: list[float] = PROBS, seed: int = 0) -> Counter[int]:
    """Sample `DRAWS` rows of the same logits in one batch; return how often each token came."""
    sampler = Sampler(vocab_size=len(probs), eos_token_ids=[99], seed=seed)
    logits = torch.tensor(probs).log().expand(DRAWS, -1).contiguous()
    specs = [SampleSpec(i, i, params, None, [7], 1) for i in range(DRAWS)]
    return Counter(t.token_id for t in sampler(logits, specs))


def test_plain_sampling_follows_the_distribution() -> None:
    counts = draw(SamplingParams(temperature=1.0))
    for tok, p in enumerate(PROBS):
        assert counts[tok] / DRAWS == pytest.approx(p, abs=0.03)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_sharpens_or_flattens(temperature: float) -> None:
    counts = draw(SamplingParams(temperature=temperature))
    want = torch.softmax(torch.tensor(PROBS).log() / temperature, dim=-1).tolist()
    for tok, p in enumerate(want):
        assert counts[tok] / DRAWS == pytest.approx(p, abs=0.03)


@pytest.mark.parametrize(("top_k", "kept"), [(1, {0}), (2, {0, 1}), (3, {0, 1, 2})])
def test_top_k_keeps_the_k_most_likely(top_k: int, kept: set[int]) -> None:
    counts = draw(SamplingParams(temperature=1.0, top_k=top_k))
    assert set(counts) == kept
    if top_k == 2:  # renormalized over the survivors: 0.5 : 0.3
        assert counts[0] / DRAWS == pytest.approx(0.625, abs=0.03)


@pytest.mark.parametrize(
    ("top_p", "kept"),
    # the nucleus: tokens whose preceding mass is below top_p
    [(0.4, {0}), (0.5, {0}), (0.7, {0, 1}), (0.85, {0, 1, 2}), (0.99, {0, 1, 2, 3})],
)
def test_top_p_keeps_the_nucleus(top_p: float, kept: set[int]) -> None:
    assert set(draw(SamplingParams(temperature=1.0, top_p=top_p))) == kept


@pytest.mark.parametrize(
    ("min_p", "kept"),
    # tokens whose probability is at least min_p times the top token's (0.5)
    [(0.05, {0, 1, 2, 3}), (0.25, {0, 1, 2}), (0.5, {0, 1}), (0.9, {0})],
)
def test_min_p_drops_tokens_below_a_fraction_of_the_top(min_p: float, kept: set[int]) -> None:
    assert set(draw(SamplingParams(temperature=1.0, min_p=min_p))) == kept


def test_filters_apply_after_temperature() -> None:
    """At temperature 0.5 the probabilities become 0.69, 0.25, 0.06, 0.01: top_p=0.9 then keeps
    two tokens where it keeps three at temperature 1."""
    assert set(draw(SamplingParams(temperature=0.5, top_p=0.9))) == {0, 1}
    assert set(draw(SamplingParams(temperature=1.0, top_p=0.9))) == {0, 1, 2}


def test_seed_fixes_the_draws_whatever_the_engine_rng_and_batch() -> None:
    def seeded(seed: int, engine_seed: int, neighbours: int) -> list[int]:
        sampler = Sampler(vocab_size=len(PROBS), eos_token_ids=[99], seed=engine_seed)
        logits = torch.tensor(PROBS).log().expand(neighbours + 1, -1).contiguous()
        params = SamplingParams(temperature=1.0, seed=seed)
        plain = SamplingParams(temperature=1.0)
        specs = [SampleSpec(i + 1, i, plain, None, [7], 1) for i in range(neighbours)]
        specs.append(SampleSpec(0, neighbours, params, seed, [7], 1))
        # 64 steps of the same sequence: its generator advances from step to step
        return [sampler(logits, specs)[-1].token_id for _ in range(64)]

    a = seeded(seed=5, engine_seed=0, neighbours=0)
    assert a == seeded(seed=5, engine_seed=123, neighbours=7)
    assert a != seeded(seed=6, engine_seed=0, neighbours=0)
    assert len(set(a)) > 1  # the steps draw afresh, not one token repeated


def test_a_finished_sequence_leaves_no_generator_behind() -> None:
    """Each seeded sequence has its own generator; forgetting finished ones keeps the sampler's
    memory flat however many seeded requests it serves."""
    sampler = Sampler(vocab_size=len(PROBS), eos_token_ids=[99])
    logits = torch.tensor(PROBS).log().expand(3, -1).contiguous()
    params = SamplingParams(temperature=1.0, seed=5)
    sampler(logits, [SampleSpec(i, i, params, 5, [7], 1) for i in range(3)])
    assert len(sampler._seq_generators) == 3
    sampler.forget([0, 2])
    assert list(sampler._seq_generators) == [1]


def test_greedy_rows_ignore_noise_beside_sampled_rows() -> None:
    sampler = Sampler(vocab_size=len(PROBS), eos_token_ids=[99])
    logits = torch.tensor(PROBS).log().expand(64, -1).contiguous()
    specs = [
        SampleSpec(i, i, SamplingParams(temperature=0.0 if i % 2 else 1.0), None, [7], 1)
        for i in range(64)
    ]
    got = [t.token_id for t in sampler(logits, specs)]
    assert all(tok == 0 for tok in got[1::2])
    assert set(got[0::2]) != {0}


def test_a_grammar_masks_its_row_only_and_advances_with_each_token() -> None:
    """Structured outputs in the sampler: a choice grammar makes its row's greedy pick the
    choice's token over a far likelier one, leaves the unconstrained row alone, and moves past
    the sampled token (the choice complete, that token is not allowed again)."""
    from transformers import AutoTokenizer

    from engine.grammar import GrammarSpec
    from engine.models.loader import bundled_model_dir
    from engine.structured import Grammars

    tokenizer = AutoTokenizer.from_pretrained(bundled_model_dir(), local_files_only=True)
    vocab, eos = len(tokenizer), tokenizer.eos_token_id
    grammar = Grammars(tokenizer, vocab, [eos]).compile(GrammarSpec.choice(["yes"]))
    sampler = Sampler(vocab_size=vocab, eos_token_ids=[eos])
    (want,) = tokenizer.encode("yes", add_special_tokens=False)
    spike = tokenizer.encode(" maybe", add_special_tokens=False)[0]
    logits = torch.zeros(2, vocab)
    logits[:, spike] = 20.0
    logits[:, want] = 1.0  # "yes" as one token, not spelt out (every allowed token ties at 0)
    plain = SamplingParams(temperature=0)
    specs = [SampleSpec(0, 0, plain, None, [7], 1), SampleSpec(1, 1, plain, None, [7], 1, grammar)]
    assert [t.token_id for t in sampler(logits, specs)] == [spike, want]
    second = [t.token_id for t in sampler(logits, specs)]
    assert second[0] == spike and second[1] not in (want, spike)
