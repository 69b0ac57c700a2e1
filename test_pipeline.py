"""The attention/FFN decode pipeline (enable_pipeline, nanovllm/modes/pipeline): same tokens as the
sequential forward, validation, fallback."""
import gc
import logging

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.config import Config
from nanovllm.engine.decode_paths import fastest
from nanovllm.modes.pipeline import pipeline_extension
from nanovllm.modes.pipeline.schedule import PipelineScheduler
from nanovllm.partitions import green as green_manager
from nanovllm.partitions.sm_limit import num_sms_of
from nanovllm.utils.context import Context, get_context
from tests.conftest import nanovllm_log_records  # noqa: F401 (autouse)
from tests.helpers import BLOCK_SIZE, checkpoint_fixture, gpu, logged, needs_green, random_prompts, tokens

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)

checkpoint = checkpoint_fixture("module", seed=5, tie_word_embeddings=False, num_hidden_layers=3)


@pytest.fixture(scope="module")
def prompts():
    return random_prompts([3, 30, 17, 64, 8, 50, 21], seed=3)


@pytest.fixture(scope="module")
def sequential(checkpoint, prompts):
    """The sequential engine's tokens on CPU."""
    return tokens(LLM(checkpoint, device="cpu", kvcache_block_size=BLOCK_SIZE, num_kvcache_blocks=64), prompts, GREEDY)


def pipeline_of(runner):
    """The runner's pipeline extension (present wherever enable_pipeline is on)."""
    [extension] = [e for e in runner.decode_paths.extensions if e.name == "pipeline"]
    return extension


def test_micro_batches_cover_the_batch_in_order():
    scheduler = PipelineScheduler(model=None)
    assert scheduler.micro_batches(7) == [slice(0, 3), slice(3, 7)]
    assert scheduler.micro_batches(1) == [slice(0, 1)]
    assert PipelineScheduler(None, num_micro_batches=3).micro_batches(9) == [slice(0, 3), slice(3, 6), slice(6, 9)]


def test_cpu_micro_batch_schedule_matches_sequential(checkpoint, prompts, sequential, caplog):
    llm = LLM(checkpoint, device="cpu", kvcache_block_size=BLOCK_SIZE, num_kvcache_blocks=64, enable_pipeline=True,
              pipeline_force=True)
    paths = llm.model_runner.decode_paths
    assert paths.forced == "pipeline" and paths.candidates["pipeline"].green is None  # one stream, no partitions
    assert "pipeline_force=True: running the micro-batch schedule on one stream, without partitions" in \
        logged(caplog, "ModelRunner")
    assert tokens(llm, prompts, GREEDY) == sequential
    stats = llm.model_runner.get_pipeline_statistics()
    assert stats["enabled"] is True
    assert stats["total_tokens"] == sum(GREEDY.max_tokens - 1 for _ in prompts)


def test_on_cpu_the_pipeline_is_off_with_one_log_line(checkpoint, prompts, sequential, caplog):
    llm = LLM(checkpoint, device="cpu", kvcache_block_size=BLOCK_SIZE, num_kvcache_blocks=64, enable_pipeline=True,
              pipeline_attention_sm_count=20, pipeline_ffn_sm_count=12)
    assert [r.getMessage() for r in caplog.records if r.name.startswith("nanovllm.") and "pipeline" in r.getMessage()] \
        == ["enable_pipeline: the pipeline runs on SM partitions of a CUDA GPU; on cpu decode runs the sequential forward"]
    paths = llm.model_runner.decode_paths
    assert pipeline_of(llm.model_runner).candidates == [] and list(paths.forwards) == ["sequential"]
    assert paths.forced is None
    assert tokens(llm, prompts, GREEDY) == sequential
    stats = llm.model_runner.get_pipeline_statistics()
    assert stats["enabled"] is False and stats["avg_total_time"] is None and stats["total_tokens"] == 0


