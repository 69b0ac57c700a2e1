import time
from dataclasses import dataclass
from typing import Protocol

from nanovllm.config import Config
from nanovllm.engine.model_runner import ModelRunner
from nanovllm.engine.scheduler import Batch
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.step_tokens import StepTokens
from nanovllm.modes.disaggregation.kv_transfer import KVTransfer, Transfer
from nanovllm.modes.disaggregation.scheduler import PDScheduler
from nanovllm.modes.disaggregation.stats import PDStatistics, report
from nanovllm.partitions.streams import Lane, StreamTimer


@dataclass(eq=False)
class DecodeStep:
    """A launched decode step: its sequences, their tokens on the way, whether a prefill was in flight
    beside it, and the lane it runs on (None: the decode runner's stream)."""
    seqs: list[Sequence]
    tokens: StepTokens
    beside_prefill: bool
    lane: Lane | None = None


class Placement(Protocol):
    """Where a two-runner loop's prefills and decode steps run, and what each waits for; its name is the
    mode's."""
    name: str

    def prefill_budget(self, loop: "PDLoop") -> int | None:
        """The most tokens of the next prefill batch (None: max_num_batched_tokens); prefill() follows
        when the batch is not empty."""

    def prefill(self, loop: "PDLoop", seqs: list[Sequence]) -> tuple[Lane | None, tuple[StreamTimer | None, ...]]: ...

    def decode(self, loop: "PDLoop", beside_prefill: bool) -> tuple[Lane | None, tuple[StreamTimer | None, ...]]: ...

    def decoded(self, loop: "PDLoop", step: DecodeStep, seconds: float) -> None:
        """Takes in the time of a collected decode step."""

    def statistics(self) -> dict: ...

    def report_lines(self, stats: dict) -> list[str]:
        """Its lines of the report of the loop's statistics()["pd"]."""


class RunnerStreams:
    """Each runner's work on its own stream (on one GPU the decode runner's has the higher priority), in
    the order it was launched there."""
    name = "disaggregation"

    def prefill_budget(self, loop):
        return None

    def prefill(self, loop, seqs):
        return None, ()

    def decode(self, loop, beside_prefill):
        return None, ()

    def decoded(self, loop, step, seconds):
        pass

    def statistics(self) -> dict:
        return {}

    def report_lines(self, stats):
        return []


