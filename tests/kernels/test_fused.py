"""The fused Triton ops (RMSNorm, q/k norm with RoPE, SiLU·mul, sampling) against the layers' torch
code or, for sampling, against the argmax and the tempered softmax.

The reference is the same layer run on CPU tensors, which takes the unfused torch path. On CUDA the
checks run directly; on CPU they run with small sizes under the Triton interpreter.
"""
import sys

import torch
from transformers import Qwen3Config

from nanovllm.layers.activation import SiluAndMul
from nanovllm.layers.layernorm import RMSNorm
from nanovllm.layers.rotary_embedding import RotaryEmbedding
from tests.triton_interpreter import interpreter_main, kernel_tests

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
MAX_POSITIONS = 4096


def assert_close(out, ref, dtype):
    """fp32 to rounding. bf16: the kernels round where the reference does, so nearly every element
    is bit-identical, and none is off by more than two units in the last place of the largest value."""
    out, ref = out.cpu().float(), ref.float()
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    elif out.numel():
        assert (out - ref).abs().max() <= 2 ** -7 * ref.abs().max(), (out - ref).abs().max()
        assert (out == ref).float().mean() >= 0.95, f"only {(out == ref).float().mean():.3f} bit-identical"


def random_rows(rows, cols, dtype, gen, extra_cols=0):
    """Rows of a wider tensor, so that the row stride differs from the row length."""
    wide = torch.randn(rows, cols + extra_cols, generator=gen).to(dtype)
    return wide[:, extra_cols:]


def check_rms_norm(device, dtype, rows, hidden, with_residual):
    from nanovllm.layers.triton_ops import rms_norm
    gen = torch.Generator().manual_seed(rows * 1000 + hidden)
    norm = RMSNorm(hidden, eps=1e-6).to(dtype)
    norm.weight.data = (torch.rand(hidden, generator=gen) + 0.5).to(dtype)
    x = random_rows(rows, hidden, dtype, gen, extra_cols=8)
    residual = torch.randn(rows, hidden, generator=gen).to(dtype) if with_residual else None
    out = rms_norm(x.to(device), norm.weight.to(device), norm.eps, None if residual is None else residual.to(device))
    ref = norm(x, residual)
    if with_residual:
        assert_close(out[0], ref[0], dtype)
        assert torch.equal(out[1].cpu(), ref[1])
    else:
        assert_close(out, ref, dtype)


def check_qk_norm_rope(device, dtype, num_tokens, num_heads, num_kv_heads, head_dim):
    from nanovllm.layers.triton_ops import qk_norm_rope
    gen = torch.Generator().manual_seed(num_tokens * 100 + num_heads * 10 + head_dim)
    config = Qwen3Config(head_dim=head_dim, max_position_embeddings=MAX_POSITIONS, rope_theta=1e6)
    rotary = RotaryEmbedding(config, head_dim)
    q_norm, k_norm = RMSNorm(head_dim).to(dtype), RMSNorm(head_dim).to(dtype)
    q_norm.weight.data = (torch.rand(head_dim, generator=gen) + 0.5).to(dtype)
    k_norm.weight.data = (torch.rand(head_dim, generator=gen) + 0.5).to(dtype)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = (torch.randn(num_tokens, q_size + 2 * kv_size, generator=gen) * 3).to(dtype)
    q, k, _ = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q, k = q.view(-1, num_heads, head_dim), k.view(-1, num_kv_heads, head_dim)
    positions = torch.randint(0, MAX_POSITIONS, (num_tokens,), generator=gen)
    q_ref, k_ref = rotary(positions, q_norm(q), k_norm(k))
    qkv_dev = qkv.to(device)
    q_dev, k_dev, _ = qkv_dev.split([q_size, kv_size, kv_size], dim=-1)
    q_out, k_out = qk_norm_rope(q_dev.view(-1, num_heads, head_dim), k_dev.view(-1, num_kv_heads, head_dim),
                                q_norm.weight.to(device), k_norm.weight.to(device), q_norm.eps,
                                rotary.cos_sin_cache.to(device), positions.to(device))
    assert_close(q_out, q_ref, dtype)
    assert_close(k_out, k_ref, dtype)


