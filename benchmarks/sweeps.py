"""The decode step swept over batches and contexts (--decode-sweep, CUDA only): the sequential forward, the
fused decode forward, each pipeline stage alone and the pipeline on each
--sm-splits partition, each captured as a CUDA graph, against the step's memory floor; and the launches
per layer of each forward."""
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from tqdm.auto import tqdm

from benchmarks.common import device_name, preset_model, with_engine
from benchmarks.floor import copy_bytes_per_s, step_floor_ms
from benchmarks.report import print_table
from nanovllm.engine.decode_paths import SEQUENTIAL, Sequential, fastest
from nanovllm.engine.graphs import DecodeGraphs
from nanovllm.modes.fused_decode.extension import FUSED, FusedDecodeCandidate
from nanovllm.modes.pipeline.extension import PipelineCandidate, StageProbe
from nanovllm.modes.pipeline.schedule import PipelineScheduler
from nanovllm.partitions.green import GreenContextManager
from nanovllm.utils.timing import median_replay_ms

STAGE_PROBES = (StageProbe("attention"), StageProbe("ffn"))


def variant_forwards(runner, splits: list[tuple[int, int]], whole_gpu_grids: bool) -> dict:
    """name -> forward(input_ids, positions, ctx): the forwards the engine's decode paths choose from or probe,
    and with whole_gpu_grids the pipeline with attention grids sized for every SM while it runs on its
    partition."""
    model = runner.model
    forwards = {c.name: c.bind(model) for c in (Sequential, FusedDecodeCandidate, *STAGE_PROBES)}
    for attention, ffn in splits:
        green = GreenContextManager(runner.device, attention, ffn)
        forwards[f"pipe{attention}:{ffn}"] = PipelineCandidate(green).bind(model)
        if whole_gpu_grids:
            streams = (green.get_attention_stream(), green.get_ffn_stream())
            forwards[f"pipe{attention}:{ffn}_whole_gpu_grid"] = PipelineScheduler(model, *streams).forward
    return forwards


def device_launches(run) -> int:
    """The kernels, copies and memsets run() puts on the GPU, counted by the profiler; run() runs once
    before, so that lazy initialisation and autotuning are not counted."""
    run()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    return sum(event.device_type == DeviceType.CUDA for event in prof.events())


def capture_forwards(graphs: DecodeGraphs, forwards: dict) -> dict:
    """name -> bucket -> the CUDA graph of forward(input_ids, positions, ctx) on the graphs' static inputs."""
    return {name: graphs.capture(lambda ids, pos, f=forward: f(ids, pos, graphs.context(ids.size(0))))
            for name, forward in forwards.items()}


def sweep_options(batches: list[int], max_context: int, memory: float, kv_cache_dtype: str = "auto",
                  max_model_len: int | None = None) -> dict:
    """The options of an engine that serves as the model, weights and KV cache of decode steps captured
    here, up to max(batches) sequences of max_context tokens; it captures no graphs of its own. max_model_len
    (default max_context + 1) sets the block tables' width, and with it the decode attention's split count
    where few sequences decode."""
    max_model_len = max_model_len or max_context + 1
    return dict(enforce_eager=True, max_num_seqs=max(batches), max_model_len=max_model_len,
                max_num_batched_tokens=max_model_len, gpu_memory_utilization=memory, kv_cache_dtype=kv_cache_dtype)


def launches_per_layer(runner, graphs: DecodeGraphs, forwards: dict, context: int) -> dict[str, float]:
    """name -> the device launches of one eager step of batch 1 at `context`, over the layers; not for the
    stage probes, which run half of each layer."""
    graphs.load_synthetic(1, context, runner.kv_cache.num_blocks)
    inputs = graphs.input_ids[:1], graphs.positions[:1], graphs.context(1)
    probes = {p.name for p in STAGE_PROBES}
    return {name: device_launches(lambda: forward(*inputs)) / runner.model.num_layers
            for name, forward in forwards.items() if name not in probes}


