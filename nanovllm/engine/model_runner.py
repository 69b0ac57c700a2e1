import time
from contextlib import contextmanager

import torch
import torch.distributed as dist

from nanovllm.attention.selector import select_backend
from nanovllm.config import Config
from nanovllm.engine.cuda_graph import CapturedGraph, DecodeGraphs, batch_buckets, sequential_forward
from nanovllm.engine.decode_inputs import DecodeInputs
from nanovllm.engine.kv_calibration import (CALIBRATION_SEQ_LEN, CALIBRATION_TOKENS, record_kv_amax,
                                            scales_from_amax)
from nanovllm.engine.prefill_graphs import PrefillGraphs, prefill_buckets
from nanovllm.engine.sampled_tokens import SampledTokens
from nanovllm.engine.sampling_inputs import sampling_inputs
from nanovllm.engine.sequence import Sequence
from nanovllm.layers.attention import Attention
from nanovllm.layers.sampler import Sampler
from nanovllm.models.qwen3 import Qwen3ForCausalLM
from nanovllm.pipeline.decode import DecodePipeline
from nanovllm.pipeline.stats import PipelineStatistics
from nanovllm.utils.context import Context, reset_context, set_context
from nanovllm.utils.loader import load_model

CPU_KV_CACHE_BYTES = 1 << 30


@contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


