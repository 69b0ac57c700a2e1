import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from nanovllm.modes.disaggregation.loop import DecodeStep, PDLoop
from nanovllm.modes.disaggregation.scheduler import PDScheduler
from nanovllm.modes.multiplexing.policy import (DEFAULT_TTFT_FACTOR, MIN_CHUNK_TOKENS, ItlAllowance, QueuedPrompt,
                                                chunk_tokens, first_token_at_risk, ttft_bound_ms)
from nanovllm.modes.multiplexing.splits import (DEFAULT_ITL_FACTOR, STEP_MARGIN, Split, SplitProfiler, choose_split,
                                                choose_splits, in_line_prefill_tokens, itl_bound_ms, split_ranges,
                                                within_bound)
from nanovllm.modes.multiplexing.stats import (FILLING, FILLING_IN_BOUND, FIRST_TOKEN, FULL_GPU, IN_LINE,
                                               SplitStatistics, report_lines)
from nanovllm.utils.log import get_logger

logger = get_logger("PD-mux")
# A prefill fills the batch (runs between decode steps) while the sequences to join the decoding ones are
# at least this share of them: the batch is still to grow by a quarter.
FILL_SHARE = 0.25


@dataclass(frozen=True)
class PrefillChoice:
    """Where the next prefill batch runs: its label in the statistics, the split (None: the whole GPU),
    whether the decode step after it waits for it (between decode steps), the most tokens it may have
    (None: max_num_batched_tokens), whether a queued prompt's first token was at risk, and whether it
    spends the ITL allowance (it may push the decode step after it past the ITL bound)."""
    label: str
    split: Split | None = None
    in_line: bool = False
    max_tokens: int | None = None
    ttft_at_risk: bool = False
    over_itl: bool = False


