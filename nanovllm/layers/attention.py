import torch
from torch import nn

from nanovllm.attention.base import AttentionBackend
from nanovllm.attention.torch_backend import TorchBackend
from nanovllm.utils.context import KVStore, get_context


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

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, stored: bool = False) -> torch.Tensor:
        ctx = get_context()
        if self.k_cache is not None and not stored:
            self.backend.store_kv(k, v, self.k_cache, self.v_cache, ctx.slot_mapping, self.kv_scales)
        if ctx.is_prefill:
            return self.backend.prefill(q, k, v, self.k_cache, self.v_cache, ctx, self.scale, self.kv_scales)
        return self.backend.decode(q, self.k_cache, self.v_cache, ctx, self.scale, self.kv_scales)
