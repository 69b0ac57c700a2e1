"""Prefill/decode multiplexing on one GPU (enable_pd_multiplexing): the same greedy tokens as the
single-runner engine with one shared KV cache, the split statistics, the candidate splits and bad
options. On CPU the engine runs its fallback (one stream); the split tests need a CUDA device.

The engine's loop is the disaggregation loop (PDLoop) with a SplitPlacement (llm.loop.placement), which decides
where each prefill and decode step runs; the CPU tests drive its code paths with stand-in splits (lanes
without streams)."""
from types import SimpleNamespace

import pytest
import torch

from nanovllm import LLM
from nanovllm.engine.graphs import DecodeGraphs
from nanovllm.kernels.attention import choose_num_splits
from nanovllm.modes.disaggregation.loop import DecodeStep, PDLoop
from nanovllm.modes.multiplexing.placement import FILL_SHARE, SplitPlacement
from nanovllm.modes.multiplexing.policy import DEFAULT_TTFT_FACTOR, MIN_CHUNK_TOKENS
from nanovllm.modes.multiplexing.splits import (OBSERVED_WEIGHT, STEP_MARGIN, STEPS_OBSERVED, STEPS_PER_BUCKET, Split,
                                                SplitProfiler, candidate_sizes, choose_split, choose_splits,
                                                in_line_prefill_tokens, itl_bound_ms, split_ranges)
from nanovllm.modes.multiplexing.stats import FILLING, FILLING_IN_BOUND, FIRST_TOKEN, FULL_GPU, IN_LINE
from nanovllm.partitions.sm_limit import num_sms_of, on_sms
from nanovllm.partitions.streams import Lane
from tests.helpers import BLOCK_SIZE, assert_idle, check_consistent, count_preemptions, gpu, logged, tokens
from tests.modes.pd_helpers import (BLOCKS_PER_SEQ, GREEDY, MAX_MODEL_LEN, collect, cuda_expected,  # noqa: F401
                                    expected, generate_twice, mixed_prompts, shared_weights)


def mux_llm(model_dir, device="cpu", **options):
    options = {"kvcache_block_size": BLOCK_SIZE, "max_model_len": MAX_MODEL_LEN, "num_kvcache_blocks": 64, **options}
    return LLM(model_dir, device=device, enable_pd_multiplexing=True, **options)


def check_invariants(llm):
    """One block manager, used by the prefilling and the decoding sequences alike."""
    s = llm.scheduler
    assert s.prefill_manager is s.block_manager and not s.transferring and not s.reserved
    assert s.num_admitted() <= s.max_num_seqs
    check_consistent(s.block_manager, s.prefilling + list(s.running))


def assert_mux_idle(llm):
    assert_idle(llm)
    check_invariants(llm)


def assert_mux_loop(llm):
    """The engine runs the disaggregation loop with the multiplexing placement and no KV handoff."""
    loop = llm.loop
    assert isinstance(loop, PDLoop) and isinstance(loop.placement, SplitPlacement) and loop.kv_transfer is None
    assert llm.statistics()["mode"] == "multiplexing"
    assert llm.runners == [loop.prefill_runner, loop.decode_runner] and llm.model_runner is loop.decode_runner


def assert_shared(llm):
    """Both runners use the same weight and buffer tensors and the same KV cache."""
    prefill, decode = llm.loop.prefill_runner, llm.loop.decode_runner
    assert shared_weights(prefill, decode)
    assert prefill.kv_cache is decode.kv_cache
    layers = list(zip(prefill.attention_layers(), decode.attention_layers(), strict=True))
    assert layers and all(a is not b and a.k_cache.data_ptr() == b.k_cache.data_ptr() for a, b in layers)


def run_and_check(llm, expected, monkeypatch, preempted, options):
    assert_mux_loop(llm)
    assert_shared(llm)
    first, again = generate_twice(llm, expected, monkeypatch, check_invariants, assert_mux_idle)
    if options.get("num_kvcache_blocks") == BLOCKS_PER_SEQ:
        assert preempted, "a cache of one sequence forces preemption"
    # The second run's prompts hit the prefix cache.
    assert again["prefill_tokens"] - first["prefill_tokens"] < sum(len(p) for p in mixed_prompts())
    return again


OPTIONS = [
    dict(),
    dict(max_num_batched_tokens=40),  # chunked prefill
    dict(num_kvcache_blocks=BLOCKS_PER_SEQ),  # preemption
    dict(num_kvcache_blocks=BLOCKS_PER_SEQ + 3, max_num_batched_tokens=24, max_num_seqs=3),
    dict(num_kvcache_blocks=BLOCKS_PER_SEQ, async_scheduling=False),
]
OPTION_IDS = ["default", "chunked", "tiny-cache", "tiny-chunked", "tiny-cache-sync"]


