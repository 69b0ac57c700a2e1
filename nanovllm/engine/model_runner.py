import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanovllm.attention.selector import select_backend
from nanovllm.config import Config
from nanovllm.engine import warmup
from nanovllm.engine.decode_paths import DecodeExtension, DecodePaths, setup_key
from nanovllm.engine.graphs import CapturedGraph, DecodeGraphs, PrefillGraphs, batch_buckets, prefill_buckets
from nanovllm.engine.kv_cache import CPU_KV_CACHE_BYTES, KVCache, calibrate_scales
from nanovllm.engine.scheduler import Batch
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.step_inputs import DecodeInputs, block_tables, prefill_step, sampling_inputs
from nanovllm.engine.step_tokens import StepTokens
from nanovllm.layers.attention import Attention
from nanovllm.layers.sampler import Sampler
from nanovllm.models import DecoderModel, model_class
from nanovllm.partitions.sm_limit import on_sms
from nanovllm.partitions.streams import Lane, StreamTimer, order_after, use_streams
from nanovllm.utils.context import Context, reset_context, set_context
from nanovllm.utils.loader import load_model
from nanovllm.utils.log import get_logger

logger = get_logger("ModelRunner")


@dataclass(frozen=True)
class RunnerRole:
    """What a mode asks of a runner besides the options; the default is the sequential engine's runner."""
    graphs: tuple[str, ...] = ("prefill", "decode")  # the kinds of step it captures CUDA graphs for
    num_kvcache_blocks: int | None = None  # its cache's blocks; None: the num_kvcache_blocks option
    cache_size_option: str = "num_kvcache_blocks"  # the option its cache's blocks follow from, named if they do not fit
    stream_priority: int | None = None  # launch on a stream of its own with this priority; None: the current stream
    shares: "ModelRunner | None" = None  # a runner whose float8 scales it takes, and on the same device its weights
    shares_kv_cache: bool = False  # and that runner's KV cache itself
    decode_extensions: tuple[DecodeExtension, ...] = ()  # decode forwards a mode adds (engine/decode_paths.py)


@contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


