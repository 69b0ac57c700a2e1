import torch
from torch import nn

from nanovllm.attention.base import AttentionBackend
from nanovllm.attention.torch_backend import TorchBackend
from nanovllm.utils.context import DecodeRope, KVStore, get_context


class Attention(nn.Module):
    """Paged attention of one layer; the runner assigns its cache views and its backend."""

    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = scale
        self.num_kv_heads = num_kv_heads
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self.kv_scales: torch.Tensor | None = None  # set for a float8 cache
        self.backend: AttentionBackend = TorchBackend()

    def fused_store(self, v: torch.Tensor) -> KVStore | None:
        """Where a kernel that computes this step's keys may store them and the values v itself, if the
        backend allows it and there is a cache; forward(stored=True) then stores nothing. Not into a
        float8 cache: quantizing in the fused kernel made whole runs 1-2% slower than store_kv's own kernel."""
        if self.k_cache is None or not self.backend.fuses_store or self.kv_scales is not None:
            return None
        return KVStore(v, self.k_cache, self.v_cache, get_context().slot_mapping)

    def decodes_raw(self) -> bool:
        """Whether this step is a decode whose backend normalizes and rotates the raw projections and stores
        the keys and values in its own kernel (decode_raw). Only into a float8 cache: there that takes the q/k
        kernel and store_kv's out of the step (4-7% off the fused step of qwen3-0.6b at batches 1-64, H200,
        docs/benchmarks.md); into a 16-bit cache the q/k kernel stores already (fused_store), and the step
        ran level."""
        return (self.k_cache is not None and self.kv_scales is not None and self.backend.fuses_rope
                and not get_context().is_prefill)

    def decode_raw(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_norm: nn.Module, k_norm: nn.Module,
                   rotary: nn.Module, positions: torch.Tensor) -> torch.Tensor:
        """Decode attention from the raw projections q, k, v: rotary(positions, q_norm(q), k_norm(k)), the keys
        and values stored, then attention, in the backend's kernel; only where decodes_raw()."""
        ctx = get_context()
        rope = DecodeRope(k, v, q_norm.weight, k_norm.weight, q_norm.eps, rotary.cos_sin_cache, positions,
                          ctx.slot_mapping)
        return self.backend.decode_rope(q, self.k_cache, self.v_cache, ctx, self.scale, self.kv_scales, rope)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, stored: bool = False) -> torch.Tensor:
        ctx = get_context()
        if self.k_cache is not None and not stored:
            self.backend.store_kv(k, v, self.k_cache, self.v_cache, ctx.slot_mapping, self.kv_scales)
        if ctx.is_prefill:
            return self.backend.prefill(q, k, v, self.k_cache, self.v_cache, ctx, self.scale, self.kv_scales)
        return self.backend.decode(q, self.k_cache, self.v_cache, ctx, self.scale, self.kv_scales)