class SplitPlacement:
    """Where the multiplexing loop runs each prefill and decode step on one GPU.

    While a prefill runs beside decoding sequences, it runs on the prefill partition of a split and the
    decode steps on the decode partition, from graphs captured there; otherwise each uses the whole GPU.
    The split follows the running batch: per decode bucket, decode gets the fewest SMs whose step the
    start-up profile puts within pd_max_itl_ms, prefill the rest; where the steps that then run on the
    split exceed the bound, the bucket moves to a split with more decode SMs. A prefill short enough for
    a decode step and it to fit that bound runs between two decode steps instead; so does every prefill
    while the sequences to join the decoding ones are a quarter of them or more (a burst, or the start of
    an offline run): the batch fills first, as in the sequential engine, since prefills on a split delay
    the sequences that are still to start. Such a fill is as long as the token budget without
    pd_max_itl_ms; with it, a fill that would push the decode step after it past the bound runs whole only
    within the ITL allowance, and otherwise is cut to fit the bound (or goes to the split where that leaves
    too few tokens): under a sustained overload, whole fills would hold up every decode step.

    The first-token bound (pd_max_ttft_ms) weighs the queued prompts: where one of them would get its
    first token past it with the prefills on the split, the prefill runs on the whole GPU between decode
    steps, as often as the ITL allowance (shared with the fills) lets a prefill push a decode step past the
    ITL bound; and a prefill on a split is cut to a share of the bound, so that the choice is taken again
    soon. Without splits (no green contexts) both runners share one stream and the scheduling is the same.
    """
    name = "multiplexing"

    def __init__(self, splits: list[Split], partitions: str, max_itl_ms: float | None, max_ttft_ms: float | None):
        self.splits = splits
        self.max_itl_ms, self.max_ttft_ms = max_itl_ms, max_ttft_ms
        self.stats = SplitStatistics(partitions)
        self.split_by_bucket: dict[int, Split] = {}
        # Full-GPU decode step times per graph bucket, from the start-up profile and then from the steps
        # run without a prefill beside; with the profiled prefill time they size in-line prefills.
        self.decode_step_ms: dict[int, float] = {}
        self.prefill_fixed_ms, self.prefill_ms_per_token = 0.0, math.inf
        self.ttft_bound_ms: float | None = None  # from the profile: without one, the queue is not weighed
        self.allowance = ItlAllowance()
        self.choice: PrefillChoice | None = None  # that of the next prefill batch
        self.prefill_split: Split | None = None  # where the prefill in flight runs (None: the whole GPU)
        self.prefill_in_line = False  # whether it runs between decode steps
        self.decode_buckets: list[int] | None = None  # the decode graphs' batch buckets (None: eager)

    def choose(self, prefill_runner, decode_runner) -> None:
        """Profiles every split, picks one per decode bucket, and logs the measurements and the choice."""
        graphs = decode_runner.decode_paths.graphs
        self.decode_buckets = graphs.buckets if graphs is not None else None
        if not self.splits:
            return
        if graphs is None:
            split = self.splits[len(self.splits) // 2]
            logger.info("enforce_eager: no decode graphs to profile; split under prefill: %s", split.label)
            self.split_by_bucket = {decode_runner.config.scheduler.max_num_seqs: split}
            self.stats.split_per_batch = split_ranges(self.split_by_bucket)
            return
        start = time.perf_counter()
        profiler = SplitProfiler(prefill_runner, decode_runner)
        full_steps_ms, full_prefill_ms = profiler.full_gpu()
        logger.info("profile: decode step of %d x %d tokens %.2f ms, prefill of %d tokens %.1f ms on the whole GPU",
                    profiler.batch, profiler.context, full_steps_ms[profiler.batch], profiler.prefill_tokens,
                    full_prefill_ms)
        for split in self.splits:
            profiler.profile(split, full_prefill_ms)
            p = split.profile
            logger.info("  %s: decode step %.2f ms alone, %.2f ms beside prefill; prefill %.1f ms alone (%.2fx the "
                        "whole GPU on %.0f%% of the SMs), %.1f ms beside decode", split.label,
                        p["decode_step_ms_alone"], p["decode_step_ms"], p["prefill_ms_alone"],
                        p["prefill_slowdown_alone"], 100 * p["prefill_sm_share"], p["prefill_ms"])
        self.split_by_bucket = choose_splits(self.splits, full_steps_ms, self.max_itl_ms)
        self.decode_step_ms.update(full_steps_ms)
        # A prefill of any length reads every weight once, as the decode step of one sequence does.
        self.prefill_fixed_ms = full_steps_ms[min(full_steps_ms)]
        self.prefill_ms_per_token = (full_prefill_ms - self.prefill_fixed_ms) / profiler.prefill_tokens
        self.ttft_bound_ms = ttft_bound_ms(self.max_ttft_ms, full_prefill_ms)
        limit = f"{self.max_itl_ms:g} ms" if self.max_itl_ms is not None else f"{DEFAULT_ITL_FACTOR} x its full-GPU step"
        ranges = "; ".join(f"{batches}: {label}" for batches, label in split_ranges(self.split_by_bucket).items())
        ttft = f"{self.ttft_bound_ms:.0f} ms"
        if self.max_ttft_ms is None:
            ttft += f" ({DEFAULT_TTFT_FACTOR:g} x the full-GPU prefill of {profiler.prefill_tokens} tokens)"
        logger.info("split under prefill, by decode batch (step bound %s): %s. A prefill runs between decode steps "
                    "on the whole GPU if a step of the running batch and it stay within the bound (at batch %d: up "
                    "to %d tokens, on its split at most %d), or if a queued prompt's first token would come past "
                    "%s. Profiled in %.1f s", limit, ranges, profiler.batch, self.in_line_tokens(profiler.batch),
                    self.chunk_tokens(self.split_for(profiler.batch)), ttft, time.perf_counter() - start)
        self.stats.bounds = {"itl": limit, "ttft": ttft}
        self.stats.split_profiles = {s.label: s.profile for s in self.splits}
        self.stats.split_observed = {s.label: s.observed for s in self.splits}
        self.stats.split_per_batch = split_ranges(self.split_by_bucket)
        torch.cuda.empty_cache()  # the profile's prefill activations, cached per stream

    def split_for(self, batch: int) -> Split | None:
        """The split to run a prefill on beside `batch` decoding sequences: that of the smallest bucket
        that holds the batch (past the graphs' buckets, the largest); None without green contexts."""
        if not self.split_by_bucket:
            return None
        buckets = sorted(self.split_by_bucket)
        return self.split_by_bucket[next((b for b in buckets if b >= batch), buckets[-1])]

    def in_line_tokens(self, batch: int) -> int:
        """The most tokens a prefill may have to run between two decode steps of `batch` sequences: the
        step (its bucket's latest full-GPU time) and the prefill within the ITL bound; 0 for a bucket
        not timed yet."""
        step_ms = self.decode_step_ms.get(self.bucket(batch))
        if step_ms is None:
            return 0
        return in_line_prefill_tokens(itl_bound_ms(self.max_itl_ms, step_ms), step_ms, self.prefill_fixed_ms,
                                      self.prefill_ms_per_token)

    @staticmethod
    def fills_batch(joining: int, running: int) -> bool:
        """Whether the sequences to join the `running` decoding ones are at least FILL_SHARE of them."""
        return joining >= FILL_SHARE * running

    def chunk_tokens(self, split: Split) -> int | None:
        """The most tokens of a prefill batch on the split (None: max_num_batched_tokens, without a profile)."""
        if self.ttft_bound_ms is None:
            return None
        return chunk_tokens(self.ttft_bound_ms, self._prefill_ms_per_token_on(split))

    def ttft_at_risk(self, queue: Iterable[QueuedPrompt], split: Split) -> bool:
        """Whether a queued prompt would get its first token past the bound with the prefills on the split;
        never without a profile."""
        if self.ttft_bound_ms is None:
            return False
        return first_token_at_risk(queue, self._prefill_ms_per_token_on(split), self.ttft_bound_ms)

    def _prefill_ms_per_token_on(self, split: Split) -> float:
        # The profile's whole-GPU time per token, slowed as a full prefill on the split beside decode steps.
        return self.prefill_ms_per_token * split.profile["prefill_slowdown"]

    def bucket(self, batch: int) -> int | None:
        """The decode graph bucket that runs the batch: the batch itself without graphs, None past the
        largest graph (such a batch runs eagerly, and its steps time no bucket)."""
        buckets = self.decode_buckets
        if buckets is None:
            return batch
        return next(b for b in buckets if b >= batch) if batch <= buckets[-1] else None

    def choose_prefill(self, running: int, joining: int, batch_tokens: int,
                       queue: Iterable[QueuedPrompt]) -> PrefillChoice:
        """Where the next prefill batch runs, beside `running` decoding sequences with `joining` more to
        come, a batch of about batch_tokens tokens and the prompts still to prefill in `queue`.

        With nothing decoding (or without splits) the prefill has the whole GPU. Beside decode steps it runs
        between two of them on the whole GPU where it fills the batch (on a split, the prefills of a burst
        take several times as long, and the sequences still to start finish that much later; the class
        says how pd_max_itl_ms cuts such a fill), where it is short enough for a step and it to stay within
        the ITL bound (then the split would cost throughput and bound nothing), or where a queued prompt's
        first token is at risk and the ITL allowance has room; else on the split of the running batch, cut
        to its chunk of tokens."""
        if not running or not self.split_by_bucket:
            return PrefillChoice(self._label(None))
        in_line_tokens = self.in_line_tokens(running)
        if self.fills_batch(joining, running):
            if batch_tokens <= in_line_tokens or self.max_itl_ms is None:
                return PrefillChoice(FILLING, in_line=True)
            if self.allowance.available():
                return PrefillChoice(FILLING, in_line=True, over_itl=True)
            if in_line_tokens >= MIN_CHUNK_TOKENS:
                return PrefillChoice(FILLING_IN_BOUND, in_line=True, max_tokens=in_line_tokens)
        elif batch_tokens <= in_line_tokens:
            return PrefillChoice(IN_LINE, in_line=True)
        split = self.split_for(running)
        at_risk = self.ttft_at_risk(queue, split)
        if at_risk and self.allowance.available():
            return PrefillChoice(FIRST_TOKEN, in_line=True, ttft_at_risk=True, over_itl=True)
        return PrefillChoice(split.label, split, max_tokens=self.chunk_tokens(split), ttft_at_risk=at_risk)

    def prefill_budget(self, loop: PDLoop) -> int | None:
        """Chooses where the next prefill batch runs (prefill() applies the choice) from the running batch
        and the queue, and returns the most tokens the batch may have."""
        scheduler = loop.scheduler
        limit = scheduler.decode.max_num_batched_tokens
        batch_tokens = 0
        for seq in scheduler.queued():
            batch_tokens += seq.num_tokens - seq.num_computed_tokens
            if batch_tokens >= limit:
                break
        if not batch_tokens:
            return None
        self.choice = self.choose_prefill(len(scheduler.running), scheduler.num_joining(), min(batch_tokens, limit),
                                          queued_prompts(scheduler, time.perf_counter()))
        return self.choice.max_tokens

    def prefill(self, loop: PDLoop, seqs):
        choice = self.choice
        self.prefill_split, self.prefill_in_line = choice.split, choice.in_line
        self.stats.record_split_prefill(choice.label)
        if choice.ttft_at_risk:
            self.stats.record_ttft_at_risk(choice.label)
        if choice.over_itl:
            self.allowance.spent += 1
            self.stats.record_itl_allowance_spent(choice.label)
        # The prefill writes the shared cache, maybe into blocks freed while the decode step in flight
        # still writes them.
        return (self.prefill_split and self.prefill_split.prefill), (loop.last_decode,)

    def decode(self, loop: PDLoop, beside_prefill: bool):
        # A step on another stream than the step before reads that step's tokens and reuses its inputs.
        split = self.prefill_split if beside_prefill else None
        in_line = (loop.prefill_in_flight[1].timer,) if beside_prefill and self.prefill_in_line else ()
        return (split and split.decode), (loop.last_decode, *in_line)

    def decoded(self, loop: PDLoop, step: DecodeStep, seconds: float) -> None:
        self.allowance.steps += 1
        split = next((s for s in self.splits if s.decode is step.lane), None) if step.lane else None
        self.stats.record_split_decode(self._label(split), seconds)
        bucket = self.bucket(len(step.seqs))
        if bucket is None:
            return
        if split is not None:
            self.observe(split, bucket, 1e3 * seconds)
        elif self.split_by_bucket and not step.beside_prefill:
            self.decode_step_ms[bucket] = 1e3 * seconds

    def observe(self, split: Split, bucket: int, step_ms: float) -> None:
        """Takes in a decode step run on a split beside a prefill. Once the steps of the bucket's chosen
        split exceed the bound, the bucket moves to the split that choose_split picks among those with
        more decode SMs, if its step is shorter: the profile measured the slow-down beside a prefill at
        one batch, and small batches can slow down more. Moving one way only, a bucket changes at most
        once per split. Without a profile (enforce_eager) the split stays."""
        split.observe(bucket, step_ms)
        full_ms = self.decode_step_ms.get(bucket)
        if full_ms is not None and step_ms > itl_bound_ms(self.max_itl_ms, full_ms):
            self.stats.itl_over_bound_steps += 1
        if (not split.profile or full_ms is None or self.split_by_bucket.get(bucket) is not split
                or within_bound(split, bucket, full_ms, self.max_itl_ms)):
            return
        wider = [s for s in self.splits if s.decode.num_sms > split.decode.num_sms]
        chosen = choose_split(wider, bucket, full_ms, self.max_itl_ms) if wider else split
        if chosen.decode_step_ms(bucket) < split.decode_step_ms(bucket):
            self.split_by_bucket[bucket] = chosen
            self.stats.record_split_change(split_ranges(self.split_by_bucket))
            logger.info("decode batch bucket %d: split under prefill now %s; %s took %.1f ms per decode step beside "
                        "prefills, over %g x the %.1f ms bound", bucket, chosen.label, split.label,
                        split.decode_step_ms(bucket), STEP_MARGIN, itl_bound_ms(self.max_itl_ms, full_ms))

    def statistics(self) -> dict:
        return self.stats.as_dict()

    def report_lines(self, stats: dict) -> list[str]:
        return report_lines(stats)

    def _label(self, split: Split | None) -> str:
        if split is not None:
            return split.label
        return FULL_GPU if self.split_by_bucket else "one stream"


def queued_prompts(scheduler: PDScheduler, now: float) -> Iterator[QueuedPrompt]:
    """The prompts still to prefill, in the order they are prefilled, with their waits at `now`
    (perf_counter seconds)."""
    for seq in scheduler.queued():
        arrived = scheduler.arrived.get(seq.seq_id)
        yield QueuedPrompt(seq.num_tokens - seq.num_computed_tokens, None if arrived is None else 1e3 * (now - arrived))
