"""Async scheduling (the host plans step N while step N-1 runs, and learns its tokens one step later)
gives the synchronous engine's tokens, in every scheduling situation."""
import random
from collections import Counter

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.engine.step_inputs import DecodeInputs
from nanovllm.engine.sequence import PENDING_TOKEN, Sequence
from tests.helpers import (GPU, BLOCK_SIZE, TINY_EOS, VOCAB_SIZE, EngineRecorder, assert_idle, gpu, random_prompts,
                           stream_to_completion, tokens)

MAX_MODEL_LEN = 96


def workload() -> tuple[list[list[int]], list[SamplingParams]]:
    """Greedy requests that stop at the end-of-sequence token (prompts 0, 3 and 6), at max_tokens (1
    included) or at max_model_len (prompt 7), with shared prefixes and a duplicate prompt."""
    prompts = random_prompts([5, 40, 17, 3, 60, 33, 8, 90, 21, 12], seed=3)
    prompts += [prompts[7][:48] + prompts[4][:5], prompts[1]]
    max_tokens = [20, 1, 16, 10, 24, 2, 40, 30, 16, 1, 12, 16]
    ignore_eos = [False, False, True, False, False, True, False, False, True, False, False, False]
    return prompts, [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=i) for n, i in zip(max_tokens, ignore_eos)]


def run_twice(model_dir, monkeypatch, async_scheduling: bool, **options):
    """The workload twice on one engine: the second run finds the first one's blocks in the prefix cache."""
    llm = LLM(model_dir, device="cpu", kvcache_block_size=BLOCK_SIZE, max_model_len=MAX_MODEL_LEN,
              async_scheduling=async_scheduling, **options)
    recorder = EngineRecorder(llm, monkeypatch)
    prompts, params = workload()
    runs = [tokens(llm, prompts, params) for _ in range(2)]
    assert_idle(llm)
    return runs, recorder


@pytest.mark.parametrize("options", [
    dict(num_kvcache_blocks=128),
    dict(num_kvcache_blocks=128, max_num_batched_tokens=24),  # chunked prefill
    dict(num_kvcache_blocks=MAX_MODEL_LEN // BLOCK_SIZE),     # preemption
    dict(num_kvcache_blocks=9, max_num_batched_tokens=40, max_num_seqs=5),
], ids=["plain", "chunked", "preempted", "all"])
def test_async_tokens_match_sync(tiny_model_dir, monkeypatch, options):
    expected, _ = run_twice(tiny_model_dir, monkeypatch, False, **options)
    monkeypatch.undo()
    outputs, recorder = run_twice(tiny_model_dir, monkeypatch, True, **options)
    assert outputs == expected
    assert expected[0] == expected[1]
    assert recorder.ran_ahead > 0 and sum(recorder.cached_tokens) >= 2 * BLOCK_SIZE
    if "max_num_batched_tokens" in options:
        assert recorder.chunked > 0
    if options["num_kvcache_blocks"] < 10:
        assert recorder.preempted
    # The workload covers every way to stop: the end-of-sequence token mid-batch, max_tokens of 1 and
    # more, max_model_len.
    prompts, params = workload()
    lengths = [len(o) for o in expected[0]]
    assert any(o[-1] == TINY_EOS and n < sp.max_tokens and not sp.ignore_eos
               for o, n, sp in zip(expected[0], lengths, params))
    assert 1 in lengths and any(n == sp.max_tokens > 1 for n, sp in zip(lengths, params))
    assert any(len(p) + n == MAX_MODEL_LEN for p, n in zip(prompts, lengths))


def test_streaming_reports_every_token_once_and_finished_last(tiny_model_dir):
    prompts, params = workload()
    sync = LLM(tiny_model_dir, device="cpu", kvcache_block_size=BLOCK_SIZE, num_kvcache_blocks=64,
               max_model_len=MAX_MODEL_LEN, async_scheduling=False)
    expected = tokens(sync, prompts, params)
    llm = LLM(tiny_model_dir, device="cpu", kvcache_block_size=BLOCK_SIZE, num_kvcache_blocks=64,
              max_model_len=MAX_MODEL_LEN)
    ids = [llm.add_request(p, sp) for p, sp in zip(prompts, params)]
    assert stream_to_completion(llm, ids) == expected
    assert_idle(llm)


def test_abort_while_a_token_is_in_flight(tiny_model_dir):
    prompts = random_prompts([20, 7, 33], seed=41)
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    llm = LLM(tiny_model_dir, device="cpu", kvcache_block_size=BLOCK_SIZE, num_kvcache_blocks=64)
    expected = tokens(llm, prompts, greedy)
    ids = [llm.add_request(p, greedy) for p in prompts]
    streamed = {i: [] for i in ids}
    for _ in range(4):  # prefill, then decode steps: each launches a step before the last one's tokens arrive
        for request_id, new_tokens, _ in llm.step():
            streamed[request_id] += new_tokens
    assert llm.loop.in_flight is not None
    llm.abort_requests([ids[1]])
    while llm.has_unfinished_requests():
        for request_id, new_tokens, _ in llm.step():
            assert request_id != ids[1], "an aborted request reported a token"
            streamed[request_id] += new_tokens
    assert streamed[ids[0]] == expected[0] and streamed[ids[2]] == expected[2]
    assert streamed[ids[1]] == expected[1][:len(streamed[ids[1]])] and len(streamed[ids[1]]) < 12
    assert_idle(llm)
    assert tokens(llm, prompts, greedy) == expected


def test_an_interrupted_step_drops_the_requests_it_had_in_flight(tiny_model_dir, monkeypatch):
    prompts = random_prompts([12, 30], seed=43)
    greedy = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    # One sequence at a time: the second request waits until the first one is done.
    llm = LLM(tiny_model_dir, device="cpu", kvcache_block_size=BLOCK_SIZE, num_kvcache_blocks=64, max_num_seqs=1)
    expected = tokens(llm, prompts, greedy)
    first, second = (llm.add_request(p, greedy) for p in prompts)
    for _ in range(3):
        llm.step()

    def interrupted_launch(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(llm.model_runner, "launch", interrupted_launch)
    with pytest.raises(KeyboardInterrupt):
        llm.step()
    monkeypatch.undo()
    streamed = []
    while llm.has_unfinished_requests():
        for request_id, new_tokens, _ in llm.step():
            assert request_id == second
            streamed += new_tokens
    assert streamed == expected[1]
    assert_idle(llm)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=GPU)])
