"""The Triton attention kernels (nanovllm/kernels/attention.py) against a plain torch reference.

On CUDA the checks run directly; on CPU they run with small sizes under the Triton interpreter.
Dtype names "bf16-fp8" and "fp32-fp8" are bf16/fp32 queries over a float8 cache with per-head scales.
"""
import torch
from transformers import Qwen3Config

from nanovllm.attention.kv_quant import FP8_MAX, dequantize, quantize
from nanovllm.layers.layernorm import RMSNorm
from nanovllm.layers.rotary_embedding import RotaryEmbedding

from tests.kernels.common import DTYPES, norm_weight
from tests.kernels.kernel_checks import kernel_tests

NUM_LAYERS = 2
LAYER = 1
MAX_POSITIONS = 8192


# ---------------------------------------------------------------------------------------------- reference

def reference_attention(q, k, v, scale):
    """q [Lq, Hq, D], k/v [Lk, Hkv, D]; the queries are the last Lq of the Lk positions (causal)."""
    len_q, num_heads, _ = q.shape
    len_k, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    q_pos = torch.arange(len_k - len_q, len_k)[:, None]
    scores = scores.masked_fill(torch.arange(len_k)[None, :] > q_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def gather(cache, block_table, length):
    block_size = cache.size(1)
    ids = block_table[:(length + block_size - 1) // block_size].long()
    return cache[ids].flatten(0, 1)[:length]


# ---------------------------------------------------------------------------------------------- inputs

def make_caches(num_blocks, block_size, num_kv_heads, head_dim, dtype, device):
    """Strided per-layer views of a block-major cache, filled with NaN so stray reads show."""
    kv_cache = torch.full((num_blocks, NUM_LAYERS, 2, block_size, num_kv_heads, head_dim), float("nan"),
                          dtype=dtype, device=device)
    return kv_cache, kv_cache[:, LAYER, 0], kv_cache[:, LAYER, 1]


def random_block_tables(context_lens, block_size, num_blocks, gen, extra_width=2):
    """Distinct, shuffled blocks per sequence; rows padded with -1."""
    needed = [(n + block_size - 1) // block_size for n in context_lens]
    width = max(needed) + extra_width
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.full((len(context_lens), width), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(needed):
        tables[b, :n] = perm[used:used + n]
        used += n
    return tables


def fill_context(k_cache, v_cache, block_table, keys, values, kv_scales=None):
    """Writes keys/values at positions 0.. of block_table, quantized with kv_scales for a float8 cache;
    returns them as the cache holds them (dequantized, float32, for a float8 cache)."""
    if kv_scales is not None:
        keys, values = quantize(keys, kv_scales[0]), quantize(values, kv_scales[1])
    block_size = k_cache.size(1)
    pos = torch.arange(keys.size(0))
    blocks = block_table.long()[pos // block_size]
    k_cache[blocks, pos % block_size] = keys
    v_cache[blocks, pos % block_size] = values
    if kv_scales is None:
        return keys, values
    return dequantize(keys, kv_scales[0], torch.float32), dequantize(values, kv_scales[1], torch.float32)


def random_scales(cache_dtype, num_kv_heads, gen):
    """Per-head key and value scales of a float8 cache (None for another cache dtype), differing by up to 4x
    between heads so that a mixed-up head shows; randn data stays below the saturation point."""
    if cache_dtype != torch.float8_e4m3fn:
        return None
    return 0.0125 + 0.0375 * torch.rand(2, num_kv_heads, generator=gen)


def qkv_views(num_tokens, num_heads, num_kv_heads, head_dim, dtype, gen):
    """q, k, v as non-contiguous views of one fused projection, like the model produces."""
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen).to(dtype)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    return (q.view(num_tokens, num_heads, head_dim), k.view(num_tokens, num_kv_heads, head_dim),
            v.view(num_tokens, num_kv_heads, head_dim))


def cache_bits(cache):
    """A cache's contents comparable with torch.equal (float8 has no equality on CPU)."""
    return cache.view(torch.uint8) if cache.dtype == torch.float8_e4m3fn else cache


def assert_close(out, ref, dtype):
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float().cpu(), ref, atol=tol, rtol=tol)


# ---------------------------------------------------------------------------------------------- checks

def check_store_kv(device, dtype, cache_dtype, block_size, num_kv_heads, head_dim, slot_dtype):
    from nanovllm.kernels.attention import store_kv
    gen = torch.Generator().manual_seed(block_size * 7 + head_dim)
    num_blocks, num_tokens = 5, 2 * block_size + 3
    kv_cache = torch.randn(num_blocks, NUM_LAYERS, 2, block_size, num_kv_heads, head_dim, generator=gen)
    kv_cache = kv_cache.to(cache_dtype)
    _, k, v = qkv_views(num_tokens, 2 * num_kv_heads, num_kv_heads, head_dim, dtype, gen)
    scales = random_scales(cache_dtype, num_kv_heads, gen)
    if scales is not None:  # some values past the range, which saturate
        k[1, 0, :3] = torch.tensor([1e3, -1e4, 0.0]).to(dtype)
        v[2, -1, -2:] = torch.tensor([-1e3, 1e5]).to(dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[::5] = -1  # tokens 1 and 2, with the values past the range, are stored
    expected = kv_cache.clone()
    keep = slots >= 0
    stored_k, stored_v = (k, v) if scales is None else (quantize(k, scales[0]), quantize(v, scales[1]))
    expected[slots[keep] // block_size, LAYER, 0, slots[keep] % block_size] = stored_k[keep]
    expected[slots[keep] // block_size, LAYER, 1, slots[keep] % block_size] = stored_v[keep]
    if scales is not None:
        assert stored_k[1, 0, :2].float().tolist() == [FP8_MAX, -FP8_MAX]
        assert stored_v[2, -1, -2:].float().tolist() == [-FP8_MAX, FP8_MAX]

    kv_cache = kv_cache.to(device)
    store_kv(k.to(device), v.to(device), kv_cache[:, LAYER, 0], kv_cache[:, LAYER, 1], slots.to(slot_dtype).to(device),
             None if scales is None else scales.to(device))
    assert torch.equal(cache_bits(kv_cache.cpu()), cache_bits(expected))


def check_decode(device, dtype, cache_dtype, block_size, group, head_dim, context_lens, num_kv_heads=2,
                 num_splits=None):
    from nanovllm.kernels.attention import longest_first, paged_decode
    gen = torch.Generator().manual_seed(block_size + 31 * group + head_dim + len(context_lens))
    num_heads = group * num_kv_heads
    num_blocks = sum((n + block_size - 1) // block_size for n in context_lens) + 3
    kv_cache, k_cache, v_cache = make_caches(num_blocks, block_size, num_kv_heads, head_dim, cache_dtype, "cpu")
    scales = random_scales(cache_dtype, num_kv_heads, gen)
    tables = random_block_tables(context_lens, block_size, num_blocks, gen)
    q, _, _ = qkv_views(len(context_lens), num_heads, num_kv_heads, head_dim, dtype, gen)
    scale = head_dim ** -0.5
    refs = []
    for b, n in enumerate(context_lens):
        keys = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
        values = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
        keys, values = fill_context(k_cache, v_cache, tables[b], keys, values, scales)
        refs.append(reference_attention(q[b:b + 1], keys, values, scale)[0])

    kv_cache = kv_cache.to(device)

    def decode(rows, early_inputs=False):
        lens = torch.tensor(context_lens, dtype=torch.int32)[rows].to(device)
        # With early_inputs, as at a step's later layers: the order written before other kernels ran (copies).
        order = longest_first(lens) if early_inputs else None
        return paged_decode(q[rows].to(device), kv_cache[:, LAYER, 0], kv_cache[:, LAYER, 1], tables[rows].to(device),
                            lens, scale, num_splits=num_splits, kv_scales=None if scales is None else scales.to(device),
                            order=order, early_inputs=early_inputs)
    rows = torch.arange(len(context_lens))
    out = decode(rows)
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out, torch.stack(refs), dtype)
    # The programs run longest first, whatever the rows' order: each row's result is the same bits.
    assert torch.equal(decode(rows.flip(0)).cpu(), out.flip(0).cpu())
    # Reading the step's inputs ahead of the wait for the kernel before (as at a step's later layers) too.
    assert torch.equal(decode(rows, early_inputs=True).cpu(), out.cpu())


def check_decode_rope(device, dtype, cache_dtype, block_size, group, head_dim, context_lens, num_kv_heads=2,
                      num_splits=None):
    """paged_decode with rope=DecodeRope: from the raw projections of each sequence's new token (at position
    context_len - 1, its slot NaN until the kernel stores it), the model's torch q/k norm and RoPE, the new
    key and value stored in the cache (quantized for a float8 one), then attention over the context. Rows of
    context 0 are a captured batch's padding (slot -1): zeros, nothing stored."""
    from nanovllm.kernels.attention import longest_first, paged_decode
    from nanovllm.utils.context import DecodeRope
    gen = torch.Generator().manual_seed(block_size + 7 * group + head_dim + sum(context_lens))
    num_heads, batch = group * num_kv_heads, len(context_lens)
    num_blocks = sum((n + block_size - 1) // block_size for n in context_lens) + 3
    kv_cache, k_cache, v_cache = make_caches(num_blocks, block_size, num_kv_heads, head_dim, cache_dtype, "cpu")
    scales = random_scales(cache_dtype, num_kv_heads, gen)
    tables = random_block_tables(context_lens, block_size, num_blocks, gen)
    config = Qwen3Config(head_dim=head_dim, max_position_embeddings=MAX_POSITIONS, rope_theta=1e6)
    rotary = RotaryEmbedding(config, head_dim)
    q_norm, k_norm = RMSNorm(head_dim).to(dtype), RMSNorm(head_dim).to(dtype)
    for norm in (q_norm, k_norm):
        norm.weight.data = norm_weight(head_dim, dtype, gen)
    q, k, v = qkv_views(batch, num_heads, num_kv_heads, head_dim, dtype, gen)
    positions = torch.tensor([max(n - 1, 0) for n in context_lens])
    q_ref, k_ref = rotary(positions, q_norm(q), k_norm(k))
    slots = torch.tensor([tables[b, (n - 1) // block_size].item() * block_size + (n - 1) % block_size if n else -1
                          for b, n in enumerate(context_lens)])
    expected = kv_cache.clone()
    refs = []
    for b, n in enumerate(context_lens):
        keys = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
        values = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
        if n:
            keys[-1], values[-1] = k_ref[b], v[b]
            fill_context(k_cache, v_cache, tables[b], keys[:-1], values[:-1], scales)
        keys, values = fill_context(expected[:, LAYER, 0], expected[:, LAYER, 1], tables[b], keys, values, scales)
        refs.append(reference_attention(q_ref[b:b + 1], keys, values, head_dim ** -0.5)[0] if n
                    else torch.zeros(num_heads, head_dim))

    def decode(early_inputs):
        cache = kv_cache.to(device)
        lens = torch.tensor(context_lens, dtype=torch.int32, device=device)
        rope = DecodeRope(k.to(device), v.to(device), q_norm.weight.to(device), k_norm.weight.to(device), q_norm.eps,
                          rotary.cos_sin_cache.to(device), positions.to(device), slots.to(device))
        out = paged_decode(q.to(device), cache[:, LAYER, 0], cache[:, LAYER, 1], tables.to(device), lens,
                           head_dim ** -0.5, num_splits=num_splits, kv_scales=None if scales is None else scales.to(device),
                           order=longest_first(lens) if early_inputs else None, early_inputs=early_inputs, rope=rope)
        return out.cpu(), cache.cpu()

    out, cache = decode(early_inputs=False)
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out, torch.stack(refs), dtype)
    if cache_dtype == torch.float8_e4m3fn:
        # The new keys round as the reference's but for the order of some sums, which where a rotation cancels
        # moves a small result by a unit of its terms; float8 then rounds it by up to a step (an eighth) more.
        assert (cache_bits(cache) == cache_bits(expected)).float().mean() >= 0.95
        scale = scales.view(1, 1, 2, 1, num_kv_heads, 1)
        torch.testing.assert_close(cache.float() * scale, expected.float() * scale, equal_nan=True,
                                   atol=2e-2, rtol=2 ** -3)
    else:
        torch.testing.assert_close(cache, expected, equal_nan=True, **({} if dtype == torch.float32 else
                                                                        dict(atol=2e-2, rtol=2e-2)))
    early_out, early_cache = decode(early_inputs=True)
    assert torch.equal(early_out, out) and torch.equal(early_cache.view(torch.uint8), cache.view(torch.uint8))


def check_longest_first(device, case):
    """case: (batch, lengths below); a small bound makes ties."""
    from nanovllm.kernels.attention import longest_first
    batch, bound = case
    context_lens = torch.randint(0, bound, (batch,), generator=torch.Generator().manual_seed(batch + bound)).tolist()
    order = longest_first(torch.tensor(context_lens, dtype=torch.int32, device=device))
    expected = sorted(range(len(context_lens)), key=lambda i: (-context_lens[i], i))
    assert order.dtype == torch.int32 and order.cpu().tolist() == expected


def check_prefill(device, dtype, cache_dtype, block_size, group, head_dim, q_lens, prefix_lens, paged,
                  num_kv_heads=2, padded=False):
    """padded: as a captured prefill runs it, with rows past the last sequence's and empty sequences
    after it; the padding is NaN, which must reach no real row."""
    from nanovllm.kernels.attention import prefill_attention
    gen = torch.Generator().manual_seed(block_size + 17 * group + head_dim + sum(q_lens) + paged)
    num_heads = group * num_kv_heads
    context_lens = [p + n for p, n in zip(prefix_lens, q_lens)]
    q, k, v = qkv_views(sum(q_lens), num_heads, num_kv_heads, head_dim, dtype, gen)
    cu_q = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + context_lens).cumsum(0).to(torch.int32)
    scale = head_dim ** -0.5
    refs = []
    if paged:
        num_blocks = sum((n + block_size - 1) // block_size for n in context_lens) + 3
        kv_cache, k_cache, v_cache = make_caches(num_blocks, block_size, num_kv_heads, head_dim, cache_dtype, "cpu")
        tables = random_block_tables(context_lens, block_size, num_blocks, gen)
    scales = random_scales(cache_dtype, num_kv_heads, gen) if paged else None
    for b, (prefix, n) in enumerate(zip(prefix_lens, q_lens)):
        new = slice(cu_q[b].item(), cu_q[b + 1].item())
        keys, values = k[new], v[new]
        if paged:
            keys = torch.cat([torch.randn(prefix, num_kv_heads, head_dim, generator=gen).to(dtype), keys])
            values = torch.cat([torch.randn(prefix, num_kv_heads, head_dim, generator=gen).to(dtype), values])
            keys, values = fill_context(k_cache, v_cache, tables[b], keys, values, scales)
        refs.append(reference_attention(q[new], keys, values, scale))

    num_tokens = q.size(0)
    if padded:
        pad_rows, empty_seqs = 37, 3
        q, k, v = (torch.cat([x, torch.full((pad_rows, *x.shape[1:]), float("nan")).to(dtype)]) for x in (q, k, v))
        cu_q = torch.cat([cu_q, cu_q[-1:].repeat(empty_seqs)])
        cu_k = torch.cat([cu_k, cu_k[-1:].repeat(empty_seqs)])
        if paged:
            tables = torch.cat([tables, torch.full((empty_seqs, tables.size(1)), -1, dtype=tables.dtype)])
    if paged:
        kv_cache = kv_cache.to(device)
        out = prefill_attention(q.to(device), kv_cache[:, LAYER, 0], kv_cache[:, LAYER, 1], cu_q.to(device),
                                cu_k.to(device), scale, block_tables=tables.to(device),
                                kv_scales=None if scales is None else scales.to(device))
    else:
        out = prefill_attention(q.to(device), k.to(device), v.to(device), cu_q.to(device), cu_q.to(device), scale)
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out[:num_tokens], torch.cat(refs), dtype)


def check_backend(device, dtype, cache_dtype):
    """TritonBackend through the AttentionBackend interface against TorchBackend: prefill with and
    without a cached prefix, then one decode step."""
    from nanovllm.attention.torch_backend import TorchBackend
    from nanovllm.attention.triton_backend import TritonBackend
    from nanovllm.utils.context import Context
    gen = torch.Generator().manual_seed(5)
    block_size, num_kv_heads, num_heads, head_dim = 16, 2, 4, 64
    prefix_lens, q_lens = [0, 20, 35], [5, 9, 17]
    context_lens = [p + n for p, n in zip(prefix_lens, q_lens)]
    num_blocks = sum(n // block_size + 1 for n in context_lens) + 2
    tables = random_block_tables([n + 1 for n in context_lens], block_size, num_blocks, gen)
    kv_cache = torch.zeros(num_blocks, NUM_LAYERS, 2, block_size, num_kv_heads, head_dim, dtype=cache_dtype)
    scales = random_scales(cache_dtype, num_kv_heads, gen)
    for b, prefix in enumerate(prefix_lens):
        fill_context(kv_cache[:, LAYER, 0], kv_cache[:, LAYER, 1], tables[b],
                     torch.randn(prefix, num_kv_heads, head_dim, generator=gen).to(dtype),
                     torch.randn(prefix, num_kv_heads, head_dim, generator=gen).to(dtype), scales)
    scales = None if scales is None else scales.to(device)
    caches = {"triton": kv_cache.to(device), "torch": kv_cache.to(device)}
    backends = {"triton": TritonBackend(), "torch": TorchBackend()}

    def slots(positions):
        return torch.tensor([tables[b, p // block_size].item() * block_size + p % block_size for b, p in positions],
                            dtype=torch.int64, device=device)

    def cu(lens):
        return torch.tensor([0] + lens, device=device).cumsum(0).to(torch.int32)

    def run_both(step, *inputs):
        outs = {}
        for name, backend in backends.items():
            k_cache, v_cache = caches[name][:, LAYER, 0], caches[name][:, LAYER, 1]
            outs[name] = step(backend, k_cache, v_cache, *[x.to(device) for x in inputs]).float().cpu()
        assert_close(outs["triton"], outs["torch"], dtype)
        assert torch.equal(cache_bits(caches["triton"].cpu()), cache_bits(caches["torch"].cpu()))

    q, k, v = qkv_views(sum(q_lens), num_heads, num_kv_heads, head_dim, dtype, gen)
    ctx = Context(is_prefill=True, cu_seqlens_q=cu(q_lens), cu_seqlens_k=cu(context_lens), max_seqlen_q=max(q_lens),
                  max_seqlen_k=max(context_lens), block_tables=tables.to(device),
                  slot_mapping=slots([(b, p + i) for b, (p, n) in enumerate(zip(prefix_lens, q_lens))
                                      for i in range(n)]))
    no_prefix = Context(is_prefill=True, cu_seqlens_q=cu(q_lens), cu_seqlens_k=cu(q_lens), max_seqlen_q=max(q_lens),
                        max_seqlen_k=max(q_lens))

    def prefill(backend, k_cache, v_cache, q, k, v):
        backend.store_kv(k, v, k_cache, v_cache, ctx.slot_mapping, scales)
        return backend.prefill(q, k, v, k_cache, v_cache, ctx, head_dim ** -0.5, scales)

    run_both(prefill, q, k, v)
    run_both(lambda backend, k_cache, v_cache, q, k, v: backend.prefill(q, k, v, None, None, no_prefix, 0.3), q, k, v)

    q, k, v = qkv_views(len(q_lens), num_heads, num_kv_heads, head_dim, dtype, gen)
    ctx = Context(is_prefill=False, slot_mapping=slots(list(enumerate(context_lens))), block_tables=tables.to(device),
                  context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device) + 1)

    def decode(backend, k_cache, v_cache, q, k, v):
        backend.store_kv(k, v, k_cache, v_cache, ctx.slot_mapping, scales)
        return backend.decode(q, k_cache, v_cache, ctx, head_dim ** -0.5, scales)

    run_both(decode, q, k, v)
    # The Triton backend ordered the rows once for the step's layers; a slice of the batch orders its own.
    lens = ctx.context_lens.cpu().tolist()
    assert ctx.decode_order.cpu().tolist() == sorted(range(len(lens)), key=lambda i: (-lens[i], i))
    assert ctx.decode_rows(slice(1, 3)).decode_order is None


# ---------------------------------------------------------------------------------------------- cases

FP8 = ("bf16-fp8", "fp32-fp8")


def dtypes(name):
    """(query dtype, cache dtype) of a case's dtype name."""
    dtype, _, cache = name.partition("-")
    return DTYPES[dtype], torch.float8_e4m3fn if cache == "fp8" else DTYPES[dtype]


def _covering(small_cases, size_pairs, options):
    """The small cases, plus on CUDA every (block size, group) pair with dtype, head_dim and the
    remaining options cycled through, which covers every value without the full product; once with a
    cache in the query's dtype, once with a float8 cache."""
    cases = list(small_cases)
    for names in (tuple(DTYPES), FP8):
        for i, (bs, g) in enumerate(size_pairs):
            cases.append((names[i % 2], bs, g, (64, 128)[i // 2 % 2], *options[i % len(options)]))
    return cases


def store_kv_cases(small):
    cases = [("bf16", 16, 1, 64, torch.int64), ("fp32", 16, 3, 128, torch.int32), ("bf16", 64, 8, 128, torch.int32),
             ("fp32", 64, 1, 64, torch.int64), ("bf16", 256, 3, 64, torch.int32), ("fp32", 256, 8, 128, torch.int64),
             ("bf16-fp8", 16, 3, 64, torch.int64), ("fp32-fp8", 64, 2, 128, torch.int32)]
    return cases if small else _covering(cases, [(bs, h) for bs in (16, 64, 256) for h in (1, 2, 8)],
                                          [(torch.int64,), (torch.int32,)])


def decode_cases(small):
    cases = [("fp32", 16, 1, 64, [1, 37, 70], None), ("bf16", 16, 8, 128, [150, 3], 3),
             ("fp32", 64, 2, 128, [130, 5, 200], None), ("bf16", 64, 4, 64, [129, 64, 1], 4),
             ("fp32", 256, 4, 64, [300, 1], 2), ("bf16", 256, 2, 128, [513, 255], None),
             ("bf16", 256, 8, 64, [257, 40], 5), ("fp32", 64, 8, 128, [0, 100], 2),
             ("bf16-fp8", 16, 2, 64, [150, 3], 3), ("fp32-fp8", 64, 4, 128, [129, 1], None)]
    lens = [1, 37, 300, 1000, 2049, 4095]
    return cases if small else _covering(cases, [(bs, g) for bs in (16, 64, 256) for g in (1, 2, 4, 8)],
                                          [(lens, None), (lens, 1), (lens, 3), (lens[::-1], 7)])


def decode_rope_cases(small):
    cases = [("fp32", 16, 1, 64, [1, 37, 70, 0], None), ("bf16", 16, 8, 128, [150, 3], 3),
             ("bf16", 64, 2, 64, [129, 64, 1], 4), ("bf16-fp8", 16, 2, 64, [150, 3, 0], 3),
             ("fp32-fp8", 64, 4, 128, [129, 1], None)]
    lens = [1, 37, 300, 1000, 2049, 4095, 0]
    return cases if small else _covering(cases, [(bs, g) for bs in (16, 64, 256) for g in (1, 2, 4, 8)],
                                          [(lens, None), (lens, 1), (lens, 3), (lens[::-1], 7)])


def prefill_cases(small):
    cases = [("fp32", 16, 1, 64, [1, 70, 33], [0, 0, 0], False), ("bf16", 16, 4, 128, [65, 2], [0, 0], False),
             ("fp32", 16, 2, 128, [40, 1, 20], [37, 0, 70], True), ("bf16", 64, 8, 64, [70, 3], [130, 64], True),
             ("fp32", 256, 4, 64, [1, 30], [300, 0], True), ("bf16", 256, 1, 128, [66, 10], [255, 513], True),
             ("bf16-fp8", 16, 2, 64, [40, 1], [37, 70], True), ("fp32-fp8", 64, 1, 128, [20, 5], [0, 64], True),
             ("fp32", 16, 2, 64, [40, 1, 20], [37, 0, 70], True, True), ("bf16", 16, 1, 64, [70, 3], [0, 0], False, True),
             # A block's first query two or one positions before the end of a key tile (32 keys in
             # fp32, 64 in bf16): that tile takes the causal mask.
             ("fp32", 16, 2, 64, [5, 40], [30, 62], True), ("bf16", 64, 2, 128, [5, 40, 3], [62, 126, 63], True),
             # More sequences than a program looks through at once (QUERY_BLOCK_SEARCH).
             ("fp32", 16, 1, 64, [1 + i % 3 for i in range(130)], [0] * 130, False, True)]
    q_lens = [1, 70, 33, 200, 129]
    return cases if small else _covering(cases, [(bs, g) for bs in (16, 64, 256) for g in (1, 2, 4, 8)],
                                          [(q_lens, [0] * 5, False), (q_lens, [0] * 5, True),
                                           (q_lens, [37, 0, 300, 513, 1000], True)])


def longest_first_cases(small):
    cases = [(1, 8), (0, 8), (7, 3), (65, 9)]
    return cases if small else cases + [(64, 4096), (129, 4096), (512, 4096), (300, 3)]


def run_store_kv(device, case):
    dtype, bs, hkv, d, slot_dtype = case
    check_store_kv(device, *dtypes(dtype), bs, hkv, d, slot_dtype)


def run_decode(device, case):
    dtype, bs, g, d, lens, splits = case
    check_decode(device, *dtypes(dtype), bs, g, d, lens, num_splits=splits)


def run_decode_rope(device, case):
    dtype, bs, g, d, lens, splits = case
    check_decode_rope(device, *dtypes(dtype), bs, g, d, lens, num_splits=splits)


def run_prefill(device, case):
    dtype, bs, g, d, q_lens, prefix, paged, *padded = case
    check_prefill(device, *dtypes(dtype), bs, g, d, q_lens, prefix, paged, padded=bool(padded))


def run_backend(device, case):
    check_backend(device, *dtypes(case))


KINDS = {"store_kv": (store_kv_cases, run_store_kv), "decode": (decode_cases, run_decode),
         "decode_rope": (decode_rope_cases, run_decode_rope),
         "longest_first": (longest_first_cases, check_longest_first),
         "prefill": (prefill_cases, run_prefill), "backend": (lambda small: [*DTYPES, *FP8], run_backend)}


test_cuda, test_interpreter = kernel_tests(KINDS, __file__)
