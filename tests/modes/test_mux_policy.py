"""The multiplexing policy's decisions on synthetic queues and timings (no engine): where the next prefill
runs beside decoding sequences, when a queued prompt's first token is at risk, how long a prefill on a
split may be, and how often a prompt at risk may take the whole GPU (modes/multiplexing/policy.py and
SplitPlacement.choose_prefill)."""
from types import SimpleNamespace

import pytest

from nanovllm.modes.multiplexing.placement import SplitPlacement
from nanovllm.modes.multiplexing.policy import (CHUNK_SHARE, DEFAULT_TTFT_FACTOR, ITL_ALLOWANCE, MIN_CHUNK_TOKENS,
                                                ItlAllowance, QueuedPrompt, chunk_tokens, first_token_at_risk,
                                                ttft_bound_ms)
from nanovllm.modes.multiplexing.splits import Split
from nanovllm.modes.multiplexing.stats import FILLING, FILLING_IN_BOUND, FIRST_TOKEN, FULL_GPU, IN_LINE
from nanovllm.partitions.streams import Lane

FULL_PREFILL_MS = 410.0  # the profile's whole-GPU prefill of a full token budget
MS_PER_TOKEN = 0.025  # its time per token past the read of the weights
SLOWDOWN = {48: 1.4, 80: 2.4}  # a prefill on the split with this many decode SMs, over its whole-GPU time


def split(decode_sms: int) -> Split:
    s = Split(Lane(None, decode_sms), Lane(None, 120 - decode_sms))
    s.profile = {"prefill_slowdown": SLOWDOWN[decode_sms]}
    return s


def placement(max_ttft_ms=None, max_itl_ms=None) -> SplitPlacement:
    """A placement as its start-up profile leaves it: small batches (bucket 64) take the split with 48 decode
    SMs, large ones 80; a decode step of 8 ms at 64 sequences and 20 ms at 512, so that a prefill of up to 80
    tokens runs in line beside 64 (a 12 ms bound: 8 ms of step, 2 ms to read the weights, 80 x 0.025 ms)."""
    wide, narrow = split(48), split(80)
    p = SplitPlacement([wide, narrow], "stand-ins", max_itl_ms, max_ttft_ms)
    p.decode_buckets = [64, 512]
    p.split_by_bucket = {64: wide, 512: narrow}
    p.decode_step_ms = {64: 8.0, 512: 20.0}
    p.prefill_fixed_ms, p.prefill_ms_per_token = 2.0, MS_PER_TOKEN
    p.ttft_bound_ms = ttft_bound_ms(max_ttft_ms, FULL_PREFILL_MS)
    return p


def young(n=1, tokens=500):
    return [QueuedPrompt(tokens, 10.0)] * n


def test_first_token_at_risk_weighs_the_wait_and_the_prompts_ahead():
    assert not first_token_at_risk([], 0.035, 400.0)
    assert not first_token_at_risk(young(), 0.035, 400.0)  # 10 ms waited + 17.5 ms of prefill
    assert first_token_at_risk([QueuedPrompt(500, 390.0)], 0.035, 400.0)  # its age nears the bound
    # Their number: each prompt waits for the prefills of all ahead of it (the 23rd: 10 + 402.5 ms).
    assert not first_token_at_risk(young(22), 0.035, 400.0)
    assert first_token_at_risk(young(23), 0.035, 400.0)
    # A preempted sequence (its first token is out) is not at risk, but its prefill delays those behind.
    assert not first_token_at_risk([QueuedPrompt(10_000, None)], 0.035, 400.0)
    assert first_token_at_risk([QueuedPrompt(20_000, None), QueuedPrompt(10, 0.0)], 0.035, 400.0)


def test_the_queue_is_read_only_up_to_the_first_prompt_at_risk():
    read = []

    def queue():
        for prompt in [QueuedPrompt(500, 395.0)] + young(1000):
            read.append(prompt)
            yield prompt

    assert first_token_at_risk(queue(), 0.035, 400.0) and len(read) == 1


