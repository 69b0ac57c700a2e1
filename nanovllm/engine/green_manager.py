import torch

try:
    import green_ctx
except ImportError as e:  # cuda-python (cuda.bindings) not installed
    green_ctx = None
    _import_error = e

MIN_DRIVER_VERSION = 12040  # green contexts appeared in CUDA 12.4


class GreenContextUnavailable(RuntimeError):
    """Green contexts cannot be used here; `reason` says why. Callers fall back to sequential execution."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def check_sm_counts(attention_sm_count, ffn_sm_count, total_sm_count=None, min_size=1, alignment=1):
    """Validate the user's SM counts; with the device's numbers, also that the rounded-up sizes fit."""
    for name, n in (("pipeline_attention_sm_count", attention_sm_count), ("pipeline_ffn_sm_count", ffn_sm_count)):
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"{name} must be a positive int, got {n!r}")
    if total_sm_count is None:
        return
    attn = green_ctx.round_sm_count(attention_sm_count, min_size, alignment)
    ffn = green_ctx.round_sm_count(ffn_sm_count, min_size, alignment)
    if attn + ffn > total_sm_count:
        raise ValueError(
            f"pipeline_attention_sm_count ({attention_sm_count} -> {attn}) + pipeline_ffn_sm_count "
            f"({ffn_sm_count} -> {ffn}) = {attn + ffn} SMs after rounding up (minimum {min_size}, multiple of "
            f"{alignment}); the allowed total is at most {total_sm_count} SMs on this device")


class GreenContextManager:
    """Two disjoint SM partitions of one GPU, one for attention and one for the FFN, each with its stream."""

    def __init__(self, device: torch.device, attention_sm_count: int, ffn_sm_count: int):
        check_sm_counts(attention_sm_count, ffn_sm_count)
        device = torch.device(device)
        if device.type != "cuda":
            raise GreenContextUnavailable(f"device {device} is not a CUDA device")
        if not torch.cuda.is_available():
            raise GreenContextUnavailable("CUDA is not available")
        if green_ctx is None:
            raise GreenContextUnavailable(f"cannot import green_ctx (needs cuda-python): {_import_error}")
        index = device.index if device.index is not None else torch.cuda.current_device()
        try:
            version = green_ctx.driver_version()
            if version < MIN_DRIVER_VERSION:
                raise GreenContextUnavailable(
                    f"the CUDA driver supports CUDA {version // 1000}.{version % 1000 // 10}; green contexts need 12.4+")
            total, min_size, alignment = green_ctx.device_sm_info(index)
        except GreenContextUnavailable:
            raise
        except RuntimeError as e:
            raise GreenContextUnavailable(str(e)) from e
        check_sm_counts(attention_sm_count, ffn_sm_count, total, min_size, alignment)
        try:
            self.partitions = green_ctx.split_device(index, [attention_sm_count, ffn_sm_count])
        except RuntimeError as e:
            raise GreenContextUnavailable(str(e)) from e
        self.device = torch.device("cuda", index)
        self.attention_sm_count, self.ffn_sm_count = self.partitions.sm_counts
        self.remaining_sm_count = self.partitions.remaining_sm_count
        print("[GreenContextManager] Initialized with SM allocation:")
        print(f"  - Attention: {self.attention_sm_count} SMs")
        print(f"  - FFN: {self.ffn_sm_count} SMs")
        print(f"  - Remaining: {self.remaining_sm_count} SMs")

    def get_attention_stream(self) -> torch.cuda.Stream:
        return self.partitions.streams[0]

    def get_ffn_stream(self) -> torch.cuda.Stream:
        return self.partitions.streams[1]

    def close(self):
        self.partitions.close()