@pytest.mark.parametrize("force", [False, True])
def test_without_green_contexts_falls_back_to_sequential(checkpoint, caplog, force):
    """For a CUDA device where green contexts cannot be made (here: no CUDA at all), the log says so in three
    lines and decode runs the sequential forward, or with pipeline_force the micro-batch schedule on one stream."""
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA: green_device_index then refuses before any CUDA call")
    config = Config.from_options(checkpoint, device="cpu", enable_pipeline=True, pipeline_attention_sm_count=20,
                                 pipeline_ffn_sm_count=12, pipeline_force=force)
    extension = pipeline_extension(config, torch.device("cuda", 0))
    assert logged(caplog, "ModelRunner")[0] == "Initializing pipeline with Attn=20, FFN=12 SMs"
    assert logged(caplog, "GreenContextManager", logging.WARNING) == ["Failed to initialize Green Context: "
                                                                      "CUDA is not available"]
    if force:
        assert logged(caplog, "ModelRunner")[1:] == ["pipeline_force=True: running the micro-batch schedule on one "
                                                     "stream, without partitions"]
        assert [c.green for c in extension.candidates] == [None] and extension.forced == "pipeline"
    else:
        assert logged(caplog, "ModelRunner", logging.WARNING) == ["Falling back to sequential execution "
                                                                  "(with CUDA graphs where enabled)"]
        assert extension.candidates == [] and extension.forced is None
    assert extension.statistics()["enabled"] is force


def test_print_pipeline_statistics_prints_the_report(checkpoint, capsys):
    llm = LLM(checkpoint, device="cpu", kvcache_block_size=BLOCK_SIZE, num_kvcache_blocks=64, enable_pipeline=True,
              pipeline_force=True)
    tokens(llm, [[1, 2, 3]], GREEDY)
    capsys.readouterr()  # the engine's start-up log lines
    llm.model_runner.print_pipeline_statistics()
    out = capsys.readouterr().out
    assert out.startswith("[Pipeline Statistics]\n") and out == pipeline_of(llm.model_runner).report() + "\n"
    plain = LLM(checkpoint, device="cpu", kvcache_block_size=BLOCK_SIZE, num_kvcache_blocks=64)
    assert plain.model_runner.get_pipeline_statistics() == {"enabled": False}
    capsys.readouterr()
    plain.model_runner.print_pipeline_statistics()
    assert capsys.readouterr().out == "[Pipeline Statistics]\n  Enabled: False\n"


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


@pytest.fixture(scope="module")
def reference(checkpoint):
    """reference(dtype): the sequential GPU engine of that dtype, built once for the module's tests."""
    engines = {}

    def get(dtype: str) -> LLM:
        if dtype not in engines:
            engines[dtype] = gpu_llm(checkpoint, dtype)
        return engines[dtype]

    yield get
    for llm in engines.values():
        llm.exit()


@needs_green
@pytest.mark.parametrize("split", [(16, 16), (64, 56), (24, 96)])
def test_pipelined_graph_matches_sequential_graph_in_every_bucket(checkpoint, reference, split):
    """Replays both graphs of every bucket on the same synthetic batch and compares hidden states,
    then checks end-to-end greedy tokens with the pipeline forced."""
    llm = gpu_llm(checkpoint, "float32", enable_pipeline=True, pipeline_force=True,
                  pipeline_attention_sm_count=split[0], pipeline_ffn_sm_count=split[1])
    runner = llm.model_runner
    paths = runner.decode_paths
    assert paths.candidates["pipeline"].green is not None, "green contexts unavailable"
    graphs, captured = paths.graphs, paths.captured
    for bucket in graphs.buckets:
        graphs.load_synthetic(bucket, 100, runner.kv_cache.num_blocks)
        runner.kv_cache.tensor.normal_()
        sequential = captured["sequential"][bucket].replay().clone()
        pipelined = captured["pipeline"][bucket].replay().clone()
        assert paths.plans[None][bucket] is captured["pipeline"][bucket]
        rel = (pipelined - sequential).norm() / sequential.norm()
        assert rel < 1e-5, f"bucket {bucket}: relative difference {rel}"
    prompts = random_prompts([5 + 11 * i % 80 for i in range(40)], seed=9)
    assert tokens(llm, prompts, GREEDY) == tokens(reference("float32"), prompts, GREEDY)
    stats = runner.get_pipeline_statistics()
    assert all(path == "pipeline" for path in stats["path_per_bucket"].values())
    assert (stats["attention_sm_count"], stats["ffn_sm_count"]) == tuple(green_manager.green_ctx.rounded_sm_counts(
        list(split), paths.candidates["pipeline"].green.partitions.unit))
    llm.exit()


