"""Scheduler: budgets, chunked prefill, decode first, preemption, abort, fork, policies."""

from __future__ import annotations

import pytest

from engine.block_manager import BlockManager
from engine.config import SchedulerConfig
from engine.request import Request, SeqStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput


def make(num_blocks: int = 16, block_size: int = 4, **cfg: object) -> Scheduler:
    return Scheduler(SchedulerConfig(**cfg), BlockManager(num_blocks, block_size))  # type: ignore[arg-type]


def request(rid: str, n_tokens: int, n: int = 1, first: int = 0, priority: int = 0) -> Request:
    params = SamplingParams(temperature=0.0, max_tokens=100, n=n)
    return Request(rid, list(range(first, first + n_tokens)), params, 100, priority=priority)


def run_samples(s: Scheduler, out: SchedulerOutput, token: int = 7) -> None:
    """What the engine does after the model: append one sampled token per sample."""
    for spec in out.samples:
        s.seqs[spec.seq_id].token_ids.append(token)


def test_chunked_prefill_then_decode() -> None:
    s = make(max_num_batched_tokens=8)
    s.add_request(request("a", 20))
    sizes = []
    for _ in range(4):
        out = s.schedule()
        sizes.append(out.num_batched_tokens)
        run_samples(s, out)
    assert sizes == [8, 8, 4, 1]  # 20-token prompt in chunks, then one decode token
    assert s.schedule().samples  # every step after the prompt samples


def test_decodes_are_scheduled_before_prefills() -> None:
    s = make(max_num_batched_tokens=8)
    s.add_request(request("a", 3))
    run_samples(s, s.schedule())
    s.add_request(request("b", 30, first=100))
    out = s.schedule()
    assert out.seqs[0].seq_id == s.requests["a"].seqs[0].seq_id
    assert [len(x.token_ids) for x in out.seqs] == [1, 7]


def test_max_num_seqs_caps_running() -> None:
    s = make(max_num_seqs=2)
    for i in range(3):
        s.add_request(request(f"r{i}", 3, first=10 * i))
    out = s.schedule()
    assert len(out.seqs) == 2 and s.num_waiting == 1


def test_preempts_newest_and_resumes_from_cache() -> None:
    s = make(num_blocks=4, block_size=4)
    s.add_request(request("old", 8))
    s.add_request(request("new", 8, first=50))
    run_samples(s, s.schedule())  # both prefilled: 2 blocks each, pool full
    out = s.schedule()  # decodes need a third block each
    assert out.num_preempted >= 1
    new_seq = s.requests["new"].seqs[0]
    assert new_seq.status is SeqStatus.WAITING and new_seq.num_computed_tokens == 0
    assert s.num_preemptions >= 1
    s.finish(s.requests["old"].seqs[0], "stop")
    out = s.schedule()
    assert out.seqs and out.seqs[0].seq_id == new_seq.seq_id
    # Its first block came back from the cache (old's decode evicted the second).
    assert out.seqs[0].start_pos == 4
    assert s.num_preemptions == 1
    # Usage reports what the cache served at first admission, not the recompute's hits.
    assert s.requests["new"].num_cached_tokens == 0


def test_abort_frees_everything_at_any_time() -> None:
    s = make(max_num_batched_tokens=4)
    s.add_request(request("a", 10))
    s.add_request(request("b", 10, first=30, n=3))
    s.schedule()
    s.abort_request("a")
    s.abort_request("b")  # still waiting
    s.abort_request("missing")
    assert not s.has_work and s.bm.num_free_blocks == s.bm.num_blocks
    assert not s.requests and not s.seqs


def test_fork_for_n_shares_prompt_blocks() -> None:
    s = make()
    s.add_request(request("a", 6, n=3))
    out = s.schedule()
    req = s.requests["a"]
    assert len(req.seqs) == 3 and len(out.samples) == 3
    assert {spec.row for spec in out.samples} == {0}
    tables = {tuple(s.bm.block_ids(q.seq_id)) for q in req.seqs}
    assert len(tables) == 1  # all three share the prompt's blocks
    for i, spec in enumerate(out.samples):
        s.seqs[spec.seq_id].token_ids.append(100 + i)
    out = s.schedule()
    assert len(out.block_copies) == 2  # two of three copy the shared partial block
    for q in req.seqs:
        s.finish(q, "stop")
    assert s.bm.num_free_blocks == s.bm.num_blocks and not s.requests


def test_priority_policy_orders_waiting() -> None:
    s = make(max_num_seqs=1, policy="priority")
    s.add_request(request("low", 3, priority=5))
    s.add_request(request("high", 3, first=40, priority=0))
    out = s.schedule()
    assert out.seqs[0].seq_id == s.requests["high"].seqs[0].seq_id


