import json
import math
import os
from dataclasses import dataclass, field, fields

import torch
from transformers import AutoConfig, PretrainedConfig

from nanovllm.attention.kv_quant import KV_CACHE_DTYPES, kv_cache_dtype
from nanovllm.attention.selector import BACKEND_NAMES

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Fields of config.json that size the model's weights: without them transformers would fill in the
# sizes of some other model.
SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads")


@dataclass
class Config:
    model: str
    device: str | torch.device | None = None
    dtype: str | torch.dtype | None = None
    max_num_batched_tokens: int = 16384
    max_num_seqs: int = 512
    max_model_len: int = 4096
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    enforce_eager: bool = False
    async_scheduling: bool = True
    kvcache_block_size: int = 256
    num_kvcache_blocks: int = -1
    kv_cache_dtype: str = "auto"
    attention_backend: str = "auto"
    enable_pipeline: bool = False
    pipeline_attention_sm_count: int = 16
    pipeline_ffn_sm_count: int = 16
    pipeline_enable_profiling: bool = False
    pipeline_force: bool = False
    enable_two_gpu_pd: bool = False
    prefill_device_id: int = 0
    decode_device_id: int = 1
    prefill_num_kvcache_blocks: int = -1
    enable_pd_multiplexing: bool = False
    pd_max_itl_ms: float | None = None
    hf_config: PretrainedConfig = field(init=False, repr=False)
    eos_token_ids: tuple[int, ...] = field(init=False, default=())
    # With enable_two_gpu_pd: the devices of the prefill and the decode runner.
    prefill_device: torch.device | None = field(init=False, default=None)
    decode_device: torch.device | None = field(init=False, default=None)
    kv_dtype: torch.dtype = field(init=False, repr=False)  # the KV cache's dtype

    def __post_init__(self):
        self._check_types()
        _require(self.max_num_batched_tokens >= 1, "max_num_batched_tokens", "an integer >= 1")
        _require(self.max_num_seqs >= 1, "max_num_seqs", "an integer >= 1")
        _require(self.max_model_len >= 1, "max_model_len", "an integer >= 1")
        _require(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization", "a number in (0, 1]")
        _require(1 <= self.tensor_parallel_size <= 8, "tensor_parallel_size", "an integer in [1, 8]")
        block = self.kvcache_block_size
        _require(16 <= block <= 4096 and block & (block - 1) == 0, "kvcache_block_size",
                 "a power of two in [16, 4096]")
        _require(self.num_kvcache_blocks == -1 or self.num_kvcache_blocks >= 1, "num_kvcache_blocks",
                 "-1 (size from memory) or an integer >= 1")
        _require(self.attention_backend in BACKEND_NAMES, "attention_backend", f"one of {BACKEND_NAMES}")
        _require(self.kv_cache_dtype in KV_CACHE_DTYPES, "kv_cache_dtype", f"one of {tuple(KV_CACHE_DTYPES)}")
        _require(self.kv_cache_dtype == "auto" or self.attention_backend != "flash-attn", "kv_cache_dtype",
                 "'auto' with attention_backend='flash-attn' (a float8 cache needs 'triton' or 'torch')")
        _require(self.pipeline_attention_sm_count >= 1, "pipeline_attention_sm_count", "an integer >= 1")
        _require(self.pipeline_ffn_sm_count >= 1, "pipeline_ffn_sm_count", "an integer >= 1")
        _require(not (self.enable_pipeline and self.tensor_parallel_size > 1), "enable_pipeline",
                 "False when tensor_parallel_size > 1 (the pipeline is single-GPU)")
        _require(self.prefill_device_id >= 0, "prefill_device_id", "an integer >= 0")
        _require(self.decode_device_id >= 0, "decode_device_id", "an integer >= 0")
        _require(not (self.enable_two_gpu_pd and self.tensor_parallel_size > 1), "enable_two_gpu_pd",
                 "False when tensor_parallel_size > 1 (prefill/decode disaggregation runs one GPU per role)")
        _require(self.prefill_num_kvcache_blocks == -1 or (self.enable_two_gpu_pd and self.prefill_num_kvcache_blocks >= 1),
                 "prefill_num_kvcache_blocks", "-1 (sized for its role) or, with enable_two_gpu_pd=True, an integer >= 1")
        self._check_multiplexing()
        if self.enable_two_gpu_pd:
            self._check_pd_device()
        self.device = self._resolve_device()
        if self.enable_two_gpu_pd:
            self.prefill_device, self.decode_device = self._resolve_pd_devices()
            self.device = self.decode_device
        elif self.enable_pd_multiplexing:
            self.prefill_device = self.decode_device = self.device
        self.hf_config = _load_hf_config(self.model)
        self.dtype = self._resolve_dtype()
        self.kv_dtype = kv_cache_dtype(self.kv_cache_dtype, self.dtype)
        self.max_model_len = min(self.max_model_len, self.hf_config.max_position_embeddings)
        blocks_per_seq = -(-self.max_model_len // self.kvcache_block_size)
        for option in ("num_kvcache_blocks", "prefill_num_kvcache_blocks"):
            blocks = getattr(self, option)
            _require(blocks == -1 or blocks >= blocks_per_seq, option,
                     f"-1 or at least the {blocks_per_seq} KV cache blocks of one max_model_len={self.max_model_len} "
                     f"sequence: raise {option} to at least {blocks_per_seq}, or lower max_model_len")
        self.eos_token_ids = _eos_token_ids(self.model, self.hf_config)
        if self.tensor_parallel_size > 1:
            heads = (self.hf_config.num_attention_heads, self.hf_config.num_key_value_heads)
            _require(all(h % self.tensor_parallel_size == 0 for h in heads), "tensor_parallel_size",
                     f"a divisor of the head counts {heads}")
            _require(self.hf_config.intermediate_size % self.tensor_parallel_size == 0, "tensor_parallel_size",
                     f"a divisor of intermediate_size={self.hf_config.intermediate_size}")

    def _check_types(self):
        for f in fields(self):
            if not f.init or f.name in ("model", "device", "dtype", "pd_max_itl_ms"):
                continue
            value, kind = getattr(self, f.name), f.type
            if kind == "float" or kind is float:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            elif kind == "int" or kind is int:
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif kind == "bool" or kind is bool:
                ok = isinstance(value, bool)
            else:
                ok = isinstance(value, str)
            if not ok:
                raise TypeError(f"{f.name} must be of type {getattr(kind, '__name__', kind)}, got {value!r}")
        itl = self.pd_max_itl_ms
        if itl is not None and (isinstance(itl, bool) or not isinstance(itl, (int, float))):
            raise TypeError(f"pd_max_itl_ms must be None or a number of milliseconds, got {itl!r}")
        if not isinstance(self.model, (str, os.PathLike)):
            raise TypeError(f"model must be a path to a model directory, got {self.model!r}")
        self.model = os.fspath(self.model)

    def _resolve_device(self) -> torch.device:
        try:
            device = torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}") from None
        _require(device.type in ("cpu", "cuda"), "device", "'cpu', 'cuda' or 'cuda:N'")
        if device.type == "cuda":
            _require(torch.cuda.is_available(), "device", "'cpu' (CUDA is not available here)")
            if device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
            _require(device.index < torch.cuda.device_count(), "device",
                     f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        return device

    def _check_multiplexing(self) -> None:
        """enable_pd_multiplexing runs both roles on one GPU: with enable_two_gpu_pd as well, the two
        device ids must name that one GPU."""
        itl = self.pd_max_itl_ms
        _require(itl is None or (self.enable_pd_multiplexing and 0 < itl < math.inf), "pd_max_itl_ms",
                 "None (1.5x the full-GPU decode step) or, with enable_pd_multiplexing=True, "
                 "a number of milliseconds > 0")
        if not self.enable_pd_multiplexing:
            return
        _require(self.tensor_parallel_size == 1, "enable_pd_multiplexing",
                 "False when tensor_parallel_size > 1 (prefill and decode share the SMs of one GPU)")
        _require(not self.enable_pipeline, "enable_pd_multiplexing",
                 "False with enable_pipeline=True (the attention/FFN pipeline has partitions of its own)")
        _require(self.prefill_num_kvcache_blocks == -1, "prefill_num_kvcache_blocks",
                 "-1 with enable_pd_multiplexing=True (prefill and decode share one KV cache)")
        _require(not self.enable_two_gpu_pd or self.prefill_device_id == self.decode_device_id,
                 "enable_pd_multiplexing", f"False when prefill_device_id ({self.prefill_device_id}) and "
                 f"decode_device_id ({self.decode_device_id}) differ (multiplexing runs both roles on one GPU)")

    def _check_pd_device(self) -> None:
        device = self.device
        if isinstance(device, (str, torch.device)) and str(device) not in ("cpu", "cuda"):
            raise ValueError(f"device must be None, 'cuda' or 'cpu' with enable_two_gpu_pd=True (the runners' GPUs "
                             f"are prefill_device_id and decode_device_id), got {device!r}")

    def _resolve_pd_devices(self) -> tuple[torch.device, torch.device]:
        """The CPU counts as one device: both runners run on it, so both ids must be 0."""
        if self.device.type == "cpu":
            count, why = 1, "on CPU both runners share the one device"
        else:
            count = torch.cuda.device_count()
            why = f"this machine has {count} CUDA device{'s' if count > 1 else ''}"
        for option in ("prefill_device_id", "decode_device_id"):
            _require(getattr(self, option) < count, option, f"an integer in [0, {count - 1}] ({why})")
        if self.device.type == "cpu":
            return self.device, self.device
        return torch.device("cuda", self.prefill_device_id), torch.device("cuda", self.decode_device_id)

    def _resolve_dtype(self) -> torch.dtype:
        if self.dtype is None:
            if self.device.type == "cpu":
                return torch.float32
            dtype = getattr(self.hf_config, "dtype", None) or getattr(self.hf_config, "torch_dtype", None)
            dtype = DTYPES.get(dtype) if isinstance(dtype, str) else dtype
            return dtype if dtype in DTYPES.values() else torch.bfloat16
        if isinstance(self.dtype, str):
            _require(self.dtype in DTYPES, "dtype", f"one of {tuple(DTYPES)}")
            return DTYPES[self.dtype]
        _require(self.dtype in DTYPES.values(), "dtype", f"one of {tuple(DTYPES)}")
        return self.dtype


def _require(ok: bool, option: str, allowed: str) -> None:
    if not ok:
        raise ValueError(f"invalid {option}: must be {allowed}")


def _load_hf_config(model: str) -> PretrainedConfig:
    if not os.path.isdir(model):
        raise ValueError(f"model directory {model!r} does not exist")
    if not os.path.isfile(os.path.join(model, "config.json")):
        raise ValueError(f"model directory {model!r} has no config.json")
    try:
        hf_config = AutoConfig.from_pretrained(model)
    except Exception as e:  # transformers reports a malformed config with many kinds of exception
        raise ValueError(f"cannot read {model}/config.json: {e}") from None
    if hf_config.model_type != "qwen3":
        raise ValueError(f"{model}/config.json describes model_type {hf_config.model_type!r}; "
                         "nanovllm supports 'qwen3' (dense Qwen3) only")
    _check_model_fields(os.path.join(model, "config.json"), hf_config)
    return hf_config


def _check_model_fields(path: str, hf_config: PretrainedConfig) -> None:
    """The fields the engine builds the model from, checked before any weight is allocated."""
    with open(path) as f:
        written = json.load(f)
    for name in SIZE_FIELDS:
        if name not in written:
            raise ValueError(f"{path} has no {name}: it is needed to size the model's weights")

    def check(name: str, value, ok: bool, allowed: str) -> None:
        if not ok:
            raise ValueError(f"{path}: {name} must be {allowed}, got {value!r}")

    for name in (*SIZE_FIELDS, "max_position_embeddings"):
        value = getattr(hf_config, name, None)
        check(name, value, _is_positive_int(value), "a positive integer")
    heads, kv_heads = hf_config.num_attention_heads, hf_config.num_key_value_heads
    check("num_key_value_heads", kv_heads, heads % kv_heads == 0, f"a divisor of num_attention_heads={heads}")
    if getattr(hf_config, "head_dim", None) is None:  # derived as transformers does; set once for every reader
        hf_config.head_dim = hf_config.hidden_size // heads
    check("head_dim", hf_config.head_dim, _is_positive_int(hf_config.head_dim) and hf_config.head_dim % 2 == 0,
          "a positive even integer (hidden_size // num_attention_heads where unset)")
    eps = getattr(hf_config, "rms_norm_eps", None)
    check("rms_norm_eps", eps, isinstance(eps, (int, float)) and not isinstance(eps, bool) and 0 < eps < math.inf,
          "a positive number")


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _eos_token_ids(model: str, hf_config: PretrainedConfig) -> tuple[int, ...]:
    eos = _token_ids(hf_config.eos_token_id)
    if eos is None:
        raise ValueError(f"{model}/config.json: eos_token_id must be a token id or a list of token ids, "
                         f"got {hf_config.eos_token_id!r}")
    return _generation_eos_token_ids(model) or eos


def _generation_eos_token_ids(model: str) -> tuple[int, ...]:
    """The end-of-sequence tokens of generation_config.json; () where it is absent or unreadable."""
    from transformers import GenerationConfig
    path = os.path.join(model, "generation_config.json")
    if not os.path.isfile(path):
        return ()
    eos, problem = (), None
    try:
        value = GenerationConfig.from_pretrained(model).eos_token_id
        eos = _token_ids(value)
        if eos is None:
            problem = f"eos_token_id {value!r} is not a token id or a list of token ids"
    except (OSError, ValueError, TypeError) as e:
        problem = str(e)
    if problem:
        print(f"[Config] ignoring {path} ({problem}): end-of-sequence tokens come from config.json only")
        return ()
    return eos


def _token_ids(value) -> tuple[int, ...] | None:
    """A token id or a list of them (or None, for none) as a tuple; None where value is neither."""
    ids = () if value is None else tuple(value) if isinstance(value, (list, tuple)) else (value,)
    return ids if all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids) else None
