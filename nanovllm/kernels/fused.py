"""Fused Triton kernels for the small per-layer ops: RMSNorm (with residual add), per-head q/k RMSNorm
with RoPE (which can also store the keys and values in the paged cache), and SiLU·mul.

Unfused, each of these is several elementwise kernels; at decode batch sizes every kernel costs a few
microseconds whatever its size, which adds up to milliseconds per step over a model's layers. Each
kernel rounds to the activation dtype wherever the torch reference does, so their results agree
with it to the last bit or nearly.
"""
import torch
import triton
import triton.language as tl

from nanovllm.kernels import rope
from nanovllm.kernels.attention import check_cache, store_at_slot
from nanovllm.kernels.dependent_launch import dependent_launch, wait_for_previous
from nanovllm.utils.context import KVStore

# qk_norm_rope: a program of one (token, head) costs more to schedule than its work, which made the
# kernel 5x slower than its bytes on a prefill; four tokens per program were the fastest on an H200.
QK_ROPE_TOKENS_PER_PROGRAM = 4


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
                     stride_x, stride_r, stride_o, stride_ro, n_cols, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    wait_for_previous(PDL)
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(residual_out_ptr + row * stride_ro + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x32 * x32, axis=0) / n_cols + eps)
    normed = (x32 * rstd).to(x.dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def _row_warps(block: int) -> int:
    return min(max(block // 512, 1), 8)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """norm(x) * weight over the last dim; with residual, (norm(x + residual) * weight, x + residual)."""
    shape, n_cols = x.shape, x.shape[-1]
    x = x.reshape(-1, n_cols)
    assert x.stride(-1) == 1 and weight.is_contiguous()
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    block = triton.next_power_of_2(n_cols)
    pdl = dependent_launch(x.device)
    if x.size(0) == 0:
        return out.view(shape) if residual is None else (out.view(shape), residual.clone())
    if residual is None:
        _rms_norm_kernel[(x.size(0),)](x, x, weight, out, out, x.stride(0), 0, out.stride(0), 0, n_cols, eps,
                                       HAS_RESIDUAL=False, BLOCK=block, num_warps=_row_warps(block),
                                       PDL=pdl, launch_pdl=pdl)
        return out.view(shape)
    residual = residual.reshape(-1, n_cols)
    assert residual.stride(-1) == 1
    residual_out = torch.empty_like(x)
    _rms_norm_kernel[(x.size(0),)](x, residual, weight, out, residual_out, x.stride(0), residual.stride(0),
                                   out.stride(0), residual_out.stride(0), n_cols, eps,
                                   HAS_RESIDUAL=True, BLOCK=block, num_warps=_row_warps(block),
                                   PDL=pdl, launch_pdl=pdl)
    return out.view(shape), residual_out.view(shape)


@triton.jit(do_not_specialize=["num_tokens"])
def _qk_norm_rope_kernel(q_ptr, k_ptr, q_weight_ptr, k_weight_ptr, cos_ptr, sin_ptr, pos_ptr, q_out_ptr, k_out_ptr,
                         v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                         num_tokens, stride_qn, stride_qh, stride_kn, stride_kh, stride_cos, eps,
                         stride_vn, stride_vh, stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch,
                         NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr,
                         BLOCK_HALF: tl.constexpr, BLOCK_T: tl.constexpr, STORE: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr, PDL: tl.constexpr):
    """One program per (BLOCK_T tokens, head): RMSNorm over the head, then rotate-half RoPE at each
    token's position. With STORE, a key head's program also writes the key and the value of its head
    into the paged cache at each token's slot (-1: none), as store_kv does."""
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(1)
    rows = toks.to(tl.int64)
    if head < NUM_Q_HEADS:
        src = q_ptr + rows * stride_qn + head * stride_qh
        weight_ptr = q_weight_ptr
        dst = q_out_ptr + (rows * NUM_Q_HEADS + head) * (2 * HALF)
    else:
        src = k_ptr + rows * stride_kn + (head - NUM_Q_HEADS) * stride_kh
        weight_ptr = k_weight_ptr
        dst = k_out_ptr + (rows * NUM_KV_HEADS + head - NUM_Q_HEADS) * (2 * HALF)
    offs = tl.arange(0, BLOCK_HALF)
    col_mask = offs < HALF
    tok_mask = toks < num_tokens
    mask = tok_mask[:, None] & col_mask[None, :]
    w1 = tl.load(weight_ptr + offs, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    w2 = tl.load(weight_ptr + HALF + offs, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    # The positions are the step's input, which no kernel of the step writes.
    pos = tl.load(pos_ptr + toks, mask=tok_mask, other=0).to(tl.int64)[:, None]
    cos = tl.load(cos_ptr + pos * stride_cos + offs[None, :], mask=mask, other=0.0)
    sin = tl.load(sin_ptr + pos * stride_cos + offs[None, :], mask=mask, other=0.0)
    wait_for_previous(PDL)
    x1 = tl.load(src[:, None] + offs[None, :], mask=mask, other=0.0)
    x2 = tl.load(src[:, None] + HALF + offs[None, :], mask=mask, other=0.0)
    dtype = x1.dtype
    a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
    rstd = tl.rsqrt((tl.sum(a1 * a1, axis=1) + tl.sum(a2 * a2, axis=1)) / (2 * HALF) + eps)[:, None]
    y1, y2 = rope.normed(a1, rstd, w1, dtype), rope.normed(a2, rstd, w2, dtype)
    out1, out2 = rope.rotated(y1, y2, cos, -sin, dtype), rope.rotated(y2, y1, cos, sin, dtype)
    tl.store(dst[:, None] + offs[None, :], out1, mask=mask)
    tl.store(dst[:, None] + HALF + offs[None, :], out2, mask=mask)
    if STORE:
        if head >= NUM_Q_HEADS:
            kv_head = head - NUM_Q_HEADS
            slot = tl.load(slot_ptr + toks, mask=tok_mask, other=-1).to(tl.int64)
            store_mask = mask & (slot >= 0)[:, None]
            slot = tl.maximum(slot, 0)[:, None]
            v_src = v_ptr + rows[:, None] * stride_vn + kv_head * stride_vh + offs[None, :]
            v1 = tl.load(v_src, mask=store_mask, other=0.0)
            v2 = tl.load(v_src + HALF, mask=store_mask, other=0.0)
            k_offs, v_offs = kv_head * stride_kch + offs[None, :], kv_head * stride_vch + offs[None, :]
            store_at_slot(k_cache_ptr, v_cache_ptr, slot, k_offs, v_offs, out1, v1, store_mask,
                          stride_kcb, stride_kct, stride_vcb, stride_vct, BLOCK_SIZE)
            store_at_slot(k_cache_ptr, v_cache_ptr, slot, k_offs + HALF, v_offs + HALF, out2, v2, store_mask,
                          stride_kcb, stride_kct, stride_vcb, stride_vct, BLOCK_SIZE)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                 cos_sin_cache: torch.Tensor, positions: torch.Tensor,
                 store: KVStore | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q [N, Hq, D] and k [N, Hkv, D] (strided views allowed) -> contiguous normed and rotated copies.

    cos_sin_cache is [2, max_positions, D] float32 with each row's two halves equal (rotate-half layout).
    store: the rotated keys and the values v [N, Hkv, D] are also written into this paged cache (not a
    float8 one), as nanovllm.kernels.attention.store_kv writes them, without a kernel of its own.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.size(1)
    assert q.stride(2) == 1 and k.stride(2) == 1 and head_dim % 2 == 0 and cos_sin_cache.stride(2) == 1
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens == 0:
        return q_out, k_out
    half = head_dim // 2
    pdl = dependent_launch(q.device)
    if store is not None:
        v, k_cache, v_cache, slot_mapping = store.v, store.k_cache, store.v_cache, store.slot_mapping
        check_cache(k_cache)
        assert v.shape == k.shape and v.stride(2) == 1 and slot_mapping.size(0) >= num_tokens
        assert k_cache.dtype == v_cache.dtype == k.dtype, "the fused store does not quantize"
    else:
        v = k_cache = v_cache = slot_mapping = q
    _qk_norm_rope_kernel[(triton.cdiv(num_tokens, QK_ROPE_TOKENS_PER_PROGRAM), num_q_heads + num_kv_heads)](
        q, k, q_weight, k_weight, cos_sin_cache[0], cos_sin_cache[1], positions, q_out, k_out,
        v, k_cache, v_cache, slot_mapping,
        num_tokens, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(1), eps,
        *(v.stride()[:2] if store else (0, 0)), *(k_cache.stride()[:3] if store else (0, 0, 0)),
        *(v_cache.stride()[:3] if store else (0, 0, 0)),
        NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads, HALF=half, BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_T=QK_ROPE_TOKENS_PER_PROGRAM, STORE=store is not None,
        BLOCK_SIZE=k_cache.size(1) if store else 1, PDL=pdl, launch_pdl=pdl,
        # Fused multiply-adds would skip the reference's rounding of each product.
        num_warps=1, enable_fp_fusion=False)
    return q_out, k_out


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g * tl.sigmoid(g)).to(gate.dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (act * up.to(tl.float32)).to(gate.dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :n]) * x[..., n:] with n = x.shape[-1] // 2."""
    n_cols = x.shape[-1] // 2
    rows = x.reshape(-1, 2 * n_cols)
    assert rows.stride(-1) == 1
    out = torch.empty((rows.size(0), n_cols), dtype=x.dtype, device=x.device)
    block = min(triton.next_power_of_2(n_cols), 1024)
    if rows.size(0):
        _silu_and_mul_kernel[(rows.size(0), triton.cdiv(n_cols, block))](
            rows, out, rows.stride(0), out.stride(0), n_cols, BLOCK=block, num_warps=4)
    return out.view(*x.shape[:-1], n_cols)
