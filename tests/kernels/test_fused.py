"""The fused Triton ops (nanovllm/kernels/fused.py: RMSNorm, q/k norm with RoPE, SiLU·mul) against the
layers' torch code.

The reference is the same layer run on CPU tensors, which takes the unfused torch path. On CUDA the
checks run directly; on CPU they run with small sizes under the Triton interpreter.
"""
import torch
from transformers import Qwen3Config

from nanovllm.layers.activation import SiluAndMul
from nanovllm.layers.layernorm import RMSNorm
from nanovllm.layers.rotary_embedding import RotaryEmbedding
from tests.kernels import common
from tests.kernels.common import DTYPES, norm_weight
from tests.kernels.kernel_checks import kernel_tests

MAX_POSITIONS = 4096


def assert_close(out, ref, dtype):
    """common.assert_close with an absolute fp32 tolerance: these ops' outputs are of order one."""
    common.assert_close(out, ref, dtype, fp32_atol=1e-5)


def random_rows(rows, cols, dtype, gen, extra_cols=0):
    """Rows of a wider tensor, so that the row stride differs from the row length."""
    wide = torch.randn(rows, cols + extra_cols, generator=gen).to(dtype)
    return wide[:, extra_cols:]


def check_rms_norm(device, dtype, rows, hidden, with_residual):
    from nanovllm.kernels.fused import rms_norm
    gen = torch.Generator().manual_seed(rows * 1000 + hidden)
    norm = RMSNorm(hidden, eps=1e-6).to(dtype)
    norm.weight.data = norm_weight(hidden, dtype, gen)
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
    from nanovllm.kernels.fused import qk_norm_rope
    gen = torch.Generator().manual_seed(num_tokens * 100 + num_heads * 10 + head_dim)
    config = Qwen3Config(head_dim=head_dim, max_position_embeddings=MAX_POSITIONS, rope_theta=1e6)
    rotary = RotaryEmbedding(config, head_dim)
    q_norm, k_norm = RMSNorm(head_dim).to(dtype), RMSNorm(head_dim).to(dtype)
    q_norm.weight.data = norm_weight(head_dim, dtype, gen)
    k_norm.weight.data = norm_weight(head_dim, dtype, gen)
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
    variant compiles to other code), and leaves the cache as store_kv (tests/kernels/test_attention.py
    checks it against torch) leaves it given the keys it returned, slot -1 included."""
    from nanovllm.kernels.attention import store_kv
    from nanovllm.utils.context import KVStore
    from nanovllm.kernels.fused import qk_norm_rope
    gen = torch.Generator().manual_seed(num_tokens * 100 + num_kv_heads * 10 + block_size)
    config = Qwen3Config(head_dim=head_dim, max_position_embeddings=MAX_POSITIONS, rope_theta=1e6)
    cos_sin = RotaryEmbedding(config, head_dim).cos_sin_cache.to(device)
    q_weight, k_weight = (norm_weight(head_dim, dtype, gen).to(device) for _ in range(2))
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
    from nanovllm.kernels.fused import silu_and_mul
    gen = torch.Generator().manual_seed(rows * 7 + n)
    x = random_rows(rows, 2 * n, dtype, gen, extra_cols=16) * 4
    assert_close(silu_and_mul(x.to(device)), SiluAndMul()(x), dtype)


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


KINDS = {"rms_norm": (rms_norm_cases, lambda device, c: check_rms_norm(device, DTYPES[c[0]], *c[1:])),
         "qk_norm_rope": (qk_norm_rope_cases, lambda device, c: check_qk_norm_rope(device, DTYPES[c[0]], *c[1:])),
         "qk_norm_rope_store": (qk_norm_rope_store_cases,
                                lambda device, c: check_qk_norm_rope_store(device, DTYPES[c[0]], *c[1:])),
         "silu_and_mul": (silu_and_mul_cases, lambda device, c: check_silu_and_mul(device, DTYPES[c[0]], *c[1:]))}


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


def test_only_a_float8_decode_on_the_triton_backend_normalizes_rotates_and_stores_in_the_attention():
    """Attention.decodes_raw: the q/k norm, RoPE and the store move into the decode attention kernel only for a
    decode step into a float8 cache on the Triton backend; a 16-bit cache keeps the q/k kernel's fused store,
    prefills and the torch backend keep theirs."""
    from nanovllm.attention.torch_backend import TorchBackend
    from nanovllm.attention.triton_backend import TritonBackend
    from nanovllm.layers.attention import Attention
    from nanovllm.utils.context import Context, reset_context, set_context
    attn = Attention(4, 16, 0.25, 2)
    attn.backend = TritonBackend()
    try:
        set_context(Context(is_prefill=False, slot_mapping=torch.tensor([5])))
        assert not attn.decodes_raw()  # no cache
        attn.k_cache, attn.v_cache = torch.zeros(2, 16, 2, 16), torch.zeros(2, 16, 2, 16)
        assert not attn.decodes_raw()  # 16-bit
        attn.kv_scales = torch.ones(2, 2)
        assert attn.decodes_raw()
        set_context(Context(is_prefill=True, slot_mapping=torch.tensor([5])))
        assert not attn.decodes_raw()
        set_context(Context(is_prefill=False, slot_mapping=torch.tensor([5])))
        attn.backend = TorchBackend()
        assert not attn.decodes_raw()
    finally:
        reset_context()