@pytest.mark.parametrize("options", [OPTIONS[i] for i in (0, 2, 4)], ids=[OPTION_IDS[i] for i in (0, 2, 4)])
def test_cpu_fallback_matches_the_single_runner_engine(model_dir, expected, monkeypatch, caplog, options):
    preempted = count_preemptions(monkeypatch)
    llm = mux_llm(model_dir, **options)
    said = logged(caplog, "PD-mux")
    assert said[0].startswith("green contexts unavailable (device cpu is not a CUDA device): ")
    assert said[0].endswith(": prefill and decode run one after the other on one stream")
    placement = llm.loop.placement
    assert not placement.split_by_bucket and not placement.splits
    # Without splits both runners launch on one stream (on CPU: none).
    assert llm.loop.prefill_runner.stream is llm.loop.decode_runner.stream
    stats = run_and_check(llm, expected, monkeypatch, preempted, options)
    assert stats["partitions"].startswith("one stream")
    assert stats["split_per_batch"] == {}
    assert sum(stats["decode_steps_per_split"].values()) == stats["decode_steps"] > 0
    assert set(stats["decode_steps_per_split"]) == {"one stream"}
    assert stats["kv_transfers"] == 0 and stats["kv_transfer_bytes"] == 0


def test_decode_steps_run_while_a_prefill_is_in_flight(model_dir, expected):
    """Requests arriving while others decode: a prefill is launched and a decode step runs in the same step()."""
    llm = mux_llm(model_dir)
    prompts, outputs = mixed_prompts(), {}
    ids = [llm.add_request(p, GREEDY) for p in prompts[:4]]
    while not llm.scheduler.running:
        collect(llm.step(), outputs)
    ids += [llm.add_request(p, GREEDY) for p in prompts[4:]]
    collect(llm.step(), outputs)
    stats = llm.get_pd_statistics()
    assert stats["prefill_batches"] >= 2 and llm.scheduler.running
    while llm.has_unfinished_requests():
        collect(llm.step(), outputs)
    assert [outputs[i] for i in ids] == expected
    assert set(llm.get_pd_statistics()["decode_steps_per_split"]) == {"one stream"}


def test_print_pd_statistics_adds_where_the_work_ran(model_dir, capsys):
    llm = mux_llm(model_dir)
    llm.generate(mixed_prompts()[:2], GREEDY, use_tqdm=False)
    stats = llm.get_pd_statistics()
    capsys.readouterr()  # the start-up's log lines
    llm.print_pd_statistics()
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["[PD Statistics]", "  Prefill runner: cpu, decode runner: cpu, KV handoff: none (one KV cache "
                                            "shared by both runners)"]
    assert lines[-3:] == [
        f"  Partitions: {stats['partitions']}; split under prefill by decode batch: none (0 changes while serving)",
        f"  Decode on one stream: {stats['decode_steps']} steps, {stats['decode_time_s']:.3f} s (100.0% of decode time)",
        f"  Prefill batches on one stream: {stats['prefill_batches']}"]


@pytest.mark.parametrize("options,error,match", [
    (dict(tensor_parallel_size=2), ValueError, "enable_pd_multiplexing"),
    (dict(enable_two_gpu_pd=True, prefill_device_id=0, decode_device_id=1), ValueError, "enable_pd_multiplexing"),
    (dict(enable_pipeline=True), ValueError, "enable_pd_multiplexing"),
    (dict(pd_max_itl_ms=0), ValueError, "pd_max_itl_ms"),
    (dict(pd_max_itl_ms=-3.0), ValueError, "pd_max_itl_ms"),
    (dict(pd_max_itl_ms="10"), TypeError, "pd_max_itl_ms"),
    (dict(pd_max_itl_ms=True), TypeError, "pd_max_itl_ms"),
    (dict(pd_max_ttft_ms=0), ValueError, "pd_max_ttft_ms"),
    (dict(pd_max_ttft_ms=-500.0), ValueError, "pd_max_ttft_ms"),
    (dict(pd_max_ttft_ms=float("inf")), ValueError, "pd_max_ttft_ms"),
    (dict(pd_max_ttft_ms="500"), TypeError, "pd_max_ttft_ms"),
    (dict(pd_max_ttft_ms=True), TypeError, "pd_max_ttft_ms"),
    (dict(prefill_num_kvcache_blocks=20), ValueError, "prefill_num_kvcache_blocks"),
    (dict(enable_pd_multiplexing=1), TypeError, "enable_pd_multiplexing"),
    (dict(enable_pd_multiplexing="yes"), TypeError, "enable_pd_multiplexing"),
])
def test_bad_options(model_dir, options, error, match):
    options = {"enable_pd_multiplexing": True, **options}
    with pytest.raises(error, match=match):
        LLM(model_dir, device="cpu", **options)


def test_bounds_reach_the_placement(model_dir):
    placement = mux_llm(model_dir, pd_max_itl_ms=12.0, pd_max_ttft_ms=300.0).loop.placement
    assert (placement.max_itl_ms, placement.max_ttft_ms) == (12.0, 300.0)