class ModelRunner:
    """Owns one device's model shard, KV cache, attention backend, decode graphs and sampler."""

    def __init__(self, config: Config, device: torch.device, rank: int = 0, dist_init_method: str | None = None):
        self.config = config
        self.device = device
        self.rank = rank
        self.world_size = config.tensor_parallel_size
        self.block_size = config.kvcache_block_size
        self.max_blocks_per_seq = -(-config.max_model_len // self.block_size)
        self.join_devices(dist_init_method)
        self.quantized_kv = config.kv_cache_dtype != "auto"
        self.backend = select_backend(config.attention_backend, device, self.block_size, self.quantized_kv)
        self.model = self.load_model()
        self.pipeline = DecodePipeline.create(config, device, self.model) if config.enable_pipeline else None
        self.sampler = Sampler()
        # Async scheduling: the last step's sampled tokens on the device, and each sequence's row in them.
        self.sampled: torch.Tensor | None = None
        self.sampled_rows: dict[int, int] = {}
        self.decode_inputs = (DecodeInputs(config.max_num_seqs, self.max_blocks_per_seq, self.block_size, device)
                              if config.async_scheduling else None)
        self.kv_scales = self.calibrate_kv_scales() if self.quantized_kv else None
        num_blocks = config.num_kvcache_blocks if config.num_kvcache_blocks != -1 else self.kv_blocks_that_fit()
        self.num_kvcache_blocks = self.allocate_kv_cache(num_blocks)
        self.graphs: DecodeGraphs | None = None
        self.decode_plan: dict[int, CapturedGraph] = {}
        self.prefill_graphs: PrefillGraphs | None = None
        self.prefill_plan: dict[int, CapturedGraph] = {}
        if device.type == "cuda":
            # Compiles the prefill and sampling kernels now rather than inside the first requests.
            self.warm_up_paged_prefill()
            self.sampler.warm_up(config.hf_config.vocab_size, config.dtype, device)
            if not config.enforce_eager:
                self.capture_cudagraphs()

    # ---- start-up -------------------------------------------------------------------------------

    def join_devices(self, dist_init_method: str | None) -> None:
        if self.world_size > 1:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo", init_method=dist_init_method,
                                    world_size=self.world_size, rank=self.rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def load_model(self) -> Qwen3ForCausalLM:
        model = self.build_model()
        for layer in model.modules():
            if isinstance(layer, Attention):
                layer.backend = self.backend
        return model

    def build_model(self) -> Qwen3ForCausalLM:
        """The model on this runner's device with the checkpoint's weights."""
        # A scoped device context: the global default device would stay installed as a torch mode.
        with torch.device(self.device), default_dtype(self.config.dtype):
            model = Qwen3ForCausalLM(self.config.hf_config)
        load_model(model, self.config.model)
        return model

    def attention_layers(self) -> list[Attention]:
        return [m for m in self.model.modules() if isinstance(m, Attention)]

    def warmup(self, num_tokens: int | None = None, seq_len: int | None = None) -> None:
        """A prefill of num_tokens random tokens (default: a full token budget) in sequences of seq_len
        (default: max_model_len) without a KV cache, so that the peak activation memory or the ranges of
        keys and values can be measured."""
        budget = num_tokens or self.config.max_num_batched_tokens
        seq_len = min(seq_len or self.config.max_model_len, budget)
        lengths = [seq_len] * (budget // seq_len) + ([budget % seq_len] if budget % seq_len else [])
        cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        positions = torch.cat([torch.arange(n) for n in lengths])
        # The same tokens on every rank; zeros would give keys and values unlike any real prompt's.
        generator = torch.Generator().manual_seed(0)
        input_ids = torch.randint(self.config.hf_config.vocab_size, (budget,), generator=generator)
        set_context(Context(is_prefill=True, cu_seqlens_q=cu.to(self.device), cu_seqlens_k=cu.to(self.device),
                            max_seqlen_q=seq_len, max_seqlen_k=seq_len))
        self.model.compute_logits(self.model(input_ids.to(self.device), positions.to(self.device))[cu[1:].long() - 1])
        reset_context()

    def kv_block_shape(self) -> tuple[int, ...]:
        hf = self.config.hf_config
        return (hf.num_hidden_layers, 2, self.block_size, hf.num_key_value_heads // self.world_size, hf.head_dim)

    def kv_block_bytes(self) -> int:
        return torch.Size(self.kv_block_shape()).numel() * self.config.kv_dtype.itemsize

    @torch.no_grad()  # scales are ordinary tensors: a tool may set them
    def calibrate_kv_scales(self) -> torch.Tensor:
        """Per-head scales [layers, 2, kv_heads] of a float8 KV cache from a prefill of random tokens,
        independent of the batching and length options."""
        layers = self.attention_layers()
        seq_len = min(CALIBRATION_SEQ_LEN, self.config.hf_config.max_position_embeddings)
        with record_kv_amax(layers, self.kv_block_shape()[3], self.device) as amax:
            self.warmup(CALIBRATION_TOKENS, seq_len)
        return scales_from_amax(amax)

    def kv_blocks_that_fit(self) -> int:
        """KV blocks that fit beside the weights and the activation peak of a warm-up prefill."""
        if self.device.type == "cpu":
            return max(self.max_blocks_per_seq, CPU_KV_CACHE_BYTES // self.kv_block_bytes())
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        self.warmup()
        free, total = torch.cuda.mem_get_info(self.device)
        stats = torch.cuda.memory_stats(self.device)
        activation_peak = stats["allocated_bytes.all.peak"] - stats["allocated_bytes.all.current"]
        usable = total * self.config.gpu_memory_utilization - (total - free) - activation_peak
        num_blocks = max(int(usable) // self.kv_block_bytes() - 1, 0)
        if self.rank == 0:
            print(f"[ModelRunner] warm-up in {time.perf_counter() - start:.1f} s: activation peak "
                  f"{activation_peak / 2 ** 30:.2f} GiB, room for {num_blocks} KV blocks of {self.block_size} tokens "
                  f"({num_blocks * self.kv_block_bytes() / 2 ** 30:.1f} GiB)")
        return num_blocks

    def allocate_kv_cache(self, num_blocks: int) -> int:
        """Allocates num_blocks KV blocks (the least of all ranks') and returns how many there are."""
        if self.world_size > 1:
            agreed = torch.tensor([num_blocks], device=self.device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
            num_blocks = int(agreed.item())
        if num_blocks < self.max_blocks_per_seq:  # sized from memory: options were checked in Config
            raise ValueError(f"the KV cache holds {num_blocks} blocks of {self.block_size} tokens, fewer than one "
                             f"sequence of max_model_len={self.config.max_model_len} needs ({self.max_blocks_per_seq}); "
                             "lower max_model_len or max_num_batched_tokens, or raise gpu_memory_utilization")
        # One extra block absorbs the writes of padded slots (-1) that some backends do not skip.
        # Zeroed, because masked-out positions still enter softmax(scores) @ V with weight 0, and
        # 0 * NaN from uninitialised memory would poison the output.
        self.kv_cache = torch.zeros((num_blocks + 1, *self.kv_block_shape()), dtype=self.config.kv_dtype,
                                    device=self.device)
        layers = self.attention_layers()
        for i, layer in enumerate(layers):
            layer.k_cache, layer.v_cache = self.kv_cache[:, i, 0], self.kv_cache[:, i, 1]
            layer.kv_scales = None if self.kv_scales is None else self.kv_scales[i]
        if self.rank == 0:
            dtype = str(self.config.kv_dtype).removeprefix("torch.")
            print(f"[ModelRunner] KV cache: {num_blocks} blocks of {self.block_size} tokens = "
                  f"{num_blocks * self.block_size} tokens, {self.config.kv_cache_dtype} ({dtype}), "
                  f"{num_blocks * self.kv_block_bytes() / 2 ** 30:.2f} GiB")
        return num_blocks

    @torch.inference_mode()
    def warm_up_paged_prefill(self) -> None:
        """A one-token prefill behind a cached block, storing nothing (slot -1): the kernels of a prompt
        that continues a chunk or hits the prefix cache compile now, not in the middle of serving, where
        they stalled the first such prefill for up to a second."""
        def on_device(values, dtype):
            return torch.tensor(values, dtype=dtype, device=self.device)

        block = self.block_size
        set_context(Context(is_prefill=True, cu_seqlens_q=on_device([0, 1], torch.int32),
                            cu_seqlens_k=on_device([0, block + 1], torch.int32), max_seqlen_q=1,
                            max_seqlen_k=block + 1, slot_mapping=on_device([-1], torch.int64),
                            block_tables=on_device([[0, 1]], torch.int32)))  # the cache has at least 2 blocks
        self.model.compute_logits(self.model(on_device([0], torch.int64), on_device([0], torch.int64)))
        reset_context()

    def capture_cudagraphs(self) -> None:
        self.capture_decode_graphs()
        self.capture_prefill_graphs()

    def capture_decode_graphs(self) -> None:
        start = time.perf_counter()
        max_batch = min(self.config.max_num_seqs, 512)
        self.graphs = DecodeGraphs(batch_buckets(max_batch), self.max_blocks_per_seq, self.device)
        self.decode_plan = self.graphs.capture(sequential_forward(self.model, self.graphs))
        if self.rank == 0:
            print(f"[ModelRunner] captured {len(self.graphs.buckets)} decode CUDA graphs (batch 1..{max_batch}) "
                  f"in {time.perf_counter() - start:.1f} s")
        if self.pipeline is not None:
            self.decode_plan = self.pipeline.plan(self.graphs, self.decode_plan, self.num_kvcache_blocks,
                                                  self.backend.name)

    def capture_prefill_graphs(self) -> None:
        """Prefill graphs at bucketed token counts, where the attention backend can run in one."""
        if not self.backend.captures_prefill:
            return
        start = time.perf_counter()
        self.prefill_graphs = PrefillGraphs(prefill_buckets(self.config.max_num_batched_tokens),
                                            self.config.max_num_seqs, self.max_blocks_per_seq, self.device)
        self.prefill_plan = self.prefill_graphs.capture(self.model)
        if self.rank == 0:
            buckets = self.prefill_graphs.buckets
            print(f"[ModelRunner] captured {len(buckets)} prefill CUDA graphs ({buckets[0]}..{buckets[-1]} tokens) "
                  f"in {time.perf_counter() - start:.1f} s")

    def close(self) -> None:
        """Frees the CUDA graphs and their memory pools."""
        self.graphs, self.decode_plan = None, {}
        self.prefill_graphs, self.prefill_plan = None, {}
        if self.pipeline is not None:
            self.pipeline.close()

    # ---- one step -------------------------------------------------------------------------------

    def _slots(self, seq: Sequence, positions: range) -> list[int]:
        table, size = seq.block_table, self.block_size
        return [table[p // size] * size + p % size for p in positions]

    def _block_tables(self, seqs: list[Sequence]) -> torch.Tensor:
        width = max(len(seq.block_table) for seq in seqs)
        return self._to_device([seq.block_table + [-1] * (width - len(seq.block_table)) for seq in seqs], torch.int32)

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
                      block_tables=self._block_tables(seqs) if has_prefix else None)
        last_indices = self._to_device(cu_q[1:], torch.int64) - 1
        return self._to_device(input_ids, torch.int64), self._to_device(positions, torch.int64), ctx, last_indices

    def prepare_decode(self, seqs: list[Sequence]):
        positions = [seq.num_tokens - 1 for seq in seqs]
        ctx = Context(is_prefill=False,
                      slot_mapping=self._to_device([self._slots(s, [p])[0] for s, p in zip(seqs, positions)], torch.int64),
                      context_lens=self._to_device([seq.num_tokens for seq in seqs], torch.int32),
                      block_tables=self._block_tables(seqs))
        return self._to_device([seq.last_token for seq in seqs], torch.int64), self._to_device(positions, torch.int64), ctx

    def prepare_decode_ahead(self, seqs: list[Sequence]):
        """prepare_decode for async scheduling, from persistent buffers: a PENDING_TOKEN input is the
        token that the previous step sampled for that sequence, still on the device."""
        input_ids, rows, positions, slot_mapping, context_lens, block_tables = self.decode_inputs.prepare(
            seqs, self.sampled_rows)
        if rows is not None:
            input_ids = torch.where(rows >= 0, self.sampled[rows.clamp(min=0)], input_ids)
        ctx = Context(is_prefill=False, slot_mapping=slot_mapping, context_lens=context_lens, block_tables=block_tables)
        return input_ids, positions, ctx

    def _to_device(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        t = torch.tensor(values, dtype=dtype)
        return t.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else t

    def run(self, seqs: list[Sequence], is_prefill: bool) -> list[int] | SampledTokens | None:
        """Runs a batch and returns its sampled token ids (None on ranks > 0): a list, or with async
        scheduling a SampledTokens whose tolist() waits for them."""
        token_ids = self.sample(seqs, is_prefill)
        if token_ids is None:
            return None
        return SampledTokens(token_ids) if self.config.async_scheduling else token_ids.tolist()

    @torch.inference_mode()
    def sample(self, seqs: list[Sequence], is_prefill: bool) -> torch.Tensor | None:
        """Launches a batch and returns its sampled token ids on the device without waiting for them
        (None on ranks > 0); its work goes to the current stream. With async scheduling the ids also
        stay here (on every rank) as the next decode step's inputs."""
        logits = self.step_logits(seqs, is_prefill)
        token_ids = self.sampler(logits, sampling_inputs(seqs, self._to_device)) if self.rank == 0 else None
        if self.config.async_scheduling:
            if token_ids is None:
                token_ids = torch.empty(len(seqs), dtype=torch.int64, device=self.device)
            if self.world_size > 1:
                dist.broadcast(token_ids, 0)
            self.sampled, self.sampled_rows = token_ids, {seq.seq_id: row for row, seq in enumerate(seqs)}
        return token_ids if self.rank == 0 else None

    @torch.inference_mode()
    def step_logits(self, seqs: list[Sequence], is_prefill: bool) -> torch.Tensor:
        """The next-token logits [len(seqs), vocab] of one step's sequences (complete on rank 0)."""
        if is_prefill:
            input_ids, positions, ctx, last_indices = self.prepare_prefill(seqs)
            logits = self.model.compute_logits(self.prefill_hidden(seqs, input_ids, positions, ctx)[last_indices])
        else:
            prepare = self.prepare_decode_ahead if self.config.async_scheduling else self.prepare_decode
            logits = self.decode_logits(*prepare(seqs))
        reset_context()
        return logits

    def prefill_hidden(self, seqs: list[Sequence], input_ids: torch.Tensor, positions: torch.Tensor,
                       ctx: Context) -> torch.Tensor:
        """The prompt batch's final hidden states, from the captured graph of its bucket where one holds it."""
        graphs = self.prefill_graphs
        bucket = graphs.bucket_for(input_ids.size(0), len(seqs)) if graphs is not None else None
        if bucket is None:
            set_context(ctx)
            return self.model(input_ids, positions)
        graphs.load(input_ids, positions, ctx, ctx.block_tables if ctx.block_tables is not None else self._block_tables(seqs))
        return self.prefill_plan[bucket].replay()

    def decode_logits(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: Context) -> torch.Tensor:
        batch = input_ids.size(0)
        if self.graphs is None or batch > self.graphs.buckets[-1]:
            if self.pipeline is not None and self.pipeline.forced:
                return self.pipeline.decode_eager(input_ids, positions, ctx)
            set_context(ctx)
            return self.model.compute_logits(self.model(input_ids, positions))
        graph = self.decode_plan[self.graphs.load(input_ids, positions, ctx.slot_mapping, ctx.context_lens,
                                                  ctx.block_tables)]
        hidden = self.pipeline.replay(graph, batch) if self.pipeline is not None else graph.replay()
        return self.model.compute_logits(hidden[:batch])

    def pipeline_statistics(self) -> PipelineStatistics:
        return self.pipeline.statistics if self.pipeline is not None else PipelineStatistics(enabled=False)

    def get_pipeline_statistics(self) -> dict:
        return self.pipeline_statistics().as_dict()

    def print_pipeline_statistics(self) -> None:
        self.pipeline_statistics().print()
