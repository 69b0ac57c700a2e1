"""Prefill/decode disaggregation (enable_two_gpu_pd): the same tokens as the single-runner engine,
back-pressure without deadlock or lost requests, the KV handoff, the streaming API, statistics and bad
configurations. On CPU and on one GPU both runners share the device (same-device mode); the tests that
need two GPUs skip on fewer. The helpers these tests share with the multiplexing tests are in
tests/modes/pd_helpers.py."""
import random

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.modes.disaggregation.kv_transfer import KVTransfer, block_runs
from nanovllm.modes.disaggregation.loop import PDLoop, RunnerStreams
from nanovllm.modes.disaggregation.stats import report
from tests.conftest import model_dir, model_dirs, nanovllm_log_records, tiny_model_dir  # noqa: F401
from tests.helpers import (BLOCK_SIZE, TINY_EOS, VOCAB_SIZE, assert_idle, check_consistent, count_preemptions,
                           fail_on_call, gpu, multi_gpu, random_prompts, stream_to_completion, tokens)
from tests.modes.pd_helpers import (BLOCKS_PER_SEQ, GREEDY, MAX_MODEL_LEN, cuda_expected, expected,  # noqa: F401
                                    generate_twice, hold, mixed_prompts, shared_weights, streaming)


def pd_llm(model_dir, device="cpu", prefill_device_id=0, decode_device_id=0, **options):
    options = {"kvcache_block_size": BLOCK_SIZE, "max_model_len": MAX_MODEL_LEN, "num_kvcache_blocks": 64, **options}
    return LLM(model_dir, device=device, enable_two_gpu_pd=True, prefill_device_id=prefill_device_id,
               decode_device_id=decode_device_id, **options)


def assert_pd_idle(llm):
    """assert_idle, and nothing prefilling, in transfer or holding decode blocks."""
    assert_idle(llm)
    scheduler = llm.scheduler
    assert not scheduler.prefilling and not scheduler.transferring and not scheduler.reserved


def assert_pd_loop(llm):
    """The engine runs the disaggregation loop: two runners, each with a KV cache of its own and the graphs
    of its role only, a KV handoff between them, each runner's work on its own stream."""
    loop = llm.loop
    assert isinstance(loop, PDLoop) and isinstance(loop.placement, RunnerStreams)
    assert loop.kv_transfer is not None and llm.statistics()["mode"] == "disaggregation"
    assert llm.runners == [loop.prefill_runner, loop.decode_runner] and llm.model_runner is loop.decode_runner
    assert loop.prefill_runner.kv_cache is not loop.decode_runner.kv_cache
    assert loop.prefill_runner.decode_paths.graphs is None and loop.decode_runner.prefill_graphs is None


def assert_shared_weights(llm):
    """On one device the decode runner uses the prefill runner's weight tensors."""
    assert shared_weights(llm.loop.prefill_runner, llm.loop.decode_runner)


class Holder:
    def __init__(self, block_table):
        self.block_table = block_table


def check_invariants(llm):
    """Every admitted prompt holds its decode blocks; both block managers agree with their users."""
    s = llm.scheduler
    for seq in s.prefilling:
        assert len(s.reserved[seq.seq_id]) == s.block_manager.num_blocks_for(seq.num_tokens)
    assert s.num_admitted() <= s.max_num_seqs
    check_consistent(s.prefill_manager, s.prefilling + [Holder(blocks) for _, blocks in s.transferring.values()])
    check_consistent(s.block_manager, list(s.running) + [seq for seq, _ in s.transferring.values()]
                     + [Holder(blocks) for blocks in s.reserved.values()])


