import torch

from nanovllm.utils.context import Context, DecodeRope


class AttentionBackend:
    """Stores new keys/values in the paged cache and computes attention over it.

    kv_scales (float32 [2, num_kv_heads], or None) are the per-head scales of a float8 cache: see
    nanovllm.attention.kv_quant. Prefill without block tables attends to the new k/v as given; with them (a
    cached prefix, a float8 cache, a captured prefill) it reads every key from the cache.
    """

    name = "base"
    # Whether prefill runs inside a CUDA graph: a launch that depends on shapes only, with every key
    # read from the cache (block_tables given).
    captures_prefill = False
    # Whether the cache layout and store are those of the Triton store_kv, which a fused kernel may do instead.
    fuses_store = False
    # Whether decode_rope exists: decode from the raw projections, with q/k norm, RoPE and the store in it.
    fuses_rope = False

    def store_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, slot_mapping: torch.Tensor, kv_scales: torch.Tensor | None = None) -> None:
        raise NotImplementedError

    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor | None,
                v_cache: torch.Tensor | None, ctx: Context, scale: float,
                kv_scales: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               ctx: Context, scale: float, kv_scales: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def decode_rope(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ctx: Context, scale: float,
                    kv_scales: torch.Tensor | None, rope: DecodeRope) -> torch.Tensor:
        """decode() where q is raw and rope holds the step's raw keys and values, what normalizes and rotates
        q and k, and where to store the keys and values, which the backend does itself. Only where fuses_rope."""
        raise NotImplementedError
