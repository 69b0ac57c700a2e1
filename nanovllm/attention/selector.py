import importlib.util

import torch

from nanovllm.attention.base import AttentionBackend
from nanovllm.attention.torch_backend import TorchBackend
from nanovllm.utils.log import get_logger

BACKEND_NAMES = ("auto", "torch", "triton", "flash-attn")
# The Triton kernels of a float8 cache convert float8 e4m3 in hardware, which GPUs do from this compute
# capability on.
FLOAT8_CAPABILITY = (8, 9)
FLOAT8_REQUIREMENT = "compute capability {}.{} or newer".format(*FLOAT8_CAPABILITY)


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def converts_float8(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= FLOAT8_CAPABILITY


def select_backend(name: str, device: torch.device, block_size: int, quantized_kv: bool = False) -> AttentionBackend:
    """Resolves "auto" to flash-attn (not for a quantized KV cache), then triton (for a quantized one,
    where the GPU converts float8), then torch; CPU always gets torch."""
    if name == "auto":
        if device.type != "cuda":
            name = "torch"
        elif flash_attn_available() and block_size % 256 == 0 and not quantized_kv:
            name = "flash-attn"
        elif quantized_kv and not converts_float8(device):
            get_logger("Attention").info("the Triton kernels of a float8 KV cache need %s, this GPU has %d.%d: "
                                         "using the torch backend", FLOAT8_REQUIREMENT,
                                         *torch.cuda.get_device_capability(device))
            name = "torch"
        else:
            name = "triton" if triton_available() else "torch"
    if name != "torch" and device.type != "cuda":
        raise ValueError(f"attention_backend={name!r} needs a CUDA device; use 'torch' or 'auto' on {device.type}")
    if name == "triton" and quantized_kv and not converts_float8(device):
        raise ValueError("attention_backend='triton' with kv_cache_dtype='fp8_e4m3' needs a GPU of "
                         f"{FLOAT8_REQUIREMENT}; use 'torch' or 'auto' here")
    # The optional backends import their packages, so they are imported only when chosen.
    if name == "flash-attn":
        if not flash_attn_available():
            raise ValueError("attention_backend='flash-attn' but the flash_attn package is not installed")
        from nanovllm.attention.flash_backend import FlashAttnBackend
        return FlashAttnBackend()
    if name == "triton":
        from nanovllm.attention.triton_backend import TritonBackend
        return TritonBackend()
    return TorchBackend()
