"""fused_decode: the option's checks, the fused decode forward (modes/fused_decode) against the model's own
forward, and on a GPU the engine's greedy tokens with the fused path against those without it.

The forward check runs the sequential and the fused forward over one decode batch of a tiny random model
with a paged cache: on CUDA directly, on CPU with small sizes under the Triton interpreter."""
import logging

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.config import Config
from nanovllm.engine.decode_paths import Sequential, fastest
from nanovllm.engine.model_runner import default_dtype
from nanovllm.layers.attention import Attention
from nanovllm.models.qwen3 import Qwen3ForCausalLM
from nanovllm.modes.fused_decode.extension import unusable
from nanovllm.utils.context import Context, reset_context
from tests.helpers import (BLOCK_SIZE, MODEL_VARIANTS, EngineRecorder, gpu, logged, qwen3_config, random_prompts,
                           shared_checkpoint, tokens)
from tests.kernels.common import DTYPES
from tests.kernels.kernel_checks import kernel_tests

# The HF-parity model (GQA, untied, head_dim 16), and GQA and MQA models with head_dim 64 and 128 (wider
# than the hidden size, 64), untied and tied; seeds chosen for wide gaps between the top two logits.
VARIANTS = {"gqa-untied-d16": MODEL_VARIANTS["untied"],
            "gqa-untied-d64": dict(seed=2, tie_word_embeddings=False, num_hidden_layers=3, head_dim=64),
            "mqa-tied-d128": dict(seed=2, tie_word_embeddings=True, num_hidden_layers=2, num_key_value_heads=1,
                                  head_dim=128)}
MAX_TOKENS = 24
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


# ---- the option ---------------------------------------------------------------------------------------

def test_a_value_other_than_auto_on_or_off_is_rejected(model_dir):
    with pytest.raises(ValueError, match=r"fused_decode: must be one of \('auto', 'on', 'off'\)"):
        Config.from_options(model_dir, device="cpu", fused_decode="yes")


def test_on_is_rejected_where_the_path_cannot_run(model_dir):
    with pytest.raises(ValueError, match=r"fused_decode: must be 'auto' or 'off' here \(.*CUDA device, not on cpu"):
        LLM(model_dir, device="cpu", fused_decode="on")
    with pytest.raises(ValueError, match="fused_decode: .*pipeline_force=True"):
        Config.from_options(model_dir, device="cpu", enable_pipeline=True, pipeline_force=True, fused_decode="on")


def test_the_reasons_the_path_cannot_run(model_dir):
    config = Config.from_options(model_dir, device="cpu")
    cuda = torch.device("cuda", 0)
    assert unusable(config, cuda) is None
    assert "not on cpu" in unusable(config, torch.device("cpu"))
    config.parallel.tensor_parallel_size = 2
    assert "tensor_parallel_size=2" in unusable(config, cuda)
    config.parallel.tensor_parallel_size = 1
    config.hf_config.attention_bias = True
    assert "attention_bias=True" in unusable(config, cuda)


def test_auto_on_cpu_says_why_in_one_line_and_decodes_as_off(model_dir, caplog):
    prompts = random_prompts([3, 17, 40], seed=5)
    outputs = {}
    for option in ("auto", "off"):
        caplog.clear()
        llm = LLM(model_dir, device="cpu", kvcache_block_size=BLOCK_SIZE, num_kvcache_blocks=32, fused_decode=option)
        outputs[option] = tokens(llm, prompts, GREEDY)
        lines = [m for m in logged(caplog, "ModelRunner", logging.INFO) if "fused_decode" in m]
        assert lines == ([] if option == "off" else
                         ["fused_decode='auto': its Triton kernels run on a CUDA device, not on cpu; decode runs the "
                          "sequential forward"])
        assert "fused_decode" not in llm.statistics()["runner"]
        llm.exit()
    assert outputs["auto"] == outputs["off"] and all(len(o) == MAX_TOKENS for o in outputs["off"])


# ---- the forward --------------------------------------------------------------------------------------

def random_model(dtype, device, num_kv_heads, head_dim, seed):
    """A two-layer model of random weights on device, built as the runner builds it (float32 RoPE table)."""
    config = qwen3_config(tie_word_embeddings=False, num_hidden_layers=2, num_key_value_heads=num_kv_heads,
                          head_dim=head_dim)
    with torch.device(device), default_dtype(dtype):
        model = Qwen3ForCausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        values = torch.randn(param.shape, generator=gen)
        param.data.copy_(values * 0.3 + 1 if "norm" in name else values * 0.2)
    return model


