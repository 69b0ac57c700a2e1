from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

from nanovllm.attention.torch_backend import TorchBackend
from nanovllm.utils.context import Context


class FlashAttnBackend(TorchBackend):
    """flash-attn kernels for attention; the KV store is the torch one. Needs block size % 256 == 0 and a
    cache in the model's dtype (the config rejects a float8 cache with this backend)."""

    name = "flash-attn"

    def prefill(self, q, k, v, k_cache, v_cache, ctx: Context, scale, kv_scales=None):
        if ctx.block_tables is not None:
            k, v = k_cache, v_cache
        return flash_attn_varlen_func(q, k, v, cu_seqlens_q=ctx.cu_seqlens_q, cu_seqlens_k=ctx.cu_seqlens_k,
                                      max_seqlen_q=ctx.max_seqlen_q, max_seqlen_k=ctx.max_seqlen_k,
                                      softmax_scale=scale, causal=True, block_table=ctx.block_tables)

    def decode(self, q, k_cache, v_cache, ctx: Context, scale, kv_scales=None):
        return flash_attn_with_kvcache(q.unsqueeze(1), k_cache, v_cache, cache_seqlens=ctx.context_lens,
                                       block_table=ctx.block_tables, softmax_scale=scale, causal=True).squeeze(1)