@pytest.mark.parametrize("options", [
    dict(),
    dict(max_num_batched_tokens=40),  # chunked prefill
    dict(num_kvcache_blocks=BLOCKS_PER_SEQ, prefill_num_kvcache_blocks=BLOCKS_PER_SEQ),  # preemption, back-pressure
    dict(num_kvcache_blocks=BLOCKS_PER_SEQ + 3, max_num_batched_tokens=24, max_num_seqs=3),
    dict(num_kvcache_blocks=BLOCKS_PER_SEQ, prefill_num_kvcache_blocks=BLOCKS_PER_SEQ, async_scheduling=False),
], ids=["default", "chunked", "tiny-caches", "tiny-chunked", "tiny-caches-sync"])
def test_greedy_tokens_match_the_single_runner_engine(model_dir, expected, monkeypatch, options):
    preempted = count_preemptions(monkeypatch)
    llm = pd_llm(model_dir, **options)
    assert_pd_loop(llm)
    assert_shared_weights(llm)
    first, again = generate_twice(llm, expected, monkeypatch, check_invariants, assert_pd_idle)
    if options.get("num_kvcache_blocks") == BLOCKS_PER_SEQ:
        assert preempted, "a decode cache of one sequence forces preemption"
        assert first["prefill_wait_for_decode_room_s"] > 0
    # The second run's prompts hit the prefill side's prefix cache.
    if "prefill_num_kvcache_blocks" not in options:
        assert again["prefill_tokens"] - first["prefill_tokens"] < sum(len(p) for p in mixed_prompts())


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_decode_steps_run_while_a_prefill_is_in_flight(model_dir, expected, monkeypatch, async_scheduling):
    llm = pd_llm(model_dir, async_scheduling=async_scheduling)
    lag = 1 if async_scheduling else 0  # the tokens of an asynchronous decode step come with the next step()
    prompts = mixed_prompts()
    streamed, step = streaming(llm)
    first = llm.add_request(prompts[0], GREEDY)
    step()
    assert list(llm.scheduler.running) and streamed[first] == expected[0][:1]
    held = hold(monkeypatch, llm.loop.prefill_runner, "launch")
    second = llm.add_request(prompts[3], GREEDY)
    for n in range(2, 6):
        step()
        assert len(held) == 1 and llm.scheduler.prefilling, "one prefill in flight, not collected"
        assert len(streamed[first]) == n - lag and second not in streamed, "the decode side kept stepping"
    held[0].released = True
    while llm.has_unfinished_requests():
        step()
    assert (streamed[first], streamed[second]) == (expected[0], expected[3])
    stats = llm.get_pd_statistics()
    assert stats["decode_step_ms_beside_prefill"] > 0 and stats["decode_step_ms_alone"] > 0
    assert_pd_idle(llm)


@pytest.mark.parametrize("stage", ["prefill", "transfer"])
def test_abort_while_work_is_in_flight(model_dir, expected, monkeypatch, stage):
    llm = pd_llm(model_dir)
    prompts = mixed_prompts()
    streamed, step = streaming(llm)
    first = llm.add_request(prompts[0], GREEDY)
    step()
    held = hold(monkeypatch, *((llm.loop.prefill_runner, "launch") if stage == "prefill"
                               else (llm.loop.kv_transfer, "start")))
    second = llm.add_request(prompts[3], GREEDY)
    step()
    assert held and (llm.scheduler.prefilling if stage == "prefill" else llm.scheduler.transferring)
    first_tokens_of_second = streamed.get(second, [])
    assert first_tokens_of_second == ([] if stage == "prefill" else expected[3][:1])
    llm.abort_requests([second])
    check_invariants(llm)
    for work in held:  # the launched work completes after the abort
        work.released = True
    while llm.has_unfinished_requests():
        step()
    assert streamed[first] == expected[0]
    assert streamed.get(second, []) == first_tokens_of_second, "nothing reported after the abort"
    assert_pd_idle(llm)


def test_float8_cache_gives_the_single_runner_tokens_with_one_set_of_scales(model_dir):
    """The caches exchange float8 bytes, so both runners must read them with the same scales."""
    single = LLM(model_dir, device="cpu", kvcache_block_size=BLOCK_SIZE, max_model_len=MAX_MODEL_LEN,
                 num_kvcache_blocks=64, kv_cache_dtype="fp8_e4m3")
    llm = pd_llm(model_dir, kv_cache_dtype="fp8_e4m3")
    prefill_scales, decode_scales = llm.loop.prefill_runner.kv_cache.scales, llm.loop.decode_runner.kv_cache.scales
    assert prefill_scales is not None and torch.equal(prefill_scales, decode_scales)
    assert tokens(llm, mixed_prompts(), GREEDY) == tokens(single, mixed_prompts(), GREEDY)


def test_pipeline_option_applies_to_the_decode_runner(model_dir, expected):
    llm = pd_llm(model_dir, enable_pipeline=True, pipeline_force=True)
    decode_paths, prefill_paths = llm.loop.decode_runner.decode_paths, llm.loop.prefill_runner.decode_paths
    assert [e.name for e in decode_paths.extensions] == ["pipeline"] and not prefill_paths.extensions
    assert decode_paths.forced == "pipeline" and "pipeline" not in prefill_paths.forwards
    assert tokens(llm, mixed_prompts(), GREEDY) == expected
    stats = llm.statistics()
    assert stats["runner"]["pipeline"]["enabled"] and stats["runner"]["pipeline"]["total_tokens"] > 0
    assert "pipeline" not in stats["prefill_runner"]