def test_bounds_and_chunks():
    assert ttft_bound_ms(None, FULL_PREFILL_MS) == DEFAULT_TTFT_FACTOR * FULL_PREFILL_MS
    assert ttft_bound_ms(500.0, FULL_PREFILL_MS) == 500.0
    # A chunk takes CHUNK_SHARE of the bound on the split: 102.5 ms at 0.035 ms per token.
    assert chunk_tokens(410.0, 0.035) == int(CHUNK_SHARE * 410.0 / 0.035) == 2928
    assert chunk_tokens(10.0, 0.035) == MIN_CHUNK_TOKENS


def test_the_itl_allowance_lets_one_in_so_many_decode_steps_wait():
    allowance = ItlAllowance()
    assert allowance.available()  # the first at once
    allowance.spent = 1
    assert not allowance.available()
    allowance.steps = round(1 / ITL_ALLOWANCE) - 1
    assert not allowance.available()
    allowance.steps += 1
    assert allowance.available()


def test_without_ttft_risk_decode_keeps_its_itl_split():
    """Beside a batch of 64 the prefill runs on the split with 48 decode SMs, cut to a chunk; beside 300, on
    the split with 80 (the ITL bound's choice); neither counts as at risk."""
    p = placement()
    choice = p.choose_prefill(running=40, joining=2, batch_tokens=500, queue=young())
    assert choice.split is p.split_by_bucket[64] and choice.label == choice.split.label
    assert not choice.in_line and not choice.ttft_at_risk
    assert choice.max_tokens == chunk_tokens(FULL_PREFILL_MS, MS_PER_TOKEN * 1.4) == 2928
    choice = p.choose_prefill(running=300, joining=2, batch_tokens=500, queue=young())
    assert choice.split is p.split_by_bucket[512] and choice.max_tokens == chunk_tokens(FULL_PREFILL_MS, 0.06)


def test_a_prompt_near_the_ttft_bound_takes_the_whole_gpu():
    p = placement()
    choice = p.choose_prefill(running=40, joining=2, batch_tokens=500, queue=[QueuedPrompt(500, 400.0)])
    assert (choice.label, choice.split, choice.in_line, choice.max_tokens, choice.ttft_at_risk) == \
        (FIRST_TOKEN, None, True, None, True)
    # So does a queue too long for the split to serve in time, however young its prompts.
    assert p.choose_prefill(running=40, joining=8, batch_tokens=16384, queue=young(24)).label == FIRST_TOKEN
    # With a looser bound the same prompt stays on the split.
    loose = placement(max_ttft_ms=2000.0)
    assert loose.choose_prefill(running=40, joining=2, batch_tokens=500,
                                queue=[QueuedPrompt(500, 400.0)]).split is loose.split_by_bucket[64]


def test_once_the_itl_allowance_is_spent_a_prompt_at_risk_stays_on_the_split():
    p = placement()
    p.allowance.spent = 1
    choice = p.choose_prefill(running=40, joining=2, batch_tokens=500, queue=[QueuedPrompt(500, 400.0)])
    assert choice.split is p.split_by_bucket[64] and choice.ttft_at_risk and not choice.in_line
    p.allowance.steps = 1000  # 5 more whole-GPU prefills allowed over 1000 decode steps
    assert p.choose_prefill(running=40, joining=2, batch_tokens=500, queue=[QueuedPrompt(500, 400.0)]).label == \
        FIRST_TOKEN


def test_the_earlier_rules_come_first():
    p = placement()
    old = [QueuedPrompt(500, 1000.0)]
    assert p.choose_prefill(running=0, joining=0, batch_tokens=500, queue=old) == p.choose_prefill(0, 0, 500, [])
    assert p.choose_prefill(running=0, joining=0, batch_tokens=500, queue=old).label == FULL_GPU
    assert p.choose_prefill(running=40, joining=10, batch_tokens=500, queue=old).label == FILLING
    choice = p.choose_prefill(running=40, joining=2, batch_tokens=80, queue=old)  # short: within the ITL bound
    assert (choice.label, choice.in_line, choice.ttft_at_risk) == (IN_LINE, True, False)


