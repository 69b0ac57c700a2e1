"""Triton kernels for the paged KV cache: store, split-KV decode attention, varlen causal prefill.

Caches are [num_blocks, block_size, num_kv_heads, head_dim] views whose block stride may exceed the
block's size (block-major cache holding every layer); only the last dimension must be contiguous.
Softmax runs in base 2: scores are scaled by scale * log2(e) so exp2 can be used.

A float8 cache comes with per-head scales (kv_scales [2, num_kv_heads], see kv_quant): store_kv
quantizes, attention converts the loaded tiles in registers and applies the scales outside the dot
products (a head's key scale joins the score scale, its value scale the output). With 16-bit queries
the dot products over a float8 cache run in float16 (FP16_DOT): float8 e4m3 converts to float16 exactly,
two values per instruction, where bfloat16 takes several instructions per value, which made the
conversion, not the memory, bound the kernel; a bf16 query is exact in float16 over float16's range,
which it is saturated to. Value tiles are converted before they take the dot operand's layout
(_fp8_to_fp16): that layout puts a thread's values along the token axis, which float8 rows hold one
byte apart, so Triton's own order (layout first, then convert) reads shared memory a byte at a time.
"""
import torch
import triton
import triton.language as tl

from nanovllm.kernels import rope
from nanovllm.kernels.dependent_launch import dependent_launch, wait_for_previous
from nanovllm.partitions.sm_limit import num_sms_of
from nanovllm.utils.context import DecodeRope

LOG2E = 1.4426950408889634
# The largest finite float8 e4m3 value, where a float8 cache saturates.
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max
# Kernels may read module globals only as constexprs.
FP8_MAX_CONSTEXPR = tl.constexpr(FP8_MAX)
# The interpreter (the CPU tests) cannot run inline PTX.
PTX = tl.constexpr(not triton.knobs.runtime.interpret)
FP16_MAX = tl.constexpr(65504.0)
# Enough resident programs per SM to keep a memory-bound kernel's loads in flight.
PROGRAMS_PER_SM = 4
# One tile: where few sequences decode, splits of one tile each put the most SMs to work on a context
# (at batch 1, 7% off a step of qwen3-0.6b against splits of 256 tokens, H200, docs/benchmarks.md).
MIN_TOKENS_PER_SPLIT = 64
MAX_SPLITS = 64
# Sequences a prefill program looks through at a time to find its own.
QUERY_BLOCK_SEARCH = 128
# Sequences ranked per program, and compared per iteration, by the longest-first ordering.
ORDER_BLOCK = 64


@triton.jit
def _quantized(x, scale):
    """x in a float8 cache's units: divided by its head's scale, saturated to the float8 range."""
    return tl.clamp(tl.math.div_rn(x.to(tl.float32), scale), -FP8_MAX_CONSTEXPR, FP8_MAX_CONSTEXPR)


@triton.jit
def store_at_slot(k_cache_ptr, v_cache_ptr, slot, k_offs, v_offs, k, v, mask,
                  stride_kb, stride_kt, stride_vb, stride_vt, BLOCK_SIZE: tl.constexpr):
    """Writes key k and value v, in the caches' dtype, into the cache rows of slot (block * BLOCK_SIZE + offset,
    int64 and >= 0) at the offsets k_offs and v_offs within a row (head and dim), where mask."""
    block, offset = slot // BLOCK_SIZE, slot % BLOCK_SIZE
    tl.store(k_cache_ptr + block * stride_kb + offset * stride_kt + k_offs, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + block * stride_vb + offset * stride_vt + v_offs, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, scales_ptr,
    stride_kn, stride_kh, stride_vn, stride_vh,
    stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch, stride_s,
    NUM_HEADS: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    QUANTIZE: tl.constexpr,
):
    i = tl.program_id(0)
    slot = tl.load(slot_ptr + i).to(tl.int64)
    if slot < 0:
        return
    offs_h = tl.arange(0, BLOCK_H)[:, None]
    offs_d = tl.arange(0, HEAD_DIM)[None, :]
    mask = offs_h < NUM_HEADS
    k = tl.load(k_ptr + i * stride_kn + offs_h * stride_kh + offs_d, mask=mask)
    v = tl.load(v_ptr + i * stride_vn + offs_h * stride_vh + offs_d, mask=mask)
    if QUANTIZE:
        k = _quantized(k, tl.load(scales_ptr + offs_h, mask=mask, other=1.0))
        v = _quantized(v, tl.load(scales_ptr + stride_s + offs_h, mask=mask, other=1.0))
    store_at_slot(k_cache_ptr, v_cache_ptr, slot, offs_h * stride_kch + offs_d, offs_h * stride_vch + offs_d, k, v,
                  mask, stride_kcb, stride_kct, stride_vcb, stride_vct, BLOCK_SIZE)