class PDLoop:
    """Prefill/decode disaggregation: a prefill runner and a decode runner kept busy at once under one
    scheduler, with the KV of finished prefills handed over asynchronously (no transfer where both share
    one cache).

    One thread drives both runners with asynchronous launches: each step() launches a prefill batch when
    none is in flight, runs a decode step on the decode runner, and collects the prefill (then its KV
    handoff) only once its event has completed. The decode steps run `depth` steps ahead of their tokens,
    as in the sequential loop (async_scheduling). On CPU every launch completes at once and the same logic
    runs in order.
    """

    def __init__(self, config: Config, prefill_runner: ModelRunner, decode_runner: ModelRunner,
                 scheduler: PDScheduler, transfer: KVTransfer | None, placement: Placement, stats: PDStatistics):
        self.config = config
        self.prefill_runner, self.decode_runner = prefill_runner, decode_runner
        self.scheduler = scheduler
        self.kv_transfer = transfer
        self.placement = placement
        self.stats = stats
        self.depth = 1 if config.scheduler.async_scheduling else 0
        self.prefill_in_flight: tuple[list[Sequence], StepTokens] | None = None
        self.transfers: list[tuple[list[Sequence], Transfer]] = []  # handoffs in flight, oldest first
        self.decoding: DecodeStep | None = None  # the decode step whose tokens are not taken in
        # The latest decode step launched, collected or not: work that writes into blocks freed while
        # it ran (a sequence that stopped or was preempted) is queued after it.
        self.last_decode: StreamTimer | None = None
        # Tokens not yet returned by step(): collected by abort (which waits for the work in flight)
        # or by a step() that raised half-way.
        self._collected: dict[int, tuple[Sequence, list[int]]] = {}

    @property
    def runners(self) -> list[ModelRunner]:
        return [self.prefill_runner, self.decode_runner]

    def add(self, seq: Sequence) -> None:
        self.scheduler.add(seq)

    def step(self) -> list[tuple[Sequence, list[int]]]:
        """Launches a prefill if one is admissible and none is in flight, runs a decode step beside it,
        then collects whatever has completed. With nothing to decode it waits for the work in flight."""
        produced = self._collected  # so that an exception half-way loses no token
        self._launch_prefill()
        if not self._decode(produced):
            self._wait_for_work()
        self._collect(produced, wait=False)
        self._collected = {}
        return list(produced.values())

    def has_unfinished(self) -> bool:
        return not self.scheduler.is_finished() or bool(self._collected)

    def abort(self, seq_ids: set[int]) -> None:
        # Blocks are freed only once no launched prefill or copy still uses them.
        self._collect(self._collected, wait=True)
        self.scheduler.abort(seq_ids)
        for seq_id in seq_ids:
            self._collected.pop(seq_id, None)

    def statistics(self) -> dict:
        return {"mode": self.placement.name, "prefill_runner": self.prefill_runner.statistics(),
                "runner": self.decode_runner.statistics(),
                "pd": {**self.stats.as_dict(), **self.placement.statistics()}}

    def report(self) -> str:
        """statistics()["pd"] as lines for people."""
        stats = self.statistics()["pd"]
        return "\n".join([report(stats), *self.placement.report_lines(stats)])

    def close(self) -> None:
        for runner in self.runners:
            runner.close()

    def _launch_prefill(self) -> None:
        if self.prefill_in_flight is not None:
            return
        seqs = self.scheduler.schedule_prefill(self.placement.prefill_budget(self))
        self.stats.blocked_on_decode_room(self.scheduler.blocked_on_decode and not seqs)
        if seqs:
            lane, after = self.placement.prefill(self, seqs)
            tokens = self.prefill_runner.launch(Batch(seqs, True), lane, after, timed=True)
            self.prefill_in_flight = (seqs, tokens)

    def _decode(self, produced: dict) -> bool:
        """Launches a decode step and takes in the tokens of the one before (depth 1), or of this one
        (depth 0). Returns False when there was nothing to decode."""
        seqs = self.scheduler.schedule_decode()
        if not seqs and self.decoding is None:
            return False
        previous, self.decoding = self.decoding, None
        try:
            step = self._launch_decode(seqs) if seqs else None
            if previous is not None:
                self._report(self.scheduler.fill(previous.seqs, self._decode_tokens(previous)), produced)
            if step is not None:
                self.scheduler.book(seqs)
                if self.depth == 0:
                    self._report(self.scheduler.fill(seqs, self._decode_tokens(step)), produced)
                else:
                    self.decoding = step
        except BaseException:
            self.scheduler.abort({seq.seq_id for seq in seqs + (previous.seqs if previous else [])})
            raise
        return True

    def _launch_decode(self, seqs: list[Sequence]) -> DecodeStep:
        beside_prefill = self.prefill_in_flight is not None and not self.prefill_in_flight[1].ready()
        lane, after = self.placement.decode(self, beside_prefill)
        step = DecodeStep(seqs, self.decode_runner.launch(Batch(seqs, False), lane, after, timed=True),
                          beside_prefill, lane)
        self.last_decode = step.tokens.timer
        return step

    def _decode_tokens(self, step: DecodeStep) -> list[list[int]]:
        tokens = step.tokens.result()
        seconds = step.tokens.timer.seconds()
        self.stats.record_decode(len(step.seqs), seconds, step.beside_prefill)
        self.placement.decoded(self, step, seconds)
        return tokens

    def _wait_for_work(self) -> None:
        """The decode side has nothing to run: wait for the oldest handoff, else for the prefill."""
        start = time.perf_counter()
        if self.transfers:
            self.transfers[0][1].wait()
        elif self.prefill_in_flight is not None:
            self.prefill_in_flight[1].timer.wait()
        self.stats.decode_idle_seconds += time.perf_counter() - start

    def _collect(self, produced: dict, wait: bool) -> None:
        """Takes in a completed prefill (starting the KV copies of its finished prompts) and completed
        handoffs (their sequences start decoding); with wait=True, waits for all of them."""
        if self.prefill_in_flight is not None and (wait or self.prefill_in_flight[1].ready()):
            seqs, tokens = self.prefill_in_flight
            num_tokens = sum(seq.num_scheduled_tokens for seq in seqs)
            new_tokens = tokens.result()
            self.prefill_in_flight = None
            self.stats.record_prefill(num_tokens, tokens.timer.seconds())
            gained, handover = self.scheduler.finish_prefill(seqs, new_tokens)
            self._report([(seq, [seq.last_token]) for seq in gained], produced)
            if handover:
                src = [b for _, blocks in handover for b in blocks]
                dst = [b for seq, _ in handover for b in seq.block_table]
                transfer = self.kv_transfer.start(src, dst, after=(tokens.timer, self.last_decode))
                self.transfers.append(([seq for seq, _ in handover], transfer))
        while self.transfers and (wait or self.transfers[0][1].done()):
            seqs, transfer = self.transfers.pop(0)
            self.stats.record_transfer(len(seqs), transfer)
            for seq in seqs:
                self.scheduler.finish_transfer(seq)

    @staticmethod
    def _report(gained: list[tuple[Sequence, list[int]]], produced: dict) -> None:
        for seq, tokens in gained:
            produced.setdefault(seq.seq_id, (seq, []))[1].extend(tokens)