def test_has_work_with_only_waiting_or_only_running() -> None:
    s = make()
    assert not s.has_work
    s.add_request(request("a", 3))
    assert s.has_work and not s.running  # waiting only
    s.schedule()
    assert s.has_work and s.num_waiting == 0  # running only


def test_n_counts_every_sequence_against_max_num_seqs() -> None:
    s = make(max_num_seqs=3)
    s.add_request(request("one", 3))
    s.add_request(request("pair", 3, first=10, n=2))
    s.add_request(request("late", 3, first=20, n=2))
    out = s.schedule()  # 1 + 2 sequences fit; 2 more would make 5
    assert len(out.seqs) == 2 and s.num_waiting == 1
    run_samples(s, out)
    assert len(s.running) == 3  # "pair" forked its second sequence
    out = s.schedule()
    assert len(out.seqs) == 3 and s.num_waiting == 1


def test_each_of_n_samples_with_its_own_seed() -> None:
    s = make()
    params = SamplingParams(temperature=1.0, max_tokens=100, n=3, seed=5)
    s.add_request(Request("a", [1, 2, 3], params, 100))
    out = s.schedule()
    assert [spec.seed for spec in out.samples] == [5, 6, 7]
    assert [spec.num_prompt_tokens for spec in out.samples] == [3, 3, 3]


def test_a_forked_request_counts_one_slot_per_sequence() -> None:
    s = make(max_num_seqs=3)
    s.add_request(request("pair", 3, n=2))
    run_samples(s, s.schedule())
    assert len(s.running) == 2  # forked: two sequences, two slots
    s.add_request(request("solo", 3, first=10))
    out = s.schedule()
    assert s.num_waiting == 0 and len(out.seqs) == 3


def test_a_running_decode_goes_before_a_running_chunked_prefill() -> None:
    s = make(max_num_batched_tokens=8)
    s.add_request(request("short", 3))
    s.add_request(request("long", 20, first=100))
    run_samples(s, s.schedule())  # short: whole prompt, sampled; long: its first 5 tokens
    out = s.schedule()
    decode = s.requests["short"].seqs[0].seq_id
    assert [(x.seq_id == decode, len(x.token_ids)) for x in out.seqs] == [(True, 1), (False, 7)]


def test_a_waiting_request_that_does_not_fit_waits() -> None:
    s = make(num_blocks=2, block_size=4)
    s.add_request(request("a", 8))
    s.add_request(request("b", 8, first=50))
    out = s.schedule()  # a takes both blocks; b stays first in line
    assert [x.seq_id for x in out.seqs] == [s.requests["a"].seqs[0].seq_id]
    assert s.num_waiting == 1 and s.waiting.peek() is s.requests["b"].seqs[0]


def test_prompt_logprobs_targets_follow_each_chunk() -> None:
    """A prompt_logprobs request's chunks carry the prompt tokens their logits predict: the next
    token of each, up to the prompt's last (which predicts the first output, not a prompt token)."""
    s = make(max_num_batched_tokens=4)
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=2)
    prompt = list(range(100, 110))
    s.add_request(Request("p", prompt, params, 2))
    s.add_request(request("plain", 3, first=50))
    targets = []
    for _ in range(3):
        out = s.schedule()
        first = out.seqs[0]
        targets.append((first.prompt_targets, first.prompt_top_k))
        assert all(x.prompt_targets is None for x in out.seqs[1:])  # the plain request's
        run_samples(s, out)
    assert targets == [(prompt[1:5], 2), (prompt[5:9], 2), (prompt[9:], 2)]
    assert s.schedule().seqs[0].prompt_targets is None  # decoding: no prompt left


def test_prompt_logprobs_targets_of_a_recompute_stay_in_the_prompt() -> None:
    s = make(num_blocks=4, block_size=4)
    s.add_request(request("old", 8))
    prompt = list(range(50, 58))
    params = SamplingParams(temperature=0.0, max_tokens=4, prompt_logprobs=1)
    s.add_request(Request("new", prompt, params, 4))
    run_samples(s, s.schedule())  # both prefilled and sampled once: the pool is full
    assert s.schedule().num_preempted == 1  # new, with its first output, goes back to waiting
    s.finish(s.requests["old"].seqs[0], "stop")
    out = s.schedule()  # new again: its first block from the cache, then prompt and output
    assert (out.seqs[0].start_pos, len(out.seqs[0].token_ids)) == (4, 5)
    assert out.seqs[0].prompt_targets == prompt[5:]  # not the output token after the prompt


def test_a_request_that_needs_exactly_the_free_pool_is_admitted() -> None:
    s = make(num_blocks=4, block_size=4, max_num_batched_tokens=16)
    s.add_request(request("all", 16))
    out = s.schedule()
    assert [len(x.token_ids) for x in out.seqs] == [16] and s.bm.num_free_blocks == 0