@triton.jit
def _longest_first_kernel(context_lens_ptr, order_ptr, batch, BLOCK: tl.constexpr):
    """order[rank] = i, where rank counts the sequences longer than i, or as long and before it."""
    offs_i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask_i = offs_i < batch
    len_i = tl.load(context_lens_ptr + offs_i, mask=mask_i, other=0)
    rank = tl.zeros([BLOCK], tl.int32)
    for first in range(0, batch, BLOCK):
        offs_j = first + tl.arange(0, BLOCK)
        len_j = tl.load(context_lens_ptr + offs_j, mask=offs_j < batch, other=-1)  # -1: never ahead
        ahead = (len_j[None, :] > len_i[:, None]) | ((len_j[None, :] == len_i[:, None]) & (offs_j[None, :] < offs_i[:, None]))
        rank += tl.sum(ahead.to(tl.int32), 1)
    tl.store(order_ptr + rank, offs_i, mask=mask_i)


@triton.jit
def _tile_blocks(block_table_ptr, start, offs_n, hi, BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr):
    """Cache blocks (int64) of tokens start + offs_n; tokens at or past hi get block 0.

    Tiles start at multiples of TILE_N, so with TILE_N <= BLOCK_SIZE a tile lies inside one block
    and one scalar read serves it. Reading a tile's blocks one iteration ahead lets Triton's
    pipeliner multi-buffer the K/V loads that depend on them.
    """
    if TILE_N <= BLOCK_SIZE:
        block = tl.load(block_table_ptr + start // BLOCK_SIZE, mask=start < hi, other=0)
    else:
        toks = start + offs_n
        block = tl.load(block_table_ptr + toks // BLOCK_SIZE, mask=toks < hi, other=0)
    # Clamped so that padding (-1) can never address memory before the cache.
    return tl.maximum(block, 0).to(tl.int64)


@triton.jit
def _as_fp16(x):
    return tl.clamp(x.to(tl.float32), -FP16_MAX, FP16_MAX).to(tl.float16)


@triton.jit
def _fp8_to_fp16(x):
    """float8 e4m3 -> float16, exact. As inline PTX the conversion is opaque to Triton, which therefore
    cannot move the tile's change of layout ahead of it onto the float8 bytes."""
    if PTX:
        return tl.inline_asm_elementwise(
            "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; cvt.rn.f16x2.e4m3x2 $0, lo; cvt.rn.f16x2.e4m3x2 $1, hi; }",
            "=r,=r,r", [x], dtype=tl.float16, is_pure=False, pack=4)
    return x.to(tl.float16)


@triton.jit
def _attend_tile(q, k, v_ptrs, tok_mask, visible, m_i, l_i, acc, qk_scale, MASKED: tl.constexpr):
    """One online-softmax step in base 2: folds a tile of keys k and values (loaded from v_ptrs where
    tok_mask) into the running max m_i, denominator l_i and output acc; visible masks the scores.
    Without MASKED every key of the tile is visible to every row, and neither mask is applied.
    Cached tiles of another dtype (float8) are converted to q's dtype."""
    s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision="ieee") * qk_scale
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED:
        v = tl.load(v_ptrs, mask=tok_mask[:, None], other=0.0)
    else:
        v = tl.load(v_ptrs)
    if v.dtype == tl.float8e4nv and q.dtype == tl.float16:
        v = _fp8_to_fp16(v)
    v = v.to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision="ieee")
    return m_new, l_i, acc


