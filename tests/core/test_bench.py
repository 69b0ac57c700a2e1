"""bench.py's one-stream latency end to end on a tiny checkpoint, its argument checks, the decode sweep's
path column and launch counter, and the step profile's per-kernel sums."""
import json
import sys

import pytest
import torch

import bench
from benchmarks.step_profile import Kernel, kernel_rows
from benchmarks.sweeps import add_auto_columns, capture_forwards, device_launches, sweep_options
from tests.helpers import gpu


def run_bench(monkeypatch, *argv: str):
    monkeypatch.setattr(sys, "argv", ["bench.py", *argv])
    bench.main()


def test_latency_rows(monkeypatch, tmp_path, model_dir):
    out = tmp_path / "rows.json"
    run_bench(monkeypatch, "--latency", "--model", model_dir, "--compare", "graph,eager", "--repeats", "1",
              "--prompt-tokens", "20", "--output-tokens", "6", "--json", str(out))
    rows = json.loads(out.read_text())
    cuda = torch.cuda.is_available()
    assert [row["mode"] for row in rows] == ["graph" if cuda else "graph (eager on cpu)", "eager"]
    for row in rows:
        assert row["output_tokens"] == 6 and row["ttft_ms"] > 0 and row["tpot_ms"] > 0
        # One request: its time is the first token's plus five more at the time per output token.
        assert row["tok_per_s"] == pytest.approx(6e3 / (row["ttft_ms"] + 5 * row["tpot_ms"]))
        # The floor needs a CUDA device's copy rate.
        assert ("floor_ms" in row and row["tpot/floor"] == pytest.approx(row["tpot_ms"] / row["floor_ms"])) == cuda
    # Only a graph has a decode path to report.
    assert rows[0]["decode_path"] in (("sequential", "fused") if cuda else ("",)) and rows[1]["decode_path"] == ""


@pytest.mark.parametrize("argv, message", [
    (["--repeats", "0"], "--repeats: expected an integer >= 1"),
    (["--prompt-tokens", "x"], "--prompt-tokens: expected an integer >= 1"),
    (["--output-tokens", "1"], "--output-tokens must be at least 2"),
    (["--compare", "graph,fast"], "unknown --compare ['fast']"),
    (["--batches", "1,0"], "--batches: expected comma-separated integers >= 1, got '1,0'"),
    (["--contexts", "x"], "--contexts: expected comma-separated integers >= 1, got 'x'"),
    (["--contexts", "256,1024", "--sweep-max-model-len", "1024"],
     "--sweep-max-model-len 1024 must exceed the longest of --contexts (1024)"),
])
def test_bad_arguments_exit_with_the_reason(monkeypatch, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        run_bench(monkeypatch, "--latency", *argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("benchmark", ["--decode-sweep", "--step-profile", "--persistent-chain"])
def test_gpu_benchmarks_on_cpu_exit_with_the_reason(monkeypatch, capsys, benchmark):
    with pytest.raises(SystemExit) as exit_:
        run_bench(monkeypatch, benchmark)
    assert exit_.value.code == 2
    assert "--sampler, --persistent-chain and --hf-peer need a CUDA device" in capsys.readouterr().err


def test_auto_path_is_the_engines_rule_over_the_contexts_swept():
    def row(batch, context, sequential, fused):
        return {"preset": "p", "kv_cache": "auto", "batch": batch, "context": context, "sequential_ms": sequential,
                "fused_ms": fused}

    # Batch 1: fused is faster at both contexts; batch 8: slower at one of them.
    rows = [row(1, 256, 2.0, 1.0), row(1, 4096, 3.0, 2.5), row(8, 256, 2.0, 1.0), row(8, 4096, 3.0, 3.5)]
    add_auto_columns(rows, [])
    assert [r["auto_path"] for r in rows] == ["fused", "fused", "sequential", "sequential"]


def test_sweep_engine_fits_the_longest_context_or_the_given_length():
    assert sweep_options([1, 8], 1024, 0.5)["max_model_len"] == 1025
    options = sweep_options([1, 8], 1024, 0.5, "fp8_e4m3", max_model_len=4096)
    assert options["max_model_len"] == options["max_num_batched_tokens"] == 4096
    assert options["max_num_seqs"] == 8 and options["kv_cache_dtype"] == "fp8_e4m3"


def test_each_forward_is_captured_with_its_own_graphs():
    class Graphs:  # stands in for DecodeGraphs: "captures" by calling at two buckets
        def capture(self, forward):
            return {batch: forward(torch.zeros(batch), torch.zeros(batch)) for batch in (1, 2)}

        def context(self, batch):
            return f"context of {batch}"

    forwards = {name: (lambda ids, pos, ctx, name=name: (name, ids.numel(), ctx)) for name in ("a", "b")}
    assert capture_forwards(Graphs(), forwards) == {
        name: {batch: (name, batch, f"context of {batch}") for batch in (1, 2)} for name in ("a", "b")}


def test_step_profile_splits_the_critical_path_among_overlapping_kernels():
    # Two replays of a two-layer step: a GEMM, then an attention kernel that starts before the GEMM ends
    # (a dependent launch); the second replay's attention runs 2 us longer.
    def replay(t0, attention_end):
        return [Kernel("gemm", t0, t0 + 10), Kernel("attn", t0 + 8, t0 + attention_end),
                Kernel("gemm", t0 + attention_end, t0 + attention_end + 10),
                Kernel("attn", t0 + attention_end + 9, t0 + 2 * attention_end)]

    rows = kernel_rows(replay(0, 14) + replay(100, 16), replays=2, layers=2)
    assert [row["kernel"] for row in rows] == ["gemm", "attn"]
    gemm, attn = rows
    assert gemm["launches/layer"] == attn["launches/layer"] == 1
    # Critical path: each gemm adds 10, the attentions 4 (6) past the gemm before them; per layer the medians.
    assert gemm["critical_us/layer"] == 10 and attn["critical_us/layer"] == pytest.approx((8 + 12) / 2 / 2)
    assert gemm["critical_us/layer"] * 2 + attn["critical_us/layer"] * 2 == pytest.approx((28 + 32) / 2)
    assert attn["busy_us/layer"] == pytest.approx((6 + 5 + 8 + 7) / 2 / 2)
    with pytest.raises(RuntimeError, match="do not split into 2 replays"):
        kernel_rows(replay(0, 14)[:3], replays=2, layers=2)


@gpu
def test_device_launches_counts_each_kernel():
    x = torch.zeros(16, device="cuda")
    assert device_launches(lambda: x.add_(1)) == 1
    assert device_launches(lambda: (x.add_(1), x.mul_(2), x.sub_(3))) == 3
