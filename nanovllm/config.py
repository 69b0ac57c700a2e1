import os
from dataclasses import dataclass, field, fields

import torch
from transformers import AutoConfig, PretrainedConfig

from nanovllm.attention.backend import BACKEND_NAMES

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
    kvcache_block_size: int = 256
    num_kvcache_blocks: int = -1
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
    hf_config: PretrainedConfig = field(init=False, repr=False)
    eos_token_ids: tuple[int, ...] = field(init=False, default=())
    # With enable_two_gpu_pd: the devices of the prefill and the decode runner.
    prefill_device: torch.device | None = field(init=False, default=None)
    decode_device: torch.device | None = field(init=False, default=None)

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
        if self.enable_two_gpu_pd:
            self._check_pd_device()
        self.device = self._resolve_device()
        if self.enable_two_gpu_pd:
            self.prefill_device, self.decode_device = self._resolve_pd_devices()
            self.device = self.decode_device
        self.hf_config = _load_hf_config(self.model)
        self.dtype = self._resolve_dtype()
        self.max_model_len = min(self.max_model_len, self.hf_config.max_position_embeddings)
        blocks_per_seq = -(-self.max_model_len // self.kvcache_block_size)
        for option in ("num_kvcache_blocks", "prefill_num_kvcache_blocks"):
            blocks = getattr(self, option)
            _require(blocks == -1 or blocks >= blocks_per_seq, option,
                     f"-1 or at least the {blocks_per_seq} KV cache blocks of one max_model_len={self.max_model_len} "
                     "sequence (or lower max_model_len)")
        self.eos_token_ids = _eos_token_ids(self.model, self.hf_config)
        if self.tensor_parallel_size > 1:
            heads = (self.hf_config.num_attention_heads, self.hf_config.num_key_value_heads)
            _require(all(h % self.tensor_parallel_size == 0 for h in heads), "tensor_parallel_size",
                     f"a divisor of the head counts {heads}")

    def _check_types(self):
        for f in fields(self):
            if not f.init or f.name in ("model", "device", "dtype"):
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
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot read {model}/config.json: {e}") from None
    if hf_config.model_type != "qwen3":
        raise ValueError(f"{model}/config.json describes model_type {hf_config.model_type!r}; "
                         "nanovllm supports 'qwen3' (dense Qwen3) only")
    return hf_config


def _eos_token_ids(model: str, hf_config: PretrainedConfig) -> tuple[int, ...]:
    from transformers import GenerationConfig
    eos = hf_config.eos_token_id
    try:
        eos = GenerationConfig.from_pretrained(model).eos_token_id or eos
    except OSError:
        pass
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