def check_qk_norm_rope_store(device, dtype, num_tokens, num_heads, num_kv_heads, head_dim, block_size):
    """With a cache to store into, the kernel returns what it returns without one (to rounding: the
    variant compiles to other code), and leaves the cache as store_kv (tests/test_triton_attention.py
    checks it against torch) leaves it given the keys it returned, slot -1 included."""
    from nanovllm.attention.base import KVStore
    from nanovllm.attention.triton_kernels import store_kv
    from nanovllm.layers.triton_ops import qk_norm_rope
    gen = torch.Generator().manual_seed(num_tokens * 100 + num_kv_heads * 10 + block_size)
    config = Qwen3Config(head_dim=head_dim, max_position_embeddings=MAX_POSITIONS, rope_theta=1e6)
    cos_sin = RotaryEmbedding(config, head_dim).cos_sin_cache.to(device)
    q_weight, k_weight = ((torch.rand(head_dim, generator=gen) + 0.5).to(dtype).to(device) for _ in range(2))
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = (torch.randn(num_tokens, q_size + 2 * kv_size, generator=gen) * 3).to(dtype).to(device)
    q, k, v = (t.view(num_tokens, -1, head_dim) for t in qkv.split([q_size, kv_size, kv_size], dim=-1))
    positions = torch.randint(0, MAX_POSITIONS, (num_tokens,), generator=gen).to(device)
    num_blocks = 2 + num_tokens // block_size
    # Both caches of a layer in one block-major tensor, as the runner lays them out.
    kv_cache = torch.randn(num_blocks, 2, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[1::3] = -1  # token 0 is stored, so the cache changes
    expected, fused = kv_cache.to(device).clone(), kv_cache.to(device).clone()
    q_plain, k_plain = qk_norm_rope(q, k, q_weight, k_weight, 1e-6, cos_sin, positions)
    q_out, k_out = qk_norm_rope(q, k, q_weight, k_weight, 1e-6, cos_sin, positions,
                                KVStore(v, fused[:, 0], fused[:, 1], slots.to(device)))
    assert_close(q_out, q_plain.cpu(), dtype)
    assert_close(k_out, k_plain.cpu(), dtype)
    store_kv(k_out, v, expected[:, 0], expected[:, 1], slots.to(device))
    assert torch.equal(fused.cpu(), expected.cpu())
    assert not torch.equal(fused.cpu(), kv_cache)


def check_silu_and_mul(device, dtype, rows, n):
    from nanovllm.layers.triton_ops import silu_and_mul
    gen = torch.Generator().manual_seed(rows * 7 + n)
    x = random_rows(rows, 2 * n, dtype, gen, extra_cols=16) * 4
    assert_close(silu_and_mul(x.to(device)), SiluAndMul()(x), dtype)


def check_sample(device, dtype, vocab_size, block, draws):
    check_sample_greedy_and_seeded(device, dtype, vocab_size, block)
    if draws:
        check_sample_frequencies(device, dtype, block, draws)
        check_sample_dense_frequencies(device, dtype, vocab_size, block, draws)


def sample_on(device, block, logits, temperatures, seed, row_seeds=None):
    from nanovllm.layers.triton_ops import sample
    row_seeds = None if row_seeds is None else row_seeds.to(device)
    return sample(logits.to(device), temperatures.to(device), seed, row_seeds, block=block).cpu()


def check_sample_greedy_and_seeded(device, dtype, vocab_size, block):
    """Greedy rows give the argmax, the first one on ties within a tile, across tiles and across
    chunks. A seeded row draws the same token alone, in a batch and under another step seed, and
    leaves the other rows' draws as they were."""
    gen = torch.Generator().manual_seed(vocab_size)
    logits = (torch.randn(8, vocab_size, generator=gen) * 3).to(dtype)
    logits[0, [10, block + 10, vocab_size - 1]] = logits[0].max() + 1
    temperatures = torch.tensor([0.0, 1.0, 0.0, 0.5] * 2)
    greedy = temperatures == 0
    argmax = logits.float().argmax(-1)
    tokens = sample_on(device, block, logits, temperatures, seed=vocab_size)
    assert argmax[0] == 10 and tokens[0] == 10
    assert sample_on(device, block, logits[:1], temperatures[:1], seed=1).item() == 10
    assert torch.equal(tokens[greedy], argmax[greedy])
    # Where the argmax is likely, one step's four draws may all be it; three steps' are not.
    assert any(not torch.equal(sample_on(device, block, logits, temperatures, seed=seed)[~greedy], argmax[~greedy])
               for seed in (vocab_size, vocab_size + 1, vocab_size + 2))

    row_seeds = torch.tensor([[-1, 5, 7, 2 ** 62 + 3, -1, -1, 5, 5],
                              [0, 0, 3, 9, 0, 0, 0, 1]]).T.contiguous()
    seeded = sample_on(device, block, logits, temperatures, seed=vocab_size, row_seeds=row_seeds)
    unseeded = row_seeds[:, 0] < 0
    assert torch.equal(seeded[unseeded], tokens[unseeded])
    assert torch.equal(seeded[greedy], argmax[greedy])
    for row in (~greedy & ~unseeded).nonzero().flatten().tolist():
        alone = sample_on(device, block, logits[row:row + 1], temperatures[row:row + 1], seed=vocab_size + 1,
                          row_seeds=row_seeds[row:row + 1])
        assert alone.item() == seeded[row], row


def check_sample_frequencies(device, dtype, block, draws):
    """Each group of `draws` rows follows softmax(logits / temperature): two temperatures from the
    step's stream, and seeded rows (one seed at many token indices, many seeds at one index). Once
    with the four tokens side by side, once with them in three chunks (the last one partial) and -inf
    (cut tokens) everywhere else, where the draw crosses chunks."""
    from nanovllm.layers.triton_ops import SAMPLE_TILES
    small = torch.tensor([2.0, 1.0, 0.0, -1.0]).to(dtype)
    temperatures = torch.tensor([0.5, 2.0, 1.0]).repeat_interleave(draws)
    row_seeds = torch.full((3 * draws, 2), -1)
    half = draws // 2
    row_seeds[2 * draws:, 0] = torch.cat([torch.full((half,), 42), torch.arange(draws - half) * 7919])
    row_seeds[2 * draws:, 1] = torch.cat([torch.arange(half), torch.full((draws - half,), 5)])
    chunk = block * SAMPLE_TILES
    for positions in ([0, 1, 2, 3], [chunk + 1, 0, 2 * chunk + 2, chunk + 3]):
        logits = torch.full((3 * draws, max(positions) + 1), float("-inf")).to(dtype)
        logits[:, positions] = small
        tokens = sample_on(device, block, logits, temperatures, seed=draws, row_seeds=row_seeds)
        assert torch.isin(tokens, torch.tensor(positions)).all()
        picks = (tokens[:, None] == torch.tensor(positions)).int().argmax(-1)
        tolerance = 4 * 0.5 / draws ** 0.5  # four standard deviations of a frequency at most
        for group, temperature in enumerate((0.5, 2.0, 1.0)):
            frequencies = torch.bincount(picks[group * draws:(group + 1) * draws], minlength=4) / draws
            expected = torch.softmax(small.float() / temperature, -1)
            assert (frequencies - expected).abs().max() < tolerance, (positions, temperature, frequencies, expected)


def check_sample_dense_frequencies(device, dtype, vocab_size, block, draws):
    """One row with every token possible, its mass spread over the chunks: the draws follow its
    softmax on its four most likely tokens and on the rest together."""
    gen = torch.Generator().manual_seed(draws + vocab_size)
    logits = (torch.randn(vocab_size, generator=gen) * 2).to(dtype)
    logits[torch.randperm(vocab_size, generator=gen)[:4]] += 6.0  # four likely tokens, anywhere
    rows = min(draws, (2 ** 31 - 1) // vocab_size)
    tokens = sample_on(device, block, logits.repeat(rows, 1), torch.full((rows,), 0.8), seed=rows)
    expected = torch.softmax(logits.float() / 0.8, -1)
    top = expected.topk(4).indices
    observed = torch.bincount(tokens, minlength=vocab_size).float() / rows
    expected, observed = (torch.cat([p[top], p.sum(0, keepdim=True) - p[top].sum(0, keepdim=True)])
                          for p in (expected, observed))
    assert (observed - expected).abs().max() < 4 * 0.5 / rows ** 0.5, (observed, expected)


def rms_norm_cases(small):
    cases = [("bf16", 1, 64, False), ("fp32", 5, 1000, True), ("bf16", 3, 1024, True), ("fp32", 0, 64, True)]
    return cases if small else cases + [(d, r, h, res) for d in DTYPES for r in (1, 256, 513)
                                        for h in (1024, 4096) for res in (False, True)]


def qk_norm_rope_cases(small):
    cases = [("bf16", 1, 2, 1, 64), ("fp32", 3, 4, 2, 128), ("bf16", 2, 3, 3, 128), ("fp32", 0, 2, 1, 64),
             ("bf16", 9, 2, 1, 64)]
    return cases if small else cases + [(d, n, 16, 8, 128) for d in DTYPES for n in (1, 64, 512, 5000)] + \
        [(d, 33, 32, 8, 128) for d in DTYPES]


def qk_norm_rope_store_cases(small):
    cases = [("bf16", 5, 2, 1, 64, 16), ("fp32", 9, 4, 2, 64, 16), ("bf16", 3, 2, 2, 128, 16)]
    return cases if small else cases + [(d, n, 16, 8, 128, bs) for d in DTYPES for n in (1, 64, 513) for bs in (16, 256)]


def silu_and_mul_cases(small):
    cases = [("bf16", 1, 64), ("fp32", 3, 1500), ("bf16", 2, 1100), ("fp32", 0, 64)]
    return cases if small else cases + [(d, r, n) for d in DTYPES for r in (1, 256, 512) for n in (3072, 12288)]


def sample_cases(small):
    # (dtype, vocabulary, tile width, draws per frequency group); the interpreter affords few draws.
    cases = [("fp32", 160, 16, 200), ("bf16", 100, 32, 0)]
    return cases if small else cases + [("bf16", 151936, 2048, 20000), ("fp32", 4097, 2048, 0),
                                        ("bf16", 5000, 2048, 0)]


KINDS = {"rms_norm": (rms_norm_cases, lambda device, c: check_rms_norm(device, DTYPES[c[0]], *c[1:])),
         "qk_norm_rope": (qk_norm_rope_cases, lambda device, c: check_qk_norm_rope(device, DTYPES[c[0]], *c[1:])),
         "qk_norm_rope_store": (qk_norm_rope_store_cases,
                                lambda device, c: check_qk_norm_rope_store(device, DTYPES[c[0]], *c[1:])),
         "silu_and_mul": (silu_and_mul_cases, lambda device, c: check_silu_and_mul(device, DTYPES[c[0]], *c[1:])),
         "sample": (sample_cases, lambda device, c: check_sample(device, DTYPES[c[0]], *c[1:]))}


test_cuda, test_interpreter = kernel_tests(KINDS, __file__)


def test_only_the_triton_backend_with_a_16_or_32_bit_cache_takes_the_fused_store():
    """Attention.fused_store hands the store to the q/k kernel only where the cache is store_kv's and not
    float8; elsewhere the layer stores itself (the torch backend, float8 scales, no cache yet)."""
    from nanovllm.attention.torch_backend import TorchBackend
    from nanovllm.attention.triton_backend import TritonBackend
    from nanovllm.layers.attention import Attention
    from nanovllm.utils.context import Context, reset_context, set_context
    attn = Attention(4, 16, 0.25, 2)
    v = torch.zeros(3, 2, 16)
    slots = torch.tensor([5, -1, 7])
    set_context(Context(is_prefill=False, slot_mapping=slots))
    try:
        attn.backend = TritonBackend()
        assert attn.fused_store(v) is None  # no cache
        attn.k_cache, attn.v_cache = torch.zeros(2, 16, 2, 16), torch.zeros(2, 16, 2, 16)
        store = attn.fused_store(v)
        assert store.v is v and store.k_cache is attn.k_cache and store.v_cache is attn.v_cache
        assert store.slot_mapping is slots
        attn.kv_scales = torch.ones(2, 2)
        assert attn.fused_store(v) is None
        attn.kv_scales, attn.backend = None, TorchBackend()
        assert attn.fused_store(v) is None
    finally:
        reset_context()


if __name__ == "__main__":
    interpreter_main(KINDS, sys.argv[1])