def test_a_recomputed_sibling_carries_no_prompt_logprobs_targets() -> None:
    """Prompt logprobs are the first sequence's to report: a forked sibling, preempted and
    recomputed, recomputes its prompt without them."""
    s = make(num_blocks=2, block_size=4)
    params = SamplingParams(temperature=1.0, max_tokens=3, n=2, prompt_logprobs=1)
    r = Request("p", list(range(6)), params, 3)
    s.add_request(r)
    run_samples(s, s.schedule())  # the prompt's 2 blocks (one partial), then 2 samples (a fork)
    out = s.schedule()  # a copy of the shared partial block, none free: the sibling goes back
    child = r.seqs[1]
    assert out.num_preempted == 1 and child.status is SeqStatus.WAITING
    run_samples(s, out)
    s.finish(r.seqs[0], "stop")
    out = s.schedule()
    again = next(x for x in out.seqs if x.seq_id == child.seq_id)
    assert again.start_pos == 4 and again.prompt_targets is None  # prompt tokens 4 and 5 again


@pytest.mark.parametrize("long_len", [7, 20])
def test_decodes_go_first_whatever_the_running_order(long_len: int) -> None:
    """Decode-first is a sort of the running sequences, not the order they were admitted in:
    the chunked prefill first in line (with 2 tokens left, or 15) still goes after the decode."""
    s = make(max_num_batched_tokens=8)
    s.add_request(request("short", 3))
    s.add_request(request("long", long_len, first=100))
    run_samples(s, s.schedule())  # short: whole prompt, sampled; long: its first 5 tokens
    s.running.reverse()
    out = s.schedule()
    decode = s.requests["short"].seqs[0].seq_id
    chunk = min(long_len - 5, 7)
    assert [(x.seq_id == decode, len(x.token_ids)) for x in out.seqs] == [(True, 1), (False, chunk)]


def test_the_step_budget_is_spent_to_its_last_token_and_no_further() -> None:
    """Three tokens of budget: three of four running decodes go, one token each; the fourth
    waits for the next step rather than riding along with no tokens."""
    s = make(max_num_batched_tokens=4)
    for i in range(4):
        s.add_request(request(f"r{i}", 1, first=10 * i))
    run_samples(s, s.schedule())  # the four one-token prompts
    s.config.max_num_batched_tokens = 3
    out = s.schedule()
    assert [len(x.token_ids) for x in out.seqs] == [1, 1, 1] and not out.empty
    assert len(out.samples) == 3
    idle = make()
    assert idle.schedule().empty


def test_a_long_prefill_leaves_room_for_the_waiting_only_while_they_wait() -> None:
    """`long_prefill_tokens`: a prompt being computed takes at most the cap while others wait,
    and the rest of the step admits them; with nobody waiting it takes the whole budget."""
    s = make(num_blocks=64, max_num_batched_tokens=16, long_prefill_tokens=6)
    s.add_request(request("long", 60))
    out = s.schedule()
    assert [len(x.token_ids) for x in out.seqs] == [16]  # nobody waits: the whole budget
    s.add_request(request("short", 3, first=100))
    out = s.schedule()
    assert [len(x.token_ids) for x in out.seqs] == [6, 3]  # capped, and the short one admitted
    assert [x.seq_id for x in out.samples] == [s.requests["short"].seqs[0].seq_id]
    run_samples(s, out)
    out = s.schedule()  # the short one decodes; nobody waits: the long one takes the rest
    assert [len(x.token_ids) for x in out.seqs] == [1, 15]


def test_the_long_prefill_cap_holds_for_all_running_prefills_together() -> None:
    s = make(num_blocks=64, max_num_batched_tokens=16, long_prefill_tokens=6)
    s.add_request(request("a", 40))
    s.add_request(request("b", 40, first=100))
    assert [len(x.token_ids) for x in s.schedule().seqs] == [16]  # a's first chunk
    assert [len(x.token_ids) for x in s.schedule().seqs] == [6, 10]  # b waits: a capped
    s.add_request(request("c", 3, first=200))  # a and b both prefilling, c waits
    out = s.schedule()
    assert [len(x.token_ids) for x in out.seqs] == [6, 3]  # a and b share 6 (a first), then c
    ids = [s.requests[r].seqs[0].seq_id for r in ("a", "c")]
    assert [x.seq_id for x in out.seqs] == ids


def test_no_long_prefill_cap_by_default() -> None:
    s = make(num_blocks=64, max_num_batched_tokens=16)
    s.add_request(request("long", 60))
    s.schedule()
    s.add_request(request("short", 3, first=100))
    assert [len(x.token_ids) for x in s.schedule().seqs] == [16]  # the short one waits
    with pytest.raises(ValueError, match="long_prefill_tokens"):
        SchedulerConfig(long_prefill_tokens=-1)
