"""The engine's options: the names users pass to LLM(...), with their defaults, grouped by what they set,
and checked before any GPU work. Config is what the engine is built from: the groups, the resolved
device and dtypes, and the checkpoint (models/checkpoint.py reads it)."""
import math
import os
import types
from dataclasses import dataclass, field, fields

import torch

from nanovllm.attention.kv_quant import KV_CACHE_DTYPES, kv_cache_dtype
from nanovllm.attention.selector import BACKEND_NAMES
from nanovllm.models.checkpoint import Checkpoint, read_checkpoint
from nanovllm.utils.log import get_logger

logger = get_logger("Config")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FUSED_DECODE = ("auto", "on", "off")


@dataclass
class SchedulerOptions:
    max_num_batched_tokens: int = 16384
    max_num_seqs: int = 512
    max_model_len: int = 4096
    async_scheduling: bool = True

    def check(self) -> None:
        _require(self.max_num_batched_tokens >= 1, "max_num_batched_tokens", "an integer >= 1")
        _require(self.max_num_seqs >= 1, "max_num_seqs", "an integer >= 1")
        _require(self.max_model_len >= 2, "max_model_len", "an integer >= 2 (a prompt token and a generated one)")


@dataclass
class CacheOptions:
    kvcache_block_size: int = 256
    num_kvcache_blocks: int = -1
    kv_cache_dtype: str = "auto"
    gpu_memory_utilization: float = 0.9

    def check(self) -> None:
        block = self.kvcache_block_size
        _require(16 <= block <= 4096 and block & (block - 1) == 0, "kvcache_block_size", "a power of two in [16, 4096]")
        _require(self.num_kvcache_blocks == -1 or self.num_kvcache_blocks >= 1, "num_kvcache_blocks",
                 "-1 (size from memory) or an integer >= 1")
        _require(self.kv_cache_dtype in KV_CACHE_DTYPES, "kv_cache_dtype", f"one of {tuple(KV_CACHE_DTYPES)}")
        _require(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization", "a number in (0, 1]")


@dataclass
class ParallelOptions:
    tensor_parallel_size: int = 1

    def check(self) -> None:
        _require(1 <= self.tensor_parallel_size <= 8, "tensor_parallel_size", "an integer in [1, 8]")


@dataclass
class RunnerOptions:
    enforce_eager: bool = False
    attention_backend: str = "auto"
    fused_decode: str = "auto"  # the fused decode forward (modes/fused_decode): where faster, always, never

    def check(self) -> None:
        _require(self.attention_backend in BACKEND_NAMES, "attention_backend", f"one of {BACKEND_NAMES}")
        _require(self.fused_decode in FUSED_DECODE, "fused_decode", f"one of {FUSED_DECODE}")


@dataclass
class PipelineOptions:
    """The attention/FFN decode pipeline (modes/pipeline)."""
    enable_pipeline: bool = False
    pipeline_attention_sm_count: int = 16
    pipeline_ffn_sm_count: int = 16
    pipeline_enable_profiling: bool = False
    pipeline_force: bool = False

    def check(self) -> None:
        _require(self.pipeline_attention_sm_count >= 1, "pipeline_attention_sm_count", "an integer >= 1")
        _require(self.pipeline_ffn_sm_count >= 1, "pipeline_ffn_sm_count", "an integer >= 1")
        _require_mode(self, "enable_pipeline")


@dataclass
class DisaggregationOptions:
    """Prefill/decode disaggregation (modes/disaggregation)."""
    enable_two_gpu_pd: bool = False
    prefill_device_id: int = 0
    decode_device_id: int = 1
    prefill_num_kvcache_blocks: int = -1

    def check(self) -> None:
        _require(self.prefill_device_id >= 0, "prefill_device_id", "an integer >= 0")
        _require(self.decode_device_id >= 0, "decode_device_id", "an integer >= 0")
        _require(self.prefill_num_kvcache_blocks == -1 or self.prefill_num_kvcache_blocks >= 1,
                 "prefill_num_kvcache_blocks", "-1 (sized for its role) or an integer >= 1")
        _require_mode(self, "enable_two_gpu_pd")


@dataclass
class MultiplexingOptions:
    """Prefill/decode multiplexing on one GPU (modes/multiplexing)."""
    enable_pd_multiplexing: bool = False
    pd_max_itl_ms: float | None = None
    pd_max_ttft_ms: float | None = None

    def check(self) -> None:
        for option, default in (("pd_max_itl_ms", "1.5x the full-GPU decode step"),
                                ("pd_max_ttft_ms", "the full-GPU prefill of a full token budget")):
            bound = getattr(self, option)
            _require(bound is None or 0 < bound < math.inf, option,
                     f"None ({default}) or a number of milliseconds > 0")
        _require_mode(self, "enable_pd_multiplexing")


# Config attribute -> its group of options.
GROUPS = {"scheduler": SchedulerOptions, "cache": CacheOptions, "parallel": ParallelOptions, "runner": RunnerOptions,
          "pipeline": PipelineOptions, "pd": DisaggregationOptions, "mux": MultiplexingOptions}


def option_names() -> list[str]:
    return sorted(f.name for group in GROUPS.values() for f in fields(group))


@dataclass
class Config:
    model: str
    checkpoint: Checkpoint = field(repr=False)
    device: torch.device
    dtype: torch.dtype
    kv_dtype: torch.dtype  # the KV cache's
    scheduler: SchedulerOptions
    cache: CacheOptions
    parallel: ParallelOptions
    runner: RunnerOptions
    pipeline: PipelineOptions
    pd: DisaggregationOptions
    mux: MultiplexingOptions

    @property
    def hf_config(self):
        return self.checkpoint.hf_config

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.checkpoint.eos_token_ids

    @classmethod
    def from_options(cls, model, device=None, dtype=None, **options) -> "Config":
        """Checks the options (TypeError for a wrong type or an unknown name, ValueError for a value out of
        range, each naming the option), then reads the checkpoint and resolves the device and dtypes."""
        if not isinstance(model, (str, os.PathLike)):
            raise TypeError(f"model must be a path to a model directory, got {model!r}")
        groups = _groups(options)
        for group in groups.values():
            group.check()
        _check_modes(groups)
        if groups["pd"].enable_two_gpu_pd and device is not None and str(device) not in ("cpu", "cuda"):
            raise ValueError(f"device must be None, 'cuda' or 'cpu' with enable_two_gpu_pd=True (the runners' GPUs "
                             f"are prefill_device_id and decode_device_id), got {device!r}")
        device = _resolve_device(device)
        _check_tp_devices(groups["parallel"].tensor_parallel_size, device)
        if groups["pd"].enable_two_gpu_pd:
            _check_pd_devices(groups["pd"], device)
        checkpoint = read_checkpoint(os.fspath(model))
        dtype = _resolve_dtype(dtype, device, checkpoint.hf_config)
        config = cls(os.fspath(model), checkpoint, device, dtype, kv_cache_dtype(groups["cache"].kv_cache_dtype, dtype),
                     **groups)
        config._check_against_checkpoint()
        return config

    def _check_against_checkpoint(self) -> None:
        hf, scheduler = self.hf_config, self.scheduler
        if scheduler.max_model_len > hf.max_position_embeddings:
            logger.info("max_model_len=%d is capped at the model's max_position_embeddings=%d", scheduler.max_model_len,
                        hf.max_position_embeddings)
            scheduler.max_model_len = hf.max_position_embeddings
        blocks_per_seq = -(-scheduler.max_model_len // self.cache.kvcache_block_size)
        for option, blocks in (("num_kvcache_blocks", self.cache.num_kvcache_blocks),
                               ("prefill_num_kvcache_blocks", self.pd.prefill_num_kvcache_blocks)):
            _require(blocks == -1 or blocks >= blocks_per_seq, option,
                     f"-1 or at least the {blocks_per_seq} KV cache blocks of one max_model_len={scheduler.max_model_len} "
                     f"sequence: raise {option} to at least {blocks_per_seq}, or lower max_model_len")
        tp = self.parallel.tensor_parallel_size
        if tp > 1:
            heads = (hf.num_attention_heads, hf.num_key_value_heads)
            _require(all(h % tp == 0 for h in heads), "tensor_parallel_size", f"a divisor of the head counts {heads}")
            _require(hf.intermediate_size % tp == 0, "tensor_parallel_size",
                     f"a divisor of intermediate_size={hf.intermediate_size}")


def _groups(options: dict) -> dict:
    """The options sorted into their groups, each checked for its type."""
    owner = {f.name: name for name, group in GROUPS.items() for f in fields(group)}
    for name in options:
        if name not in owner:
            raise TypeError(f"unknown option {name!r}; options are: {', '.join(option_names())}")
    by_group = {name: {} for name in GROUPS}
    for name, value in options.items():
        by_group[owner[name]][name] = value
    groups = {name: GROUPS[name](**values) for name, values in by_group.items()}
    for group in groups.values():
        for f in fields(group):
            _check_type(f.name, getattr(group, f.name), f.type)
    return groups


def _check_type(name: str, value, kind) -> None:
    optional = isinstance(kind, types.UnionType)
    if optional and value is None:
        return
    base = float if optional else kind
    if base is bool:
        ok = isinstance(value, bool)
    elif base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, str)
    if not ok:
        what = "None or a number" if optional else f"of type {base.__name__}"
        raise TypeError(f"{name} must be {what}, got {value!r}")


def _check_modes(groups: dict) -> None:
    """Options that exclude each other."""
    tp, pd, mux = groups["parallel"].tensor_parallel_size, groups["pd"], groups["mux"]
    _require(groups["cache"].kv_cache_dtype == "auto" or groups["runner"].attention_backend != "flash-attn",
             "kv_cache_dtype", "'auto' with attention_backend='flash-attn' (a float8 cache needs 'triton' or 'torch')")
    forces_pipeline = groups["pipeline"].enable_pipeline and groups["pipeline"].pipeline_force
    _require(not (forces_pipeline and groups["runner"].fused_decode == "on"), "fused_decode",
             "'auto' or 'off' with enable_pipeline=True, pipeline_force=True (one decode path can be forced)")
    _require(not (groups["pipeline"].enable_pipeline and tp > 1), "enable_pipeline",
             "False when tensor_parallel_size > 1 (the pipeline is single-GPU)")
    _require(not (pd.enable_two_gpu_pd and tp > 1), "enable_two_gpu_pd",
             "False when tensor_parallel_size > 1 (prefill/decode disaggregation runs one GPU per role)")
    if not mux.enable_pd_multiplexing:
        return
    _require(tp == 1, "enable_pd_multiplexing",
             "False when tensor_parallel_size > 1 (prefill and decode share the SMs of one GPU)")
    _require(not groups["pipeline"].enable_pipeline, "enable_pd_multiplexing",
             "False with enable_pipeline=True (the attention/FFN pipeline has partitions of its own)")
    _require(pd.prefill_num_kvcache_blocks == -1, "prefill_num_kvcache_blocks",
             "-1 with enable_pd_multiplexing=True (prefill and decode share one KV cache)")
    _require(not pd.enable_two_gpu_pd or pd.prefill_device_id == pd.decode_device_id, "enable_pd_multiplexing",
             f"False when prefill_device_id ({pd.prefill_device_id}) and decode_device_id ({pd.decode_device_id}) "
             "differ (multiplexing runs both roles on one GPU)")


def _resolve_device(device) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be None, a string ('cpu', 'cuda' or 'cuda:N') or a torch.device, got {device!r}")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    _require(resolved.type in ("cpu", "cuda"), "device", "'cpu', 'cuda' or 'cuda:N'")
    if resolved.type == "cuda":
        _require(torch.cuda.is_available(), "device", "'cpu' (CUDA is not available here)")
        if resolved.index is None:
            resolved = torch.device("cuda", torch.cuda.current_device())
        _require(resolved.index < torch.cuda.device_count(), "device", f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return resolved


def _check_tp_devices(tp: int, device: torch.device) -> None:
    """Tensor-parallel rank r runs on cuda:r; on CPU every rank runs on the CPU."""
    if device.type == "cuda":
        count = torch.cuda.device_count()
        _require(tp <= count, "tensor_parallel_size",
                 f"at most the {count} CUDA device{'s' if count > 1 else ''} of this machine (rank r runs on cuda:r)")


def _check_pd_devices(pd: DisaggregationOptions, device: torch.device) -> None:
    """The runners' GPUs are the two ids; the CPU counts as one device, both runners running on it."""
    if device.type == "cpu":
        count, why = 1, "on CPU both runners share the one device"
    else:
        count = torch.cuda.device_count()
        why = f"this machine has {count} CUDA device{'s' if count > 1 else ''}"
    if count == 1:
        why += "; on one device pass prefill_device_id=0, decode_device_id=0 to run both runners on it"
    for option in ("prefill_device_id", "decode_device_id"):
        _require(getattr(pd, option) < count, option, f"an integer in [0, {count - 1}] ({why})")


def _resolve_dtype(dtype, device: torch.device, hf_config) -> torch.dtype:
    if dtype is None:
        if device.type == "cpu":
            return torch.float32
        dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
        dtype = DTYPES.get(dtype) if isinstance(dtype, str) else dtype
        return dtype if dtype in DTYPES.values() else torch.bfloat16
    if isinstance(dtype, str):
        _require(dtype in DTYPES, "dtype", f"one of {tuple(DTYPES)}")
        return DTYPES[dtype]
    _require(dtype in DTYPES.values(), "dtype", f"one of {tuple(DTYPES)}")
    return dtype


def _require_mode(options, switch: str) -> None:
    """A ValueError for each option of the group set away from its default while its mode's switch is off."""
    if getattr(options, switch):
        return
    for f in fields(options):
        value = getattr(options, f.name)
        _require(f.name == switch or value == f.default, f.name,
                 f"{f.default!r} (its default) unless {switch}=True: it has no effect with the mode off, got {value!r}")


def _require(ok: bool, option: str, allowed: str) -> None:
    if not ok:
        raise ValueError(f"invalid {option}: must be {allowed}")
