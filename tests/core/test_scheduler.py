"""Scheduler driven by a fake model that checks the paged KV cache it is handed.

The fake model writes, for every computed position, a fingerprint of the tokens up to it into the
slot the block table gives, and reads back the whole context before producing the next token. Stale or
shared-and-overwritten blocks, wrong slots or lost prefix-cache content therefore change the output.
"""
import random

import pytest

from tests.helpers import BLOCK_SIZE, check_consistent, count_preemptions
from nanovllm.config import Config
from nanovllm.engine.scheduler import Batch, Scheduler
from nanovllm.engine.sequence import PENDING_TOKEN, Sequence, SequenceStatus
from nanovllm.sampling_params import SamplingParams

BS = BLOCK_SIZE
FAKE_VOCAB = 64
FAKE_EOS = 0


def fingerprints(token_ids: list[int]) -> list[int]:
    """fp[p] identifies token_ids[:p + 1], like the KV of position p does."""
    out, h = [], 17
    for t in token_ids:
        h = hash((h, t))
        out.append(h)
    return out


def next_token(token_ids: list[int]) -> int:
    return fingerprints(token_ids)[-1] % FAKE_VOCAB


def reference_completion(prompt, max_tokens, ignore_eos, max_model_len, eos=(FAKE_EOS,)) -> list[int]:
    tokens = list(prompt)
    while True:
        t = next_token(tokens)
        tokens.append(t)
        if (not ignore_eos and t in eos) or len(tokens) - len(prompt) >= max_tokens or len(tokens) >= max_model_len:
            return tokens[len(prompt):]


def make_scheduler(model_dir, num_blocks, eos=(FAKE_EOS,), **options) -> Scheduler:
    config = Config.from_options(model_dir, device="cpu", kvcache_block_size=BS, **options)
    scheduler = Scheduler(config, num_blocks)
    scheduler.eos_token_ids = set(eos)
    return scheduler


def schedule(scheduler: Scheduler) -> tuple[list[Sequence], bool]:
    """The next step's sequences and whether it is a prefill; ([], False) when there is nothing to run."""
    batch = scheduler.schedule()
    return (batch.seqs, batch.is_prefill) if batch is not None else ([], False)


def postprocess(scheduler: Scheduler, seqs: list[Sequence], token_ids: list[int]) -> list[Sequence]:
    """A synchronous step's bookkeeping, as the engine does it: book the launched step, then fill in its
    tokens (one per sequence). Returns the sequences that gained a token."""
    scheduler.book(seqs)
    return [seq for seq, _ in scheduler.fill(seqs, [[t] for t in token_ids])]


def check_block_invariants(scheduler: Scheduler, ahead: bool = False) -> None:
    live = list(scheduler.waiting) + list(scheduler.running)
    assert not any(seq.is_finished for seq in live)
    for seq in live:
        # Only the newest token may be in flight, and its KV is never computed (or hashed) before it is known.
        assert PENDING_TOKEN not in seq.token_ids[:-1]
        assert seq.last_token != PENDING_TOKEN or (ahead and seq.num_computed_tokens < seq.num_tokens)
    check_consistent(scheduler.block_manager, live)