def test_persistent_decode_inputs_match_inputs_built_from_lists(device):
    """Batches that change from step to step (order, members, grown and replaced block tables, tokens
    in flight) against the inputs written out from the sequences' lists. On the GPU the host runs
    ahead: each step waits behind a sleeping kernel, and the results are read only at the end."""
    rng = random.Random(5)
    block_size, width, max_batch = 4, 8, 6
    inputs = DecodeInputs(max_batch, width, block_size, torch.device(device))
    pool = [Sequence([rng.randrange(VOCAB_SIZE) for _ in range(rng.randrange(1, 20))], SamplingParams())
            for _ in range(10)]
    for seq in pool:
        seq.block_table = rng.sample(range(100), -(-seq.num_tokens // block_size))
    got, expected = [], []
    for _ in range(60):
        if device == "cuda":
            torch.cuda._sleep(200_000)
        batch = rng.sample(pool, rng.randrange(1, max_batch + 1))
        sampled_rows = {}
        for seq in batch:
            if seq.last_token == PENDING_TOKEN:
                seq.token_ids[-1] = rng.randrange(VOCAB_SIZE)
            if rng.random() < 0.2:  # preempted and prefilled again: the same list, other blocks
                seq.block_table[:] = rng.sample(range(100, 200), len(seq.block_table))
            if seq.num_tokens < block_size * width and rng.random() < 0.7:
                seq.append_token(PENDING_TOKEN if rng.random() < 0.6 else rng.randrange(VOCAB_SIZE))
                if len(seq.block_table) * block_size < seq.num_tokens:
                    seq.block_table.append(rng.randrange(200, 300))
            if seq.last_token == PENDING_TOKEN:
                sampled_rows[seq.seq_id] = rng.randrange(max_batch)
        input_ids, rows, positions, slots, context_lens, tables = inputs.prepare(batch, sampled_rows)
        if rows is None:
            rows = torch.full_like(input_ids, -1)
        # Copies on the device: the persistent buffers are overwritten by the next step.
        got.append([t.clone() for t in (input_ids, rows, positions, slots, context_lens, tables)])
        table_width = max(len(seq.block_table) for seq in batch)
        expected.append([
            [seq.last_token for seq in batch],
            [sampled_rows.get(seq.seq_id, -1) for seq in batch],
            [seq.num_tokens - 1 for seq in batch],
            [seq.block_table[(seq.num_tokens - 1) // block_size] * block_size + (seq.num_tokens - 1) % block_size
             for seq in batch],
            [seq.num_tokens for seq in batch],
            [seq.block_table + [-1] * (table_width - len(seq.block_table)) for seq in batch]])
    assert [[t.tolist() for t in step] for step in got] == expected


def test_async_scheduling_must_be_a_bool(tiny_model_dir):
    with pytest.raises(TypeError, match="async_scheduling"):
        LLM(tiny_model_dir, device="cpu", async_scheduling="yes")


@gpu
@pytest.mark.parametrize("enforce_eager", [False, True], ids=["graph", "eager"])
def test_async_matches_sync_on_the_gpu(model_dir, enforce_eager):
    """float32 on the GPU, in graph and eager mode, with preemption and end-of-sequence stops (the
    random model's most frequent output token is made the stop token)."""
    prompts = random_prompts([5 + 7 * i % 90 for i in range(37)], seed=7)
    rng = random.Random(9)
    params = [SamplingParams(temperature=0.0, max_tokens=rng.randint(1, 48), ignore_eos=rng.random() < 0.3)
              for _ in prompts]

    def engine(async_scheduling: bool) -> LLM:
        llm = LLM(model_dir, device="cuda", dtype="float32", kvcache_block_size=BLOCK_SIZE, max_num_seqs=64,
                  max_model_len=256, num_kvcache_blocks=48, enforce_eager=enforce_eager,
                  async_scheduling=async_scheduling)
        assert (llm.model_runner.decode_paths.graphs is None) == enforce_eager
        return llm

    def generate(llm: LLM, eos: int) -> list[list[int]]:
        llm.scheduler.eos_token_ids = {eos}
        outputs = tokens(llm, prompts, params)
        assert_idle(llm)
        return outputs

    sync = engine(False)  # one synchronous engine for both of its runs: the stop token changes, not the engine
    unstopped = generate(sync, -1)
    eos = Counter(t for o in unstopped for t in o[1:]).most_common(1)[0][0]
    expected = generate(sync, eos)
    sync.exit()
    assert any(o[-1] == eos and len(o) < sp.max_tokens for o, sp in zip(expected, params))
    asynchronous = engine(True)
    assert generate(asynchronous, eos) == expected
    asynchronous.exit()
