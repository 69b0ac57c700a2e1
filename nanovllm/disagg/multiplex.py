import copy
import math
import time

import torch

from nanovllm.config import Config
from nanovllm.disagg.engine import DecodeStep, PDEngine
from nanovllm.disagg.runner import PendingTokens, RoleRunner
from nanovllm.disagg.scheduler import SharedCacheScheduler
from nanovllm.disagg.splits import (DEFAULT_ITL_FACTOR, STEP_MARGIN, Split, SplitProfiler, choose_split,
                                    choose_splits, in_line_prefill_tokens, itl_bound_ms, prepare_splits, split_ranges,
                                    within_bound)
from nanovllm.disagg.stats import FILLING, FULL_GPU, IN_LINE, MuxStatistics
from nanovllm.disagg.streams import Lane, StreamTimer, use_streams
from nanovllm.engine.cuda_graph import sequential_forward
from nanovllm.engine.sequence import Sequence
from nanovllm.pipeline.green_manager import GreenContextUnavailable
from nanovllm.utils.sm_limit import on_sms

# A prefill fills the batch (runs between decode steps, whatever its length) while the sequences to
# join the decoding ones are at least this share of them: the batch is still to grow by a quarter.
FILL_SHARE = 0.25


class SplitRunner(RoleRunner):
    """A runner of the multiplexing engine. Besides the whole-GPU graphs of its role it captures a set
    on each split's partition for that role, with kernels sized for its SMs (a graph runs on the
    partition it was captured on, wherever it is launched); `plans` maps the partition's SM count
    (None: the whole GPU) to its graphs, so switching splits re-captures nothing."""

    def __init__(self, config: Config, device: torch.device, role: str, splits: list[Split], **role_options):
        self.splits = splits
        self.plans: dict[int | None, dict] = {}
        super().__init__(config, device, role, **role_options)

    def lane(self, split: Split | None) -> Lane | None:
        if split is None:
            return None
        return split.prefill if self.role == "prefill" else split.decode

    def capture_cudagraphs(self) -> None:
        super().capture_cudagraphs()
        prefill = self.role == "prefill"
        if prefill and self.prefill_graphs is None:  # the attention backend runs prefill eagerly
            return
        self.plans = {None: self.prefill_plan if prefill else self.decode_plan}
        start = time.perf_counter()
        for split in self.splits:
            lane = self.lane(split)
            with use_streams(lane.stream), on_sms(lane.num_sms):
                self.plans[lane.num_sms] = (self.prefill_graphs.capture(self.model, stream=lane.stream) if prefill else
                                            self.graphs.capture(sequential_forward(self.model, self.graphs),
                                                                stream=lane.stream))
        if self.splits:
            print(f"[PD-mux] captured the {self.role} graphs again for {len(self.splits)} {self.role} partitions "
                  f"({', '.join(str(self.lane(s).num_sms) for s in self.splits)} SMs) "
                  f"in {time.perf_counter() - start:.1f} s")

    def launch_on(self, seqs: list[Sequence], split: Split | None, after: tuple[StreamTimer | None, ...]) -> PendingTokens:
        """The batch on the whole GPU (split None) or on the split's partition for this role, queued
        after the work the timers in `after` mark."""
        lane = self.lane(split)
        prefill = self.role == "prefill"
        if self.plans:
            plan = self.plans[lane.num_sms if lane else None]
            if prefill:
                self.prefill_plan = plan
            else:
                self.decode_plan = plan
        return self.launch(seqs, is_prefill=prefill, lane=lane, after=after)

    def close(self) -> None:
        self.plans = {}
        super().close()


