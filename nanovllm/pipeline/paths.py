"""Which decode graph each batch bucket replays: the rule, and the on-disk record of start-up timings."""
import hashlib
import json
from pathlib import Path

import torch

from nanovllm.pipeline.stats import BucketTiming
from nanovllm.utils.cache import cache_root


def pipeline_wins(timings: list[BucketTiming]) -> bool:
    """The pipelined graph serves a bucket only where it beat the sequential one at every context timed."""
    return all(t.pipelined_ms < t.sequential_ms for t in timings)


def setup_key(device: torch.device, hf_config, dtype: torch.dtype, kv_cache_dtype: str, sm_counts: tuple,
              block_size: int, attention_backend: str, buckets: list[int], context_lens: list[int]) -> dict:
    """Everything the path timings depend on."""
    try:  # the exact driver build where the kernel module reports it
        driver = Path("/proc/driver/nvidia/version").read_text().splitlines()[0]
    except OSError:
        driver = str(torch._C._cuda_getDriverVersion())
    return {"gpu": torch.cuda.get_device_name(device), "driver": driver, "torch": torch.__version__,
            "model": hf_config.to_diff_dict(), "dtype": str(dtype), "kv_cache_dtype": kv_cache_dtype, "sm_counts": list(sm_counts),
            "block_size": block_size, "attention_backend": attention_backend, "buckets": buckets,
            "context_lens": context_lens}


class TimingCache:
    """Start-up path timings of one setup in a JSON file under the cache root. The file is named by a
    digest of the setup's key and holds the key, so another setup never reads its timings."""

    def __init__(self, key: dict):
        self.key = json.loads(json.dumps(key, sort_keys=True, default=str))
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:20]
        self.path = cache_root() / "decode_paths" / f"{digest}.json"

    def load(self) -> dict[int, list[BucketTiming]] | None:
        if not self.path.exists():
            return None
        try:
            record = json.loads(self.path.read_text())
            if record["key"] != self.key:
                raise ValueError("its key does not match this setup")
            timings = {int(b): [BucketTiming(**t) for t in ts] for b, ts in record["timings"].items()}
            if sorted(timings) != sorted(self.key["buckets"]) or not all(timings.values()):
                raise ValueError("it does not cover every batch bucket")
            return timings
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"[ModelRunner] ignoring the decode path cache {self.path}: {type(e).__name__}: {e}")
            return None

    def save(self, timings: dict[int, list[BucketTiming]]) -> None:
        record = {"key": self.key, "timings": {b: [vars(t) for t in ts] for b, ts in timings.items()}}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(record))
            tmp.replace(self.path)
        except OSError as e:
            print(f"[ModelRunner] could not save the decode path cache {self.path}: {e}")