# The block table's row stride (its width) varies from batch to batch outside CUDA graphs; specialised
# on it (== 1, % 16), a kernel would compile again in the middle of serving.
@triton.jit(do_not_specialize=["stride_bt"])
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, order_ptr, scales_ptr,
    out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, qk_scale,
    stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_bt, stride_s, stride_ob, stride_oh,
    new_k_ptr, new_v_ptr, q_norm_ptr, k_norm_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr, eps,
    stride_nkb, stride_nkh, stride_nvb, stride_nvh, stride_cos,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr, NUM_SPLITS: tl.constexpr, DEQUANTIZE: tl.constexpr, FP16_DOT: tl.constexpr,
    PDL: tl.constexpr, EARLY_INPUTS: tl.constexpr, ROPE: tl.constexpr,
):
    """One program: one sequence, one KV head with its GROUP query heads, one slice of the context.

    KV heads vary fastest across programs: a token's heads are adjacent in the cache, so programs
    running side by side read neighbouring memory. Sequences start longest first (order): a long one
    started last would leave the SMs idle while it finishes. With EARLY_INPUTS the step's inputs (order,
    context lengths, block tables) were written before the kernel before this one, which has waited for
    them: a dependent launch reads them before its own wait, while that kernel finishes.

    With ROPE, q and the step's new keys and values (new_k, new_v) are the qkv projection's: the program
    normalizes and rotates its query heads itself (qk_norm_rope's arithmetic), and the program whose slice
    holds the new token stores that token's key and value (quantized for a float8 cache) at its slot
    before it reads the slice, as store_kv would have before the kernel.
    """
    if not EARLY_INPUTS:
        wait_for_previous(PDL)
    kv_head = tl.program_id(0)
    b = tl.load(order_ptr + tl.program_id(1))
    split = tl.program_id(2)
    num_kv_heads = tl.num_programs(0)

    context_len = tl.load(context_lens_ptr + b)
    if DEQUANTIZE:
        qk_scale = qk_scale * tl.load(scales_ptr + kv_head)
    # Split the actual context evenly, in whole tiles; trailing splits of short contexts stay empty.
    chunk = tl.cdiv(tl.cdiv(context_len, NUM_SPLITS), TILE_N) * TILE_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, context_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, TILE_N)
    heads = kv_head * GROUP + offs_g
    g_mask = offs_g < GROUP
    block_table = block_tables_ptr + b * stride_bt
    blocks = _tile_blocks(block_table, lo, offs_n, hi, BLOCK_SIZE, TILE_N)
    if ROPE:
        # The positions are the step's input, the table and the norms' weights constants: all read before
        # the wait where the sequence is known by then.
        half = HEAD_DIM // 2
        partner = (offs_d + half) % HEAD_DIM
        position = tl.load(pos_ptr + b).to(tl.int64)
        cos = tl.load(cos_ptr + position * stride_cos + offs_d)
        signed_sin = tl.load(sin_ptr + position * stride_cos + offs_d) * tl.where(offs_d < half, -1.0, 1.0)
        q_norm, q_norm_partner = tl.load(q_norm_ptr + offs_d), tl.load(q_norm_ptr + partner)
        k_norm, k_norm_partner = tl.load(k_norm_ptr + offs_d), tl.load(k_norm_ptr + partner)
    if EARLY_INPUTS:
        wait_for_previous(PDL)
    # Rows past GROUP pad the query tile to the 16 rows tl.dot needs; they are never stored.
    q_rows = q_ptr + b * stride_qb + heads[:, None] * stride_qh
    q = tl.load(q_rows + offs_d[None, :], mask=g_mask[:, None], other=0.0)
    if ROPE:
        q_partner = tl.load(q_rows + partner[None, :], mask=g_mask[:, None], other=0.0)
        q = _normed_rotated(q, q_partner, q_norm, q_norm_partner, cos, signed_sin, eps, HEAD_DIM)
        if (lo <= context_len - 1) & (context_len - 1 < hi):
            k_row = new_k_ptr + b * stride_nkb + kv_head * stride_nkh
            k_new = _normed_rotated(tl.load(k_row + offs_d)[None, :], tl.load(k_row + partner)[None, :], k_norm,
                                    k_norm_partner, cos, signed_sin, eps, HEAD_DIM)
            v_new = tl.load(new_v_ptr + b * stride_nvb + kv_head * stride_nvh + offs_d)[None, :]
            if DEQUANTIZE:
                k_new = _quantized(k_new, tl.load(scales_ptr + kv_head))
                v_new = _quantized(v_new, tl.load(scales_ptr + stride_s + kv_head))
            slot = tl.load(slot_ptr + b).to(tl.int64)
            slot_mask = (tl.zeros([1, HEAD_DIM], tl.int64) + slot) >= 0
            store_at_slot(k_cache_ptr, v_cache_ptr, tl.maximum(slot, 0), kv_head * stride_kh + offs_d[None, :],
                          kv_head * stride_vh + offs_d[None, :], k_new, v_new, slot_mask,
                          stride_kb, stride_kt, stride_vb, stride_vt, BLOCK_SIZE)
            # The slice's last tile reads them back: every thread's stores land before any thread loads.
            tl.debug_barrier()
    if FP16_DOT:
        q = _as_fp16(q)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    for start in range(lo, hi, TILE_N):
        tok_mask = start + offs_n < hi
        pos = (start + offs_n) % BLOCK_SIZE
        k_rows = blocks * stride_kb + pos * stride_kt
        v_rows = blocks * stride_vb + pos * stride_vt
        blocks = _tile_blocks(block_table, start + TILE_N, offs_n, hi, BLOCK_SIZE, TILE_N)
        k = tl.load(k_cache_ptr + k_rows[:, None] + kv_head * stride_kh + offs_d[None, :],
                    mask=tok_mask[:, None], other=0.0)
        # Every tile holds a valid token, so the running max is finite from the first tile on.
        m_i, l_i, acc = _attend_tile(q, k, v_cache_ptr + v_rows[:, None] + kv_head * stride_vh + offs_d[None, :],
                                     tok_mask, tok_mask[None, :], m_i, l_i, acc, qk_scale, True)
    if DEQUANTIZE:
        acc = acc * tl.load(scales_ptr + stride_s + kv_head)

    if NUM_SPLITS == 1:
        # Empty contexts (padding rows of a captured batch) give zeros instead of NaN.
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
    else:
        part = (b * num_kv_heads * GROUP + heads) * NUM_SPLITS + split
        tl.store(part_m_ptr + part, m_i, mask=g_mask)
        tl.store(part_l_ptr + part, l_i, mask=g_mask)
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=g_mask[:, None])