class ModelRunner:
    """One device's model shard and what runs it: its KV cache, CUDA graphs and sampler. Its one job at
    run time is launch(): a scheduled batch through the model, and its tokens sampled."""

    def __init__(self, config: Config, device: torch.device, rank: int = 0, dist_init_method: str | None = None,
                 role: RunnerRole = RunnerRole()):
        self.config = config
        self.device = device
        self.rank = rank
        self.world_size = config.parallel.tensor_parallel_size
        self.block_size = config.cache.kvcache_block_size
        self.max_blocks_per_seq = -(-config.scheduler.max_model_len // self.block_size)
        if self.world_size > 1:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=dist_init_method,
                                    world_size=self.world_size, rank=rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        quantized = config.cache.kv_cache_dtype != "auto"
        self.backend = select_backend(config.runner.attention_backend, device, self.block_size, quantized)
        self.startup_seconds: dict[str, float] = {}  # per phase, for statistics()
        with self._phase("load_weights"):
            self.model = self._build_model(role.shares)
        for layer in self.attention_layers():
            layer.backend = self.backend
        with self._phase("kv_cache"):
            self.kv_cache = self._kv_cache(role, quantized)
        self.kv_cache.bind(self.attention_layers())
        self.sampler = Sampler()
        # Each decoding sequence writes into a block of its own, so no decode batch outgrows the cache's blocks.
        max_decode_batch = min(config.scheduler.max_num_seqs, self.kv_cache.num_blocks)
        self.decode_inputs = DecodeInputs(max_decode_batch, self.max_blocks_per_seq, self.block_size, device)
        self.decode_paths = DecodePaths(self.model, role.decode_extensions)
        self.prefill_graphs: PrefillGraphs | None = None
        # SM count of a lane (None: the whole GPU) -> token bucket -> captured prefill.
        self.prefill_plans: dict[int | None, dict[int, CapturedGraph]] = {}
        self.stream = None
        if device.type == "cuda":
            if role.stream_priority is not None:
                # A graph replay takes the priority of the stream it is launched on.
                self.stream = torch.cuda.Stream(device, priority=role.stream_priority)
                torch.cuda.synchronize(device)  # the cache was zeroed on the default stream
            with self._phase("warm_up"):
                # Compiles the prefill and sampling kernels now rather than inside the first requests.
                warmup.paged_prefill(self.model, self.block_size, device)
                self.sampler.warm_up(config.hf_config.vocab_size, config.dtype, device)
            if not config.runner.enforce_eager:
                self._capture(role.graphs)

    # ---- start-up -------------------------------------------------------------------------------

    @contextmanager
    def _phase(self, name: str):
        """Times a start-up phase into startup_seconds."""
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.startup_seconds[name] = time.perf_counter() - start

    def _build_model(self, shares: "ModelRunner | None") -> DecoderModel:
        """The model on this runner's device with the checkpoint's weights, or with those of `shares`
        where it is on the same device (a second copy would not fit beside its cache)."""
        cls = model_class(self.config.hf_config.model_type)
        if shares is not None and shares.device == self.device:
            # Modules of its own (their caches and backends) around the shared weight and buffer tensors.
            with torch.device("meta"):
                model = cls(self.config.hf_config)
            for module, shared in zip(model.modules(), shares.model.modules(), strict=True):
                module._parameters.update(shared._parameters)
                module._buffers.update(shared._buffers)
            return model
        # A scoped device context: the global default device would stay installed as a torch mode.
        with torch.device(self.device), default_dtype(self.config.dtype):
            model = cls(self.config.hf_config)
        load_model(model, self.config.model)
        return model

    def _kv_cache(self, role: RunnerRole, quantized: bool) -> KVCache:
        if role.shares_kv_cache:
            return role.shares.kv_cache
        hf = self.config.hf_config
        shape = (hf.num_hidden_layers, 2, self.block_size, hf.num_key_value_heads // self.world_size, hf.head_dim)
        scales = None
        if role.shares is not None and role.shares.kv_cache.scales is not None:
            # The runners exchange KV bytes, which must mean the same on both sides.
            scales = role.shares.kv_cache.scales.to(self.device)
        elif quantized:
            with torch.no_grad():  # scales are ordinary tensors: a tool may set them
                scales = calibrate_scales(self.attention_layers(), shape[3], self.device, self.random_prefill)
        cache = KVCache(shape, self.config.kv_dtype, self.device, scales)
        num_blocks = self.config.cache.num_kvcache_blocks if role.num_kvcache_blocks is None else role.num_kvcache_blocks
        utilization = self.config.cache.gpu_memory_utilization
        sized = ""
        if num_blocks == -1:
            try:
                num_blocks = cache.blocks_that_fit(utilization, self.max_blocks_per_seq, self.random_prefill,
                                                   self.rank == 0)
            except torch.OutOfMemoryError:
                tokens = self.config.scheduler.max_num_batched_tokens
                raise ValueError(f"invalid max_num_batched_tokens: the warm-up prefill of one full step ({tokens} "
                                 f"tokens) ran out of memory on {self.device} beside the weights; lower "
                                 "max_num_batched_tokens") from None
            sized = (f", sized by gpu_memory_utilization={utilization}" if self.device.type == "cuda" else
                     f", sized for the CPU's {CPU_KV_CACHE_BYTES / 2 ** 30:g} GiB "
                     "(gpu_memory_utilization applies to GPUs)")
        else:
            cache.check_fits(num_blocks, role.cache_size_option)
        cache.allocate(num_blocks, self.world_size > 1)
        if cache.num_blocks < self.max_blocks_per_seq:  # sized from memory: options were checked in Config
            raise ValueError(f"the KV cache holds {cache.num_blocks} blocks of {self.block_size} tokens, fewer than one "
                             f"sequence of max_model_len={self.config.scheduler.max_model_len} needs "
                             f"({self.max_blocks_per_seq}); lower max_model_len or max_num_batched_tokens, or raise "
                             "gpu_memory_utilization")
        if self.rank == 0:
            logger.info("KV cache: %d blocks of %d tokens = %d tokens, %s (%s), %.2f GiB%s", cache.num_blocks,
                        self.block_size, cache.num_blocks * self.block_size, self.config.cache.kv_cache_dtype,
                        str(cache.dtype).removeprefix("torch."), cache.num_blocks * cache.block_bytes / 2 ** 30, sized)
        return cache

    def random_prefill(self, num_tokens: int | None = None, seq_len: int | None = None) -> None:
        """A prefill of num_tokens random tokens (default: a full token budget) in sequences of seq_len
        (default: max_model_len, at most the model's positions) that stores no KV."""
        scheduler, hf = self.config.scheduler, self.config.hf_config
        warmup.random_prefill(self.model, hf.vocab_size, self.device, num_tokens or scheduler.max_num_batched_tokens,
                              min(seq_len or scheduler.max_model_len, hf.max_position_embeddings))

    def _capture(self, kinds: tuple[str, ...]) -> None:
        config = self.config
        if "decode" in kinds:
            graphs = DecodeGraphs(batch_buckets(min(config.scheduler.max_num_seqs, 512)), self.max_blocks_per_seq,
                                  self.device)
            setup = setup_key(self.device, config.hf_config, config.dtype, config.cache.kv_cache_dtype,
                              self.block_size, self.backend.name)
            with self._phase("decode_graphs"):
                self.decode_paths.capture(graphs, setup, self.kv_cache.num_blocks, config.scheduler.max_model_len)
        if "prefill" in kinds and self.backend.captures_prefill:
            self.prefill_graphs = PrefillGraphs(prefill_buckets(config.scheduler.max_num_batched_tokens),
                                                config.scheduler.max_num_seqs, self.max_blocks_per_seq, self.device)
            with self._phase("prefill_graphs"):
                self.prefill_plans[None] = self._capture_prefill(None)

    def _capture_prefill(self, stream: torch.cuda.Stream | None) -> dict[int, CapturedGraph]:
        start = time.perf_counter()
        plan = self.prefill_graphs.capture(self.model, stream)
        buckets = self.prefill_graphs.buckets
        logger.info("captured %d prefill CUDA graphs (%d..%d tokens) in %.1f s", len(buckets), buckets[0],
                    buckets[-1], time.perf_counter() - start)
        return plan

    def capture_lane(self, lane: Lane) -> None:
        """Captures this runner's graphs again on a lane (a green context's stream), with kernels sized for its
        SMs: a graph runs on the partition it was captured on, wherever it is launched."""
        if self.decode_paths.graphs is not None:
            self.decode_paths.capture_lane(lane)
        if self.prefill_graphs is not None:
            with use_streams(lane.stream), on_sms(lane.num_sms):
                self.prefill_plans[lane.num_sms] = self._capture_prefill(lane.stream)

    def attention_layers(self) -> list[Attention]:
        return [m for m in self.model.modules() if isinstance(m, Attention)]

    def close(self) -> None:
        """Frees the CUDA graphs and their memory pools."""
        self.decode_paths.close()
        self.prefill_graphs, self.prefill_plans = None, {}

    # ---- one step -------------------------------------------------------------------------------

    def launch(self, batch: Batch, lane: Lane | None = None, after: tuple[StreamTimer | None, ...] = (),
               timed: bool = False) -> StepTokens:
        """Launches the batch and returns its tokens on their way to the host, without waiting for them. Its
        work goes to this runner's stream (or the current one), or to lane's with kernels sized for lane's SMs,
        queued after the work the timers in `after` mark; `timed` marks it with a StreamTimer."""
        stream = lane.stream if lane is not None else self.stream
        with use_streams(stream), on_sms(lane and lane.num_sms):
            if stream is None and self.device.type == "cuda":  # then the work goes to the current stream
                stream = torch.cuda.current_stream(self.device)
            order_after(after, stream)
            timer = StreamTimer(stream) if timed else None
            return StepTokens(self.sample(batch, lane), timer)

    @torch.inference_mode()
    def sample(self, batch: Batch, lane: Lane | None = None) -> torch.Tensor | None:
        """The batch's sampled token ids on the device (None on ranks > 0). With async scheduling they also
        stay here, on every rank, as the next decode step's inputs."""
        logits = self.logits(batch, lane)
        token_ids = self.sampler(logits, sampling_inputs(batch.seqs, self._to_device)) if self.rank == 0 else None
        if self.config.scheduler.async_scheduling:
            if token_ids is None:
                token_ids = torch.empty(len(batch.seqs), dtype=torch.int64, device=self.device)
            if self.world_size > 1:
                dist.broadcast(token_ids, 0)
            self.decode_inputs.remember(batch.seqs, token_ids)
        return token_ids if self.rank == 0 else None

    @torch.inference_mode()
    def logits(self, batch: Batch, lane: Lane | None = None) -> torch.Tensor:
        """The next-token logits [len(batch.seqs), vocab] of the batch (complete on rank 0)."""
        if batch.is_prefill:
            # A float8 cache is read the same way whether a prompt's keys were just computed or found in the
            # prefix cache, so that prefix hits do not change the tokens: from the cache.
            input_ids, positions, ctx, last_indices = prefill_step(batch.seqs, self.block_size, self._to_device,
                                                                   paged=self.kv_cache.scales is not None)
            hidden = self._prefill_hidden(batch.seqs, input_ids, positions, ctx, lane)[last_indices]
        else:
            hidden = self.decode_paths.run(*self.decode_inputs.decode_step(batch.seqs), lane)
        logits = self.model.compute_logits(hidden)
        reset_context()
        return logits

    def _prefill_hidden(self, seqs: list[Sequence], input_ids: torch.Tensor, positions: torch.Tensor, ctx: Context,
                        lane: Lane | None) -> torch.Tensor:
        """The prompt batch's final hidden states, from the captured graph of its bucket where one holds it."""
        graphs = self.prefill_graphs
        bucket = graphs.bucket_for(input_ids.size(0), len(seqs)) if graphs is not None else None
        if bucket is None:
            set_context(ctx)
            return self.model(input_ids, positions)
        tables = ctx.block_tables if ctx.block_tables is not None else block_tables(seqs, self._to_device)
        graphs.load(input_ids, positions, ctx, tables)
        return self.prefill_plans[lane.num_sms if lane else None][bucket].replay()

    def _to_device(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        t = torch.tensor(values, dtype=dtype)
        return t.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else t

    # ---- statistics -----------------------------------------------------------------------------

    def statistics(self) -> dict:
        """The seconds of each start-up phase, the decode path per batch bucket, and what each decode
        extension reports under its name."""
        return {"startup_s": dict(self.startup_seconds), "decode_paths": self.decode_paths.statistics(),
                **{e.name: e.statistics() for e in self.decode_paths.extensions}}

    def get_pipeline_statistics(self) -> dict:
        """statistics()["pipeline"] on its own, as the pipeline's API offers it."""
        return self.statistics().get("pipeline", {"enabled": False})

    def print_pipeline_statistics(self) -> None:
        reports = [e.report() for e in self.decode_paths.extensions if e.name == "pipeline"]
        print(reports[0] if reports else "[Pipeline Statistics]\n  Enabled: False")
