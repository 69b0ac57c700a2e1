"""GPU partitions for every mode: disjoint sets of SMs (CUDA green contexts, through green_ctx.py), each
with its stream, made once per process and shared by the engines that ask for the same split."""
import torch

from nanovllm.utils.log import get_logger

try:
    import green_ctx
except ImportError as e:  # cuda-python (cuda.bindings) not installed
    green_ctx = None
    _import_error = e

MIN_DRIVER_VERSION = 12040  # green contexts appeared in CUDA 12.4

# Partitions live for the process and serve every engine that asks for the same split. Destroying
# them does not give everything back: cuBLAS keeps a workspace for each stream it ran on, and the
# driver keeps some memory per context (72 MiB per create-and-destroy of a 16/16 split, measured on
# an H100), so engines created in a loop would leak.
_PARTITIONS: dict[tuple[int, ...], "green_ctx.GreenPartitions"] = {}


class GreenContextUnavailable(RuntimeError):
    """Green contexts cannot be used here; `reason` says why. Callers fall back to sequential execution."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def green_device_index(device: torch.device) -> int:
    """The CUDA device index of `device` once green contexts are known to work there; otherwise raises
    GreenContextUnavailable."""
    device = torch.device(device)
    if device.type != "cuda":
        raise GreenContextUnavailable(f"device {device} is not a CUDA device")
    if not torch.cuda.is_available():
        raise GreenContextUnavailable("CUDA is not available")
    if green_ctx is None:
        raise GreenContextUnavailable(f"cannot import green_ctx (needs cuda-python): {_import_error}")
    try:
        version = green_ctx.driver_version()
    except green_ctx.GreenContextError as e:
        raise GreenContextUnavailable(str(e)) from e
    if version < MIN_DRIVER_VERSION:
        raise GreenContextUnavailable(
            f"the CUDA driver supports CUDA {version // 1000}.{version % 1000 // 10}; green contexts need 12.4+")
    return device.index if device.index is not None else torch.cuda.current_device()


def shared_split(index: int, sm_counts: list[int]) -> "green_ctx.GreenPartitions":
    """Disjoint partitions of these sizes on device `index`, made once per process (see _PARTITIONS).
    Raises green_ctx.SmCountError when they do not fit, GreenContextUnavailable when the driver refuses."""
    key = (index, *sm_counts)
    if key not in _PARTITIONS:
        try:
            _PARTITIONS[key] = green_ctx.split_device(index, list(sm_counts))
        except green_ctx.GreenContextError as e:
            raise GreenContextUnavailable(str(e)) from e
    return _PARTITIONS[key]


class GreenContextManager:
    """Two disjoint SM partitions of one GPU, one for attention and one for the FFN, each with its stream."""

    def __init__(self, device: torch.device, attention_sm_count: int, ffn_sm_count: int):
        index = green_device_index(device)
        try:
            partitions = shared_split(index, [attention_sm_count, ffn_sm_count])
        except green_ctx.SmCountError as e:
            raise ValueError(
                f"pipeline_attention_sm_count ({attention_sm_count} -> {e.sizes[0]}) + pipeline_ffn_sm_count "
                f"({ffn_sm_count} -> {e.sizes[1]}) = {sum(e.sizes)} SMs after rounding up to multiples of "
                f"{e.unit}; the allowed total is at most {e.available} SMs on this device") from None
        self.partitions = partitions
        self.attention_sm_count, self.ffn_sm_count = partitions.sm_counts
        self.remaining_sm_count = partitions.remaining_sm_count
        get_logger("GreenContextManager").info(
            "Initialized with SM allocation:\n  - Attention: %d SMs\n  - FFN: %d SMs\n  - Remaining: %d SMs",
            self.attention_sm_count, self.ffn_sm_count, self.remaining_sm_count)

    def get_attention_stream(self) -> torch.cuda.Stream:
        return self.partitions.streams[0]

    def get_ffn_stream(self) -> torch.cuda.Stream:
        return self.partitions.streams[1]