@triton.jit
def _normed_rotated(x, partner, weight, weight_partner, cos, signed_sin, eps, HEAD_DIM: tl.constexpr):
    """Heads x [rows, HEAD_DIM] and partner, each row's halves swapped: per-head RMSNorm with weight (and
    weight_partner, swapped likewise), then RoPE at the position of cos and signed_sin [HEAD_DIM], in x's
    dtype."""
    dtype = x.dtype
    a, a_partner = x.to(tl.float32), partner.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(a * a, axis=1) / HEAD_DIM + eps)[:, None]
    y = rope.normed(a, rstd, weight.to(tl.float32)[None, :], dtype)
    y_partner = rope.normed(a_partner, rstd, weight_partner.to(tl.float32)[None, :], dtype)
    return rope.rotated(y, y_partner, cos[None, :], signed_sin[None, :], dtype)


@triton.jit
def _decode_reduce_kernel(out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, num_heads, stride_ob, stride_oh,
                          HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
                          PDL: tl.constexpr):
    """Merges the splits of one (sequence, query head) row."""
    wait_for_previous(PDL)
    row = tl.program_id(0)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    s_mask = offs_s < NUM_SPLITS
    part = row * NUM_SPLITS + offs_s
    m = tl.load(part_m_ptr + part, mask=s_mask, other=float("-inf"))
    l = tl.load(part_l_ptr + part, mask=s_mask, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_max)  # empty splits have m = -inf and weigh nothing
    acc = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], mask=s_mask[:, None], other=0.0)
    num = tl.sum(acc * w[:, None], 0)
    den = tl.sum(l * w, 0)
    out = num / tl.where(den == 0.0, 1.0, den)
    b = row // num_heads
    h = row % num_heads
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty))


