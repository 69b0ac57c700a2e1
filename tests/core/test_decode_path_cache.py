"""The on-disk record of start-up path timings: read back for the same setup only; bad files ignored."""
import json

import pytest

from nanovllm.pipeline.paths import TimingCache, pipeline_wins
from nanovllm.pipeline.stats import BucketTiming

KEY = {"gpu": "NVIDIA H100 80GB HBM3", "driver": "580.159.04", "buckets": [1, 2], "sm_counts": [16, 16]}
TIMINGS = {1: [BucketTiming(256, 1.0, 1.5), BucketTiming(2048, 2.0, 2.5)],
           2: [BucketTiming(256, 1.2, 1.1), BucketTiming(2048, 2.2, 2.1)]}


@pytest.fixture(autouse=True)
def cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOVLLM_CACHE", str(tmp_path))


def test_same_setup_reads_back_what_was_saved():
    TimingCache(KEY).save(TIMINGS)
    loaded = TimingCache(dict(KEY)).load()
    assert loaded == TIMINGS
    assert [pipeline_wins(loaded[b]) for b in (1, 2)] == [False, True]


@pytest.mark.parametrize("change", [{"gpu": "NVIDIA H200"}, {"driver": "575.0"}, {"sm_counts": [24, 16]}])
def test_another_setup_has_no_timings(change):
    TimingCache(KEY).save(TIMINGS)
    assert TimingCache({**KEY, **change}).load() is None


@pytest.mark.parametrize("content", ["{not json", json.dumps({"key": {}, "timings": {}}),
                                     json.dumps({"key": KEY, "timings": {"1": [{"context_len": 256}]}}),
                                     json.dumps({"key": KEY, "timings": {"1": []}})])
def test_corrupt_or_stale_file_is_ignored_with_a_log_line(content, capsys):
    cache = TimingCache(KEY)
    cache.path.parent.mkdir(parents=True)
    cache.path.write_text(content)
    assert cache.load() is None
    assert f"ignoring the decode path cache {cache.path}" in capsys.readouterr().out
    cache.save(TIMINGS)
    assert cache.load() == TIMINGS