class MuxEngine(PDEngine):
    """Prefill and decode at the same time on one GPU (enable_pd_multiplexing=True).

    The PD engine's loop with both runners on one device sharing the weights and one KV cache (a
    finished prompt decodes from the blocks it was prefilled into). While a prefill runs beside decoding
    sequences, it runs on the prefill partition of a split and the decode steps on the decode partition,
    from graphs captured there; otherwise each uses the whole GPU. The split follows the running batch:
    per decode bucket, the start-up profile picks the one that gives up the least decode time for the
    prefill work done beside it, with the decode step within pd_max_itl_ms; where the steps that then
    run on the split exceed the bound, the bucket moves to a split with more decode SMs. A prefill
    short enough for a decode step and it to fit that bound runs between two decode steps instead; so
    does every prefill while the sequences to join the decoding ones are a quarter of them or more (a
    burst, or the start of an offline run): the batch fills first, as in the default engine, since
    prefills on a split delay the sequences that are still to start.
    Without green contexts (CPU, an old driver, no cuda-python) both runners share one stream and the
    scheduling is the same.
    """

    def _build_roles(self, config: Config) -> None:
        device = config.device
        try:
            splits = prepare_splits(device)
            partitions = "green-context partitions"
        except GreenContextUnavailable as e:
            splits, partitions = [], f"one stream ({e.reason})"
            print(f"[PD-mux] green contexts unavailable ({e.reason}): prefill and decode run one after the other "
                  "on one stream")
        self.prefill_runner = SplitRunner(config, device, "prefill", splits)
        decode_config = copy.copy(config)
        decode_config.num_kvcache_blocks = self.prefill_runner.num_kvcache_blocks
        self.decode_runner = SplitRunner(decode_config, device, "decode", splits, prefill_runner=self.prefill_runner,
                                         share_kv_cache=True)
        if not splits:
            self.prefill_runner.stream = self.decode_runner.stream
        self.scheduler = SharedCacheScheduler(config, self.decode_runner.num_kvcache_blocks, self.tokenizer)
        self.kv_transfer = None
        self.stats = MuxStatistics(device, partitions)
        # Full-GPU decode step times per graph bucket, from the start-up profile and then from the steps
        # run without a prefill beside; with the profiled prefill time they size in-line prefills.
        self.decode_step_ms: dict[int, float] = {}
        self.prefill_fixed_ms, self.prefill_ms_per_token = 0.0, math.inf
        self.split_by_bucket = self._choose(splits, config.pd_max_itl_ms) if splits else {}
        self._prefill_split: Split | None = None  # where the prefill in flight runs (None: the whole GPU)
        self._prefill_in_line = False  # whether it runs between decode steps
        self._decode_split: Split | None = None  # where the decode step being run runs
        print(f"[PD-mux] prefill and decode share {self.decode_runner.num_kvcache_blocks} KV blocks of "
              f"{self.decode_runner.block_size} tokens on {device}; "
              f"{'CUDA graphs' if self.decode_runner.graphs is not None else 'eager'}")

    def _choose(self, splits: list[Split], max_itl_ms: float | None) -> dict[int, Split]:
        """Profiles every split, picks one per decode bucket, and logs the measurements and the choice."""
        if self.decode_runner.graphs is None:
            split = splits[len(splits) // 2]
            print(f"[PD-mux] enforce_eager: no decode graphs to profile; split under prefill: {split.label}")
            split_by_bucket = {self.config.max_num_seqs: split}
        else:
            start = time.perf_counter()
            profiler = SplitProfiler(self.prefill_runner, self.decode_runner)
            full_steps_ms, full_prefill_ms = profiler.full_gpu()
            print(f"[PD-mux] profile: decode step of {profiler.batch} x {profiler.context} tokens "
                  f"{full_steps_ms[profiler.batch]:.2f} ms, prefill of {profiler.prefill_tokens} tokens "
                  f"{full_prefill_ms:.1f} ms on the whole GPU")
            for split in splits:
                profiler.profile(split, full_prefill_ms)
                p = split.profile
                print(f"[PD-mux]   {split.label}: decode step {p['decode_step_ms_alone']:.2f} ms alone, "
                      f"{p['decode_step_ms']:.2f} ms beside prefill; prefill {p['prefill_ms_alone']:.1f} ms alone "
                      f"({p['prefill_slowdown_alone']:.2f}x the whole GPU on {100 * p['prefill_sm_share']:.0f}% "
                      f"of the SMs), {p['prefill_ms']:.1f} ms beside decode; decode time given up per ms of "
                      f"prefill work {split.prefill_cost(profiler.batch, full_steps_ms[profiler.batch]):.2f}")
            split_by_bucket = choose_splits(splits, full_steps_ms, max_itl_ms)
            self.decode_step_ms.update(full_steps_ms)
            # A prefill of any length reads every weight once, as the decode step of one sequence does.
            self.prefill_fixed_ms = full_steps_ms[min(full_steps_ms)]
            self.prefill_ms_per_token = (full_prefill_ms - self.prefill_fixed_ms) / profiler.prefill_tokens
            limit = f"{max_itl_ms:g} ms" if max_itl_ms is not None else f"{DEFAULT_ITL_FACTOR} x its full-GPU step"
            ranges = "; ".join(f"{batches}: {label}" for batches, label in split_ranges(split_by_bucket).items())
            print(f"[PD-mux] split under prefill, by decode batch (step bound {limit}): {ranges}. A prefill runs "
                  f"between decode steps on the whole GPU if a step of the running batch and it stay within the "
                  f"bound (at batch {profiler.batch}: up to {self.in_line_tokens(profiler.batch)} tokens). "
                  f"Profiled in {time.perf_counter() - start:.1f} s")
            self.stats.split_profiles = {s.label: s.profile for s in splits}
            self.stats.split_observed = {s.label: s.observed for s in splits}
            torch.cuda.empty_cache()  # the profile's prefill activations, cached per stream
        self.stats.split_per_batch = split_ranges(split_by_bucket)
        return split_by_bucket

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
        step_ms = self.decode_step_ms.get(self._bucket(batch))
        if step_ms is None:
            return 0
        return in_line_prefill_tokens(itl_bound_ms(self.config.pd_max_itl_ms, step_ms), step_ms,
                                      self.prefill_fixed_ms, self.prefill_ms_per_token)

    def fills_batch(self, running: int) -> bool:
        """Whether the sequences to join the `running` decoding ones are at least FILL_SHARE of them."""
        return self.scheduler.num_joining() >= FILL_SHARE * running

    def _bucket(self, batch: int) -> int | None:
        """The decode graph bucket that runs the batch: the batch itself without graphs, None past the
        largest graph (such a batch runs eagerly, and its steps time no bucket)."""
        graphs = self.decode_runner.graphs
        if graphs is None:
            return batch
        return graphs.bucket_for(batch) if batch <= graphs.buckets[-1] else None

    def _launch_prefill_batch(self, seqs: list[Sequence]) -> PendingTokens:
        # With nothing decoding the prefill has the whole GPU. Beside decode steps it runs on the split's
        # partition, unless it is short enough to run between two decode steps within the ITL bound
        # (then the split would cost throughput and bound nothing), or it fills the batch: on a split,
        # the prefills of a burst take several times as long, and the sequences still to start finish
        # that much later.
        tokens = sum(seq.num_scheduled_tokens for seq in seqs)
        running = len(self.scheduler.running)
        filling = running > 0 and self.fills_batch(running)
        self._prefill_in_line = filling or (running > 0 and tokens <= self.in_line_tokens(running))
        self._prefill_split = self.split_for(running) if running and not self._prefill_in_line else None
        label = FILLING if filling else IN_LINE if self._prefill_in_line else self._split_label(self._prefill_split)
        self.stats.record_split_prefill(label)
        # The prefill writes the shared cache, maybe into blocks freed while the decode step in flight
        # still writes them.
        return self.prefill_runner.launch_on(seqs, self._prefill_split, after=(self._last_decode,))

    def _launch_decode_batch(self, seqs: list[Sequence], beside_prefill: bool) -> PendingTokens:
        # A step on another stream than the step before reads that step's tokens and reuses its inputs.
        self._decode_split = self._prefill_split if beside_prefill else None
        in_line = (self._prefill[1].timer,) if beside_prefill and self._prefill_in_line else ()
        return self.decode_runner.launch_on(seqs, self._decode_split, after=(self._last_decode, *in_line))

    def _launch_decode(self, seqs: list[Sequence]) -> DecodeStep:
        step = super()._launch_decode(seqs)
        step.split = self._decode_split
        return step

    def _record_decode(self, step: DecodeStep) -> None:
        super()._record_decode(step)
        seconds = step.pending.timer.seconds()
        self.stats.record_split_decode(self._split_label(step.split), seconds)
        bucket = self._bucket(len(step.seqs))
        if bucket is None:
            return
        if step.split is not None:
            self._observe(step.split, bucket, 1e3 * seconds)
        elif self.split_by_bucket and not step.beside_prefill:
            self.decode_step_ms[bucket] = 1e3 * seconds

    def _observe(self, split: Split, bucket: int, step_ms: float) -> None:
        """Takes in a decode step run on a split beside a prefill. Once the steps of the bucket's chosen
        split exceed the bound, the bucket moves to the split that choose_split picks among those with
        more decode SMs, if its step is shorter: the profile measured the slow-down beside a prefill at
        one batch, and small batches can slow down more. Moving one way only, a bucket changes at most
        once per split. Without a profile (enforce_eager) the split stays."""
        split.observe(bucket, step_ms)
        full_ms, max_itl_ms = self.decode_step_ms.get(bucket), self.config.pd_max_itl_ms
        if (not split.profile or full_ms is None or self.split_by_bucket.get(bucket) is not split
                or within_bound(split, bucket, full_ms, max_itl_ms)):
            return
        wider = [s for s in self.decode_runner.splits if s.decode.num_sms > split.decode.num_sms]
        chosen = choose_split(wider, bucket, full_ms, max_itl_ms) if wider else split
        if chosen.decode_step_ms(bucket) < split.decode_step_ms(bucket):
            self.split_by_bucket[bucket] = chosen
            self.stats.record_split_change(split_ranges(self.split_by_bucket))
            print(f"[PD-mux] decode batch bucket {bucket}: split under prefill now {chosen.label}; "
                  f"{split.label} took {split.decode_step_ms(bucket):.1f} ms per decode step beside prefills, over "
                  f"{STEP_MARGIN:g} x the {itl_bound_ms(max_itl_ms, full_ms):.1f} ms bound")

    def _split_label(self, split: Split | None) -> str:
        if split is not None:
            return split.label
        return FULL_GPU if self.split_by_bucket else "one stream"