@triton.jit
def _query_block(cu_q_ptr, num_seqs, pid, BLOCK_M: tl.constexpr, SEARCH: tl.constexpr):
    """(sequence, query block) of program pid, where the sequences take cdiv(q_len, BLOCK_M) programs
    each, in order; sequence -1 past the last. Found on the device, so that the grid depends only on
    the token and sequence counts, which a captured prefill fixes."""
    offs = tl.arange(0, SEARCH)
    seq = -1
    block = 0
    before = 0  # programs of the sequences before this chunk of SEARCH
    for first in range(0, num_seqs, SEARCH):
        idx = first + offs
        mask = idx < num_seqs
        q_len = tl.load(cu_q_ptr + idx + 1, mask=mask, other=0) - tl.load(cu_q_ptr + idx, mask=mask, other=0)
        count = tl.where(mask, (q_len + BLOCK_M - 1) // BLOCK_M, 0)
        start = tl.cumsum(count, 0) - count + before
        hit = (pid >= start) & (pid < start + count)
        seq = tl.maximum(seq, tl.max(tl.where(hit, idx, -1), 0))
        block += tl.sum(tl.where(hit, pid - start, 0), 0)
        before += tl.sum(count, 0)
    return seq, block


@triton.jit
def _prefill_step(q, k_ptr, v_ptr, block_table, blocks, start, hi, q_start, q_pos, offs_n, offs_d, kv_head,
                  m_i, l_i, acc, qk_scale, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                  BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, PAGED: tl.constexpr, MASKED: tl.constexpr):
    """Folds the key tile at start into the running softmax; returns it with the blocks of the next tile."""
    toks = start + offs_n
    tok_mask = toks < hi
    if PAGED:
        k_rows = blocks * stride_kb + (toks % BLOCK_SIZE) * stride_kt
        v_rows = blocks * stride_vb + (toks % BLOCK_SIZE) * stride_vt
        blocks = _tile_blocks(block_table, start + BLOCK_N, offs_n, hi, BLOCK_SIZE, BLOCK_N)
    else:
        k_rows = (q_start + toks).to(tl.int64) * stride_kt
        v_rows = (q_start + toks).to(tl.int64) * stride_vt
    k_ptrs = k_ptr + k_rows[:, None] + kv_head * stride_kh + offs_d[None, :]
    if MASKED:
        k = tl.load(k_ptrs, mask=tok_mask[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
    # Key 0 is visible to every row, so each row's max is finite after the first tile.
    visible = tok_mask[None, :] & (toks[None, :] <= q_pos[:, None])
    m_i, l_i, acc = _attend_tile(q, k, v_ptr + v_rows[:, None] + kv_head * stride_vh + offs_d[None, :],
                                 tok_mask, visible, m_i, l_i, acc, qk_scale, MASKED)
    return m_i, l_i, acc, blocks


@triton.jit(do_not_specialize=["stride_bt", "num_seqs"])
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, cu_q_ptr, cu_k_ptr, block_tables_ptr, scales_ptr, qk_scale, num_seqs,
    stride_qn, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_bt, stride_s, stride_on, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, PAGED: tl.constexpr, DEQUANTIZE: tl.constexpr, FP16_DOT: tl.constexpr,
    SEARCH: tl.constexpr,
):
    """One program: BLOCK_M new queries of one sequence and one query head.

    PAGED: keys/values come from the cache through the block table and the queries are the last
    tokens of the context; otherwise k/v are the new tokens' own [N, Hkv, D] rows. The tiles of keys
    that every query of the block sees run without masks; only those at the causal diagonal take them.
    """
    b, m_block = _query_block(cu_q_ptr, num_seqs, tl.program_id(0), BLOCK_M, SEARCH)
    if b < 0:
        return
    head = tl.program_id(1)
    q_start = tl.load(cu_q_ptr + b)
    q_len = tl.load(cu_q_ptr + b + 1) - q_start
    if PAGED:
        k_len = tl.load(cu_k_ptr + b + 1) - tl.load(cu_k_ptr + b)
    else:
        k_len = q_len
    prefix = k_len - q_len
    kv_head = head // GROUP
    if DEQUANTIZE:
        qk_scale = qk_scale * tl.load(scales_ptr + kv_head)

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    m_mask = offs_m < q_len
    q = tl.load(q_ptr + (q_start + offs_m)[:, None] * stride_qn + head * stride_qh + offs_d[None, :],
                mask=m_mask[:, None], other=0.0)
    if FP16_DOT:
        q = _as_fp16(q)
    q_pos = prefix + offs_m

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    block_table = block_tables_ptr + b * stride_bt
    hi = tl.minimum(k_len, prefix + (m_block + 1) * BLOCK_M)
    # Keys up to the block's first query position are visible to all its rows (and exist).
    unmasked_hi = (prefix + m_block * BLOCK_M + 1) // BLOCK_N * BLOCK_N
    blocks = offs_n  # unused without PAGED
    if PAGED:
        blocks = _tile_blocks(block_table, 0, offs_n, hi, BLOCK_SIZE, BLOCK_N)
    for start in range(0, unmasked_hi, BLOCK_N):
        m_i, l_i, acc, blocks = _prefill_step(
            q, k_ptr, v_ptr, block_table, blocks, start, hi, q_start, q_pos, offs_n, offs_d, kv_head,
            m_i, l_i, acc, qk_scale, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
            BLOCK_N, BLOCK_SIZE, PAGED, False)
    for start in range(unmasked_hi, hi, BLOCK_N):
        m_i, l_i, acc, blocks = _prefill_step(
            q, k_ptr, v_ptr, block_table, blocks, start, hi, q_start, q_pos, offs_n, offs_d, kv_head,
            m_i, l_i, acc, qk_scale, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
            BLOCK_N, BLOCK_SIZE, PAGED, True)

    if DEQUANTIZE:
        acc = acc * tl.load(scales_ptr + stride_s + kv_head)
    out = acc / l_i[:, None]
    tl.store(out_ptr + (q_start + offs_m)[:, None] * stride_on + head * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None])


def _check_head_dim(head_dim: int):
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"triton attention needs a power-of-two head_dim >= 16, got {head_dim}")


