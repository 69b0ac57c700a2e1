"""Where a decode step's time goes (--step-profile, CUDA only): the sequential and the fused forward captured
as CUDA graphs, a few replays traced by torch.profiler, and per kernel its launches per layer, its busy
time and its share of the step's critical path. With dependent launch, kernels overlap their neighbours,
so busy times add up to more than the step; the share of the critical path is the time by which each
kernel moves the end of the step's work (its end past the latest end before it), which adds up to the
step."""
import statistics
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import device_name, preset_model, with_engine
from benchmarks.report import print_table
from benchmarks.sweeps import capture_forwards, sweep_options
from nanovllm.engine.decode_paths import Sequential
from nanovllm.engine.graphs import DecodeGraphs
from nanovllm.modes.fused_decode.extension import FusedDecodeCandidate
from nanovllm.utils.timing import median_replay_ms

TRACED_REPLAYS = 7
NAME_WIDTH = 48


@dataclass
class Kernel:
    name: str
    start_us: float
    end_us: float


def kernel_rows(kernels: list[Kernel], replays: int, layers: int) -> list[dict]:
    """Per kernel name, over `replays` equal replays of one step (kernels sorted by start): launches per layer,
    and the medians over the replays of its busy time and of its share of the critical path, per layer."""
    per_replay = len(kernels) // replays
    if per_replay == 0 or per_replay * replays != len(kernels):
        raise RuntimeError(f"--step-profile: {len(kernels)} kernels traced do not split into {replays} replays")
    busy, advance = defaultdict(list), defaultdict(list)
    for r in range(replays):
        replay = kernels[r * per_replay:(r + 1) * per_replay]
        latest_end = replay[0].start_us
        busy_r, advance_r = defaultdict(float), defaultdict(float)
        for k in replay:
            busy_r[k.name] += k.end_us - k.start_us
            advance_r[k.name] += max(0.0, k.end_us - latest_end)
            latest_end = max(latest_end, k.end_us)
        for name in busy_r:
            busy[name].append(busy_r[name])
            advance[name].append(advance_r[name])
    launches = defaultdict(int)
    for k in kernels[:per_replay]:
        launches[k.name] += 1
    rows = [{"kernel": name[:NAME_WIDTH], "launches/layer": launches[name] / layers,
             "critical_us/layer": statistics.median(advance[name]) / layers,
             "busy_us/layer": statistics.median(busy[name]) / layers} for name in launches]
    return sorted(rows, key=lambda row: -row["critical_us/layer"])


def traced_kernels(replay) -> list[Kernel]:
    """The kernels of TRACED_REPLAYS calls of replay(), each waited for, sorted by start."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(TRACED_REPLAYS):
            replay()
            torch.cuda.synchronize()
    kernels = [Kernel(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
               if e.device_type == DeviceType.CUDA]
    return sorted(kernels, key=lambda k: k.start_us)


def profile_preset(preset: str, kv_cache_dtype: str, args) -> list[dict]:
    context = args.contexts[0]

    def run(llm) -> list[dict]:
        runner = llm.model_runner
        graphs = DecodeGraphs(args.batches, runner.max_blocks_per_seq, runner.device)
        forwards = {c.name: c.bind(runner.model) for c in (Sequential, FusedDecodeCandidate)}
        captured = capture_forwards(graphs, forwards)
        layers = runner.model.num_layers
        rows = []
        for batch in args.batches:
            graphs.load_synthetic(batch, context, runner.kv_cache.num_blocks)
            step_ms = median_replay_ms({n: g[batch].replay for n, g in captured.items()}, repeats=args.repeats)
            for name, g in captured.items():
                head = {"preset": preset, "kv_cache": kv_cache_dtype, "forward": name, "batch": batch,
                        "context": context, "step_us": step_ms[name] * 1e3}
                rows += [{**head, **row} for row in kernel_rows(traced_kernels(g[batch].replay), TRACED_REPLAYS, layers)]
        return rows

    options = sweep_options(args.batches, context, args.sweep_memory, kv_cache_dtype, args.sweep_max_model_len)
    return with_engine(preset_model(preset), options, run, warm_up=False)


def run(args) -> list[dict]:
    rows = [row for preset in args.presets.split(",") for kv in args.kv_cache_dtype.split(",")
            for row in profile_preset(preset, kv, args)]
    print(f"\ndecode step kernels (CUDA graph replay, layers only, at the first of --contexts), {TRACED_REPLAYS} "
          f"replays traced; step_us: median of {args.repeats} event-timed replays, untraced; device {device_name()}")
    print("critical_us/layer: how far the kernel moves the end of the step's work; these add up to the traced step. "
          "busy_us/layer: its time running, overlaps included")
    print_table(rows, list(rows[0].keys()))
    return rows
