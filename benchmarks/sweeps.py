"""The decode step swept over batches and contexts (--decode-sweep, CUDA only): the sequential forward, each
pipeline stage alone and the pipeline on each --sm-splits partition, each captured as a CUDA graph, against
the step's memory floor."""
from tqdm.auto import tqdm

from benchmarks.common import device_name, preset_model, with_engine
from benchmarks.floor import copy_bytes_per_s
from benchmarks.report import print_table
from nanovllm.engine.decode_paths import Sequential, fastest
from nanovllm.engine.graphs import DecodeGraphs
from nanovllm.modes.pipeline.extension import PipelineCandidate, StageProbe
from nanovllm.modes.pipeline.schedule import PipelineScheduler
from nanovllm.partitions.green import GreenContextManager
from nanovllm.utils.timing import median_replay_ms


def step_floor_ms(runner, batch: int, context: int, bandwidth: float, weight_reads: int = 1) -> float:
    """Fewest bytes a decode step moves (the layers' weights weight_reads times, every sequence's K
    and V once) over the copy bandwidth."""
    weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.model.layers.parameters())
    kv_bytes = batch * context * runner.kv_cache.block_bytes // runner.block_size
    return (weight_reads * weight_bytes + kv_bytes) / bandwidth * 1e3


def capture_variants(runner, graphs: DecodeGraphs, splits: list[tuple[int, int]], whole_gpu_grids: bool) -> dict:
    """name -> {batch: captured graph}: the forwards the engine's decode paths choose from or probe, and
    with whole_gpu_grids the pipeline with attention grids sized for every SM while it runs on its partition."""
    model = runner.model

    def capture(forward):
        return graphs.capture(lambda ids, pos: forward(ids, pos, graphs.context(ids.size(0))))

    variants = {c.name: capture(c.bind(model)) for c in (Sequential, StageProbe("attention"), StageProbe("ffn"))}
    for attention, ffn in splits:
        green = GreenContextManager(runner.device, attention, ffn)
        variants[f"pipe{attention}:{ffn}"] = capture(PipelineCandidate(green).bind(model))
        if whole_gpu_grids:
            streams = (green.get_attention_stream(), green.get_ffn_stream())
            variants[f"pipe{attention}:{ffn}_whole_gpu_grid"] = capture(PipelineScheduler(model, *streams).forward)
    return variants


def sweep_preset(preset: str, kv_cache_dtype: str, args, batches: list[int], contexts: list[int],
                 splits: list[tuple[int, int]], bandwidth: float) -> list[dict]:
    """Decode-step timings of one model; its engine, graphs and partitions' graphs are freed on return."""
    def sweep(llm) -> list[dict]:
        runner = llm.model_runner
        # Each micro-batch of the pipeline reads every layer's weights itself.
        micro_batches = PipelineScheduler(runner.model).micro_batches
        graphs = DecodeGraphs(batches, runner.max_blocks_per_seq, runner.device)
        variants = capture_variants(runner, graphs, splits, args.whole_gpu_grids)
        rows = []
        for batch, context in tqdm([(b, c) for b in batches for c in contexts], desc=f"decode sweep {preset}"):
            graphs.load_synthetic(batch, context, runner.kv_cache.num_blocks)
            ms = median_replay_ms({v: g[batch].replay for v, g in variants.items()}, repeats=args.repeats)
            floor = step_floor_ms(runner, batch, context, bandwidth)
            pipe_floor = step_floor_ms(runner, batch, context, bandwidth, weight_reads=len(micro_batches(batch)))
            row = {"preset": preset, "kv_cache": kv_cache_dtype, "batch": batch, "context": context,
                   "floor_ms": floor, "sequential_ms": ms["sequential"], "seq/floor": ms["sequential"] / floor,
                   "pipe_floor_ms": pipe_floor,
                   "attn_only_ms": ms["attention_only"], "ffn_only_ms": ms["ffn_only"],
                   "overlap_bound": ms["sequential"] / max(ms["attention_only"], ms["ffn_only"])}
            for name in variants:
                if name.startswith("pipe"):
                    row[f"{name}_ms"] = ms[name]
                    row[f"seq/{name}"] = ms["sequential"] / ms[name]
            rows.append(row)
        return rows

    options = dict(enforce_eager=True, max_num_seqs=max(batches), max_model_len=max(contexts) + 1,
                   max_num_batched_tokens=max(contexts) + 1, gpu_memory_utilization=args.sweep_memory,
                   kv_cache_dtype=kv_cache_dtype)
    return with_engine(preset_model(preset), options, sweep, warm_up=False)


def add_auto_column(rows: list[dict], splits: list[tuple[int, int]]) -> None:
    """What enable_pipeline=True would run at each point, by the engine's rule (engine/decode_paths.py:
    fastest) applied to every context swept at that batch."""
    for attention, ffn in splits:
        key = f"pipe{attention}:{ffn}_ms"
        for row in rows:
            same_batch = [{"sequential_ms": r["sequential_ms"], "pipeline_ms": r[key]} for r in rows
                          if (r["preset"], r["kv_cache"], r["batch"]) == (row["preset"], row["kv_cache"], row["batch"])]
            pipelined = fastest(same_batch, ["sequential", "pipeline"]) == "pipeline"
            row[f"auto{attention}:{ffn}/seq"] = (row["sequential_ms"] / row[key]) if pipelined else 1.0


def run(args) -> list[dict]:
    bandwidth = copy_bytes_per_s()
    print(f"device copy bandwidth: {bandwidth / 1e12:.2f} TB/s (read + write)")
    batches = [int(b) for b in args.batches.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    splits = [tuple(int(n) for n in s.split(":")) for s in args.sm_splits.split(",")] if args.sm_splits else []
    rows = []
    for preset in args.presets.split(","):
        for kv in args.kv_cache_dtype.split(","):
            rows += sweep_preset(preset, kv, args, batches, contexts, splits, bandwidth)
    add_auto_column(rows, splits)
    print(f"\ndecode step (CUDA graph replay, layers only, lm_head excluded), median of {args.repeats}; "
          f"device {device_name()}")
    print_table(rows, list(rows[0].keys()))
    return rows