def check_cache(cache: torch.Tensor):
    block_size = cache.size(1)
    if block_size < 16 or block_size & (block_size - 1) or cache.stride(3) != 1:
        raise ValueError("triton attention needs a power-of-two block size >= 16 and contiguous head_dim")


def _scales_args(kv_scales: torch.Tensor | None, cache: torch.Tensor) -> tuple[torch.Tensor, int, bool]:
    """(pointer, row stride, quantized) kernel arguments for a cache's scales; the cache itself
    stands in as the unused pointer of an unquantized cache."""
    if kv_scales is None:
        return cache, 0, False
    assert kv_scales.dtype == torch.float32 and kv_scales.stride(1) == 1 and kv_scales.size(1) == cache.size(2)
    return kv_scales, kv_scales.stride(0), True


def _fp16_dot(q: torch.Tensor, dequantize: bool) -> bool:
    """Whether the dot products over a float8 cache run in float16 (see the module's docstring)."""
    return dequantize and q.dtype in (torch.bfloat16, torch.float16)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, kv_scales: torch.Tensor | None = None) -> None:
    """k, v [N, Hkv, D] -> cache slots slot_mapping[i] (block * block_size + offset); -1 skips.
    With kv_scales, quantized to the (float8) cache's dtype."""
    num_tokens, num_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    _check_head_dim(head_dim)
    check_cache(k_cache)
    assert k.stride(2) == 1 and v.stride(2) == 1
    scales, stride_s, quantize = _scales_args(kv_scales, k_cache)
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, scales,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), stride_s,
        NUM_HEADS=num_heads, BLOCK_H=triton.next_power_of_2(num_heads), HEAD_DIM=head_dim,
        BLOCK_SIZE=k_cache.size(1), QUANTIZE=quantize,
    )


