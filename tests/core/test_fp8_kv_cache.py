"""The float8 KV cache (kv_cache_dtype="fp8_e4m3") on CPU: the torch reference's quantization, the
start-up calibration of its scales, and the engine's outputs against a float32 cache."""
import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.attention.kv_quant import FP8_MAX, dequantize, quantize
from nanovllm.attention.torch_backend import TorchBackend
from benchmarks.quality import compare
from nanovllm.engine import kv_cache
from nanovllm.engine.kv_cache import MARGIN, record_kv_amax
from nanovllm.layers.attention import Attention
from nanovllm.utils.context import Context, reset_context, set_context
from tests.helpers import BLOCK_SIZE, EngineRecorder, assert_fp8_quality, gpu, logged, random_prompts, tokens


def engine(path, **options):
    return LLM(path, **{"device": "cpu", "kvcache_block_size": BLOCK_SIZE, "num_kvcache_blocks": 96,
                        "async_scheduling": False, **options})


def test_round_trip_error_is_within_half_a_float8_step():
    """Stored through the torch backend and read back by its decode: every value within half an e4m3
    step (1/16 relative, or half the smallest subnormal), values past the range saturated."""
    gen = torch.Generator().manual_seed(0)
    heads, dim, tokens = 4, 32, 48
    # Heads of very different ranges, as real models have.
    x = torch.randn(2, tokens, heads, dim, generator=gen) * torch.tensor([0.01, 1.0, 30.0, 500.0])[:, None]
    scales = x.abs().amax(dim=(1, 3)) * MARGIN / FP8_MAX
    x[0, 5, 2, :4] = torch.tensor([1e6, -1e6, 3e4, -3e4])  # past 448 * scale
    k_cache = torch.zeros(3, BLOCK_SIZE, heads, dim, dtype=torch.float8_e4m3fn)
    v_cache = torch.zeros_like(k_cache)
    TorchBackend().store_kv(x[0], x[1], k_cache, v_cache, torch.arange(tokens), scales)
    stored = torch.stack([k_cache.flatten(0, 1), v_cache.flatten(0, 1)])
    back = torch.stack([dequantize(stored[i], scales[i], torch.float32) for i in range(2)])

    limit = scales[:, None, :, None].expand_as(x) * FP8_MAX
    assert back[0, 5, 2, :4].tolist() == pytest.approx([limit[0, 5, 2, 0].item(), -limit[0, 5, 2, 0].item()] * 2)
    x = torch.maximum(torch.minimum(x, limit), -limit)
    error = (back - x).abs()
    assert (error <= x.abs() / 16 + scales[:, None, :, None] * 2 ** -10).all()
    assert 1e-3 < (error / x.abs().clamp(min=1e-30)).median() < 1 / 16  # really quantized, heads kept apart


def test_decode_on_float8_cache_is_attention_over_the_dequantized_values():
    gen = torch.Generator().manual_seed(1)
    heads, kv_heads, dim, tokens = 4, 2, 16, 37
    k, v = torch.randn(2, tokens, kv_heads, dim, generator=gen)
    q = torch.randn(1, heads, dim, generator=gen)
    scales = 0.01 + 0.02 * torch.rand(2, kv_heads, generator=gen)
    k_cache = torch.zeros(4, BLOCK_SIZE, kv_heads, dim, dtype=torch.float8_e4m3fn)
    v_cache = torch.zeros_like(k_cache)
    backend = TorchBackend()
    backend.store_kv(k, v, k_cache, v_cache, torch.arange(tokens) + BLOCK_SIZE, scales)
    ctx = Context(block_tables=torch.tensor([[1, 2, 3]]), context_lens=torch.tensor([tokens]))
    out = backend.decode(q, k_cache, v_cache, ctx, dim ** -0.5, scales)
    keys, values = dequantize(quantize(k, scales[0]), scales[0], torch.float32), \
        dequantize(quantize(v, scales[1]), scales[1], torch.float32)
    scores = torch.einsum("hd,khd->hk", q[0], keys.repeat_interleave(2, 1)) * dim ** -0.5
    expected = torch.einsum("hk,khd->hd", scores.softmax(-1), values.repeat_interleave(2, 1))
    torch.testing.assert_close(out[0], expected, atol=1e-5, rtol=1e-5)
    unquantized = torch.einsum("hk,khd->hd", (torch.einsum("hd,khd->hk", q[0], k.repeat_interleave(2, 1))
                                               * dim ** -0.5).softmax(-1), v.repeat_interleave(2, 1))
    assert 1e-3 < (out[0] - unquantized).abs().max() < 0.1


