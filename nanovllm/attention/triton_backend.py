from nanovllm.attention.base import AttentionBackend
from nanovllm.kernels.attention import longest_first, paged_decode, prefill_attention, store_kv
from nanovllm.utils.context import Context, DecodeRope


class TritonBackend(AttentionBackend):
    """Paged attention with the Triton kernels; prefill and decode are CUDA-graph capturable, and decode
    sizes its split count for the SMs it runs on (nanovllm.partitions.sm_limit)."""

    name = "triton"
    captures_prefill = True
    fuses_store = True
    fuses_rope = True

    def store_kv(self, k, v, k_cache, v_cache, slot_mapping, kv_scales=None):
        store_kv(k, v, k_cache, v_cache, slot_mapping, kv_scales)

    def prefill(self, q, k, v, k_cache, v_cache, ctx: Context, scale, kv_scales=None):
        if ctx.block_tables is None:
            return prefill_attention(q, k, v, ctx.cu_seqlens_q, ctx.cu_seqlens_q, scale)
        return prefill_attention(q, k_cache, v_cache, ctx.cu_seqlens_q, ctx.cu_seqlens_k, scale,
                                 block_tables=ctx.block_tables, kv_scales=kv_scales)

    def decode(self, q, k_cache, v_cache, ctx: Context, scale, kv_scales=None):
        return self.decode_rope(q, k_cache, v_cache, ctx, scale, kv_scales, None)

    def decode_rope(self, q, k_cache, v_cache, ctx: Context, scale, kv_scales, rope: DecodeRope | None):
        # The order is computed once per step, at the first layer. The later layers' kernels, launched after
        # it and the step's other inputs were written, read them before they wait for the kernel before.
        first_layer = ctx.decode_order is None
        if first_layer:
            ctx.decode_order = longest_first(ctx.context_lens)
        return paged_decode(q, k_cache, v_cache, ctx.block_tables, ctx.context_lens, scale,
                            kv_scales=kv_scales, order=ctx.decode_order, early_inputs=not first_layer, rope=rope)
