"""SM splits of one GPU for prefill/decode multiplexing: the candidate sizes, their green-context
partitions, and the start-up profile that picks the split to run while prefills are pending."""
import math
from dataclasses import dataclass, field

import torch

from nanovllm.utils.sm_limit import num_sms_of, on_sms
from nanovllm.disagg.streams import Lane, StreamTimer, use_streams
from nanovllm.pipeline.green_manager import GreenContextUnavailable, green_ctx, green_device_index, shared_split

# The decode partition's share of the SMs that can be handed out, for each prepared split. A decode
# step reaches the full memory bandwidth on about half an H100's SMs, so the candidates sit around it.
DECODE_SHARES = (2 / 5, 8 / 15, 2 / 3)
# The decode step of the profile: sequences of this many tokens (or max_model_len), as many as fit the cache.
PROFILE_CONTEXT = 1024
DEFAULT_ITL_FACTOR = 1.5  # pd_max_itl_ms unset: this times the full-GPU decode step


@dataclass(eq=False)
class Split:
    """Decode and prefill on disjoint partitions of one GPU; profile holds the start-up measurements."""
    decode: Lane
    prefill: Lane
    profile: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"decode {self.decode.num_sms} / prefill {self.prefill.num_sms} SMs"


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


def in_line_prefill_tokens(bound_ms: float, full_step_ms: float, prefill_ms_per_token: float) -> int:
    """The most tokens a prefill may have for a decode step and it, one after the other on the whole
    GPU, to stay within bound_ms."""
    return max(0, int((bound_ms - full_step_ms) / prefill_ms_per_token))


def choose_split(splits: list[Split], max_itl_ms: float | None, full_step_ms: float) -> Split:
    """The split with the most tokens per second (decode and prefill together) whose decode step
    beside a prefill stays within itl_bound_ms; if none does, the one with the shortest decode step."""
    limit = itl_bound_ms(max_itl_ms, full_step_ms)
    within = [s for s in splits if s.profile["decode_step_ms"] <= limit]
    if within:
        return max(within, key=lambda s: s.profile["tokens_per_s"])
    return min(splits, key=lambda s: s.profile["decode_step_ms"])


class SplitProfiler:
    """Times, for each split, a decode step (its captured graph at one batch, on synthetic inputs that
    store nothing) and a prefill of a full token budget, alone on their partitions and side by side;
    and both on the whole GPU. The decode runner's layers are other modules than the prefill runner's,
    so detaching the prefill runner's cache leaves the decode graphs reading theirs."""

    def __init__(self, prefill_runner, decode_runner):
        self.prefill_runner, self.decode = prefill_runner, decode_runner
        config = decode_runner.config
        graphs = decode_runner.graphs
        context = min(config.max_model_len, PROFILE_CONTEXT)
        fits = decode_runner.num_kvcache_blocks * decode_runner.block_size // context
        self.batch = graphs.bucket_for(max(1, min(fits, graphs.buckets[-1])))
        self.context = context
        self.prefill_tokens = config.max_num_batched_tokens
        graphs.load_synthetic(self.batch, context, decode_runner.num_kvcache_blocks)

    def full_gpu(self) -> tuple[float, float]:
        """(decode step ms, prefill ms) on the whole GPU, one after the other."""
        stream = self.decode.stream
        return self._decode_ms(None, stream, 10), self._prefill_ms(stream, None)

    def profile(self, split: Split, full_prefill_ms: float) -> None:
        decode_alone = self._decode_ms(split.decode.num_sms, split.decode.stream, 10)
        prefill_alone = self._prefill_ms(split.prefill.stream, split.prefill.num_sms)
        # Side by side: the prefill first, then enough decode steps to cover it.
        steps = max(3, math.ceil(prefill_alone / decode_alone))
        prefill_timer = self._prefill_timer(split.prefill.stream, split.prefill.num_sms)
        decode_ms = self._decode_ms(split.decode.num_sms, split.decode.stream, steps, warm=False)
        prefill_ms = prefill_timer.seconds() * 1e3
        split.profile = {
            "batch": self.batch, "context": self.context, "prefill_tokens": self.prefill_tokens,
            "decode_step_ms_alone": decode_alone, "prefill_ms_alone": prefill_alone,
            "decode_step_ms": decode_ms, "prefill_ms": prefill_ms,
            "tokens_per_s": 1e3 * (self.batch / decode_ms + self.prefill_tokens / prefill_ms),
            # The GEMM library sizes its grids for the whole device; this shows what a partition costs it.
            "prefill_slowdown_alone": prefill_alone / full_prefill_ms,
            "prefill_sm_share": split.prefill.num_sms / num_sms_of(self.decode.device),
        }

    def _decode_ms(self, num_sms: int | None, stream, steps: int, warm: bool = True) -> float:
        graph = self.decode.plans[num_sms][self.batch]
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
                self.prefill_runner.warmup()
                timer.stop()
        finally:
            for layer, (k_cache, v_cache) in zip(layers, caches):
                layer.k_cache, layer.v_cache = k_cache, v_cache
        return timer