def test_many_requests_through_tiny_caches_finish_once_in_order(tiny_model_dir, monkeypatch):
    preempted = count_preemptions(monkeypatch)
    llm = pd_llm(tiny_model_dir, num_kvcache_blocks=BLOCKS_PER_SEQ + 2, prefill_num_kvcache_blocks=BLOCKS_PER_SEQ,
                 max_num_batched_tokens=64, max_num_seqs=16)
    rng = random.Random(7)
    stem = [rng.randrange(2, VOCAB_SIZE) for _ in range(60)]
    prompts = [(stem[:rng.randrange(60)] if rng.random() < 0.4 else [])
               + [rng.randrange(2, VOCAB_SIZE) for _ in range(rng.randrange(1, 90))] for _ in range(60)]
    params = [SamplingParams(temperature=rng.choice([0.0, 0.8]), max_tokens=rng.randrange(1, 40),
                             ignore_eos=rng.random() < 0.5) for _ in prompts]
    finished = []
    step = llm.loop.step  # what generate() steps

    def checked_step():
        produced = step()
        check_invariants(llm)
        finished.extend(seq.seq_id for seq, _ in produced if seq.is_finished)
        return produced

    monkeypatch.setattr(llm.loop, "step", checked_step)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert len(finished) == len(set(finished)) == len(prompts), "each request finishes exactly once"
    assert preempted
    for out, prompt, sp in zip(outputs, prompts, params):
        limit = min(sp.max_tokens, MAX_MODEL_LEN - len(prompt))
        if sp.ignore_eos or TINY_EOS not in out["token_ids"]:
            assert len(out["token_ids"]) == limit
        else:
            assert out["token_ids"].index(TINY_EOS) == len(out["token_ids"]) - 1
    assert_pd_idle(llm)
    # In prompt order: the greedy ones, run again on the single-runner engine, agree.
    greedy = [i for i, sp in enumerate(params) if sp.temperature == 0][:10]
    single = LLM(tiny_model_dir, device="cpu", kvcache_block_size=BLOCK_SIZE, max_model_len=MAX_MODEL_LEN,
                 num_kvcache_blocks=64)
    again = single.generate([prompts[i] for i in greedy], [params[i] for i in greedy], use_tqdm=False)
    assert [o["token_ids"] for o in again] == [outputs[i]["token_ids"] for i in greedy]


@pytest.fixture(scope="module")
def pd_engine(model_dir):
    return pd_llm(model_dir, num_kvcache_blocks=BLOCKS_PER_SEQ * 2, max_num_batched_tokens=64)


def test_streaming_api_reports_every_token_once(pd_engine, expected):
    prompts = mixed_prompts()
    ids = [pd_engine.add_request(p, GREEDY) for p in prompts]
    assert stream_to_completion(pd_engine, ids) == expected
    assert_pd_idle(pd_engine)


def test_abort_of_waiting_and_decoding_requests_frees_both_caches(pd_engine, expected):
    prompts = mixed_prompts()
    ids = [pd_engine.add_request(p, GREEDY) for p in prompts]
    streamed = {i: [] for i in ids}
    for _ in range(3):
        for request_id, new_tokens, _ in pd_engine.step():
            streamed[request_id] += new_tokens
    s = pd_engine.scheduler
    assert s.waiting and s.running, "requests in several states when aborted"
    aborted = set(ids[::2])
    pd_engine.abort_requests(aborted)
    check_invariants(pd_engine)
    while pd_engine.has_unfinished_requests():
        for request_id, new_tokens, _ in pd_engine.step():
            assert request_id not in aborted
            streamed[request_id] += new_tokens
    for i, request_id in enumerate(ids):
        if request_id not in aborted:
            assert streamed[request_id] == expected[i]
    assert_pd_idle(pd_engine)


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, RuntimeError])
@pytest.mark.parametrize("runner", ["prefill_runner", "decode_runner"])
def test_interrupted_generate_removes_its_requests(pd_engine, expected, monkeypatch, interrupt, runner):
    fail_on_call(monkeypatch, getattr(pd_engine.loop, runner), "launch", 3, interrupt("stopped mid-generate"))
    with pytest.raises(interrupt):
        pd_engine.generate(mixed_prompts(), GREEDY, use_tqdm=False)
    monkeypatch.undo()
    assert_pd_idle(pd_engine)
    assert tokens(pd_engine, mixed_prompts(), GREEDY) == expected


