import time
from contextlib import contextmanager

import torch
import torch.distributed as dist

from nanovllm.attention.backend import select_backend
from nanovllm.config import Config
from nanovllm.engine.cuda_graph import DecodeGraphs, batch_buckets, sequential_forward
from nanovllm.engine.green_manager import GreenContextManager, GreenContextUnavailable
from nanovllm.engine.pipeline_scheduler import PipelineScheduler
from nanovllm.engine.pipeline_stats import PipelineStatistics, median_replay_ms
from nanovllm.engine.sequence import Sequence
from nanovllm.layers.attention import Attention
from nanovllm.layers.sampler import Sampler
from nanovllm.models.qwen3 import Qwen3ForCausalLM
from nanovllm.utils.context import Context, reset_context, set_context
from nanovllm.utils.loader import load_model

CPU_KV_CACHE_BYTES = 1 << 30


@contextmanager
def default_device_and_dtype(device: torch.device, dtype: torch.dtype):
    old_device, old_dtype = torch.get_default_device(), torch.get_default_dtype()
    torch.set_default_device(device)
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_device(old_device)
        torch.set_default_dtype(old_dtype)


class ModelRunner:
    """Owns one device's model shard, KV cache, attention backend, decode graphs and sampler."""

    def __init__(self, config: Config, device: torch.device, rank: int = 0, dist_init_method: str | None = None):
        self.config = config
        self.device = device
        self.rank = rank
        self.world_size = config.tensor_parallel_size
        self.block_size = config.kvcache_block_size
        if self.world_size > 1:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=dist_init_method,
                                    world_size=self.world_size, rank=rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        self.backend = select_backend(config.attention_backend, device, self.block_size)
        self.green = self._init_green_contexts() if config.enable_pipeline else None
        with default_device_and_dtype(device, config.dtype):
            self.model = Qwen3ForCausalLM(config.hf_config)
        self.load_weights()
        self.pipeline = None
        if self.green is not None:
            self.pipeline = PipelineScheduler(self.model, self.green.get_attention_stream(), self.green.get_ffn_stream())
        elif config.enable_pipeline and config.pipeline_force:
            print("[ModelRunner] pipeline_force=True: running the micro-batch schedule on one stream, without partitions")
            self.pipeline = PipelineScheduler(self.model)
        self.pipeline_stats = PipelineStatistics(self.pipeline is not None, config.pipeline_enable_profiling,
                                                 self._sm_counts())
        self.sampler = Sampler()
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        for layer in self.attention_layers:
            layer.backend = self.backend
        self.max_blocks_per_seq = -(-config.max_model_len // self.block_size)
        self.num_kvcache_blocks = self.allocate_kv_cache()
        if device.type == "cuda":
            # Compiles the sampling kernels now rather than inside the first request.
            self.sampler(torch.zeros(2, config.hf_config.vocab_size, dtype=config.dtype, device=device),
                         torch.tensor([0.0, 1.0], device=device))
        self.graphs = None
        if device.type == "cuda" and not config.enforce_eager:
            self.capture_cudagraphs()

    # ---- start-up -------------------------------------------------------------------------------

    def load_weights(self) -> None:
        load_model(self.model, self.config.model)

    def _init_green_contexts(self) -> GreenContextManager | None:
        attention, ffn = self.config.pipeline_attention_sm_count, self.config.pipeline_ffn_sm_count
        print(f"[ModelRunner] Initializing pipeline with Attn={attention}, FFN={ffn} SMs")
        try:
            green = GreenContextManager(self.device, attention, ffn)
        except GreenContextUnavailable as e:
            print(f"[GreenContextManager] Failed to initialize Green Context: {e.reason}")
            if not self.config.pipeline_force:
                print("[ModelRunner] Falling back to sequential execution (with CUDA graphs where enabled)")
            return None
        print("[ModelRunner] Pipeline initialized successfully")
        return green

    def _sm_counts(self) -> dict:
        if self.green is None:
            return {"attention_sm_count": None, "ffn_sm_count": None, "remaining_sm_count": None}
        return {"attention_sm_count": self.green.attention_sm_count, "ffn_sm_count": self.green.ffn_sm_count,
                "remaining_sm_count": self.green.remaining_sm_count}

    def warmup(self) -> None:
        """A prefill of a full token budget, so that the peak activation memory can be measured."""
        budget = self.config.max_num_batched_tokens
        seq_len = min(self.config.max_model_len, budget)
        lengths = [seq_len] * (budget // seq_len) + ([budget % seq_len] if budget % seq_len else [])
        cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        positions = torch.cat([torch.arange(n) for n in lengths])
        set_context(Context(is_prefill=True, cu_seqlens_q=cu.to(self.device), cu_seqlens_k=cu.to(self.device),
                            max_seqlen_q=seq_len, max_seqlen_k=seq_len))
        self.model.compute_logits(self.model(torch.zeros(budget, dtype=torch.int64, device=self.device),
                                             positions.to(self.device))[cu[1:].long() - 1])
        reset_context()

    def allocate_kv_cache(self) -> int:
        hf = self.config.hf_config
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        num_kv_heads = hf.num_key_value_heads // self.world_size
        block_shape = (hf.num_hidden_layers, 2, self.block_size, num_kv_heads, head_dim)
        block_bytes = torch.Size(block_shape).numel() * self.config.dtype.itemsize
        num_blocks = self.config.num_kvcache_blocks
        if num_blocks == -1:
            num_blocks = self._blocks_that_fit(block_bytes)
        if self.world_size > 1:
            agreed = torch.tensor([num_blocks], device=self.device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
            num_blocks = int(agreed.item())
        if num_blocks < self.max_blocks_per_seq:
            raise ValueError(f"the KV cache holds {num_blocks} blocks of {self.block_size} tokens, fewer than one "
                             f"sequence of max_model_len={self.config.max_model_len} needs ({self.max_blocks_per_seq}); "
                             "lower max_model_len or max_num_batched_tokens, or raise gpu_memory_utilization")
        # One extra block absorbs the writes of padded slots (-1) that some backends do not skip.
        # Zeroed, because masked-out positions still enter softmax(scores) @ V with weight 0, and
        # 0 * NaN from uninitialised memory would poison the output.
        self.kv_cache = torch.zeros((num_blocks + 1, *block_shape), dtype=self.config.dtype, device=self.device)
        for i, layer in enumerate(self.attention_layers):
            layer.k_cache, layer.v_cache = self.kv_cache[:, i, 0], self.kv_cache[:, i, 1]
        return num_blocks

    def _blocks_that_fit(self, block_bytes: int) -> int:
        if self.device.type == "cpu":
            return max(self.max_blocks_per_seq, CPU_KV_CACHE_BYTES // block_bytes)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        self.warmup()
        free, total = torch.cuda.mem_get_info(self.device)
        stats = torch.cuda.memory_stats(self.device)
        activation_peak = stats["allocated_bytes.all.peak"] - stats["allocated_bytes.all.current"]
        usable = total * self.config.gpu_memory_utilization - (total - free) - activation_peak
        num_blocks = max(int(usable) // block_bytes - 1, 0)
        if self.rank == 0:
            print(f"[ModelRunner] warm-up in {time.perf_counter() - start:.1f} s: activation peak "
                  f"{activation_peak / 2 ** 30:.2f} GiB, room for {num_blocks} KV blocks of {self.block_size} tokens "
                  f"({num_blocks * block_bytes / 2 ** 30:.1f} GiB)")
        return num_blocks

    def capture_cudagraphs(self) -> None:
        start = time.perf_counter()
        max_batch = min(self.config.max_num_seqs, 512)
        self.graphs = DecodeGraphs(batch_buckets(max_batch), self.max_blocks_per_seq, self.device)
        self.graphs.capture("sequential", sequential_forward(self.model, self.graphs))
        variants = ["sequential"]
        if self.pipeline is not None:
            for variant in self._pipeline_variants():
                stage = getattr(self.pipeline, "forward" if variant == "pipeline" else variant)
                self.graphs.capture(variant, lambda ids, pos, stage=stage: stage(ids, pos, self.graphs.context(ids.size(0))))
            variants.append("pipeline")
        if self.rank == 0:
            print(f"[ModelRunner] captured {len(self.graphs.buckets)} decode CUDA graphs per variant "
                  f"{variants} (batch 1..{max_batch}) in {time.perf_counter() - start:.1f} s")
        if self.pipeline is not None:
            self.choose_decode_paths()

    def _pipeline_variants(self) -> tuple[str, ...]:
        # The stage-only graphs exist for the statistics' per-stage times, so only with profiling.
        return ("pipeline", "attention_only", "ffn_only") if self.config.pipeline_enable_profiling else ("pipeline",)

    def choose_decode_paths(self) -> None:
        """Times the sequential and the pipelined graph of every bucket at a short and a long context
        and keeps the pipeline only where it wins at both (or everywhere, with pipeline_force)."""
        start = time.perf_counter()
        context_lens = sorted({min(256, self.config.max_model_len - 1), min(2048, self.config.max_model_len - 1)})
        for bucket in self.graphs.buckets:
            timings = {}
            for context_len in context_lens:
                self.graphs.load_synthetic(bucket, context_len, self.num_kvcache_blocks)
                variants = ("sequential", *self._pipeline_variants())
                medians = median_replay_ms({v: lambda v=v: self.graphs.replay(v, bucket) for v in variants})
                timings.update({f"{v}@{context_len}": t for v, t in medians.items()})
            wins = all(timings[f"pipeline@{n}"] < timings[f"sequential@{n}"] for n in context_lens)
            path = "pipeline" if wins or self.config.pipeline_force else "sequential"
            self.pipeline_stats.paths[bucket] = path
            self.pipeline_stats.bucket_timings[bucket] = timings
        pipelined = [b for b, p in self.pipeline_stats.paths.items() if p == "pipeline"]
        print(f"[ModelRunner] decode path per batch bucket chosen in {time.perf_counter() - start:.1f} s: "
              f"pipeline for {pipelined or 'none'}, sequential graph for the rest")

    # ---- one step -------------------------------------------------------------------------------

    def _slots(self, seq: Sequence, positions: range) -> list[int]:
        table, size = seq.block_table, self.block_size
        return [table[p // size] * size + p % size for p in positions]

    def _block_tables(self, seqs: list[Sequence]) -> torch.Tensor:
        width = max(len(seq.block_table) for seq in seqs)
        return torch.tensor([seq.block_table + [-1] * (width - len(seq.block_table)) for seq in seqs],
                            dtype=torch.int32)

    def prepare_prefill(self, seqs: list[Sequence]):
        input_ids, positions, slots, cu_q, cu_k = [], [], [], [0], [0]
        for seq in seqs:
            span = seq.scheduled_positions
            input_ids.extend(seq.token_ids[span.start:span.stop])
            positions.extend(span)
            slots.extend(self._slots(seq, span))
            cu_q.append(cu_q[-1] + len(span))
            cu_k.append(cu_k[-1] + span.stop)
        has_prefix = any(seq.num_computed_tokens > 0 for seq in seqs)
        ctx = Context(is_prefill=True, cu_seqlens_q=self._to_device(cu_q, torch.int32),
                      cu_seqlens_k=self._to_device(cu_k, torch.int32),
                      max_seqlen_q=max(len(s.scheduled_positions) for s in seqs),
                      max_seqlen_k=max(s.scheduled_positions.stop for s in seqs),
                      slot_mapping=self._to_device(slots, torch.int64),
                      block_tables=self._block_tables(seqs).to(self.device) if has_prefix else None)
        last_indices = self._to_device(cu_q[1:], torch.int64) - 1
        return self._to_device(input_ids, torch.int64), self._to_device(positions, torch.int64), ctx, last_indices

    def prepare_decode(self, seqs: list[Sequence]):
        positions = [seq.num_tokens - 1 for seq in seqs]
        ctx = Context(is_prefill=False,
                      slot_mapping=self._to_device([self._slots(s, [p])[0] for s, p in zip(seqs, positions)], torch.int64),
                      context_lens=self._to_device([seq.num_tokens for seq in seqs], torch.int32),
                      block_tables=self._block_tables(seqs).to(self.device))
        return self._to_device([seq.last_token for seq in seqs], torch.int64), self._to_device(positions, torch.int64), ctx

    def _to_device(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        t = torch.tensor(values, dtype=dtype)
        return t.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else t

    def run(self, seqs: list[Sequence], is_prefill: bool) -> list[int] | None:
        token_ids = self.sample(seqs, is_prefill)
        return None if token_ids is None else token_ids.tolist()

    @torch.inference_mode()
    def sample(self, seqs: list[Sequence], is_prefill: bool) -> torch.Tensor | None:
        """Launches a batch and returns its sampled token ids on the device without waiting for them
        (None on ranks > 0); its work goes to the current stream."""
        if is_prefill:
            input_ids, positions, ctx, last_indices = self.prepare_prefill(seqs)
            set_context(ctx)
            logits = self.model.compute_logits(self.model(input_ids, positions)[last_indices])
        else:
            logits = self.decode_logits(*self.prepare_decode(seqs))
        reset_context()
        if self.rank != 0:
            return None
        temperatures = self._to_device([seq.temperature for seq in seqs], torch.float32)
        return self.sampler(logits, temperatures)

    def decode_logits(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: Context) -> torch.Tensor:
        batch = input_ids.size(0)
        if self.graphs is None or batch > self.graphs.buckets[-1]:
            self.pipeline_stats.total_tokens += batch
            if self.pipeline is not None and self.config.pipeline_force:
                return self.pipeline.decode_token(input_ids, positions, ctx)
            set_context(ctx)
            return self.model.compute_logits(self.model(input_ids, positions))
        bucket = self.graphs.load(input_ids, positions, ctx.slot_mapping, ctx.context_lens, ctx.block_tables)
        events = self.pipeline_stats.start_step()
        hidden = self.graphs.replay(self.pipeline_stats.paths.get(bucket, "sequential"), bucket)
        self.pipeline_stats.end_step(bucket, batch, events)
        return self.model.compute_logits(hidden[:batch])

    def get_pipeline_statistics(self) -> dict:
        return self.pipeline_stats.as_dict()

    def print_pipeline_statistics(self) -> None:
        self.pipeline_stats.print()