def test_same_device_ids_are_accepted(model_dir, expected):
    llm = mux_llm(model_dir, enable_two_gpu_pd=True, prefill_device_id=0, decode_device_id=0)
    assert_mux_loop(llm)
    assert tokens(llm, mixed_prompts(), GREEDY) == expected


def test_candidate_splits():
    assert candidate_sizes(8, 120) == [(48, 72), (64, 56), (80, 40)]  # an H100
    assert candidate_sizes(4, 108) == [(44, 64), (56, 52), (72, 36)]
    for unit, available in ((8, 16), (8, 24), (2, 10)):
        sizes = candidate_sizes(unit, available)
        assert sizes and all(d % unit == 0 and p % unit == 0 and d >= unit and p >= unit and d + p == available
                             for d, p in sizes)


def test_kernels_launched_on_a_partition_size_their_grids_for_it():
    cpu = torch.device("cpu")
    whole = num_sms_of(cpu)
    with on_sms(48):
        assert num_sms_of(cpu) == 48
        assert choose_num_splits(4, 8, 4096, num_sms_of(cpu)) < choose_num_splits(4, 8, 4096, whole)
        with on_sms(None):  # a launch without a lane inside keeps the partition's count
            assert num_sms_of(cpu) == 48
    assert num_sms_of(cpu) == whole
    assert candidate_sizes(8, 8) == []  # one unit: no split


def profiled_split(decode_sms, alone_ms_per_batch, prefill_slowdown, beside_over_alone=1.0):
    s = Split(Lane(None, decode_sms), Lane(None, 120 - decode_sms))
    s.profile = {"decode_step_ms_alone_per_batch": alone_ms_per_batch, "decode_step_ms_alone": 10.0,
                 "decode_step_ms": 10.0 * beside_over_alone, "prefill_slowdown": prefill_slowdown}
    return s


def test_choose_splits_follows_the_batch():
    """Per bucket, decode gets the fewest SMs whose step stays within STEP_MARGIN of the ITL bound and
    prefill the rest; if no split keeps it within, the split with the shortest decode step."""
    full = {8: 6.0, 64: 8.0, 256: 15.0}
    wide = profiled_split(48, {8: 6.0, 64: 10.0, 256: 30.0}, 1.4)  # small batches lose little on 48 SMs
    middle = profiled_split(64, {8: 6.2, 64: 8.4, 256: 20.0}, 1.8)
    narrow = profiled_split(80, {8: 6.1, 64: 8.5, 256: 19.0}, 2.0)
    splits = [narrow, middle, wide]
    # The default bound is 1.5 x the full-GPU step: 8.1, 10.8 and 20.25 ms with the margin.
    assert STEP_MARGIN * itl_bound_ms(None, 15.0) == pytest.approx(20.25)
    assert choose_splits(splits, full, None) == {8: wide, 64: wide, 256: middle}
    assert choose_splits(splits, full, 22.0) == {8: wide, 64: wide, 256: narrow}  # 20 ms is over 0.9 x 22 ms
    assert choose_splits(splits, full, 5.0) == {8: wide, 64: middle, 256: narrow}  # none within: shortest step
    # The decode step beside a prefill scales the step alone by the slow-down measured at the profile's batch.
    slowed = profiled_split(48, {8: 6.0, 64: 10.0, 256: 30.0}, 1.4, beside_over_alone=1.2)
    assert slowed.decode_step_ms(64) == pytest.approx(12.0)
    assert choose_splits([slowed, middle], full, None) == {8: slowed, 64: middle, 256: middle}  # 12 ms > 10.8 ms


def test_observed_decode_steps_replace_the_profiles_estimate():
    """From STEPS_OBSERVED steps on, a split's decode step time for a bucket is what the steps run on it
    took: their mean, then a running mean that weighs each later step by OBSERVED_WEIGHT."""
    s = profiled_split(64, {8: 6.2, 64: 8.4}, 1.8)
    for ms in (9.0, 11.0, 10.0)[:STEPS_OBSERVED - 1]:
        s.observe(64, ms)
    assert s.decode_step_ms(64) == pytest.approx(8.4)  # too few steps: the profile's estimate
    s.observe(64, 12.0)
    assert s.decode_step_ms(64) == pytest.approx(10.5)  # the mean of the four
    s.observe(64, 20.5)
    assert s.decode_step_ms(64) == pytest.approx(10.5 + OBSERVED_WEIGHT * 10.0)
    assert s.decode_step_ms(8) == pytest.approx(6.2)  # other buckets keep the estimate
    # The bucket's choice follows: the 64-SM split's steps now exceed 1.5 x 8 ms, the 80-SM split's do not.
    narrow = profiled_split(80, {8: 6.1, 64: 8.5}, 2.6)
    assert choose_splits([s, narrow], {8: 6.0}, None)[8] is s
    assert choose_split([s, narrow], 64, 8.0, None) is narrow
    for _ in range(STEPS_OBSERVED):
        narrow.observe(64, 13.0)
    assert choose_split([s, narrow], 64, 8.0, None) is s  # none within the bound: the shortest step