def test_statistics_count_the_work(model_dir):
    llm = pd_llm(model_dir, num_kvcache_blocks=64, prefill_num_kvcache_blocks=64)
    prompts = random_prompts([5, 40, 17, 33], seed=3)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (1, 6, 9, 4)]
    tokens(llm, prompts, params)
    stats = llm.get_pd_statistics()
    assert stats["prefill_tokens"] == sum(len(p) for p in prompts)
    assert stats["prefill_batches"] >= 1 and stats["prefill_time_s"] > 0
    assert stats["decode_tokens"] == sum(sp.max_tokens - 1 for sp in params)
    assert stats["decode_steps"] == max(sp.max_tokens for sp in params) - 1
    assert stats["decode_time_s"] > 0 and stats["decode_step_ms_alone"] > 0
    # The one-token request finishes at its prefill and is never handed over.
    handed_over = [p for p, sp in zip(prompts, params) if sp.max_tokens > 1]
    assert stats["kv_transfers"] == len(handed_over)
    kv_cache = llm.loop.prefill_runner.kv_cache.tensor
    block_bytes = kv_cache[0].numel() * kv_cache.element_size()
    assert block_bytes == llm.loop.prefill_runner.kv_cache.block_bytes
    assert stats["kv_transfer_bytes"] == sum(-(-len(p) // BLOCK_SIZE) for p in handed_over) * block_bytes
    assert 1 <= stats["kv_transfer_copies"] <= sum(-(-len(p) // BLOCK_SIZE) for p in handed_over)
    assert stats["kv_transfer_gb_per_s"] > 0
    assert stats["prefill_wait_for_decode_room_s"] == 0 and stats["decode_idle_s"] > 0
    assert (stats["prefill_device"], stats["decode_device"], stats["kv_transfer_mode"]) == ("cpu", "cpu", "device-local")
    assert "partitions" not in stats  # the multiplexing placement's statistics only come with that mode
    everything = llm.statistics()
    assert everything["mode"] == "disaggregation" and everything["pd"] == stats
    assert set(everything["runner"]["decode_paths"]) == {"path_per_bucket", "timings_ms"}


def test_print_pd_statistics_prints_the_report(pd_engine, capsys):
    pd_engine.print_pd_statistics()
    out = capsys.readouterr().out
    assert out.startswith("[PD Statistics]\n") and out == report(pd_engine.get_pd_statistics()) + "\n"


def test_block_runs_group_blocks_consecutive_on_both_sides():
    assert block_runs([4, 5, 6, 9, 10, 2], [0, 1, 2, 3, 7, 8]) == [(4, 0, 3), (9, 3, 1), (10, 7, 1), (2, 8, 1)]
    assert block_runs([], []) == []
    with pytest.raises(ValueError):
        block_runs([1, 2], [3])


def random_caches(device, src_blocks=12, dst_blocks=10, dtype=torch.float32):
    shape = (2, 2, BLOCK_SIZE, 2, 8)  # layers, K/V, block size, kv heads, head dim
    generator = torch.Generator().manual_seed(0)
    src = torch.randn((src_blocks + 1, *shape), generator=generator).to(device, dtype)
    dst = torch.randn((dst_blocks + 1, *shape), generator=generator).to(device, dtype)
    return src, dst


def check_transfer(src, dst, staged):
    before = dst.clone()
    transfer = KVTransfer(src, dst, staged=staged)
    src_blocks, dst_blocks = [3, 4, 5, 0, 11, 7], [6, 7, 8, 2, 1, 0]
    handle = transfer.start(src_blocks, dst_blocks)
    handle.wait()
    assert handle.done()
    for s, d in zip(src_blocks, dst_blocks):
        assert torch.equal(dst[d].cpu(), src[s].cpu())
    untouched = [b for b in range(dst.size(0)) if b not in dst_blocks]
    assert torch.equal(dst[untouched].cpu(), before[untouched].cpu())
    assert handle.num_bytes == len(src_blocks) * src[0].numel() * src.element_size()
    assert handle.num_copies == (2 if staged else 1) * 4
    assert handle.seconds() > 0


@pytest.mark.parametrize("staged", [False, True])
def test_kv_transfer_copies_blocks_on_cpu(staged):
    check_transfer(*random_caches("cpu"), staged)


def test_kv_transfer_rejects_caches_of_different_shapes():
    src, _ = random_caches("cpu")
    with pytest.raises(ValueError, match="block shape"):
        KVTransfer(src, torch.zeros(4, 3, 2, BLOCK_SIZE, 2, 8))


@pytest.mark.parametrize("options,match", [
    (dict(tensor_parallel_size=2), "enable_two_gpu_pd"),
    (dict(decode_device_id=1), "decode_device_id"),  # the CPU is one device
    (dict(prefill_device_id=5), "prefill_device_id"),
    (dict(prefill_device_id=-1), "prefill_device_id"),
    (dict(decode_device_id=-2), "decode_device_id"),
    (dict(prefill_num_kvcache_blocks=3), "prefill_num_kvcache_blocks"),
    (dict(prefill_num_kvcache_blocks=0), "prefill_num_kvcache_blocks"),
    (dict(num_kvcache_blocks=3), "num_kvcache_blocks"),
    (dict(device="cuda:0"), "device"),
    # The same-device prefill cache holds two batches of max_num_batched_tokens, past the memory here.
    (dict(max_num_batched_tokens=10 ** 12), "invalid max_num_batched_tokens: .* lower max_num_batched_tokens$"),
])
def test_bad_configurations(model_dir, pd_engine, expected, options, match):
    with pytest.raises(ValueError, match=match):
        pd_llm(model_dir, **options)
    assert tokens(pd_engine, mixed_prompts(), GREEDY) == expected


@pytest.mark.skipif(torch.cuda.device_count() > 1, reason="checks the error on machines with fewer than 2 GPUs")
def test_default_decode_device_needs_a_second_gpu(model_dir):
    with pytest.raises(ValueError, match="decode_device_id"):
        LLM(model_dir, kvcache_block_size=BLOCK_SIZE, enable_two_gpu_pd=True)


# ---- GPU ------------------------------------------------------------------------------------------


@gpu
@pytest.mark.parametrize("options", [dict(), dict(num_kvcache_blocks=BLOCKS_PER_SEQ, max_num_batched_tokens=40)],
                         ids=["default", "tiny-chunked"])
def test_same_device_mode_on_one_gpu_matches_the_single_runner_engine(model_dir, cuda_expected, monkeypatch, options):
    preempted = count_preemptions(monkeypatch)
    llm = pd_llm(model_dir, device=None, dtype="float32", **{"num_kvcache_blocks": 64, **options})
    # Each runner captures the graphs of its role only.
    loop = llm.loop
    assert loop.decode_runner.decode_paths.graphs is not None and loop.prefill_runner.decode_paths.graphs is None
    assert loop.prefill_runner.prefill_graphs is not None and loop.decode_runner.prefill_graphs is None
    assert loop.prefill_runner.device == loop.decode_runner.device
    assert loop.kv_transfer.mode == "device-local"
    assert_pd_loop(llm)
    assert_shared_weights(llm)
    assert tokens(llm, mixed_prompts(), GREEDY) == cuda_expected
    assert_pd_idle(llm)
    assert tokens(llm, mixed_prompts(), GREEDY) == cuda_expected  # now with prefix-cache hits
    assert_pd_idle(llm)
    if options:
        assert preempted
    assert llm.get_pd_statistics()["kv_transfer_gb_per_s"] > 0


@gpu
@pytest.mark.parametrize("staged", [False, True])
def test_kv_transfer_copies_blocks_on_a_gpu(staged):
    check_transfer(*random_caches("cuda", dtype=torch.bfloat16), staged)


@multi_gpu
@pytest.mark.parametrize("staged", [False, True])
def test_kv_transfer_between_two_gpus(staged):
    src, _ = random_caches("cuda:0")
    _, dst = random_caches("cuda:1")
    check_transfer(src, dst, staged)


@multi_gpu
def test_two_gpus_match_the_single_runner_engine(model_dir, cuda_expected):
    llm = pd_llm(model_dir, device=None, dtype="float32", prefill_device_id=0, decode_device_id=1,
                 num_kvcache_blocks=BLOCKS_PER_SEQ + 2, max_num_batched_tokens=40)
    assert (str(llm.loop.prefill_runner.device), str(llm.loop.decode_runner.device)) == ("cuda:0", "cuda:1")
    assert_pd_loop(llm)
    assert llm.loop.kv_transfer.mode in ("peer-to-peer", "staged through pinned host memory")
    assert tokens(llm, mixed_prompts(), GREEDY) == cuda_expected
    assert_pd_idle(llm)