def test_calibration_records_key_pair_norms_and_value_magnitudes():
    """Keys are bounded by their RoPE pairs' norms (which any rotation keeps), values by magnitude."""
    layers = [Attention(4, 8, 0.3, 2) for _ in range(2)]
    gen = torch.Generator().manual_seed(2)
    k = torch.randn(2, 10, 2, 8, generator=gen)
    v = torch.randn(2, 10, 2, 8, generator=gen)
    cu = torch.tensor([0, 10], dtype=torch.int32)
    set_context(Context(is_prefill=True, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=10, max_seqlen_k=10))
    try:
        with record_kv_amax(layers, 2, torch.device("cpu")) as amax:
            for i, layer in enumerate(layers):
                layer(torch.randn(10, 4, 8, generator=gen), k[i], v[i])
        layers[0](torch.randn(10, 4, 8), k[0] * 100, v[0] * 100)  # after the context: not recorded
    finally:
        reset_context()
    pair_norms = torch.sqrt(k[..., :4] ** 2 + k[..., 4:] ** 2)
    torch.testing.assert_close(amax[:, 0], pair_norms.amax(dim=(1, 3)))
    torch.testing.assert_close(amax[:, 1], v.abs().amax(dim=(1, 3)))


def test_engine_calibrates_without_warm_up_and_starts_zeroed(model_dir, caplog):
    """num_kvcache_blocks set (no memory-sizing warm-up) still calibrates; the cache, padding block
    included, starts as float8 zeros; start-up reports the tokens the cache holds."""
    llm = engine(model_dir, kv_cache_dtype="fp8_e4m3")
    runner = llm.model_runner
    cache = runner.kv_cache.tensor
    assert cache.dtype == torch.float8_e4m3fn and cache.size(0) == 97 and runner.kv_cache.num_blocks == 96
    assert torch.equal(cache.view(torch.uint8), torch.zeros_like(cache, dtype=torch.uint8))
    hf = llm.config.hf_config
    scales = runner.kv_cache.scales
    assert scales.shape == (hf.num_hidden_layers, 2, hf.num_key_value_heads)
    assert torch.isfinite(scales).all() and (scales > 1e-4).all()
    assert len(set(scales.flatten().tolist())) == scales.numel()  # measured, not a default
    assert all(layer.kv_scales is not None for layer in runner.attention_layers())
    [line] = [m for m in logged(caplog, "ModelRunner") if m.startswith("KV cache: ")]
    assert line.startswith("KV cache: 96 blocks of 16 tokens = 1536 tokens, fp8_e4m3 (float8_e4m3fn), ")


def test_sized_from_memory_the_cache_holds_twice_the_tokens_of_bfloat16(model_dir, monkeypatch):
    monkeypatch.setattr(kv_cache, "CPU_KV_CACHE_BYTES", 1 << 20)
    blocks = {kv: LLM(model_dir, device="cpu", dtype="bfloat16", kvcache_block_size=BLOCK_SIZE,
                      kv_cache_dtype=kv).model_runner.kv_cache.num_blocks for kv in ("auto", "fp8_e4m3")}
    assert blocks["auto"] > 64 and blocks["fp8_e4m3"] in (2 * blocks["auto"], 2 * blocks["auto"] + 1)


@pytest.mark.parametrize("variant", ["untied", "rope_yarn"])
def test_outputs_close_to_a_float32_cache(model_dirs, prompts, variant):
    path = model_dirs(variant)
    result = compare(engine(path), engine(path, kv_cache_dtype="fp8_e4m3"), prompts, 32)
    assert result["positions"] == 8 * 32
    assert_fp8_quality(result)


def rerun_differences(monkeypatch, path, device: str, dtype: str, kv_cache_dtype: str, **options) -> int:
    """How many of 40 prompts get other greedy tokens when generated again on the same engine, where their
    full blocks hit the prefix cache (with a float8 cache, no more than with a cache in the model's dtype)."""
    llm = LLM(path, device=device, dtype=dtype, kvcache_block_size=BLOCK_SIZE, max_num_seqs=64,
              num_kvcache_blocks=600, kv_cache_dtype=kv_cache_dtype, **options)
    prompts = random_prompts([20 + 7 * i % 90 for i in range(40)], seed=17)
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    first = tokens(llm, prompts, greedy)
    recorder = EngineRecorder(llm, monkeypatch)
    again = tokens(llm, prompts, greedy)
    assert sum(recorder.cached_tokens) == sum((len(p) - 1) // BLOCK_SIZE * BLOCK_SIZE for p in prompts), \
        "every full block hits"
    llm.exit()
    return sum(a != b for a, b in zip(first, again))


def test_prefix_hits_change_no_tokens_with_a_float8_cache(model_dir, monkeypatch):
    """A prompt reads its keys from the float8 cache whether it computed them in this step or found them in
    the prefix cache: the same computation, so a rerun gives the same tokens."""
    assert rerun_differences(monkeypatch, model_dir, "cpu", "float32", "fp8_e4m3") == 0


@gpu
@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "graphs"])
def test_prefix_hits_change_no_more_tokens_with_a_float8_cache_than_with_bfloat16_on_the_gpu(model_dir, enforce_eager,
                                                                                           monkeypatch):
    """On the GPU kernels, whose dot products over a float8 cache run in float16 with the scales applied
    outside; eager prefills included (the prefill graphs always read the cache)."""
    counts = {kv: rerun_differences(monkeypatch, model_dir, "cuda", "bfloat16", kv, enforce_eager=enforce_eager)
              for kv in ("auto", "fp8_e4m3")}
    assert counts["fp8_e4m3"] <= counts["auto"], counts
