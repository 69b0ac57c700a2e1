import statistics

import torch

from nanovllm.engine.decode_paths import mean_ms


class PipelineStatistics:
    """What the pipeline did: partitions, the path chosen per batch bucket with its start-up timings,
    and, with profiling on a GPU, per-step times from CUDA events (resolved only when asked for)."""

    def __init__(self, enabled: bool, profiling: bool = False, sm_counts: tuple = (None, None, None)):
        self.enabled = enabled
        self.profiling = profiling
        self.sm_counts = sm_counts
        self.path_per_bucket: dict[int, str] = {}
        self.bucket_timings: dict[int, list[dict]] = {}
        self.total_tokens = 0
        self.steps: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def observe(self, run, batch: int) -> torch.Tensor:
        """Runs run() for a decode step of `batch` sequences, counting it (and timing it when profiling)."""
        self.total_tokens += batch
        if not self.profiling:
            return run()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = run()
        end.record()
        self.steps.append((start, end))
        return out

    def as_dict(self) -> dict:
        attention, ffn, remaining = self.sm_counts
        stats = {"enabled": self.enabled, "profiling": self.profiling, "total_tokens": self.total_tokens,
                 "attention_sm_count": attention, "ffn_sm_count": ffn, "remaining_sm_count": remaining,
                 "path_per_bucket": dict(self.path_per_bucket), "bucket_timings_ms": dict(self.bucket_timings),
                 "avg_attention_time": None, "avg_ffn_time": None, "avg_total_time": None}
        if self.steps:
            self.steps[-1][1].synchronize()
            stats["avg_total_time"] = statistics.mean(s.elapsed_time(e) for s, e in self.steps)
            # Each stage alone on the full GPU, timed at start-up per bucket, averaged over the contexts tried.
            stats["avg_attention_time"] = mean_ms(self.bucket_timings, "attention_only")
            stats["avg_ffn_time"] = mean_ms(self.bucket_timings, "ffn_only")
        return stats

    def report(self) -> str:
        stats = self.as_dict()
        lines = ["[Pipeline Statistics]", f"  Enabled: {stats['enabled']}",
                 f"  Total tokens processed: {stats['total_tokens']}"]
        for label, key in (("attention", "avg_attention_time"), ("FFN", "avg_ffn_time"), ("total", "avg_total_time")):
            value = stats[key]
            lines.append(f"  Avg {label} time: " + (f"{value:.2f} ms" if value is not None else "n/a"))
        if self.path_per_bucket:
            chosen = sorted(b for b, path in self.path_per_bucket.items() if path == "pipeline")
            lines.append(f"  Pipelined batch buckets: {chosen or 'none'} of {len(self.path_per_bucket)}")
        return "\n".join(lines)