def decode_batch(model, dtype, device, batch, seed, blocks_per_seq=3):
    """Random caches bound to the model's attention layers and a decode step of `batch` sequences of random
    lengths, each in blocks of its own: (input_ids, positions, context, the caches' initial contents, the layers)."""
    gen = torch.Generator().manual_seed(seed)
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    num_blocks = batch * blocks_per_seq + 1  # the last block takes the stores of slot -1
    caches = [torch.randn(2, num_blocks, BLOCK_SIZE, layer.num_kv_heads, layer.head_dim, generator=gen).to(dtype)
              for layer in layers]
    lengths = torch.randint(1, blocks_per_seq * BLOCK_SIZE + 1, (batch,), generator=gen)
    tables = torch.arange(batch * blocks_per_seq).view(batch, blocks_per_seq)
    last = lengths - 1
    slots = tables.gather(1, (last // BLOCK_SIZE)[:, None])[:, 0] * BLOCK_SIZE + last % BLOCK_SIZE
    input_ids = torch.randint(0, model.lm_head.weight.size(0), (batch,), generator=gen)
    context = dict(slot_mapping=slots, context_lens=lengths.to(torch.int32), block_tables=tables.to(torch.int32))
    return (input_ids.to(device), last.to(device), {k: v.to(device) for k, v in context.items()},
            [c.to(device) for c in caches], layers)


def run_forward(forward, layers, caches, input_ids, positions, context):
    """forward over a fresh copy of the caches: (hidden states, the caches after the step)."""
    caches = [c.clone() for c in caches]
    for layer, cache in zip(layers, caches):
        layer.k_cache, layer.v_cache = cache[0], cache[1]
    try:
        with torch.inference_mode():
            hidden = forward(input_ids, positions, Context(is_prefill=False, **context))
    finally:
        reset_context()
    return hidden.float().cpu(), [c.float().cpu() for c in caches]


def check_forward(device, dtype, batch, num_kv_heads, head_dim):
    """The fused forward's hidden states and stored keys and values against the sequential forward's: in
    float32 to the order of the sums, in bf16 close (roundings that differ propagate through the layers)."""
    from nanovllm.modes.fused_decode.extension import FusedDecodeCandidate
    model = random_model(dtype, device, num_kv_heads, head_dim, seed=batch)
    if device == "cuda":
        from nanovllm.attention.triton_backend import TritonBackend  # its store is the one fused into q/k RoPE
        for layer in model.modules():
            if isinstance(layer, Attention):
                layer.backend = TritonBackend()
    input_ids, positions, context, caches, layers = decode_batch(model, dtype, device, batch, seed=batch + 1)
    ref, ref_caches = run_forward(Sequential.bind(model), layers, caches, input_ids, positions, context)
    out, out_caches = run_forward(FusedDecodeCandidate().bind(model), layers, caches, input_ids, positions, context)
    assert out.shape == ref.shape == (batch, 64) and torch.isfinite(out).all()
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    for got, expected in [(out, ref), *zip(out_caches, ref_caches)]:
        assert (got - expected).norm() <= tolerance * expected.norm(), (got - expected).norm() / expected.norm()
    changed = [(a != b.float().cpu()).any(dim=(0, 2, 3, 4)) for a, b in zip(ref_caches, caches)]
    assert all(c.sum() == batch for c in changed)  # each sequence's block got its new key and value


def forward_cases(small):
    cases = [("fp32", 3, 2, 16), ("bf16", 13, 1, 32)]
    return cases if small else cases + [(d, b, kv, hd) for d in DTYPES for b in (1, 7, 33, 100)
                                        for kv, hd in ((2, 64), (1, 128))]


KINDS = {"forward": (forward_cases, lambda device, c: check_forward(device, DTYPES[c[0]], *c[1:]))}
test_cuda, test_interpreter = kernel_tests(KINDS, __file__)


# ---- the engine on a GPU ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return lambda variant: shared_checkpoint(tmp_path_factory, **VARIANTS[variant])


def stress_prompts() -> list[list[int]]:
    """Prompts that share a long prefix (prefix-cache hits) and are longer than the token budget (chunked),
    and many short ones, so that decode batches fill several buckets on both sides of 8 rows."""
    stem = random_prompts([70], seed=31)[0]
    tails = random_prompts([9, 30, 5, 50], seed=32)
    return [stem + t for t in tails] + [stem] + random_prompts([2 + 5 * i % 13 for i in range(30)], seed=33)


# Small enough a cache and budget that sequences are preempted and long prompts prefilled in chunks.
STRESS = dict(dtype="float32", kvcache_block_size=BLOCK_SIZE, max_model_len=160, num_kvcache_blocks=40,
              max_num_batched_tokens=64, max_num_seqs=48)


def greedy(llm: LLM, prompts) -> list[list[int]]:
    try:
        return tokens(llm, prompts, GREEDY)
    finally:
        llm.exit()


@gpu
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8_e4m3"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_float32_fused_tokens_match_the_sequential_graph(checkpoints, variant, kv_cache_dtype, monkeypatch):
    path, prompts = checkpoints(variant), stress_prompts()
    expected = greedy(LLM(path, kv_cache_dtype=kv_cache_dtype, fused_decode="off", **STRESS), prompts)
    llm = LLM(path, kv_cache_dtype=kv_cache_dtype, fused_decode="on", **STRESS)
    stats = llm.statistics()["runner"]
    recorder = EngineRecorder(llm, monkeypatch)
    assert greedy(llm, prompts) == expected
    assert set(stats["decode_paths"]["path_per_bucket"].values()) == {"fused"}
    assert stats["fused_decode"]["fused_buckets"] == sorted(stats["decode_paths"]["path_per_bucket"])
    assert recorder.preempted and sum(recorder.cached_tokens) >= 4 * BLOCK_SIZE and recorder.chunked > 0
    assert min(recorder.decode_batch_sizes) <= 8 < max(recorder.decode_batch_sizes)


@gpu
def test_float32_fused_tokens_without_graphs_match(checkpoints, monkeypatch):
    """"on" with enforce_eager runs the fused forward eagerly."""
    path, prompts = checkpoints("gqa-untied-d64"), stress_prompts()
    expected = greedy(LLM(path, fused_decode="off", **STRESS), prompts)
    llm = LLM(path, fused_decode="on", enforce_eager=True, **STRESS)
    forwards = []
    fused = llm.model_runner.decode_paths.forwards["fused"]
    monkeypatch.setitem(llm.model_runner.decode_paths.forwards, "fused",
                        lambda *args: forwards.append(args[0].size(0)) or fused(*args))
    assert greedy(llm, prompts) == expected
    assert llm.model_runner.decode_paths.graphs is None and len(forwards) > 0


@gpu
@pytest.mark.parametrize("mode", [dict(enable_two_gpu_pd=True, prefill_device_id=0, decode_device_id=0),
                                  dict(enable_pd_multiplexing=True)], ids=["pd-same-device", "multiplexing"])
def test_float32_fused_tokens_in_the_prefill_decode_modes(checkpoints, mode):
    path, prompts = checkpoints("mqa-tied-d128"), stress_prompts()
    options = dict(STRESS, num_kvcache_blocks=160)
    expected = greedy(LLM(path, fused_decode="off", **options), prompts)
    llm = LLM(path, fused_decode="on", **options, **mode)
    assert set(llm.statistics()["runner"]["decode_paths"]["path_per_bucket"].values()) == {"fused"}
    assert greedy(llm, prompts) == expected


@gpu
@pytest.mark.parametrize("pipeline", [False, True], ids=["alone", "with-pipeline"])
def test_auto_replays_a_candidate_only_where_it_was_timed_faster(checkpoints, tmp_path, monkeypatch, pipeline):
    """Timed afresh (an empty cache directory): each bucket replays, of the candidates that beat the sequential
    forward at every context timed, the one of least total time (decode_paths.fastest), otherwise the sequential
    one."""
    monkeypatch.setenv("NANOVLLM_CACHE", str(tmp_path))
    llm = LLM(checkpoints("gqa-untied-d64"), dtype="bfloat16", max_num_seqs=64, max_model_len=512,
              num_kvcache_blocks=256, kvcache_block_size=BLOCK_SIZE, enable_pipeline=pipeline)
    try:
        stats = llm.statistics()["runner"]
        names = list(llm.model_runner.decode_paths.forwards)
    finally:
        llm.exit()
    choice, timings = stats["decode_paths"]["path_per_bucket"], stats["decode_paths"]["timings_ms"]
    assert choice and sorted(choice) == sorted(timings)
    for bucket, path in choice.items():
        assert all("fused_ms" in t for t in timings[bucket])
        assert path == fastest(timings[bucket], names), (bucket, path, timings[bucket])
    assert stats["fused_decode"]["fused_buckets"] == sorted(b for b, p in choice.items() if p == "fused")
