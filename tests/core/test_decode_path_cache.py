"""The on-disk record of start-up decode path timings: read back for the same setup only; bad files ignored.
And the rule that picks a bucket's path from its timings."""
import json
import logging
from types import SimpleNamespace

import pytest
import torch

from nanovllm.engine import decode_paths
from nanovllm.engine.decode_paths import TimingCache, fastest, setup_key, source_digest
from tests.helpers import logged

NAMES = ["sequential", "pipeline"]
KEY = {"gpu": "NVIDIA H100 80GB HBM3", "driver": "580.159.04", "buckets": [1, 2],
       "candidates": {"sequential": {}, "pipeline": {"sm_counts": [16, 16, 100]}}}


def timing(context_len, sequential_ms, pipeline_ms):
    return {"context_len": context_len, "sequential_ms": sequential_ms, "pipeline_ms": pipeline_ms}


TIMINGS = {1: [timing(256, 1.0, 1.5), timing(2048, 2.0, 2.5)],
           2: [timing(256, 1.2, 1.1), timing(2048, 2.2, 2.1)]}


@pytest.fixture(autouse=True)
def cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOVLLM_CACHE", str(tmp_path))


def test_same_setup_reads_back_what_was_saved():
    TimingCache(KEY).save(TIMINGS)
    loaded = TimingCache(json.loads(json.dumps(KEY))).load()
    assert loaded == TIMINGS
    assert [fastest(loaded[b], NAMES) for b in (1, 2)] == ["sequential", "pipeline"]


def test_a_candidate_wins_a_bucket_only_where_it_is_faster_at_every_context():
    assert fastest([timing(256, 1.0, 0.9), timing(2048, 2.0, 2.1)], NAMES) == "sequential"
    assert fastest([timing(256, 1.0, 1.0)], NAMES) == "sequential"  # a tie is no win
    both = [{**timing(256, 1.0, 0.9), "fused_ms": 0.8}, {**timing(2048, 2.0, 1.9), "fused_ms": 1.95}]
    assert fastest(both, NAMES + ["fused"]) == "fused"  # of those faster everywhere, the least total time
    assert fastest(both, ["sequential"]) == "sequential"


@pytest.mark.parametrize("change", [{"gpu": "NVIDIA H200"}, {"driver": "575.0"},
                                    {"candidates": {"sequential": {}, "pipeline": {"sm_counts": [24, 16, 92]}}}])
def test_another_setup_has_no_timings(change):
    TimingCache(KEY).save(TIMINGS)
    assert TimingCache({**KEY, **change}).load() is None


def test_the_source_digest_changes_with_any_file_of_the_code(tmp_path):
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "attention.py").write_text("TILE = 64\n")
    (tmp_path / "llm.py").write_text("class LLM: ...\n")
    first = source_digest(tmp_path)
    assert source_digest(tmp_path) == first and len(first) == 20
    (tmp_path / "kernels" / "attention.py").write_text("TILE = 32\n")
    edited = source_digest(tmp_path)
    (tmp_path / "kernels" / "attention.py").rename(tmp_path / "kernels" / "decode.py")
    assert len({first, edited, source_digest(tmp_path)}) == 3
    code = source_digest(tmp_path)
    (tmp_path / "notes.txt").write_text("not code")
    assert source_digest(tmp_path) == code


@pytest.mark.parametrize("dependent_launch", [True, False])
def test_the_setup_key_holds_the_source_digest_and_dependent_launch(monkeypatch, dependent_launch):
    from transformers import Qwen3Config
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H200")
    monkeypatch.setattr(torch._C, "_cuda_getDriverVersion", lambda: 12080, raising=False)
    monkeypatch.setattr(decode_paths, "dependent_launch", SimpleNamespace(ENABLED=dependent_launch))
    key = setup_key(torch.device("cuda", 0), Qwen3Config(), torch.bfloat16, "auto", 256, "triton")
    assert key["source"] == source_digest() and key["gpu"] == "NVIDIA H200"
    assert key["dependent_launch"] is dependent_launch


@pytest.mark.parametrize("content", ["{not json", json.dumps({"key": {}, "timings": {}}),
                                     json.dumps({"key": KEY, "timings": {"1": [{"context_len": 256}]}}),
                                     json.dumps({"key": KEY, "timings": {"1": [], "2": []}}),
                                     # every bucket, but the pipeline's time missing in one of them
                                     json.dumps({"key": KEY, "timings": {"1": TIMINGS[1], "2": [
                                         {"context_len": 256, "sequential_ms": 1.2}]}})])
def test_corrupt_or_stale_file_is_ignored_with_a_log_line(content, caplog):
    cache = TimingCache(KEY)
    cache.path.parent.mkdir(parents=True)
    cache.path.write_text(content)
    assert cache.load() is None
    warnings = logged(caplog, "ModelRunner", logging.WARNING)
    assert len(warnings) == 1 and warnings[0].startswith(f"ignoring the decode path cache {cache.path}: ")
    cache.save(TIMINGS)
    assert cache.load() == TIMINGS