def test_decode_steps_over_the_bound_move_their_bucket_to_more_decode_sms(model_dir, caplog):
    """The engine feeds each decode step run on a split to that split: once the steps of a bucket's
    chosen split exceed the bound, the bucket moves to a split with more decode SMs, the log says so
    and the statistics show the change. It never moves back, nor off the split with the most decode
    SMs, nor off a split without a profile (enforce_eager)."""
    llm = mux_llm(model_dir)
    placement = llm.loop.placement
    wide = profiled_split(48, {4: 6.0}, 1.4)
    narrow = profiled_split(80, {4: 6.5}, 2.6)
    placement.splits = [wide, narrow]  # stand-ins: lanes without streams
    placement.split_by_bucket = {4: wide}
    placement.decode_step_ms = {4: 6.0}  # on CPU a batch is its own bucket; bound 9 ms
    caplog.clear()
    for _ in range(STEPS_OBSERVED):
        placement.observe(wide, 4, 9.5)
    assert placement.split_by_bucket == {4: narrow}
    assert logged(caplog, "PD-mux") == [
        "decode batch bucket 4: split under prefill now decode 80 / prefill 40 SMs; decode 48 / prefill 72 SMs took "
        f"9.5 ms per decode step beside prefills, over {STEP_MARGIN:g} x the 9.0 ms bound"]
    stats = llm.get_pd_statistics()
    assert stats["split_changes"] == 1 and stats["split_per_batch"] == {"1-4": narrow.label}
    for _ in range(STEPS_OBSERVED):
        placement.observe(narrow, 4, 20.0)  # over the bound, and longer than wide's steps: no split has more SMs
    assert placement.split_by_bucket == {4: narrow} and llm.get_pd_statistics()["split_changes"] == 1
    bare = Split(Lane(None, 8), Lane(None, 16))
    placement.split_by_bucket = {4: bare}
    for _ in range(STEPS_OBSERVED):
        placement.observe(bare, 4, 100.0)
    assert placement.split_by_bucket == {4: bare} and bare.observed[4][0] == STEPS_OBSERVED
    assert len(logged(caplog, "PD-mux")) == 1


def test_batches_past_the_largest_decode_graph_time_no_bucket(model_dir):
    """max_num_seqs above the largest decode graph: such batches run eagerly; their steps are recorded
    per split but time no bucket, and a prefill beside them never runs in line."""
    llm = mux_llm(model_dir)
    placement = llm.loop.placement
    assert placement.decode_buckets is None  # eager on CPU: a batch is its own bucket
    assert placement.bucket(3) == 3
    placement.decode_buckets = [1, 2]  # as if the decode graphs had these buckets
    split = Split(Lane(None, 8), Lane(None, 16))  # a stand-in
    placement.split_by_bucket = {1: split, 2: split}
    placement.decode_step_ms = {1: 5.0, 2: 6.0}
    assert placement.bucket(1) == 1 and placement.bucket(2) == 2 and placement.bucket(3) is None
    assert placement.in_line_tokens(3) == 0 and placement.split_for(3) is split
    timer = SimpleNamespace(seconds=lambda: 0.009)
    placement.decoded(llm.loop, DecodeStep([object()] * 3, SimpleNamespace(timer=timer), beside_prefill=False), 0.009)
    assert placement.decode_step_ms == {1: 5.0, 2: 6.0}
    assert llm.get_pd_statistics()["decode_steps_per_split"] == {FULL_GPU: 1}
    placement.decoded(llm.loop, DecodeStep([object()] * 2, SimpleNamespace(timer=timer), beside_prefill=False), 0.004)
    assert placement.decode_step_ms == {1: 5.0, 2: 4.0}  # a full-GPU step without a prefill beside times its bucket


def test_split_ranges():
    a, b = profiled_split(48, {}, 1.0), profiled_split(64, {}, 1.0)
    assert split_ranges({8: a, 16: a, 64: b, 256: a}) == {"1-16": a.label, "17-64": b.label, "65-256": a.label}
    assert split_ranges({1: a}) == {"1": a.label}
    assert split_ranges({}) == {}


def test_in_line_prefills_fit_a_decode_step_into_the_bound():
    # A 10 ms step, a bound of 15 ms, 16384 tokens in 40 ms: 5 ms of prefill is 2048 tokens.
    per_token = 40.0 / 16384
    assert in_line_prefill_tokens(itl_bound_ms(None, 10.0), 10.0, 0.0, per_token) == 2048
    assert in_line_prefill_tokens(15.0, 10.0, 2.5, per_token) == 1024  # 2.5 ms of it read the weights
    assert in_line_prefill_tokens(12.0, 10.0, 0.0, per_token) == 819
    assert in_line_prefill_tokens(12.0, 10.0, 3.0, per_token) == 0
    assert in_line_prefill_tokens(8.0, 10.0, 0.0, per_token) == 0  # the step alone exceeds the bound


