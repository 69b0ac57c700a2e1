import torch
import torch.nn.functional as F

from nanovllm.attention.base import AttentionBackend
from nanovllm.attention.kv_quant import dequantize, quantize
from nanovllm.utils.context import Context


class TorchBackend(AttentionBackend):
    """Reference attention in plain torch; runs on CPU and GPU, decode is graph-capturable.

    Slot -1 indexes the cache's last block, which the runner keeps out of the block manager,
    so padded entries need no masking here. With kv_scales, the cache is float8: keys/values are
    quantized as they are stored and dequantized as they are read.
    """

    name = "torch"

    def store_kv(self, k, v, k_cache, v_cache, slot_mapping, kv_scales=None):
        block_size = k_cache.size(1)
        blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
        if kv_scales is not None:
            k, v = quantize(k, kv_scales[0]), quantize(v, kv_scales[1])
        k_cache[blocks, offsets] = k
        v_cache[blocks, offsets] = v

    def prefill(self, q, k, v, k_cache, v_cache, ctx: Context, scale, kv_scales=None):
        out = torch.empty_like(q)
        cu_q, cu_k = ctx.cu_seqlens_q.tolist(), ctx.cu_seqlens_k.tolist()
        for b in range(len(cu_q) - 1):
            len_q, len_k = cu_q[b + 1] - cu_q[b], cu_k[b + 1] - cu_k[b]
            if ctx.block_tables is None:
                keys, values = k[cu_q[b]:cu_q[b + 1]], v[cu_q[b]:cu_q[b + 1]]
            else:
                keys, values = _gather(k_cache, v_cache, ctx.block_tables[b], len_k)
                keys, values = _read(keys, values, kv_scales, q.dtype)
            query_pos = torch.arange(len_k - len_q, len_k, device=q.device)
            mask = torch.arange(len_k, device=q.device)[None, :] <= query_pos[:, None]
            out[cu_q[b]:cu_q[b + 1]] = _sdpa(q[cu_q[b]:cu_q[b + 1]], keys, values, mask, scale)
        return out

    def decode(self, q, k_cache, v_cache, ctx: Context, scale, kv_scales=None):
        block_tables = ctx.block_tables.clamp(min=0)
        keys, values = _read(k_cache[block_tables].flatten(1, 2), v_cache[block_tables].flatten(1, 2), kv_scales,
                             q.dtype)
        keys, values = keys.transpose(1, 2), values.transpose(1, 2)
        mask = torch.arange(keys.size(2), device=q.device)[None, :] < ctx.context_lens[:, None]
        out = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=mask[:, None, None, :],
                                             scale=scale, enable_gqa=True)
        return out.squeeze(2)


def _gather(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor, length: int):
    block_size = k_cache.size(1)
    ids = block_table[:(length + block_size - 1) // block_size].long()
    return k_cache[ids].flatten(0, 1)[:length], v_cache[ids].flatten(0, 1)[:length]


def _read(keys: torch.Tensor, values: torch.Tensor, kv_scales: torch.Tensor | None, dtype: torch.dtype):
    """Cached keys/values [..., Hkv, D] as dtype."""
    if kv_scales is None:
        return keys, values
    return dequantize(keys, kv_scales[0], dtype), dequantize(values, kv_scales[1], dtype)


def _sdpa(q, k, v, mask, scale):
    """q [Lq, Hq, D], k/v [Lk, Hkv, D], mask [Lq, Lk] (True = attend) -> [Lq, Hq, D]."""
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(0, 1)
