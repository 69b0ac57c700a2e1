"""SM splits of one GPU for prefill/decode multiplexing: the candidate sizes, their green-context
partitions, and the start-up profile that picks the split to run while prefills are pending."""
import math
from dataclasses import dataclass, field

import torch

from nanovllm.partitions.green import GreenContextUnavailable, green_ctx, green_device_index, shared_split
from nanovllm.partitions.sm_limit import num_sms_of, on_sms
from nanovllm.partitions.streams import Lane, StreamTimer, use_streams

# The decode partition's share of the SMs that can be handed out, for each prepared split. A decode
# step reaches the full memory bandwidth on about half an H100's SMs, so the candidates sit around it.
DECODE_SHARES = (2 / 5, 8 / 15, 2 / 3)
# The decode step of the profile: sequences of this many tokens (or max_model_len), as many as fit the cache.
PROFILE_CONTEXT = 1024
DEFAULT_ITL_FACTOR = 1.5  # pd_max_itl_ms unset: this times the full-GPU decode step
STEPS_PER_BUCKET = 5  # timed decode steps per bucket and partition in the profile
# Decode steps of a bucket that must have run on a split beside prefills before their time replaces the
# profile's estimate, and the weight of each later step in that running estimate.
STEPS_OBSERVED = 4
OBSERVED_WEIGHT = 0.2
# A split qualifies for a bucket when its mean decode step is within this share of the ITL bound: a
# bucket spans batches and contexts, and its longer steps must stay within the bound too.
STEP_MARGIN = 0.9