class FakeRunner:

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.cache: dict[int, int] = {}
        self.prefill_chunks: list[tuple[int, int, int]] = []  # (seq_id, start, stop)
        self.cache_hits = 0
        self.ran_ahead = 0  # decode inputs that were still in flight

    def run(self, seqs: list[Sequence], is_prefill: bool, in_flight: dict[int, int] | None = None) -> list[int]:
        """in_flight: the tokens of the previous step by seq_id, which async scheduling has not yet
        filled in for their PENDING_TOKENs (a device would read them from its own memory)."""
        bm = self.scheduler.block_manager
        tokens = []
        for seq in seqs:
            span = seq.scheduled_positions
            assert 0 < len(span) and span.stop <= seq.num_tokens
            assert len(seq.block_table) == bm.num_blocks_for(seq.num_tokens)
            if not is_prefill:
                assert len(span) == 1 and span.stop == seq.num_tokens
            else:
                self.prefill_chunks.append((seq.seq_id, span.start, span.stop))
                self.cache_hits += span.start == seq.num_cached_tokens > 0
            token_ids = seq.token_ids[:span.stop]
            if token_ids[-1] == PENDING_TOKEN:
                assert not is_prefill and PENDING_TOKEN not in token_ids[:-1]
                token_ids[-1] = in_flight[seq.seq_id]
                self.ran_ahead += 1
            fp = fingerprints(token_ids)
            for p in span:
                block = bm.blocks[seq.block_table[p // BS]]
                # Only a block of this sequence alone, not registered for reuse, may be written.
                assert block.ref_count == 1 and block.hash == -1, "write into a shared or cached block"
                self.cache[block.block_id * BS + p % BS] = fp[p]
            context = [self.cache.get(seq.block_table[p // BS] * BS + p % BS) for p in range(span.stop)]
            assert context == fp, f"seq {seq.seq_id} reads a corrupted KV cache"
            tokens.append(fp[-1] % FAKE_VOCAB)
        return tokens


def drive(scheduler: Scheduler, seqs: list[Sequence], arrivals_per_step: int | None = None,
          ahead: bool = False) -> FakeRunner:
    """Runs seqs to completion, adding arrivals_per_step of them before each step (all at once if None).
    ahead: as the async engine does, each step is planned before the previous step's tokens are known."""
    runner = FakeRunner(scheduler)
    pending = list(seqs)
    finished = []
    in_flight = None  # (batch, tokens) of the step whose tokens are not filled in yet
    for _ in range(10_000):
        for seq in pending[:arrivals_per_step or len(pending)]:
            scheduler.add(seq)
        del pending[:arrivals_per_step or len(pending)]
        if scheduler.is_finished():
            if not pending:
                break
            continue
        batch, is_prefill = schedule(scheduler)
        assert len(batch) <= scheduler.max_num_seqs and (batch or in_flight)
        if is_prefill:
            assert sum(s.num_scheduled_tokens for s in batch) <= scheduler.max_num_batched_tokens
        check_block_invariants(scheduler, ahead)
        if ahead:
            previous = dict(zip((s.seq_id for s in in_flight[0]), in_flight[1])) if in_flight else {}
            launched = (batch, runner.run(batch, is_prefill, previous)) if batch else None
            produced = [seq for seq, _ in scheduler.fill(in_flight[0], [[t] for t in in_flight[1]])] if in_flight else []
            scheduler.book(batch)
            in_flight = launched
        else:
            produced = postprocess(scheduler, batch, runner.run(batch, is_prefill))
        for seq in produced:
            if seq.is_finished:
                assert seq.seq_id not in finished, "a request finished twice"
                assert seq.block_table == []
                finished.append(seq.seq_id)
        assert all(seq.num_scheduled_tokens == 0 for seq in batch if not seq.is_finished)
        check_block_invariants(scheduler, ahead)
    assert scheduler.is_finished() and not pending
    assert sorted(finished) == sorted(s.seq_id for s in seqs)
    bm = scheduler.block_manager
    assert bm.num_free_blocks == len(bm.blocks)
    return runner


def random_requests(rng: random.Random, n: int, max_len: int):
    """Prompts drawn from a few shared stems, so that prefix caching is exercised."""
    stems = [[rng.randrange(1, FAKE_VOCAB) for _ in range(rng.randrange(BS, 4 * BS))] for _ in range(3)]
    requests = []
    for _ in range(n):
        stem = rng.choice(stems)[:rng.randrange(0, 4 * BS)] if rng.random() < 0.7 else []
        prompt = stem + [rng.randrange(1, FAKE_VOCAB) for _ in range(rng.randrange(1, 40))]
        prompt = prompt[:max_len - 1]
        requests.append((prompt, SamplingParams(temperature=0.0, max_tokens=rng.randrange(1, 40),
                                                ignore_eos=rng.random() < 0.5)))
    return requests


@pytest.mark.parametrize("ahead", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("num_blocks,budget,max_seqs", [
    (512, 16384, 512),  # everything fits
    (24, 16384, 512),   # preemption
    (512, 40, 512),     # chunked prefill
    (14, 37, 4),        # all of them, and a cap on running sequences
])
def test_every_request_finishes_once_with_the_right_tokens(model_dir, num_blocks, budget, max_seqs, ahead, monkeypatch):
    max_model_len = 160
    scheduler = make_scheduler(model_dir, num_blocks, max_num_batched_tokens=budget, max_num_seqs=max_seqs,
                               max_model_len=max_model_len)
    requests = random_requests(random.Random(num_blocks * budget + max_seqs), 60, max_model_len)
    seqs = [Sequence(p, sp) for p, sp in requests]
    preempted = count_preemptions(monkeypatch)
    runner = drive(scheduler, seqs, arrivals_per_step=5, ahead=ahead)
    assert bool(runner.ran_ahead) == ahead
    for seq, (prompt, sp) in zip(seqs, requests):
        assert seq.token_ids[:seq.num_prompt_tokens] == prompt
        assert seq.completion_token_ids == reference_completion(prompt, sp.max_tokens, sp.ignore_eos, max_model_len)
    stopped_by_eos = [s for s in seqs if not s.ignore_eos and s.completion_token_ids[-1] == FAKE_EOS]
    assert stopped_by_eos, "the workload should exercise stopping at the end-of-sequence token"
    assert runner.cache_hits > 0
    if num_blocks < 100:
        assert preempted
    if budget < 100:
        assert any(stop < seq.num_prompt_tokens for seq in seqs for sid, _, stop in runner.prefill_chunks
                   if sid == seq.seq_id)


def test_prefix_cache_hits_skip_computation(model_dir):
    scheduler = make_scheduler(model_dir, 64, eos=())
    prompt = list(range(1, 3 * BS + 5))
    drive(scheduler, [Sequence(prompt, SamplingParams(temperature=0.0, max_tokens=3))])
    again = Sequence(prompt[:3 * BS] + [9, 9], SamplingParams(temperature=0.0, max_tokens=3))
    scheduler.add(again)
    assert scheduler.schedule() == Batch([again], True)
    assert again.num_cached_tokens == 3 * BS
    assert list(again.scheduled_positions) == [3 * BS, 3 * BS + 1]


def test_max_tokens_and_max_model_len_stop_generation(model_dir):
    scheduler = make_scheduler(model_dir, 64, eos=(), max_model_len=40)
    short = Sequence([5] * 10, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    long = Sequence([6] * 30, SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True))
    drive(scheduler, [short, long])
    assert short.num_completion_tokens == 4
    assert long.num_tokens == 40 and long.num_completion_tokens == 10


def run_prefill(scheduler):
    batch, is_prefill = schedule(scheduler)
    assert is_prefill
    postprocess(scheduler, batch, [FAKE_VOCAB - 1] * len(batch))
    return batch


def test_chunked_prefill_bookkeeping(model_dir):
    scheduler = make_scheduler(model_dir, 64, eos=(), max_num_batched_tokens=20)
    long = Sequence(list(range(1, 51)), SamplingParams(temperature=0.0, max_tokens=5))
    short = Sequence([3] * 15, SamplingParams(temperature=0.0, max_tokens=5))
    scheduler.add(long)
    scheduler.add(short)
    bm = scheduler.block_manager

    batch, is_prefill = schedule(scheduler)
    assert is_prefill and batch == [long] and long.num_scheduled_tokens == 20
    assert len(long.block_table) == 4  # the whole prompt's blocks are held from the first chunk
    assert long.status == SequenceStatus.WAITING and scheduler.waiting[0] is long
    postprocess(scheduler, batch, [42])
    assert long.num_computed_tokens == 20 and long.num_tokens == 50  # no token from a partial prompt
    assert [bm.blocks[b].hash != -1 for b in long.block_table] == [True, False, False, False]

    batch = run_prefill(scheduler)
    assert batch == [long] and long.num_computed_tokens == 40 and long.num_tokens == 50

    # The last 10 tokens of the long prompt, then 10 of the short one fill the budget of 20.
    batch, _ = schedule(scheduler)
    assert batch == [long, short]
    assert (long.num_scheduled_tokens, short.num_scheduled_tokens) == (10, 10)
    postprocess(scheduler, batch, [42, 43])
    assert long.num_tokens == 51 and long.completion_token_ids == [42]
    assert long.status == SequenceStatus.RUNNING and list(scheduler.running) == [long]
    assert short.num_computed_tokens == 10 and short.num_tokens == 15 and scheduler.waiting[0] is short

    batch = run_prefill(scheduler)
    assert batch == [short] and short.completion_token_ids == [FAKE_VOCAB - 1]
    assert list(scheduler.running) == [long, short]

    batch, is_prefill = schedule(scheduler)
    assert not is_prefill and batch == [long, short]


def test_preemption_takes_the_newest_running_sequence(model_dir):
    # Four one-block prompts fill four blocks: after prefill each needs a second block to decode.
    scheduler = make_scheduler(model_dir, 4, eos=(), max_model_len=64)
    a, b, c, d = (Sequence([i] * BS, SamplingParams(temperature=0.0, max_tokens=40)) for i in (1, 2, 3, 4))
    for seq in (a, b, c, d):
        scheduler.add(seq)
    batch = run_prefill(scheduler)
    assert batch == [a, b, c, d] and scheduler.block_manager.num_free_blocks == 0

    # a takes d's block, b takes c's: the newest requests give way, the oldest resume first.
    batch, is_prefill = schedule(scheduler)
    assert not is_prefill and batch == [a, b]
    assert list(scheduler.waiting) == [c, d] and list(scheduler.running) == [a, b]
    for seq in (c, d):
        assert seq.status == SequenceStatus.WAITING and seq.block_table == [] and seq.num_computed_tokens == 0
        assert seq.num_tokens == BS + 1  # keeps its generated token and recomputes it
    postprocess(scheduler, batch, [7, 7])

    # a and b fill their two blocks; then a's third block has to come from b, the newer one.
    while a.num_tokens <= 2 * BS:
        batch, is_prefill = schedule(scheduler)
        assert not is_prefill and batch == [a, b]
        postprocess(scheduler, batch, [7, 7])
    batch, is_prefill = schedule(scheduler)
    assert not is_prefill and batch == [a]
    assert list(scheduler.waiting) == [b, c, d]
    assert b.block_table == [] and b.status == SequenceStatus.WAITING
    assert len(a.block_table) == 3


def test_a_sequence_that_outgrows_the_whole_cache_raises(model_dir):
    scheduler = make_scheduler(model_dir, 2, eos=(), max_model_len=64)
    seq = Sequence([1] * 2 * BS, SamplingParams(temperature=0.0, max_tokens=8))
    scheduler.add(seq)
    run_prefill(scheduler)
    with pytest.raises(RuntimeError, match="KV cache"):
        scheduler.schedule()
    assert seq.block_table == [] and scheduler.block_manager.num_free_blocks == 2


def test_preempted_sequence_reuses_its_cached_blocks(model_dir):
    scheduler = make_scheduler(model_dir, 4, eos=(), max_model_len=64)
    a = Sequence([1] * BS, SamplingParams(temperature=0.0, max_tokens=2))
    c = Sequence([3] * 2 * BS, SamplingParams(temperature=0.0, max_tokens=5))
    scheduler.add(a)
    scheduler.add(c)
    run_prefill(scheduler)
    # a takes the last free block; c, the newest, has nobody else to take from and preempts itself.
    batch, is_prefill = schedule(scheduler)
    assert not is_prefill and batch == [a]
    assert list(scheduler.waiting) == [c] and c.block_table == []
    postprocess(scheduler, batch, [7])
    assert a.is_finished and scheduler.block_manager.num_free_blocks == 4
    batch, is_prefill = schedule(scheduler)
    assert is_prefill and batch == [c]
    assert c.num_cached_tokens == 2 * BS  # its two full blocks kept their hashes while free
    assert list(c.scheduled_positions) == [2 * BS]
