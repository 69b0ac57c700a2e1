from nanovllm.attention.backend import AttentionBackend
from nanovllm.attention.triton_kernels import paged_decode, prefill_attention, store_kv
from nanovllm.utils.context import Context


class TritonBackend(AttentionBackend):
    """Paged attention with the Triton kernels; decode is CUDA-graph capturable.

    num_sms sizes the decode split count; set it when attention runs on a partition of the GPU.
    """

    name = "triton"

    def __init__(self, num_sms: int | None = None):
        self.num_sms = num_sms

    def store_kv(self, k, v, k_cache, v_cache, slot_mapping):
        store_kv(k, v, k_cache, v_cache, slot_mapping)

    def prefill(self, q, k, v, k_cache, v_cache, ctx: Context, scale):
        if ctx.block_tables is None:
            return prefill_attention(q, k, v, ctx.cu_seqlens_q, ctx.cu_seqlens_q, ctx.max_seqlen_q, scale)
        return prefill_attention(q, k_cache, v_cache, ctx.cu_seqlens_q, ctx.cu_seqlens_k, ctx.max_seqlen_q, scale,
                                 block_tables=ctx.block_tables)

    def decode(self, q, k_cache, v_cache, ctx: Context, scale):
        return paged_decode(q, k_cache, v_cache, ctx.block_tables, ctx.context_lens, scale, num_sms=self.num_sms)