def sweep_preset(preset: str, kv_cache_dtype: str, args, splits: list[tuple[int, int]], bandwidth: float) -> list[dict]:
    """Decode-step timings of one model at args.batches and args.contexts; its engine, graphs and partitions'
    graphs are freed on return."""
    batches, contexts = args.batches, args.contexts
    def sweep(llm) -> list[dict]:
        runner = llm.model_runner
        # Each micro-batch of the pipeline reads every layer's weights itself.
        micro_batches = PipelineScheduler(runner.model).micro_batches
        graphs = DecodeGraphs(batches, runner.max_blocks_per_seq, runner.device)
        forwards = variant_forwards(runner, splits, args.whole_gpu_grids)
        variants = capture_forwards(graphs, forwards)
        launches = launches_per_layer(runner, graphs, forwards, contexts[0])
        rows = []
        for batch, context in tqdm([(b, c) for b in batches for c in contexts], desc=f"decode sweep {preset}"):
            graphs.load_synthetic(batch, context, runner.kv_cache.num_blocks)
            ms = median_replay_ms({v: g[batch].replay for v, g in variants.items()}, repeats=args.repeats)
            floor = step_floor_ms(runner, batch, context, bandwidth)
            pipe_floor = step_floor_ms(runner, batch, context, bandwidth, weight_reads=len(micro_batches(batch)))
            row = {"preset": preset, "kv_cache": kv_cache_dtype, "batch": batch, "context": context,
                   "floor_ms": floor, "sequential_ms": ms[SEQUENTIAL], "seq/floor": ms[SEQUENTIAL] / floor}
            if FUSED in ms:
                row.update({"fused_ms": ms[FUSED], "fused/floor": ms[FUSED] / floor})
            row.update({"pipe_floor_ms": pipe_floor, "attn_only_ms": ms["attention_only"],
                        "ffn_only_ms": ms["ffn_only"],
                        "overlap_bound": ms[SEQUENTIAL] / max(ms["attention_only"], ms["ffn_only"])})
            for name in variants:
                if name.startswith("pipe"):
                    row[f"{name}_ms"] = ms[name]
                    row[f"seq/{name}"] = ms[SEQUENTIAL] / ms[name]
            row.update({f"{name}_launches/layer": n for name, n in launches.items()})
            rows.append(row)
        return rows

    options = sweep_options(batches, max(contexts), args.sweep_memory, kv_cache_dtype, args.sweep_max_model_len)
    return with_engine(preset_model(preset), options, sweep, warm_up=False)


def same_batch(rows: list[dict], row: dict) -> list[dict]:
    """The rows of every context swept at this row's model, cache and batch."""
    key = ("preset", "kv_cache", "batch")
    return [r for r in rows if all(r[k] == row[k] for k in key)]


def add_auto_columns(rows: list[dict], splits: list[tuple[int, int]]) -> None:
    """By the engine's rule (engine/decode_paths.py: fastest) applied to every context swept at each batch:
    the path the default engine would replay among the sequential and the fused forward, and what
    enable_pipeline=True would run on each split."""
    for row in rows:
        row["auto_path"] = fastest(same_batch(rows, row), [n for n in (SEQUENTIAL, FUSED) if f"{n}_ms" in row])
    for attention, ffn in splits:
        key = f"pipe{attention}:{ffn}_ms"
        for row in rows:
            timings = [{"sequential_ms": r["sequential_ms"], "pipeline_ms": r[key]} for r in same_batch(rows, row)]
            pipelined = fastest(timings, [SEQUENTIAL, "pipeline"]) == "pipeline"
            row[f"auto{attention}:{ffn}/seq"] = (row["sequential_ms"] / row[key]) if pipelined else 1.0


def run(args) -> list[dict]:
    bandwidth = copy_bytes_per_s()
    print(f"device copy bandwidth: {bandwidth / 1e12:.2f} TB/s (read + write)")
    splits = [tuple(int(n) for n in s.split(":")) for s in args.sm_splits.split(",")] if args.sm_splits else []
    rows = []
    for preset in args.presets.split(","):
        for kv in args.kv_cache_dtype.split(","):
            rows += sweep_preset(preset, kv, args, splits, bandwidth)
    add_auto_columns(rows, splits)
    print(f"\ndecode step (CUDA graph replay, layers only, lm_head excluded), median of {args.repeats}; "
          f"device {device_name()}")
    print("auto_path: the forward the engine's rule (decode_paths.fastest) picks at that batch from the sequential and "
          "the fused one, over the contexts swept; auto<split>/seq: likewise for the pipeline, its speed-up")
    print(f"*_launches/layer: kernels, copies and memsets of one eager forward of batch 1 at context "
          f"{args.contexts[0]} (torch.profiler), over the layers; the embedding and final norm included, "
          "lm_head excluded")
    print_table(rows, list(rows[0].keys()))
    return rows
