import importlib.util

import torch

from nanovllm.utils.context import Context


class AttentionBackend:
    """Stores new keys/values in the paged cache and computes attention over it."""

    name = "base"

    def store_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        raise NotImplementedError

    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor | None,
                v_cache: torch.Tensor | None, ctx: Context, scale: float) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               ctx: Context, scale: float) -> torch.Tensor:
        raise NotImplementedError


BACKEND_NAMES = ("auto", "torch", "triton", "flash-attn")


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def select_backend(name: str, device: torch.device, block_size: int) -> AttentionBackend:
    """Resolves "auto" to flash-attn, then triton, then torch; CPU always gets torch."""
    if name == "auto":
        if device.type != "cuda":
            name = "torch"
        elif flash_attn_available() and block_size % 256 == 0:
            name = "flash-attn"
        elif importlib.util.find_spec("nanovllm.attention.triton_backend") is not None:
            name = "triton"
        else:
            name = "torch"
    if name != "torch" and device.type != "cuda":
        raise ValueError(f"attention_backend={name!r} needs a CUDA device; use 'torch' or 'auto' on {device.type}")
    if name == "flash-attn":
        if not flash_attn_available():
            raise ValueError("attention_backend='flash-attn' but the flash_attn package is not installed")
        from nanovllm.attention.flash_backend import FlashAttnBackend
        return FlashAttnBackend()
    if name == "triton":
        from nanovllm.attention.triton_backend import TritonBackend
        return TritonBackend()
    from nanovllm.attention.torch_backend import TorchBackend
    return TorchBackend()
