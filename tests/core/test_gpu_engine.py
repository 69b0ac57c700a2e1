"""The GPU fast path against references: CUDA-graph replay vs eager, and Hugging Face transformers."""
import pytest
import torch
from transformers import Qwen3ForCausalLM

from nanovllm import LLM, SamplingParams
from nanovllm.utils.context import reset_context, set_context
from tests.helpers import GPU, BLOCK_SIZE, MODEL_VARIANTS, assert_fp8_quality, count_preemptions, random_prompts, tokens

pytestmark = GPU

GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
# Engines of the same options serve every test that asks for them (tests leave them idle).
_ENGINES: dict[tuple, LLM] = {}


def engine(model_dir, **options) -> LLM:
    key = (model_dir, tuple(sorted(options.items())))
    if key not in _ENGINES:
        _ENGINES[key] = LLM(model_dir, device="cuda", kvcache_block_size=BLOCK_SIZE, max_num_seqs=64, max_model_len=512,
                            num_kvcache_blocks=1024, **options)
    return _ENGINES[key]


@pytest.fixture(scope="module", autouse=True)
def release_engines():
    yield
    for llm in _ENGINES.values():
        llm.exit()
    _ENGINES.clear()


def generate(model_dir, prompts, **options):
    llm = engine(model_dir, **options)
    outputs = tokens(llm, prompts, GREEDY)
    return outputs, llm


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_float32_graph_replay_matches_eager(model_dir, backend):
    # 37 prompts: decode batches fall in several padded buckets (37 -> 48, then smaller as they finish).
    prompts = random_prompts([5 + 7 * i % 90 for i in range(37)], seed=7)
    eager, _ = generate(model_dir, prompts, dtype="float32", attention_backend=backend, enforce_eager=True)
    graph, llm = generate(model_dir, prompts, dtype="float32", attention_backend=backend)
    assert llm.model_runner.decode_paths.graphs is not None and llm.model_runner.backend.name == backend
    assert graph == eager


def test_float32_prefill_graphs_match_eager(model_dir, monkeypatch):
    """Prompts sharing a prefix (prefix-cache hits), a token budget that cuts prompts into chunks and a
    KV cache small enough to preempt; then a burst of short prompts, more than one bucket's graph
    holds, which runs eagerly in the same engine: the same greedy tokens as an engine without graphs."""
    shared = random_prompts([40], seed=3)[0]
    batches = [[shared + p for p in random_prompts([3 + 11 * i % 150 for i in range(20)], seed=11)],
               random_prompts([2 + i % 5 for i in range(30)], seed=12)]
    options = dict(dtype="float32", kvcache_block_size=BLOCK_SIZE, max_num_seqs=64, max_model_len=512,
                   max_num_batched_tokens=300, num_kvcache_blocks=60)

    def run_batches(llm):
        return [tokens(llm, batch, GREEDY) for batch in batches]

    eager = run_batches(LLM(model_dir, device="cuda", enforce_eager=True, **options))
    llm = LLM(model_dir, device="cuda", **options)
    runner = llm.model_runner
    assert runner.prefill_graphs.buckets[-1] == 300
    prefills, replayed = [], []
    prefill_hidden, load = runner._prefill_hidden, runner.prefill_graphs.load

    def counted_prefill(seqs, *args):
        prefills.append(len(seqs))
        return prefill_hidden(seqs, *args)

    def counted_load(*args):
        replayed.append(load(*args))
        return replayed[-1]

    runner._prefill_hidden, runner.prefill_graphs.load = counted_prefill, counted_load
    preempted = count_preemptions(monkeypatch)
    assert run_batches(llm) == eager
    assert preempted and 0 < len(replayed) < len(prefills)
    assert 30 in prefills and runner.prefill_graphs.seqs_in(300) < 30  # the burst, eagerly


