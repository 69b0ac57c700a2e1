import statistics

import torch


def median_replay_ms(replays: dict, repeats: int = 5, before=None) -> dict:
    """Median milliseconds of each named replay function; replays interleave so drift hits all alike.
    before(), if given, runs ahead of each timed replay, outside the timing."""
    for fn in replays.values():
        fn()
    times = {name: [] for name in replays}
    for _ in range(repeats):
        for name, fn in replays.items():
            if before is not None:
                before()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end))
    return {name: statistics.median(t) for name, t in times.items()}


class PipelineStatistics:
    """What the pipeline did: partitions, the path chosen per batch bucket with its timings, and,
    with profiling on, per-step times from CUDA events (resolved only when asked for)."""

    def __init__(self, enabled: bool, profiling: bool, sm_counts: dict):
        self.enabled = enabled
        self.profiling = profiling
        self.sm_counts = sm_counts
        self.paths: dict[int, str] = {}
        self.bucket_timings: dict[int, dict[str, float]] = {}
        self.total_tokens = 0
        self.steps: list[tuple[int, torch.cuda.Event, torch.cuda.Event]] = []

    def start_step(self) -> tuple[torch.cuda.Event, torch.cuda.Event] | None:
        if not self.profiling:
            return None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        return start, end

    def end_step(self, bucket: int, batch: int, events) -> None:
        self.total_tokens += batch
        if events is not None:
            events[1].record()
            self.steps.append((bucket, *events))

    def as_dict(self) -> dict:
        stats = {"enabled": self.enabled, "profiling": self.profiling, "total_tokens": self.total_tokens,
                 **self.sm_counts, "path_per_bucket": dict(self.paths), "bucket_timings_ms": dict(self.bucket_timings),
                 "avg_attention_time": None, "avg_ffn_time": None, "avg_total_time": None}
        if self.steps:
            self.steps[-1][2].synchronize()
            buckets = [bucket for bucket, _, _ in self.steps]
            stats["avg_total_time"] = statistics.mean(s.elapsed_time(e) for _, s, e in self.steps)
            for stage in ("attention", "ffn"):
                # Each stage alone on the full GPU, timed at start-up per bucket (mean over the contexts tried).
                measured = [[t for k, t in self.bucket_timings.get(b, {}).items() if k.startswith(f"{stage}_only@")]
                            for b in buckets]
                if all(measured):
                    stats[f"avg_{stage}_time"] = statistics.mean(statistics.mean(t) for t in measured)
        return stats

    def print(self) -> None:
        stats = self.as_dict()
        print("[Pipeline Statistics]")
        print(f"  Enabled: {stats['enabled']}")
        print(f"  Total tokens processed: {stats['total_tokens']}")
        for label, key in (("attention", "avg_attention_time"), ("FFN", "avg_ffn_time"), ("total", "avg_total_time")):
            value = stats[key]
            print(f"  Avg {label} time: " + (f"{value:.2f} ms" if value is not None else "n/a"))
        paths = stats["path_per_bucket"]
        if paths:
            pipelined = sorted(b for b, p in paths.items() if p == "pipeline")
            print(f"  Pipelined batch buckets: {pipelined or 'none'} of {len(paths)}")
