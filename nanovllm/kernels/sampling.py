"""Sampling kernels: one token per row of logits, greedy or drawn from the tempered softmax by inverting its
cumulative distribution at one uniform per row, over fixed chunks of the vocabulary."""
import torch
import triton
import triton.language as tl

from nanovllm.kernels.attention import LOG2E

LOG2E_CONSTEXPR = tl.constexpr(LOG2E)


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