class CountedReplay:
    def __init__(self):
        self.replays = 0

    def replay(self):
        self.replays += 1


def test_split_profile_times_both_roles_and_stores_no_kv(model_dir):
    """The profile's code path on CPU, with counted stand-ins for the graphs: every split gets its
    measurements, the prefill stores no KV and the prefill runner gets its cache back."""
    llm = mux_llm(model_dir, max_num_batched_tokens=64)
    decode, prefill = llm.loop.decode_runner, llm.loop.prefill_runner
    paths = decode.decode_paths
    paths.graphs = DecodeGraphs([1, 2, 4, 8], decode.max_blocks_per_seq, decode.device)
    splits = [Split(Lane(None, 8), Lane(None, 16)), Split(Lane(None, 16), Lane(None, 8))]
    paths.plans = {n: {b: CountedReplay() for b in paths.graphs.buckets} for n in (None, 8, 16)}
    cache = prefill.kv_cache.tensor.clone()
    profiler = SplitProfiler(prefill, decode)
    assert profiler.batch == 8  # 64 blocks of 16 tokens hold 6 sequences of 160: bucket 8
    full_steps_ms, full_prefill_ms = profiler.full_gpu()
    assert set(full_steps_ms) == {1, 2, 4, 8} and all(ms > 0 for ms in full_steps_ms.values()) and full_prefill_ms > 0
    timed = 1 + STEPS_PER_BUCKET  # a warm-up replay, then the timed ones
    for split in splits:
        profiler.profile(split, full_prefill_ms)
        p = split.profile
        assert p["batch"] == 8 and p["prefill_tokens"] == 64
        assert all(p[k] > 0 for k in ("decode_step_ms", "prefill_ms", "decode_step_ms_alone", "prefill_slowdown"))
        assert set(p["decode_step_ms_alone_per_batch"]) == {1, 2, 4, 8}
        plan = paths.plans[split.decode.num_sms]
        assert [plan[b].replays for b in (1, 2, 4)] == [timed] * 3 and plan[8].replays >= timed + 3
    assert [paths.plans[None][b].replays for b in (1, 2, 4, 8)] == [timed] * 4
    assert torch.equal(prefill.kv_cache.tensor, cache)
    layers = list(zip(prefill.attention_layers(), decode.attention_layers(), strict=True))
    assert all(a.k_cache is not None and a.k_cache.data_ptr() == b.k_cache.data_ptr() for a, b in layers)
    chosen = choose_splits(splits, full_steps_ms, None)
    assert set(chosen) == {1, 2, 4, 8} and set(chosen.values()) <= set(splits)
    # The placement's choice from a profile: the first-token bound and the chunks on a split follow it.
    placement = llm.loop.placement
    placement.splits = splits
    placement.choose(prefill, decode)
    assert set(placement.split_by_bucket) == {1, 2, 4, 8}
    full_prefill_ms = placement.prefill_fixed_ms + placement.prefill_ms_per_token * 64
    assert placement.ttft_bound_ms == pytest.approx(DEFAULT_TTFT_FACTOR * full_prefill_ms)
    assert llm.get_pd_statistics()["bounds"] == {
        "itl": "1.5 x its full-GPU step",
        "ttft": f"{placement.ttft_bound_ms:.0f} ms (1 x the full-GPU prefill of 64 tokens)"}
    assert placement.chunk_tokens(splits[0]) >= MIN_CHUNK_TOKENS


def decode_beside_every_prefill(llm, monkeypatch):
    """Each prefill counts as in flight when the decode step after its launch starts, so that this step
    runs on the split: on a GPU a tiny model's prefill may be done before."""
    runner = llm.loop.prefill_runner
    launch = runner.launch

    def launch_and_hold(*args, **kwargs):
        step_tokens = launch(*args, **kwargs)
        ready, answers = step_tokens.ready, [False]
        step_tokens.ready = lambda: answers.pop() if answers else ready()
        return step_tokens

    monkeypatch.setattr(runner, "launch", launch_and_hold)


