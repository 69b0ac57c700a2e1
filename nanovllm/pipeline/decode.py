import time

import torch

from nanovllm.engine.cuda_graph import CapturedGraph, DecodeGraphs
from nanovllm.pipeline.green_manager import GreenContextManager, GreenContextUnavailable
from nanovllm.pipeline.paths import TimingCache, pipeline_wins, setup_key
from nanovllm.pipeline.scheduler import PipelineScheduler
from nanovllm.pipeline.stats import BucketTiming, PipelineStatistics
from nanovllm.utils.context import Context
from nanovllm.utils.timing import median_replay_ms


class DecodePipeline:
    """The runner's one seam to the attention/FFN pipeline: the partitions, the pipelined forward,
    its graphs beside the sequential ones, which of the two each batch bucket replays, and the
    statistics that observe the steps."""

    @classmethod
    def create(cls, config, device: torch.device, model) -> "DecodePipeline | None":
        """The pipeline, or None (with the log lines users know) when it falls back to the sequential path."""
        attention, ffn = config.pipeline_attention_sm_count, config.pipeline_ffn_sm_count
        print(f"[ModelRunner] Initializing pipeline with Attn={attention}, FFN={ffn} SMs")
        try:
            green = GreenContextManager(device, attention, ffn)
        except GreenContextUnavailable as e:
            print(f"[GreenContextManager] Failed to initialize Green Context: {e.reason}")
            if not config.pipeline_force:
                print("[ModelRunner] Falling back to sequential execution (with CUDA graphs where enabled)")
                return None
            print("[ModelRunner] pipeline_force=True: running the micro-batch schedule on one stream, without partitions")
            return cls(config, model, None)
        print("[ModelRunner] Pipeline initialized successfully")
        return cls(config, model, green)

    def __init__(self, config, model, green: GreenContextManager | None):
        self.config = config
        self.green = green
        self.sequential_graphs: dict[int, CapturedGraph] = {}
        self.pipelined_graphs: dict[int, CapturedGraph] = {}
        sm_counts = (green.attention_sm_count, green.ffn_sm_count, green.remaining_sm_count) if green else (None,) * 3
        self.statistics = PipelineStatistics(True, config.pipeline_enable_profiling, sm_counts)
        streams = (green.get_attention_stream(), green.get_ffn_stream(), green.attention_sm_count) if green else ()
        self.scheduler = PipelineScheduler(model, *streams, statistics=self.statistics)

    @property
    def forced(self) -> bool:
        return self.config.pipeline_force

    def decode_eager(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: Context) -> torch.Tensor:
        """Logits of a pipelined step run without graphs."""
        return self.scheduler.decode_token(input_ids, positions, ctx)

    def replay(self, graph: CapturedGraph, batch: int) -> torch.Tensor:
        return self.statistics.observe(graph.replay, batch)

    def plan(self, graphs: DecodeGraphs, sequential: dict[int, CapturedGraph], num_kvcache_blocks: int,
             backend_name: str) -> dict[int, CapturedGraph]:
        """Captures the pipelined graphs and returns the graph each bucket replays."""
        start = time.perf_counter()
        pipelined = graphs.capture(self._stage(graphs, self.scheduler.forward))
        self.sequential_graphs, self.pipelined_graphs = sequential, pipelined
        print(f"[ModelRunner] captured the pipelined decode graphs in {time.perf_counter() - start:.1f} s")
        timings = self._timings(graphs, sequential, pipelined, num_kvcache_blocks, backend_name)
        self.statistics.bucket_timings = timings
        self.statistics.pipelined = {b: self.config.pipeline_force or pipeline_wins(timings.get(b, []))
                                     for b in graphs.buckets}
        chosen = sorted(b for b, p in self.statistics.pipelined.items() if p)
        print(f"[ModelRunner] decode path per batch bucket: pipeline for {chosen or 'none'}, sequential graph for the rest")
        return {b: pipelined[b] if self.statistics.pipelined[b] else sequential[b] for b in graphs.buckets}

    def _timings(self, graphs, sequential, pipelined, num_kvcache_blocks, backend_name) -> dict[int, list[BucketTiming]]:
        """Each bucket's graphs timed at a short and a long context: from the cache file of this setup
        when there is one; with profiling, always timed, the stage-only graphs too."""
        profiling, force = self.config.pipeline_enable_profiling, self.config.pipeline_force
        if force and not profiling:
            return {}
        max_len = self.config.max_model_len - 1
        context_lens = sorted({min(256, max_len), min(2048, max_len)})
        cache = None
        if not profiling:
            cache = TimingCache(setup_key(graphs.input_ids.device, self.config.hf_config, self.config.dtype,
                                          self.config.kv_cache_dtype, self.statistics.sm_counts, self.config.kvcache_block_size, backend_name,
                                          graphs.buckets, context_lens))
            cached = cache.load()
            if cached is not None:
                print(f"[ModelRunner] decode path timings read from {cache.path}: path timing skipped")
                return cached
        start = time.perf_counter()
        stages = {}
        if profiling:
            stages = {"attention_only_ms": graphs.capture(self._stage(graphs, self.scheduler.attention_only)),
                      "ffn_only_ms": graphs.capture(self._stage(graphs, self.scheduler.ffn_only))}
        timings = {}
        for bucket in graphs.buckets:
            timings[bucket] = []
            for context_len in context_lens:
                graphs.load_synthetic(bucket, context_len, num_kvcache_blocks)
                replays = {"sequential_ms": sequential[bucket].replay, "pipelined_ms": pipelined[bucket].replay,
                           **{name: stage[bucket].replay for name, stage in stages.items()}}
                timings[bucket].append(BucketTiming(context_len, **median_replay_ms(replays)))
        print(f"[ModelRunner] decode paths timed in {time.perf_counter() - start:.1f} s"
              + (f", saved to {cache.path}" if cache else ""))
        if cache:
            cache.save(timings)
        return timings

    @staticmethod
    def _stage(graphs: DecodeGraphs, stage):
        return lambda ids, pos: stage(ids, pos, graphs.context(ids.size(0)))

    def close(self) -> None:
        """Drops the graphs; the partitions stay for the next engine (see green_manager)."""
        self.sequential_graphs, self.pipelined_graphs = {}, {}
