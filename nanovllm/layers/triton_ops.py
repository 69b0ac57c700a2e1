"""Fused Triton kernels for the small per-layer ops of decode: RMSNorm (with residual add), per-head
q/k RMSNorm with RoPE (which can also store the keys and values in the paged cache), and SiLU·mul.

Unfused, each of these is several elementwise kernels; at decode batch sizes every kernel costs a few
microseconds whatever its size, which adds up to milliseconds per step over a model's layers. Each
kernel rounds to the activation dtype wherever the torch reference does, so their results agree
with it to the last bit or nearly.
"""
import torch
import triton
import triton.language as tl

from nanovllm.attention.base import KVStore
from nanovllm.attention.triton_kernels import LOG2E, check_cache

LOG2E_CONSTEXPR = tl.constexpr(LOG2E)
# qk_norm_rope: a program of one (token, head) costs more to schedule than its work, which made the
# kernel 5x slower than its bytes on a prefill; four tokens per program were the fastest on an H200.
QK_ROPE_TOKENS_PER_PROGRAM = 4


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
                     stride_x, stride_r, stride_o, stride_ro, n_cols, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(residual_out_ptr + row * stride_ro + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x32 * x32, axis=0) / n_cols + eps)
    normed = (x32 * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
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
    if x.size(0) == 0:
        return out.view(shape) if residual is None else (out.view(shape), residual.clone())
    if residual is None:
        _rms_norm_kernel[(x.size(0),)](x, x, weight, out, out, x.stride(0), 0, out.stride(0), 0, n_cols, eps,
                                       HAS_RESIDUAL=False, BLOCK=block, num_warps=_row_warps(block))
        return out.view(shape)
    residual = residual.reshape(-1, n_cols)
    assert residual.stride(-1) == 1
    residual_out = torch.empty_like(x)
    _rms_norm_kernel[(x.size(0),)](x, residual, weight, out, residual_out, x.stride(0), residual.stride(0),
                                   out.stride(0), residual_out.stride(0), n_cols, eps,
                                   HAS_RESIDUAL=True, BLOCK=block, num_warps=_row_warps(block))
    return out.view(shape), residual_out.view(shape)


@triton.jit(do_not_specialize=["num_tokens"])
def _qk_norm_rope_kernel(q_ptr, k_ptr, q_weight_ptr, k_weight_ptr, cos_ptr, sin_ptr, pos_ptr, q_out_ptr, k_out_ptr,
                         v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                         num_tokens, stride_qn, stride_qh, stride_kn, stride_kh, stride_cos, eps,
                         stride_vn, stride_vh, stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch,
                         NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr,
                         BLOCK_HALF: tl.constexpr, BLOCK_T: tl.constexpr, STORE: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr):
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
    x1 = tl.load(src[:, None] + offs[None, :], mask=mask, other=0.0)
    x2 = tl.load(src[:, None] + HALF + offs[None, :], mask=mask, other=0.0)
    dtype = x1.dtype
    a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
    rstd = tl.rsqrt((tl.sum(a1 * a1, axis=1) + tl.sum(a2 * a2, axis=1)) / (2 * HALF) + eps)[:, None]
    w1 = tl.load(weight_ptr + offs, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    w2 = tl.load(weight_ptr + HALF + offs, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    y1 = ((a1 * rstd).to(dtype).to(tl.float32) * w1).to(dtype).to(tl.float32)
    y2 = ((a2 * rstd).to(dtype).to(tl.float32) * w2).to(dtype).to(tl.float32)
    pos = tl.load(pos_ptr + toks, mask=tok_mask, other=0).to(tl.int64)[:, None]
    # The table is float32; the reference rounds it to the activation dtype first.
    cos = tl.load(cos_ptr + pos * stride_cos + offs[None, :], mask=mask, other=0.0).to(dtype).to(tl.float32)
    sin = tl.load(sin_ptr + pos * stride_cos + offs[None, :], mask=mask, other=0.0).to(dtype).to(tl.float32)
    # x * cos + rotate_half(x) * sin with the reference's three roundings.
    out1 = ((y1 * cos).to(dtype).to(tl.float32) + (-y2 * sin).to(dtype).to(tl.float32)).to(dtype)
    out2 = ((y2 * cos).to(dtype).to(tl.float32) + (y1 * sin).to(dtype).to(tl.float32)).to(dtype)
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
            block, offset = slot // BLOCK_SIZE, slot % BLOCK_SIZE
            k_dst = k_cache_ptr + block * stride_kcb + offset * stride_kct + kv_head * stride_kch + offs[None, :]
            v_dst = v_cache_ptr + block * stride_vcb + offset * stride_vct + kv_head * stride_vch + offs[None, :]
            cache_dtype = k_cache_ptr.dtype.element_ty
            tl.store(k_dst, out1.to(cache_dtype), mask=store_mask)
            tl.store(k_dst + HALF, out2.to(cache_dtype), mask=store_mask)
            tl.store(v_dst, v1.to(cache_dtype), mask=store_mask)
            tl.store(v_dst + HALF, v2.to(cache_dtype), mask=store_mask)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                 cos_sin_cache: torch.Tensor, positions: torch.Tensor,
                 store: KVStore | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q [N, Hq, D] and k [N, Hkv, D] (strided views allowed) -> contiguous normed and rotated copies.

    cos_sin_cache is [2, max_positions, D] float32 with each row's two halves equal (rotate-half layout).
    store: the rotated keys and the values v [N, Hkv, D] are also written into this paged cache (not a
    float8 one), as nanovllm.attention.triton_kernels.store_kv writes them, without a kernel of its own.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.size(1)
    assert q.stride(2) == 1 and k.stride(2) == 1 and head_dim % 2 == 0 and cos_sin_cache.stride(2) == 1
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens == 0:
        return q_out, k_out
    half = head_dim // 2
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
        BLOCK_SIZE=k_cache.size(1) if store else 1,
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


@triton.jit
def _logit_tile(logits_ptr, row, stride, cols, vocab_size):
    return tl.load(logits_ptr + row.to(tl.int64) * stride + cols, mask=cols < vocab_size,
                   other=float("-inf")).to(tl.float32)


@triton.jit
def _log2_scale(temperature):
    """What a row's logits are multiplied by for its softmax in base 2; both sampling kernels must agree."""
    return LOG2E_CONSTEXPR / tl.maximum(temperature, 1e-5)


@triton.jit
def _sample_chunk_kernel(logits_ptr, temperatures_ptr, part_max_ptr, part_sum_ptr, part_idx_ptr, stride, vocab_size,
                         num_chunks, BLOCK: tl.constexpr, TILES: tl.constexpr):
    """One pass over a chunk of TILES tiles of one row. A greedy row's (temperature 0) chunk gives its
    largest logit and that logit's index (the earliest on ties); any other row's gives the largest
    y = logit / T in base 2 and the sum of exp2(y - that largest), its share of the softmax."""
    row = tl.program_id(0)
    part = tl.program_id(1)
    temperature = tl.load(temperatures_ptr + row)
    greedy = temperature == 0.0
    scale = _log2_scale(temperature)
    # Each lane keeps its own maximum (and sum) across tiles; lanes meet once, at the end: reducing
    # every tile across the program would make the loop wait on each reduction.
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK], tl.int32)
    total = tl.zeros([BLOCK], tl.float32)
    for tile in range(TILES):
        cols = (part * TILES + tile) * BLOCK + tl.arange(0, BLOCK)
        x = _logit_tile(logits_ptr, row, stride, cols, vocab_size)
        if greedy:
            best_idx = tl.where(x > best, cols, best_idx)
            best = tl.maximum(best, x)
        else:
            y = x * scale
            new_best = tl.maximum(best, y)
            # A lane that has seen only -inf (cut or past the vocabulary) keeps a sum of 0, not NaN.
            total = tl.where(new_best == float("-inf"), 0.0,
                             total * tl.exp2(best - new_best) + tl.exp2(y - new_best))
            best = new_best
    chunk_max = tl.max(best, 0)
    at = row * num_chunks + part
    tl.store(part_max_ptr + at, chunk_max)
    tl.store(part_idx_ptr + at, tl.min(tl.where(best == chunk_max, best_idx, vocab_size), 0))
    tl.store(part_sum_ptr + at, tl.sum(tl.where(best == float("-inf"), 0.0, total * tl.exp2(best - chunk_max)), 0))


# A fresh seed every step must not pick a new specialisation (Triton specialises ints on % 16 and == 1).
@triton.jit(do_not_specialize=["seed"])
def _sample_pick_kernel(logits_ptr, temperatures_ptr, row_seeds_ptr, part_max_ptr, part_sum_ptr, part_idx_ptr, out_ptr,
                        stride, vocab_size, num_chunks, seed, SEEDED: tl.constexpr, BLOCK: tl.constexpr,
                        TILES: tl.constexpr, BLOCK_C: tl.constexpr):
    """One row's token from its chunks: a greedy row takes the chunk with the largest logit (the
    first on ties). Any other row draws by inverting the softmax's cumulative distribution at one
    uniform u: it finds the chunk where the cumulative sum passes u times the total, then the token
    inside that chunk, whose scaled logits it reads again."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_C)
    chunk_mask = offs < num_chunks
    at = row * num_chunks + offs
    chunk_max = tl.load(part_max_ptr + at, mask=chunk_mask, other=float("-inf"))
    temperature = tl.load(temperatures_ptr + row)
    if temperature == 0.0:
        best = tl.argmax(chunk_max, 0)  # the first chunk on ties, so the lowest token index wins as in torch
        token = tl.sum(tl.where(offs == best, tl.load(part_idx_ptr + at, mask=chunk_mask, other=0), 0), 0)
    else:
        # One uniform per row. A row draws from the step's seed with its row as the counter, or, with a
        # seed of its own, from that seed with the token index as the counter's high word: then its
        # draw depends on neither the batch nor the step (the chunks are fixed, so are the sums).
        key = seed
        counter = row
        if SEEDED:
            row_seed = tl.load(row_seeds_ptr + 2 * row)
            own = row_seed >= 0
            key = tl.where(own, row_seed, seed)
            counter = tl.where(own, tl.load(row_seeds_ptr + 2 * row + 1) << 32, row.to(tl.int64))
        u = tl.rand(key, counter)
        row_max = tl.max(chunk_max, 0)
        weights = tl.load(part_sum_ptr + at, mask=chunk_mask, other=0.0)
        weights = tl.where(chunk_max == float("-inf"), 0.0, weights * tl.exp2(chunk_max - row_max))
        target = u * tl.sum(weights, 0)
        cumulative = tl.cumsum(weights, 0)
        # The chunk where the cumulative sum passes the target; past the last one with any weight only
        # by rounding, which that one then absorbs.
        last = tl.max(tl.where(weights > 0, offs, 0), 0)
        chunk = tl.minimum(tl.sum(((cumulative <= target) & chunk_mask).to(tl.int32), 0), last)
        rest = tl.maximum(target - tl.sum(tl.where(offs < chunk, weights, 0.0), 0), 0.0)
        scale = _log2_scale(temperature)
        token = vocab_size
        last_kept = 0
        running = 0.0
        for tile in range(TILES):
            cols = (chunk * TILES + tile) * BLOCK + tl.arange(0, BLOCK)
            y = _logit_tile(logits_ptr, row, stride, cols, vocab_size) * scale
            p = tl.where(y == float("-inf"), 0.0, tl.exp2(y - row_max))
            passed = (tl.cumsum(p, 0) + running > rest) & (p > 0)
            token = tl.minimum(token, tl.min(tl.where(passed, cols, vocab_size), 0))
            last_kept = tl.maximum(last_kept, tl.max(tl.where(p > 0, cols, 0), 0))
            running += tl.sum(p, 0)
        # The chunk's sum read again may fall short of the one it was picked by, by rounding.
        token = tl.where(token < vocab_size, token, last_kept)
    tl.store(out_ptr + row, token.to(tl.int64))


SAMPLE_BLOCK = 2048
# Tiles per chunk: a chunk is what the pick kernel reads again, so that it stays short; the chunks are
# fixed, so that the sums, and with them a seeded row's draw, do not depend on the batch.
SAMPLE_TILES = 4


def sample(logits: torch.Tensor, temperatures: torch.Tensor, seed: int, row_seeds: torch.Tensor | None = None,
           block: int = SAMPLE_BLOCK) -> torch.Tensor:
    """Token ids [B] from logits [B, V]: greedy where temperatures[b] == 0, else a draw at that
    temperature; seed picks the step's random stream. row_seeds [B, 2] int64, where given, holds per
    row a request seed (-1: none, the row draws from the step's stream) and the index of the token
    being drawn; a seeded row's draw depends only on those two and its logits. Rows are cut into
    chunks of SAMPLE_TILES tiles; block is the tile width (a power of two >= 16)."""
    batch, vocab_size = logits.shape
    assert logits.stride(1) == 1 and batch * vocab_size < 2 ** 31
    out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    if batch == 0:
        return out
    num_chunks = triton.cdiv(vocab_size, block * SAMPLE_TILES)
    part_max = torch.empty(batch, num_chunks, dtype=torch.float32, device=logits.device)
    part_sum = torch.empty_like(part_max)
    part_idx = torch.empty(batch, num_chunks, dtype=torch.int32, device=logits.device)
    seeded = row_seeds is not None
    if seeded:
        assert row_seeds.shape == (batch, 2) and row_seeds.dtype == torch.int64 and row_seeds.is_contiguous()
    _sample_chunk_kernel[(batch, num_chunks)](logits, temperatures, part_max, part_sum, part_idx, logits.stride(0),
                                              vocab_size, num_chunks, BLOCK=block, TILES=SAMPLE_TILES, num_warps=8)
    _sample_pick_kernel[(batch,)](logits, temperatures, row_seeds if seeded else temperatures, part_max, part_sum,
                                  part_idx, out, logits.stride(0), vocab_size, num_chunks, seed, SEEDED=seeded,
                                  BLOCK=block, TILES=SAMPLE_TILES, BLOCK_C=triton.next_power_of_2(num_chunks),
                                  num_warps=8)
    return out