@needs_green
def test_pipelined_graph_bfloat16_close_to_sequential(checkpoint, reference):
    prompts = random_prompts([5 + 11 * i % 80 for i in range(40)], seed=10)
    expected = tokens(reference("bfloat16"), prompts, GREEDY)
    llm = gpu_llm(checkpoint, "bfloat16", enable_pipeline=True, pipeline_force=True, pipeline_enable_profiling=True)
    ours = tokens(llm, prompts, GREEDY)
    same = sum(a == b for a, b in zip(ours, expected))
    assert same >= len(prompts) - 2, f"only {same}/{len(prompts)} sequences identical"
    stats = llm.model_runner.get_pipeline_statistics()
    assert stats["profiling"] is True
    assert stats["avg_total_time"] > 0 and stats["avg_attention_time"] > 0 and stats["avg_ffn_time"] > 0
    assert stats["attention_sm_count"] >= 16 and stats["ffn_sm_count"] >= 16
    llm.exit()


@needs_green
def test_auto_mode_chooses_a_path_for_every_bucket_and_caches_its_timings(checkpoint, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("NANOVLLM_CACHE", str(tmp_path))
    # Without the fused decode, the other candidate, so that each bucket chooses between these two.
    llm = gpu_llm(checkpoint, "bfloat16", enable_pipeline=True, fused_decode="off")
    runner = llm.model_runner
    paths = runner.decode_paths
    stats = runner.get_pipeline_statistics()
    assert set(stats["path_per_bucket"]) == set(paths.graphs.buckets)
    assert stats["avg_attention_time"] is None
    for bucket, path in stats["path_per_bucket"].items():
        timings = stats["bucket_timings_ms"][bucket]
        assert timings and all("attention_only_ms" not in t for t in timings)  # no stage graphs without profiling
        assert path == fastest(timings, list(paths.forwards))
        assert paths.plans[None][bucket] is paths.captured[path][bucket]
    assert any(m.startswith("decode paths timed in") for m in logged(caplog, "ModelRunner"))
    llm.exit()
    caplog.clear()
    again = gpu_llm(checkpoint, "bfloat16", enable_pipeline=True, fused_decode="off")
    assert any(m.endswith(": path timing skipped") for m in logged(caplog, "ModelRunner"))
    assert not any(m.startswith("decode paths timed in") for m in logged(caplog, "ModelRunner"))
    assert again.model_runner.get_pipeline_statistics()["path_per_bucket"] == stats["path_per_bucket"]
    again.exit()


@gpu
def test_engines_with_partitions_release_them(checkpoint, prompts, reference):
    """Five engines made and dropped in turn: no partitions, streams, graph memory or cuBLAS workspaces left
    behind (the partitions of one split and the capture stream are made once per process and reused), and
    an engine that lives beside them, capturing on the same stream, keeps its answers."""
    kept = reference("bfloat16")
    expected = tokens(kept, prompts[:2], GREEDY)

    def cycle():
        llm = gpu_llm(checkpoint, "bfloat16", enable_pipeline=True, pipeline_force=True)
        tokens(llm, prompts[:2], GREEDY)
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
    assert tokens(kept, prompts[:2], GREEDY) == expected


@needs_green
def test_green_context_failure_keeps_cuda_graphs(checkpoint, prompts, reference, monkeypatch, caplog):
    def fail(*args, **kwargs):
        raise green_manager.green_ctx.GreenContextError("cuGreenCtxCreate failed: CUDA_ERROR_NOT_SUPPORTED (simulated)")

    monkeypatch.setattr(green_manager.green_ctx, "split_device", fail)
    monkeypatch.setattr(green_manager, "_PARTITIONS", {})  # none made by earlier tests
    llm = gpu_llm(checkpoint, "float32", enable_pipeline=True, fused_decode="off")
    assert logged(caplog, "GreenContextManager", logging.WARNING) == [
        "Failed to initialize Green Context: cuGreenCtxCreate failed: CUDA_ERROR_NOT_SUPPORTED (simulated)"]
    assert logged(caplog, "ModelRunner", logging.WARNING) == ["Falling back to sequential execution "
                                                              "(with CUDA graphs where enabled)"]
    paths = llm.model_runner.decode_paths
    assert pipeline_of(llm.model_runner).candidates == [] and list(paths.forwards) == ["sequential"]
    assert paths.graphs is not None
    assert tokens(llm, prompts, GREEDY) == tokens(reference("float32"), prompts, GREEDY)
    llm.exit()


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