@pytest.mark.parametrize("in_line_tokens", [0, 10 ** 9], ids=["on-the-split", "in-line"])
def test_a_prefill_beside_decode_runs_on_the_split_or_between_decode_steps(model_dir, expected, monkeypatch,
                                                                           in_line_tokens):
    """The choice's code path on CPU, with stand-in splits: a prefill beside decoding sequences runs on
    the split of the running batch's bucket, or between decode steps when it has at most
    in_line_tokens(batch) tokens; the decode steps beside it follow. The tokens stay the same."""
    llm = mux_llm(model_dir, max_num_batched_tokens=40)
    placement = llm.loop.placement
    small, large = Split(Lane(None, 8), Lane(None, 16)), Split(Lane(None, 16), Lane(None, 8))
    placement.splits = [small, large]  # stand-ins: lanes without streams
    placement.split_by_bucket = {2: small, llm.config.scheduler.max_num_seqs: large}
    assert placement.split_for(1) is small and placement.split_for(2) is small and placement.split_for(3) is large
    placement.in_line_tokens = lambda batch: in_line_tokens
    placement.fills_batch = lambda joining, running: False
    chosen = []
    split_for = placement.split_for
    monkeypatch.setattr(placement, "split_for", lambda batch: chosen.append(split_for(batch)) or chosen[-1])
    decode_beside_every_prefill(llm, monkeypatch)
    assert tokens(llm, mixed_prompts(), GREEDY) == expected
    stats = llm.get_pd_statistics()
    on_splits = {label: n for label, n in stats["prefills_per_split"].items() if label in (small.label, large.label)}
    assert on_splits == {s.label: chosen.count(s) for s in set(chosen)}
    assert bool(on_splits) == (not in_line_tokens)
    assert (IN_LINE in stats["prefills_per_split"]) == bool(in_line_tokens)
    assert set(stats["decode_steps_per_split"]) - {FULL_GPU} == set(on_splits)


def test_prefills_that_fill_the_batch_run_between_decode_steps(model_dir, expected, monkeypatch):
    """Requests queued at once: while those to join are at least a quarter of those decoding, each
    prefill runs on the whole GPU between decode steps, long as it may be; once the batch is mostly
    full, the rest go on the split. The tokens stay the same."""
    llm = mux_llm(model_dir, max_num_batched_tokens=64)
    placement = llm.loop.placement
    split = Split(Lane(None, 8), Lane(None, 16))
    placement.splits = [split]  # a stand-in: lanes without streams
    placement.split_by_bucket = {llm.config.scheduler.max_num_seqs: split}
    placement.in_line_tokens = lambda batch: 0
    decode_beside_every_prefill(llm, monkeypatch)
    launched = []
    record = placement.stats.record_split_prefill
    monkeypatch.setattr(placement.stats, "record_split_prefill", lambda label: launched.append(
        (label, len(llm.scheduler.running), llm.scheduler.num_joining())) or record(label))
    assert tokens(llm, mixed_prompts(), GREEDY) == expected
    filling = [(running, joining) for label, running, joining in launched if label == FILLING]
    on_split = [(running, joining) for label, running, joining in launched if label == split.label]
    assert filling and on_split and launched[0][1] == 0
    assert all(joining >= FILL_SHARE * running > 0 for running, joining in filling)
    assert all(joining < FILL_SHARE * running for running, joining in on_split)
    labels = [label for label, _, _ in launched]
    assert labels.index(FILLING) < labels.index(split.label)


def test_with_an_itl_bound_fills_are_cut_to_it_once_the_allowance_is_spent(model_dir, expected, monkeypatch):
    """Requests queued at once with pd_max_itl_ms set: the first fill beside decoding sequences runs whole
    (the ITL allowance's first), the later ones between decode steps cut to the in-line size (here 16 of a
    64-token budget, with MIN_CHUNK_TOKENS lowered to let so short a cut run). The tokens stay the same."""
    llm = mux_llm(model_dir, max_num_batched_tokens=64, pd_max_itl_ms=50.0)
    placement = llm.loop.placement
    split = Split(Lane(None, 8), Lane(None, 16))
    placement.splits = [split]  # a stand-in: lanes without streams
    placement.split_by_bucket = {llm.config.scheduler.max_num_seqs: split}
    placement.in_line_tokens = lambda batch: 16
    monkeypatch.setattr("nanovllm.modes.multiplexing.placement.MIN_CHUNK_TOKENS", 8)
    decode_beside_every_prefill(llm, monkeypatch)
    launched = []
    prefill = placement.prefill
    monkeypatch.setattr(placement, "prefill", lambda loop, seqs: launched.append(
        (placement.choice.label, sum(seq.num_scheduled_tokens for seq in seqs))) or prefill(loop, seqs))
    assert tokens(llm, mixed_prompts(), GREEDY) == expected
    whole = [n for label, n in launched if label == FILLING]
    cut = [n for label, n in launched if label == FILLING_IN_BOUND]
    assert len(whole) == 1 and whole[0] > 16 and cut and max(cut) <= 16
    labels = [label for label, _ in launched]
    assert labels[0] == FULL_GPU and labels.index(FILLING) < labels.index(FILLING_IN_BOUND)
    assert llm.get_pd_statistics()["itl_allowance_spent_by"] == {FILLING: 1}


