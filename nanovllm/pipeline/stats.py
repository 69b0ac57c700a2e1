import statistics
from dataclasses import dataclass

import torch


@dataclass
class BucketTiming:
    """Start-up timings (ms) of one batch bucket's decode graphs at one context length."""
    context_len: int
    sequential_ms: float
    pipelined_ms: float
    attention_only_ms: float | None = None
    ffn_only_ms: float | None = None


class PipelineStatistics:
    """What the pipeline did: partitions, the path chosen per batch bucket with its timings, and,
    with profiling on, per-step times from CUDA events (resolved only when asked for)."""

    def __init__(self, enabled: bool, profiling: bool = False, sm_counts: tuple = (None, None, None)):
        self.enabled = enabled
        self.profiling = profiling
        self.sm_counts = sm_counts
        self.pipelined: dict[int, bool] = {}
        self.bucket_timings: dict[int, list[BucketTiming]] = {}
        self.total_tokens = 0
        self.steps: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def observe(self, replay, batch: int) -> torch.Tensor:
        """Runs replay() for a decode step of `batch` sequences, counting it (and timing it when profiling)."""
        self.total_tokens += batch
        if not self.profiling:
            return replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = replay()
        end.record()
        self.steps.append((start, end))
        return out

    def _mean_stage_ms(self, stage: str) -> float | None:
        # Each stage alone on the full GPU, timed at start-up per bucket, averaged over the contexts tried.
        times = [getattr(t, f"{stage}_only_ms") for timings in self.bucket_timings.values() for t in timings]
        return statistics.mean(times) if times and None not in times else None

    def as_dict(self) -> dict:
        attention, ffn, remaining = self.sm_counts
        stats = {"enabled": self.enabled, "profiling": self.profiling, "total_tokens": self.total_tokens,
                 "attention_sm_count": attention, "ffn_sm_count": ffn, "remaining_sm_count": remaining,
                 "path_per_bucket": {b: "pipeline" if p else "sequential" for b, p in self.pipelined.items()},
                 "bucket_timings_ms": {b: [vars(t) for t in ts] for b, ts in self.bucket_timings.items()},
                 "avg_attention_time": None, "avg_ffn_time": None, "avg_total_time": None}
        if self.steps:
            self.steps[-1][1].synchronize()
            stats["avg_total_time"] = statistics.mean(s.elapsed_time(e) for s, e in self.steps)
            stats["avg_attention_time"] = self._mean_stage_ms("attention")
            stats["avg_ffn_time"] = self._mean_stage_ms("ffn")
        return stats

    def print(self) -> None:
        stats = self.as_dict()
        print("[Pipeline Statistics]")
        print(f"  Enabled: {stats['enabled']}")
        print(f"  Total tokens processed: {stats['total_tokens']}")
        for label, key in (("attention", "avg_attention_time"), ("FFN", "avg_ffn_time"), ("total", "avg_total_time")):
            value = stats[key]
            print(f"  Avg {label} time: " + (f"{value:.2f} ms" if value is not None else "n/a"))
        if self.pipelined:
            chosen = sorted(b for b, p in self.pipelined.items() if p)
            print(f"  Pipelined batch buckets: {chosen or 'none'} of {len(self.pipelined)}")