def test_capture_survives_unreachable_graphs():
    """A graph left in a reference cycle (as a dropped engine leaves its graphs) is not destroyed in the
    middle of a later capture, which would invalidate it: the captured forward drops the last reference
    to the cycle and allocates enough to trigger the garbage collector. (Its run before the capture,
    the warm-up, must not drop it: a collection there is harmless.)"""
    import gc

    from nanovllm.engine.graphs import capture
    x = torch.arange(4.0, device="cuda")
    stream = torch.cuda.Stream()
    gc.collect()
    cycle = [capture(lambda: x * 2, None, stream)]
    cycle.append(cycle)
    holder = [cycle]
    del cycle
    runs = []

    def forward():
        runs.append(None)
        if len(runs) == 2:  # inside the capture
            holder.clear()
            _ = [[] for _ in range(10 * gc.get_threshold()[0])]
        return x + 1

    graph = capture(forward, None, stream)
    assert len(runs) == 2 and not holder
    x.fill_(5.0)
    assert graph.replay().tolist() == [6.0] * 4


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_float8_cache_graph_replay_matches_eager(model_dir, backend):
    """Teacher-forced, since graph and eager steps differ in float summation order (split counts of
    padded buckets), which can move a value across a float8 rounding boundary and a tiny model's greedy
    tokens with it."""
    from benchmarks.quality import compare
    prompts = random_prompts([5 + 7 * i % 90 for i in range(37)], seed=7)
    options = dict(dtype="float32", attention_backend=backend, kv_cache_dtype="fp8_e4m3", async_scheduling=False)
    _, eager = generate(model_dir, [[1, 2, 3]], enforce_eager=True, **options)
    _, graph = generate(model_dir, [[1, 2, 3]], **options)  # the next test's float8 engine too
    assert graph.model_runner.decode_paths.graphs is not None
    assert graph.model_runner.kv_cache.tensor.dtype == torch.float8_e4m3fn
    assert torch.equal(graph.model_runner.kv_cache.scales, eager.model_runner.kv_cache.scales)
    result = compare(eager, graph, prompts, 32)
    assert result["forced_top1_agreement"] > 0.98
    assert result["max_abs_error/range"] < 0.02


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_float8_cache_outputs_close_to_a_float32_cache(model_dir, prompts, backend):
    """The CPU test's bounds (tests/core/test_fp8_kv_cache.py), on the GPU kernels and CUDA graphs."""
    from benchmarks.quality import compare
    options = dict(dtype="float32", attention_backend=backend, async_scheduling=False)
    _, reference = generate(model_dir, [[1, 2, 3]], **options)
    _, quantized = generate(model_dir, [[1, 2, 3]], kv_cache_dtype="fp8_e4m3", **options)
    assert_fp8_quality(compare(reference, quantized, prompts, 32))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bfloat16_graph_replay_close_to_eager_in_every_bucket(model_dir, backend):
    """bf16 greedy runs drift apart after a few tokens on rounding alone, so compare one step's
    hidden states: the padded graph replay against the eager forward on the same batch."""
    _, llm = generate(model_dir, [[1, 2, 3]], dtype="bfloat16", attention_backend=backend)
    runner, graphs = llm.model_runner, llm.model_runner.decode_paths.graphs
    # Random keys and values everywhere: the engine's later prompts overwrite the blocks they use.
    runner.kv_cache.tensor.normal_()
    for bucket in graphs.buckets:
        batch = max(1, bucket - 1)  # one padded row when the bucket allows it
        graphs.load_synthetic(bucket, 100, runner.kv_cache.num_blocks)
        graphs.input_ids[:batch].random_(0, 512)
        replayed = runner.decode_paths.plans[None][bucket].replay()[:batch].float()
        with torch.inference_mode():
            set_context(graphs.context(batch))
            eager = runner.model(graphs.input_ids[:batch], graphs.positions[:batch]).float()
            reset_context()
        rel = (replayed - eager).norm() / eager.norm()
        assert rel < 2e-2, f"bucket {bucket}: relative difference {rel}"


@pytest.mark.parametrize("variant", list(MODEL_VARIANTS))
def test_float32_greedy_matches_transformers(model_dirs, prompts, hf_outputs, variant):
    """Every parity checkpoint, its RoPE scaling types included, on the GPU path (the default backend,
    Triton: for the untied checkpoint, the engine of test_float32_graph_replay_matches_eager[triton])."""
    ours, llm = generate(model_dirs(variant), prompts, dtype="float32", attention_backend="triton")
    assert llm.model_runner.backend.name == "triton" and llm.model_runner.decode_paths.graphs is not None
    assert ours == hf_outputs(variant)  # transformers' greedy tokens, shared with tests/core/test_hf_parity.py


def test_bfloat16_logits_close_to_transformers_at_every_step(model_dir):
    """Both models are fed the same tokens (teacher forcing); nanovllm's logits at each decode step
    must stay close to transformers' bf16 logits at that position. (The engine of
    test_bfloat16_graph_replay_close_to_eager_in_every_bucket[triton]; its sampler is put back after.)"""
    hf = Qwen3ForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    _, llm = generate(model_dir, [[1, 2, 3]], dtype="bfloat16", attention_backend="triton")
    runner = llm.model_runner
    sampler = runner.sampler
    try:
        check_teacher_forced_logits(llm, hf)
    finally:
        runner.sampler = sampler


def check_teacher_forced_logits(llm, hf):
    runner = llm.model_runner
    for prompt in random_prompts([9, 40, 77], seed=11):
        forced = random_prompts([24], seed=len(prompt))[0]
        recorded = []

        def teacher(logits, temperatures, recorded=recorded, forced=forced):
            recorded.append(logits.float().clone())
            return torch.tensor([forced[len(recorded) - 1]], device=logits.device)

        runner.sampler = teacher
        llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=len(forced), ignore_eos=True),
                     use_tqdm=False)
        with torch.no_grad():
            ref = hf(torch.tensor([prompt + forced], device="cuda")).logits[0, len(prompt) - 1:-1].float()
        ours = torch.cat(recorded)
        assert ours.shape == ref.shape
        rel = (ours - ref).norm(dim=-1) / ref.norm(dim=-1)
        assert rel.max() < 3e-2, f"step errors {rel.tolist()}"