@pytest.mark.parametrize("bound_ms", [1e9, 1e-3], ids=["no-risk", "always-at-risk"])
def test_first_token_risk_and_chunks_keep_the_tokens(model_dir, expected, monkeypatch, bound_ms):
    """The first-token side of the choice on CPU, with a stand-in split: beside decoding sequences a prefill
    runs on the split in chunks of at most chunk_tokens or, with every queued prompt at risk, on the whole GPU
    while the ITL allowance lasts (here once) and on the split after; the statistics count the prefills at
    risk by where they ran. The tokens stay the same."""
    llm = mux_llm(model_dir, max_num_batched_tokens=64)
    placement = llm.loop.placement
    split = Split(Lane(None, 8), Lane(None, 16), profile={"prefill_slowdown": 2.0})  # a stand-in
    placement.splits, placement.split_by_bucket = [split], {llm.config.scheduler.max_num_seqs: split}
    placement.in_line_tokens = lambda batch: 0
    placement.fills_batch = lambda joining, running: False
    placement.prefill_ms_per_token, placement.ttft_bound_ms = 1.0, bound_ms
    placement.chunk_tokens = lambda s: 8
    launched = []
    prefill = placement.prefill
    monkeypatch.setattr(placement, "prefill", lambda loop, seqs: launched.append(
        (placement.choice.label, sum(seq.num_scheduled_tokens for seq in seqs))) or prefill(loop, seqs))
    assert tokens(llm, mixed_prompts(), GREEDY) == expected
    stats = llm.get_pd_statistics()
    on_split = [n for label, n in launched if label == split.label]
    whole_gpu = [n for label, n in launched if label == FIRST_TOKEN]
    assert on_split and max(on_split) <= 8 and launched[0][0] == FULL_GPU
    if bound_ms > 1:
        assert not whole_gpu and stats["ttft_at_risk_prefills"] == 0 and stats["ttft_at_risk_ran_on"] == {}
    else:
        assert len(whole_gpu) == placement.allowance.spent == 1 and whole_gpu[0] > 8
        assert stats["ttft_at_risk_ran_on"] == {FIRST_TOKEN: 1, split.label: len(on_split)}
        # Every prefill beside decoding sequences was at risk; those with nothing decoding are not weighed.
        assert stats["ttft_at_risk_prefills"] == sum(label != FULL_GPU for label, _ in launched)


def test_in_line_prefills_follow_the_running_batch(model_dir, expected):
    """The decode steps run on the whole GPU without a prefill beside time their batch's bucket, and
    the in-line size follows that time: a bucket not timed yet runs no prefill in line."""
    llm = mux_llm(model_dir, max_num_batched_tokens=40)
    placement = llm.loop.placement
    placement.split_by_bucket = {llm.config.scheduler.max_num_seqs: Split(Lane(None, 8), Lane(None, 16))}  # a stand-in
    placement.prefill_ms_per_token = 40.0 / 16384
    assert tokens(llm, mixed_prompts(), GREEDY) == expected
    assert placement.decode_step_ms and all(ms > 0 for ms in placement.decode_step_ms.values())
    placement.decode_step_ms = {4: 10.0}  # on CPU a batch is its own bucket
    assert placement.in_line_tokens(4) == 2048  # 5 ms of prefill within the default bound of 15 ms
    assert placement.in_line_tokens(3) == 0
    placement.prefill_fixed_ms = 2.5
    assert placement.in_line_tokens(4) == 1024
    placement.prefill_fixed_ms = 0.0
    placement.max_itl_ms = 12.0  # what pd_max_itl_ms sets
    assert placement.in_line_tokens(4) == 819


@pytest.fixture(scope="module")
def gpu_mux(model_dir):
    """gpu_mux(**options): the float32 multiplexing engine on the GPU with those options, built once for the
    module's tests (each engine profiles its splits at start-up). A test changes its placement only through
    monkeypatch, so that the next one finds it as built; statistics and prefix-cache contents carry over, and
    the tests compare counts before and after."""
    engines = {}

    def get(**options) -> LLM:
        key = tuple(sorted(options.items()))
        if key not in engines:
            engines[key] = mux_llm(model_dir, device=None, dtype="float32", **options)
        llm = engines[key]
        if not llm.loop.placement.split_by_bucket:
            pytest.skip(f"green contexts unavailable: {llm.get_pd_statistics()['partitions']}")
        return llm

    yield get
    for llm in engines.values():
        llm.exit()


