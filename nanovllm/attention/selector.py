import importlib.util

import torch

from nanovllm.attention.base import AttentionBackend
from nanovllm.attention.torch_backend import TorchBackend

BACKEND_NAMES = ("auto", "torch", "triton", "flash-attn")


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def select_backend(name: str, device: torch.device, block_size: int, quantized_kv: bool = False) -> AttentionBackend:
    """Resolves "auto" to flash-attn (not for a quantized KV cache), then triton, then torch; CPU always
    gets torch."""
    if name == "auto":
        if device.type != "cuda":
            name = "torch"
        elif flash_attn_available() and block_size % 256 == 0 and not quantized_kv:
            name = "flash-attn"
        else:
            name = "triton" if triton_available() else "torch"
    if name != "torch" and device.type != "cuda":
        raise ValueError(f"attention_backend={name!r} needs a CUDA device; use 'torch' or 'auto' on {device.type}")
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
