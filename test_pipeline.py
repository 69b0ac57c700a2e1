"""The attention/FFN decode pipeline: same tokens as the sequential forward, validation, fallback."""
import gc

import pytest
import torch

import green_ctx
from nanovllm import LLM, SamplingParams
from nanovllm.pipeline import green_manager
from nanovllm.pipeline.scheduler import PipelineScheduler
from nanovllm.utils.context import Context, get_context
from nanovllm.utils.sm_limit import num_sms_of
from tests.helpers import BLOCK_SIZE, build_checkpoint, random_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipeline_model")
    build_checkpoint(path, seed=5, tie_word_embeddings=False, num_hidden_layers=3)
    return str(path)


@pytest.fixture(scope="module")
def prompts():
    return random_prompts([3, 30, 17, 64, 8, 50, 21], seed=3)


def tokens(llm, prompts):
    return [o["token_ids"] for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def test_micro_batches_cover_the_batch_in_order():
    scheduler = PipelineScheduler(model=None)
    assert scheduler.micro_batches(7) == [slice(0, 3), slice(3, 7)]
    assert scheduler.micro_batches(1) == [slice(0, 1)]
    assert PipelineScheduler(None, num_micro_batches=3).micro_batches(9) == [slice(0, 3), slice(3, 6), slice(6, 9)]


def test_cpu_micro_batch_schedule_matches_sequential(checkpoint, prompts):
    sequential = tokens(LLM(checkpoint, device="cpu", kvcache_block_size=BLOCK_SIZE), prompts)
    llm = LLM(checkpoint, device="cpu", kvcache_block_size=BLOCK_SIZE, enable_pipeline=True, pipeline_force=True)
    assert llm.model_runner.pipeline is not None and not llm.model_runner.pipeline.scheduler.uses_streams
    assert tokens(llm, prompts) == sequential
    stats = llm.model_runner.get_pipeline_statistics()
    assert stats["enabled"] is True
    assert stats["total_tokens"] == sum(GREEDY.max_tokens - 1 for _ in prompts)


def test_without_green_contexts_falls_back_to_sequential(checkpoint, prompts, capsys):
    sequential = tokens(LLM(checkpoint, device="cpu", kvcache_block_size=BLOCK_SIZE), prompts)
    llm = LLM(checkpoint, device="cpu", kvcache_block_size=BLOCK_SIZE, enable_pipeline=True,
              pipeline_attention_sm_count=20, pipeline_ffn_sm_count=12)
    out = capsys.readouterr().out
    assert "[ModelRunner] Initializing pipeline with Attn=20, FFN=12 SMs" in out
    assert "[GreenContextManager] Failed to initialize Green Context:" in out
    assert "[ModelRunner] Falling back to sequential execution" in out
    assert llm.model_runner.pipeline is None
    assert tokens(llm, prompts) == sequential
    stats = llm.model_runner.get_pipeline_statistics()
    assert stats["enabled"] is False and stats["avg_total_time"] is None
    llm.model_runner.print_pipeline_statistics()
    assert "[Pipeline Statistics]" in capsys.readouterr().out


@pytest.mark.parametrize("options, option_name", [
    ({"pipeline_attention_sm_count": 0}, "pipeline_attention_sm_count"),
    ({"pipeline_ffn_sm_count": -8}, "pipeline_ffn_sm_count"),
    ({"tensor_parallel_size": 2}, "enable_pipeline"),
])
def test_invalid_pipeline_options_raise(checkpoint, options, option_name):
    with pytest.raises(ValueError, match=option_name):
        LLM(checkpoint, device="cpu", enable_pipeline=True, **options)


def test_non_boolean_flag_raises(checkpoint):
    with pytest.raises(TypeError, match="enable_pipeline"):
        LLM(checkpoint, device="cpu", enable_pipeline="yes")


# ---- GPU ------------------------------------------------------------------------------------------

def gpu_llm(checkpoint, dtype, **options):
    return LLM(checkpoint, device="cuda", dtype=dtype, kvcache_block_size=BLOCK_SIZE, max_num_seqs=48,
               max_model_len=256, num_kvcache_blocks=1024, **options)


@needs_cuda
@pytest.mark.parametrize("split", [(16, 16), (64, 56), (24, 96)])
def test_pipelined_graph_matches_sequential_graph_in_every_bucket(checkpoint, split):
    """Replays both graphs of every bucket on the same synthetic batch and compares hidden states,
    then checks end-to-end greedy tokens with the pipeline forced."""
    llm = gpu_llm(checkpoint, "float32", enable_pipeline=True, pipeline_force=True,
                  pipeline_attention_sm_count=split[0], pipeline_ffn_sm_count=split[1])
    runner = llm.model_runner
    assert runner.pipeline is not None and runner.pipeline.scheduler.uses_streams, "green contexts unavailable"
    graphs, pipeline = runner.graphs, runner.pipeline
    for bucket in graphs.buckets:
        graphs.load_synthetic(bucket, 100, runner.num_kvcache_blocks)
        runner.kv_cache.normal_()
        sequential = pipeline.sequential_graphs[bucket].replay().clone()
        pipelined = pipeline.pipelined_graphs[bucket].replay().clone()
        assert runner.decode_plan[bucket] is pipeline.pipelined_graphs[bucket]
        rel = (pipelined - sequential).norm() / sequential.norm()
        assert rel < 1e-5, f"bucket {bucket}: relative difference {rel}"
    prompts = random_prompts([5 + 11 * i % 80 for i in range(40)], seed=9)
    reference = tokens(gpu_llm(checkpoint, "float32"), prompts)
    assert tokens(llm, prompts) == reference
    assert all(path == "pipeline" for path in runner.get_pipeline_statistics()["path_per_bucket"].values())


@needs_cuda
def test_pipelined_graph_bfloat16_close_to_sequential(checkpoint):
    prompts = random_prompts([5 + 11 * i % 80 for i in range(40)], seed=10)
    reference = tokens(gpu_llm(checkpoint, "bfloat16"), prompts)
    llm = gpu_llm(checkpoint, "bfloat16", enable_pipeline=True, pipeline_force=True, pipeline_enable_profiling=True)
    ours = tokens(llm, prompts)
    same = sum(a == b for a, b in zip(ours, reference))
    assert same >= len(prompts) - 2, f"only {same}/{len(prompts)} sequences identical"
    stats = llm.model_runner.get_pipeline_statistics()
    assert stats["avg_total_time"] > 0 and stats["avg_attention_time"] > 0 and stats["avg_ffn_time"] > 0
    assert stats["attention_sm_count"] >= 16 and stats["ffn_sm_count"] >= 16


@needs_cuda
def test_auto_mode_chooses_a_path_for_every_bucket_and_caches_its_timings(checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOVLLM_CACHE", str(tmp_path))
    llm = gpu_llm(checkpoint, "bfloat16", enable_pipeline=True)
    runner = llm.model_runner
    stats = runner.get_pipeline_statistics()
    assert set(stats["path_per_bucket"]) == set(runner.graphs.buckets)
    assert stats["avg_attention_time"] is None
    for bucket, path in stats["path_per_bucket"].items():
        timings = stats["bucket_timings_ms"][bucket]
        assert timings and all(t["attention_only_ms"] is None for t in timings)  # no stage graphs
        faster = all(t["pipelined_ms"] < t["sequential_ms"] for t in timings)
        assert path == ("pipeline" if faster else "sequential")
        chosen = runner.pipeline.pipelined_graphs if faster else runner.pipeline.sequential_graphs
        assert runner.decode_plan[bucket] is chosen[bucket]
    assert "decode paths timed in" in capsys.readouterr().out
    llm.exit()
    again = gpu_llm(checkpoint, "bfloat16", enable_pipeline=True)
    assert "path timing skipped" in capsys.readouterr().out
    assert again.model_runner.get_pipeline_statistics()["path_per_bucket"] == stats["path_per_bucket"]
    again.exit()


@needs_cuda
def test_engines_with_partitions_release_them(checkpoint, prompts):
    """Five engines made and dropped in turn: no partitions, streams or graph memory left behind
    (the partitions of one split are made once per process and reused)."""
    def cycle():
        llm = gpu_llm(checkpoint, "bfloat16", enable_pipeline=True, pipeline_force=True)
        tokens(llm, prompts[:2])
        llm.exit()
        del llm
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()

    cycle()
    free_after_first = torch.cuda.mem_get_info()[0]
    for _ in range(4):
        cycle()
    leaked = free_after_first - torch.cuda.mem_get_info()[0]
    assert leaked < 8 << 20, f"{leaked / 2 ** 20:.1f} MiB less free memory after four more engines"


@needs_cuda
def test_green_context_failure_keeps_cuda_graphs(checkpoint, prompts, monkeypatch, capsys):
    def fail(*args, **kwargs):
        raise green_ctx.GreenContextError("cuGreenCtxCreate failed: CUDA_ERROR_NOT_SUPPORTED (simulated)")

    monkeypatch.setattr(green_ctx, "split_device", fail)
    monkeypatch.setattr(green_manager, "_PARTITIONS", {})  # none made by earlier tests
    llm = gpu_llm(checkpoint, "float32", enable_pipeline=True)
    assert "Falling back to sequential execution" in capsys.readouterr().out
    assert llm.model_runner.pipeline is None
    assert llm.model_runner.graphs is not None
    assert tokens(llm, prompts) == tokens(gpu_llm(checkpoint, "float32"), prompts)


def test_micro_batch_attention_runs_with_the_partition_sm_count():
    """Each micro-batch's attention runs with the attention partition's SM count in force, so that its
    kernels size their grids for the partition rather than the whole GPU."""
    seen = []

    class Recorder:
        num_layers = 2

        def embed(self, ids):
            return ids.float()[:, None]

        def forward_attention(self, layer, positions, hidden, residual):
            seen.append((num_sms_of(positions.device), get_context().context_lens.tolist()))
            return hidden, hidden

        def forward_ffn(self, layer, hidden, residual):
            return hidden, residual

        def norm(self, hidden, residual):
            return hidden

    ctx = Context(slot_mapping=torch.arange(5), context_lens=torch.arange(10, 15), block_tables=torch.zeros(5, 2))
    PipelineScheduler(Recorder(), attention_sm_count=40).forward(torch.arange(5), torch.arange(5), ctx)
    assert seen == [(40, [10, 11]), (40, [12, 13, 14])] * 2