def test_without_an_itl_bound_a_fill_runs_whole():
    p = placement()
    choice = p.choose_prefill(running=40, joining=10, batch_tokens=16384, queue=young(10))
    assert (choice.label, choice.in_line, choice.max_tokens, choice.over_itl) == (FILLING, True, None, False)


def test_with_an_itl_bound_a_fill_runs_whole_within_the_allowance_then_cut_to_the_bound():
    """pd_max_itl_ms 20: beside 40 sequences (bucket 64, an 8 ms step) a prefill of up to 400 tokens stays
    within it ((20 - 8 - 2) / 0.025). A longer fill runs whole while the ITL allowance (shared with the
    first-token bound) has room, then cut to 400 tokens; a fill within the bound spends nothing."""
    p = placement(max_itl_ms=20.0)
    assert p.in_line_tokens(40) == 400
    choice = p.choose_prefill(running=40, joining=10, batch_tokens=300, queue=young(10))
    assert (choice.label, choice.in_line, choice.max_tokens, choice.over_itl) == (FILLING, True, None, False)
    choice = p.choose_prefill(running=40, joining=10, batch_tokens=16384, queue=young(10))
    assert (choice.label, choice.in_line, choice.max_tokens, choice.over_itl) == (FILLING, True, None, True)
    p.allowance.spent = 1
    choice = p.choose_prefill(running=40, joining=10, batch_tokens=16384, queue=young(10))
    assert (choice.label, choice.in_line, choice.max_tokens, choice.over_itl) == (FILLING_IN_BOUND, True, 400, False)
    # With the allowance spent by fills, a prompt at risk stays on the split.
    choice = p.choose_prefill(running=40, joining=2, batch_tokens=500, queue=[QueuedPrompt(500, 400.0)])
    assert choice.split is p.split_by_bucket[64] and choice.ttft_at_risk and not choice.in_line


def test_a_fill_whose_in_bound_cut_is_too_short_goes_to_the_split():
    """pd_max_itl_ms 12 leaves 80 tokens beside 40 sequences, fewer than MIN_CHUNK_TOKENS: once the
    allowance is spent, the fill runs on the split like any other prefill."""
    p = placement(max_itl_ms=12.0)
    assert p.in_line_tokens(40) == 80 < MIN_CHUNK_TOKENS
    p.allowance.spent = 1
    choice = p.choose_prefill(running=40, joining=10, batch_tokens=16384, queue=young(10))
    assert choice.split is p.split_by_bucket[64] and not choice.in_line and not choice.over_itl


def test_prefills_that_spend_the_itl_allowance_are_counted_by_label():
    p = placement(max_itl_ms=20.0)
    loop = SimpleNamespace(last_decode=None)
    p.choice = p.choose_prefill(running=40, joining=10, batch_tokens=16384, queue=young(10))
    p.prefill(loop, [])
    p.allowance.steps = 1000
    p.choice = p.choose_prefill(running=40, joining=2, batch_tokens=500, queue=[QueuedPrompt(500, 400.0)])
    p.prefill(loop, [])
    p.choice = p.choose_prefill(running=40, joining=2, batch_tokens=100, queue=young())
    p.prefill(loop, [])
    assert p.allowance.spent == 2
    assert p.statistics()["itl_allowance_spent_by"] == {FILLING: 1, FIRST_TOKEN: 1}
    assert p.statistics()["prefills_per_split"] == {FILLING: 1, FIRST_TOKEN: 1, IN_LINE: 1}


@pytest.mark.parametrize("what", ["no profile", "one stream"])
def test_without_a_profile_or_splits_the_queue_is_not_weighed(what):
    p = placement()
    if what == "no profile":  # enforce_eager: the split stays, the bound is unknown
        p.ttft_bound_ms = None
        choice = p.choose_prefill(running=40, joining=2, batch_tokens=500, queue=[QueuedPrompt(500, 1e6)])
        assert choice.split is p.split_by_bucket[64] and choice.max_tokens is None and not choice.ttft_at_risk
    else:
        p.split_by_bucket = {}
        choice = p.choose_prefill(running=40, joining=2, batch_tokens=500, queue=[QueuedPrompt(500, 1e6)])
        assert (choice.label, choice.split, choice.max_tokens) == ("one stream", None, None)