@gpu
@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
def test_gpu_tokens_match_on_every_split(gpu_mux, cuda_expected, monkeypatch, options):
    """Every prepared split in turn runs the decode steps beside prefills: the tokens stay the same."""
    llm = gpu_mux(**options)
    placement, decode, prefill = llm.loop.placement, llm.loop.decode_runner, llm.loop.prefill_runner
    splits = placement.splits
    assert len(splits) >= 2 and set(decode.decode_paths.plans) == {None, *(s.decode.num_sms for s in splits)}
    assert set(prefill.prefill_plans) == {None, *(s.prefill.num_sms for s in splits)}
    chosen_per_batch = llm.get_pd_statistics()["split_per_batch"]
    assert chosen_per_batch and set(chosen_per_batch.values()) <= {s.label for s in splits}
    assert set(placement.split_by_bucket) == set(decode.decode_paths.graphs.buckets)
    for chosen in splits:
        preempted = count_preemptions(monkeypatch)
        monkeypatch.setattr(placement, "in_line_tokens", lambda batch: 0)  # every prefill beside decode on the split
        monkeypatch.setattr(placement, "fills_batch", lambda joining, running: False)
        monkeypatch.setattr(placement, "ttft_at_risk", lambda queue, split: False)
        decode_beside_every_prefill(llm, monkeypatch)
        monkeypatch.setattr(placement, "split_by_bucket", dict.fromkeys(placement.split_by_bucket, chosen))
        before = llm.get_pd_statistics()
        stats = run_and_check(llm, cuda_expected, monkeypatch, preempted, options)
        if options:  # more than one prefill batch: later ones run beside decoding sequences
            assert stats["decode_steps_per_split"][chosen.label] > before["decode_steps_per_split"].get(chosen.label, 0)
            assert stats["prefills_per_split"][chosen.label] > before["prefills_per_split"].get(chosen.label, 0)
        monkeypatch.undo()
    assert sum(stats["decode_steps_per_split"].values()) == stats["decode_steps"]
    assert set(stats["decode_steps_per_split"]) <= {FULL_GPU, *(s.label for s in splits)}
    assert set(stats["split_profiles"]) == {s.label for s in splits}
    assert all(p["decode_step_ms"] > 0 and p["prefill_ms"] > 0 for p in stats["split_profiles"].values())


@gpu
@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
def test_gpu_short_prefills_run_between_decode_steps(gpu_mux, cuda_expected, monkeypatch, options):
    """With every prefill short enough to run in line, a prefill beside decoding sequences runs on the
    whole GPU and the decode step after it waits for it: the tokens stay the same, no step uses the split."""
    llm = gpu_mux(**options)
    placement = llm.loop.placement
    monkeypatch.setattr(placement, "in_line_tokens", lambda batch: 10 ** 9)
    monkeypatch.setattr(placement, "fills_batch", lambda joining, running: False)
    preempted = count_preemptions(monkeypatch)
    decode_beside_every_prefill(llm, monkeypatch)
    before = llm.get_pd_statistics()
    stats = run_and_check(llm, cuda_expected, monkeypatch, preempted, options)
    if options:  # more than one prefill batch: later ones run beside decoding sequences
        assert stats["prefills_per_split"][IN_LINE] > before["prefills_per_split"].get(IN_LINE, 0)
    # This test's decode steps all ran on the whole GPU, and no prefill on a split.
    assert stats["decode_steps_per_split"][FULL_GPU] - before["decode_steps_per_split"].get(FULL_GPU, 0) == \
        stats["decode_steps"] - before["decode_steps"] > 0
    for split in placement.splits:
        assert stats["prefills_per_split"].get(split.label, 0) == before["prefills_per_split"].get(split.label, 0)


@gpu
def test_gpu_decode_runs_on_the_split_beside_a_prefill(gpu_mux, cuda_expected, monkeypatch):
    """With a prefill held in flight, the decode step replays the split's graphs on its partition."""
    llm = gpu_mux()
    placement = llm.loop.placement
    monkeypatch.setattr(placement, "in_line_tokens", lambda batch: 0)
    monkeypatch.setattr(placement, "fills_batch", lambda joining, running: False)
    monkeypatch.setattr(placement, "ttft_at_risk", lambda queue, split: False)
    chosen = []
    split_for = placement.split_for
    monkeypatch.setattr(placement, "split_for", lambda batch: chosen.append(split_for(batch)) or chosen[-1])
    before = llm.get_pd_statistics()
    prompts, outputs = mixed_prompts(), {}
    ids = [llm.add_request(p, GREEDY) for p in prompts[:4]]
    while not llm.scheduler.running:
        collect(llm.step(), outputs)
    ids += [llm.add_request(p, GREEDY) for p in prompts[4:]]
    runner = llm.loop.prefill_runner
    original = runner.launch
    held = []

    def launch_held(*args, **kwargs):
        step_tokens = original(*args, **kwargs)
        step_tokens.ready = lambda: False  # the prefill counts as in flight during the decode step beside it
        held.append(step_tokens)
        return step_tokens

    monkeypatch.setattr(runner, "launch", launch_held)
    collect(llm.step(), outputs)
    monkeypatch.setattr(runner, "launch", original)
    assert held
    for step_tokens in held:
        del step_tokens.ready
    while llm.has_unfinished_requests():
        collect(llm.step(), outputs)
    stats = llm.get_pd_statistics()
    assert chosen
    label = chosen[0].label
    assert stats["decode_steps_per_split"].get(label, 0) >= before["decode_steps_per_split"].get(label, 0) + 1
    assert stats["prefills_per_split"].get(label, 0) >= before["prefills_per_split"].get(label, 0) + 1
    assert [outputs[i] for i in ids] == cuda_expected