def choose_num_splits(batch: int, num_kv_heads: int, max_context: int, num_sms: int) -> int:
    """Splits per (sequence, KV head) so that about PROGRAMS_PER_SM programs run on each SM.

    Depends only on shapes, never on tensor data, so a captured CUDA graph stays valid.
    """
    programs = batch * num_kv_heads
    wanted = triton.cdiv(PROGRAMS_PER_SM * num_sms, programs)
    useful = max(1, max_context // MIN_TOKENS_PER_SPLIT)
    return max(1, min(wanted, useful, MAX_SPLITS))


def longest_first(context_lens: torch.Tensor) -> torch.Tensor:
    """The batch's rows by falling context length (ties in row order), int32; capturable in a CUDA graph."""
    batch = context_lens.numel()
    order = torch.empty(batch, dtype=torch.int32, device=context_lens.device)
    if batch:
        _longest_first_kernel[(triton.cdiv(batch, ORDER_BLOCK),)](context_lens, order, batch, BLOCK=ORDER_BLOCK)
    return order


def decode_tile_config(dtype: torch.dtype, head_dim: int, quantized: bool) -> tuple[int, int, int]:
    """(tokens per tile, num_warps, num_stages); fp32 tiles are halved to fit shared memory. A float8
    cache with 16-bit queries runs best on two warps (83% of the copy rate against 70% on four, H200)."""
    if dtype == torch.float32 or head_dim > 128:
        return 32, 4, 2
    return 64, 2 if quantized else 4, 3


def _rope_args(rope: DecodeRope | None, q: torch.Tensor) -> tuple:
    """_decode_kernel's arguments from new_k_ptr to stride_cos (unused placeholders without rope)."""
    if rope is None:
        return (q,) * 8 + (0.0,) + (0,) * 5
    k, v, table = rope.k, rope.v, rope.cos_sin_cache
    assert k.shape == v.shape == (q.size(0), k.size(1), q.size(2)) and k.stride(2) == 1 and v.stride(2) == 1
    assert table.dtype == torch.float32 and table.stride(2) == 1 and table.size(2) == q.size(2)
    assert rope.q_norm_weight.is_contiguous() and rope.k_norm_weight.is_contiguous()
    return (k, v, rope.q_norm_weight, rope.k_norm_weight, table[0], table[1], rope.positions, rope.slot_mapping,
            rope.eps, k.stride(0), k.stride(1), v.stride(0), v.stride(1), table.stride(1))


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, scale: float, num_splits: int | None = None,
                 tile_n: int | None = None, kv_scales: torch.Tensor | None = None,
                 order: torch.Tensor | None = None, early_inputs: bool = False,
                 rope: DecodeRope | None = None) -> torch.Tensor:
    """q [B, Hq, D] attends to context_lens[b] cached tokens of block_tables[b] -> [B, Hq, D];
    kv_scales dequantize a float8 cache; order is longest_first(context_lens), computed here if not given.
    early_inputs: order (given), context_lens and block_tables were written before the last kernel
    launched on the stream (at an earlier layer of the step, say), so the kernel may read them before it
    waits for that one. rope: q is raw (before its norm and RoPE), and the kernel also stores the step's
    keys and values (see DecodeRope), in place of fused.qk_norm_rope and store_kv before it.

    num_splits and tile_n override the heuristics (for benchmarking); all of them depend on shapes only, so
    the launch is CUDA-graph capturable.
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.size(2)
    block_size = k_cache.size(1)
    _check_head_dim(head_dim)
    check_cache(k_cache)
    assert q.stride(2) == 1 and num_heads % num_kv_heads == 0
    group = num_heads // num_kv_heads
    default_tile, default_warps, default_stages = decode_tile_config(q.dtype, head_dim, kv_scales is not None)
    tile_n = tile_n or default_tile
    out = torch.empty(batch, num_heads, head_dim, dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    if num_splits is None:
        max_context = block_tables.size(1) * block_size
        num_splits = choose_num_splits(batch, num_kv_heads, max_context, num_sms_of(q.device))
    if num_splits > 1:
        part_m = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    else:
        part_m = part_l = part_acc = out  # unused by the single-split variant
    scales, stride_s, dequantize = _scales_args(kv_scales, k_cache)
    assert order is not None or not early_inputs, "longest_first, launched here, writes the order just before"
    order = longest_first(context_lens) if order is None else order
    pdl = dependent_launch(q.device)
    _decode_kernel[(num_kv_heads, batch, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, order, scales, out, part_m, part_l, part_acc, scale * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0), stride_s,
        out.stride(0), out.stride(1), *_rope_args(rope, q),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        TILE_N=tile_n, NUM_SPLITS=num_splits, DEQUANTIZE=dequantize, FP16_DOT=_fp16_dot(q, dequantize),
        PDL=pdl, EARLY_INPUTS=early_inputs, ROPE=rope is not None, launch_pdl=pdl,
        num_warps=default_warps, num_stages=default_stages,
    )
    if num_splits > 1:
        _decode_reduce_kernel[(batch * num_heads,)](
            out, part_m, part_l, part_acc, num_heads, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, NUM_SPLITS=num_splits, BLOCK_S=triton.next_power_of_2(num_splits),
            PDL=pdl, launch_pdl=pdl, num_warps=4 if head_dim >= 128 else 2,
        )
    return out


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                      cu_seqlens_k: torch.Tensor, scale: float,
                      block_tables: torch.Tensor | None = None, kv_scales: torch.Tensor | None = None) -> torch.Tensor:
    """Causal varlen attention for q [N, Hq, D] -> [N, Hq, D].

    With block_tables, k/v are the paged caches (float8 ones dequantized with kv_scales) and
    sequence b's queries are the last of its cu_seqlens_k[b+1] - cu_seqlens_k[b] context tokens;
    without, k/v are [N, Hkv, D] rows laid out like q (no prefix) and cu_seqlens_k is ignored.
    Rows of q past cu_seqlens_q[-1] (padding) are left unwritten; so are empty sequences. The launch
    depends on the shapes only (CUDA-graph capturable).
    """
    num_tokens, num_heads, head_dim = q.shape
    _check_head_dim(head_dim)
    paged = block_tables is not None
    num_kv_heads = k.size(2) if paged else k.size(1)
    assert q.stride(2) == 1 and num_heads % num_kv_heads == 0
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=q.dtype, device=q.device)
    batch = cu_seqlens_q.numel() - 1
    if num_tokens == 0 or batch == 0:
        return out
    scales, stride_s, dequantize = _scales_args(kv_scales if paged else None, k)
    if paged:
        check_cache(k)
        k_strides = k.stride(0), k.stride(1), k.stride(2)
        v_strides = v.stride(0), v.stride(1), v.stride(2)
        block_size, stride_bt = k.size(1), block_tables.stride(0)
    else:
        assert k.stride(2) == 1 and v.stride(2) == 1
        k_strides = 0, k.stride(0), k.stride(1)
        v_strides = 0, v.stride(0), v.stride(1)
        block_tables, block_size, stride_bt = cu_seqlens_q, 16, 0  # table unused
    fp32 = q.dtype == torch.float32
    # Wide fp32 tiles spill registers on sm_90.
    block_m = block_n = 32 if fp32 or head_dim > 128 else 64
    # Each sequence takes cdiv(q_len, block_m) programs: at most cdiv(num_tokens, block_m) + batch.
    grid = (triton.cdiv(num_tokens, block_m) + batch, num_heads)
    _prefill_kernel[grid](
        q, k, v, out, cu_seqlens_q, cu_seqlens_k, block_tables, scales, scale * LOG2E, batch,
        q.stride(0), q.stride(1), *k_strides, *v_strides, stride_bt, stride_s, out.stride(0), out.stride(1),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_SIZE=block_size, PAGED=paged, DEQUANTIZE=dequantize, FP16_DOT=_fp16_dot(q, dequantize),
        SEARCH=QUERY_BLOCK_SEARCH, num_warps=4, num_stages=2 if fp32 else 3,
    )
    return out