@dataclass(eq=False)
class Split:
    """Decode and prefill on disjoint partitions of one GPU; profile holds the start-up measurements,
    observed the decode steps run on it while serving: bucket -> (steps, running mean ms)."""
    decode: Lane
    prefill: Lane
    profile: dict = field(default_factory=dict)
    observed: dict[int, tuple[int, float]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"decode {self.decode.num_sms} / prefill {self.prefill.num_sms} SMs"

    def decode_step_ms(self, bucket: int) -> float:
        """A decode step of the bucket's batch beside a prefill: once STEPS_OBSERVED of them have run,
        their running mean; before, the profile's estimate, the step alone on the decode partition times
        the slow-down beside a prefill measured at the profile's batch (which small batches can exceed)."""
        steps, mean_ms = self.observed.get(bucket, (0, 0.0))
        if steps >= STEPS_OBSERVED:
            return mean_ms
        p = self.profile
        return p["decode_step_ms_alone_per_batch"][bucket] * p["decode_step_ms"] / p["decode_step_ms_alone"]

    def observe(self, bucket: int, step_ms: float) -> None:
        """Takes in the time of a decode step of the bucket run on this split: the mean of the first
        steps, then a running mean that follows the contexts as they grow."""
        steps, mean_ms = self.observed.get(bucket, (0, 0.0))
        weight = max(OBSERVED_WEIGHT, 1 / (steps + 1))
        self.observed[bucket] = (steps + 1, mean_ms + weight * (step_ms - mean_ms))


def candidate_sizes(unit: int, available: int) -> list[tuple[int, int]]:
    """(decode SMs, prefill SMs) of each prepared split: multiples of unit that share `available`."""
    sizes = []
    for share in DECODE_SHARES:
        decode = min(max(unit, round(available * share / unit) * unit), available - unit)
        if decode >= unit and (decode, available - decode) not in sizes:
            sizes.append((decode, available - decode))
    return sizes


def prepare_splits(device: torch.device) -> list[Split]:
    """The candidate splits of this GPU, each a pair of green-context partitions (made once per
    process). Raises GreenContextUnavailable where green contexts cannot be used."""
    index = green_device_index(device)
    try:
        unit, available = green_ctx.available_sms(index)
    except green_ctx.GreenContextError as e:
        raise GreenContextUnavailable(str(e)) from e
    sizes = candidate_sizes(unit, available)
    if not sizes:
        raise GreenContextUnavailable(f"the device hands out {available} SMs in units of {unit}: "
                                      "too few for two partitions")
    splits = []
    for decode_sms, prefill_sms in sizes:
        parts = shared_split(index, [decode_sms, prefill_sms])
        decode, prefill = (Lane(stream, n) for stream, n in zip(parts.streams, parts.sm_counts))
        splits.append(Split(decode, prefill))
    return splits


def itl_bound_ms(max_itl_ms: float | None, full_step_ms: float) -> float:
    """The bound on a decode step beside a prefill: max_itl_ms, by default DEFAULT_ITL_FACTOR x the
    full-GPU step."""
    return max_itl_ms if max_itl_ms is not None else DEFAULT_ITL_FACTOR * full_step_ms


def in_line_prefill_tokens(bound_ms: float, full_step_ms: float, prefill_fixed_ms: float,
                           prefill_ms_per_token: float) -> int:
    """The most tokens a prefill may have for a decode step and it, one after the other on the whole
    GPU, to stay within bound_ms: the prefill takes prefill_fixed_ms plus prefill_ms_per_token per token."""
    return max(0, int((bound_ms - full_step_ms - prefill_fixed_ms) / prefill_ms_per_token))


def within_bound(split: Split, bucket: int, full_ms: float, max_itl_ms: float | None) -> bool:
    """Whether the split's decode step of the bucket's batch (full_ms on the whole GPU) is within
    STEP_MARGIN x itl_bound_ms."""
    return split.decode_step_ms(bucket) <= STEP_MARGIN * itl_bound_ms(max_itl_ms, full_ms)


def choose_split(splits: list[Split], bucket: int, full_ms: float, max_itl_ms: float | None) -> Split:
    """The split to run a prefill on beside the bucket's batch (full_ms: its full-GPU decode step): decode
    gets the fewest SMs that keep its step within_bound, prefill the rest, so that prompts reach their
    first token soonest; if no split keeps the step within, the one with the shortest decode step."""
    within = [s for s in splits if within_bound(s, bucket, full_ms, max_itl_ms)]
    if not within:
        return min(splits, key=lambda s: s.decode_step_ms(bucket))
    return min(within, key=lambda s: s.decode.num_sms)


def choose_splits(splits: list[Split], full_step_ms: dict[int, float], max_itl_ms: float | None) -> dict[int, Split]:
    """choose_split for each decode bucket, given its full-GPU step time in full_step_ms."""
    return {bucket: choose_split(splits, bucket, full_ms, max_itl_ms) for bucket, full_ms in full_step_ms.items()}


def split_ranges(split_by_bucket: dict[int, Split]) -> dict[str, str]:
    """The buckets as ranges of decode batches ("1-48") with the label of the split each takes."""
    ranges, start = {}, 1
    buckets = sorted(split_by_bucket)
    for i, bucket in enumerate(buckets):
        split = split_by_bucket[bucket]
        if i + 1 == len(buckets) or split_by_bucket[buckets[i + 1]] is not split:
            ranges[f"{start}-{bucket}" if start != bucket else str(bucket)] = split.label
            start = bucket + 1
    return ranges


class SplitProfiler:
    """Times a decode step of every bucket (its captured graph, on synthetic inputs that store nothing)
    on the whole GPU and on each split's decode partition; a prefill of a full token budget on the
    whole GPU and on each prefill partition; and, per split, the two side by side at one batch. The
    decode runner's layers are other modules than the prefill runner's, so detaching the prefill
    runner's cache leaves the decode graphs reading theirs."""

    def __init__(self, prefill_runner, decode_runner):
        self.prefill_runner, self.decode = prefill_runner, decode_runner
        config = decode_runner.config
        graphs = decode_runner.decode_paths.graphs
        context = min(config.scheduler.max_model_len, PROFILE_CONTEXT)
        fits = decode_runner.kv_cache.num_blocks * decode_runner.block_size // context
        # The side-by-side batch: as many sequences as the cache holds; larger buckets reuse its blocks.
        self.batch = graphs.bucket_for(max(1, min(fits, graphs.buckets[-1])))
        self.buckets = graphs.buckets
        self.context = context
        self.prefill_tokens = config.scheduler.max_num_batched_tokens
        graphs.load_synthetic(graphs.buckets[-1], context, decode_runner.kv_cache.num_blocks)

    def full_gpu(self) -> tuple[dict[int, float], float]:
        """(decode step ms per bucket, prefill ms) on the whole GPU, one after the other."""
        stream = self.decode.stream
        return self._decode_ms_per_bucket(None, stream), self._prefill_ms(stream, None)

    def profile(self, split: Split, full_prefill_ms: float) -> None:
        per_batch = self._decode_ms_per_bucket(split.decode.num_sms, split.decode.stream)
        decode_alone = per_batch[self.batch]
        prefill_alone = self._prefill_ms(split.prefill.stream, split.prefill.num_sms)
        # Side by side: the prefill first, then enough decode steps to cover it.
        steps = max(3, math.ceil(prefill_alone / decode_alone))
        prefill_timer = self._prefill_timer(split.prefill.stream, split.prefill.num_sms)
        decode_ms = self._decode_ms(split.decode.num_sms, split.decode.stream, self.batch, steps, warm=False)
        prefill_ms = prefill_timer.seconds() * 1e3
        split.profile = {
            "batch": self.batch, "context": self.context, "prefill_tokens": self.prefill_tokens,
            "decode_step_ms_alone": decode_alone, "prefill_ms_alone": prefill_alone,
            "decode_step_ms": decode_ms, "prefill_ms": prefill_ms, "decode_step_ms_alone_per_batch": per_batch,
            "prefill_slowdown": prefill_ms / full_prefill_ms,
            # The GEMM library sizes its grids for the whole device; this shows what a partition costs it.
            "prefill_slowdown_alone": prefill_alone / full_prefill_ms,
            "prefill_sm_share": split.prefill.num_sms / num_sms_of(self.decode.device),
        }

    def _decode_ms_per_bucket(self, num_sms: int | None, stream) -> dict[int, float]:
        return {bucket: self._decode_ms(num_sms, stream, bucket, STEPS_PER_BUCKET) for bucket in self.buckets}

    def _decode_ms(self, num_sms: int | None, stream, bucket: int, steps: int, warm: bool = True) -> float:
        """A bucket's graph on the partition (None: the whole GPU) timed over `steps` replays, after
        one more unless warm is False."""
        graph = self.decode.decode_paths.plans[num_sms][bucket]
        with use_streams(stream):
            if warm:
                graph.replay()
            timer = StreamTimer(stream)
            for _ in range(steps):
                graph.replay()
            timer.stop()
        return timer.seconds() * 1e3 / steps

    def _prefill_ms(self, stream, num_sms: int | None) -> float:
        self._prefill_timer(stream, num_sms).wait()  # warm-up: cuBLAS workspaces and autotuning
        return self._prefill_timer(stream, num_sms).seconds() * 1e3

    def _prefill_timer(self, stream, num_sms: int | None) -> StreamTimer:
        """Queues the runner's warm-up prefill (a full token budget) with its cache detached, so that it
        stores no KV, as when the cache was sized."""
        layers = self.prefill_runner.attention_layers()
        caches = [(layer.k_cache, layer.v_cache) for layer in layers]
        try:
            for layer in layers:
                layer.k_cache = layer.v_cache = None
            with use_streams(stream), on_sms(num_sms), torch.inference_mode():
                timer = StreamTimer(stream)
                self.prefill_runner.random_prefill()
                timer.stop()
        finally:
            for layer, (k_cache, v_cache) in zip(layers, caches):
                layer.k_cache, layer.v_cache = k_cache, v_cache
        return timer
