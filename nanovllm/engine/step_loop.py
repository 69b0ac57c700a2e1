"""The step-loop seam: how scheduled batches reach the runners, step after step. The engine's request API
(engine/llm_engine.py) drives a StepLoop; SequentialLoop is the default, and a mode may bring its own
(prefill and decode on two runners; prefill beside decode on partitions of one GPU)."""
import weakref
from dataclasses import dataclass
from typing import Protocol

from nanovllm.config import Config
from nanovllm.engine.decode_paths import DecodeExtension
from nanovllm.engine.model_runner import ModelRunner, RunnerRole
from nanovllm.engine.scheduler import Batch, Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.step_tokens import StepTokens
from nanovllm.engine.tp_worker import TensorParallelGroup


class StepLoop(Protocol):
    scheduler: Scheduler

    @property
    def runners(self) -> list[ModelRunner]:
        """This process's runners; the one that decodes comes last."""

    def add(self, seq: Sequence) -> None: ...

    def step(self) -> list[tuple[Sequence, list[int]]]:
        """Runs one step; returns the sequences that gained tokens in it, with those tokens. An idle loop
        returns []. Where it raises, the sequences whose tokens were lost with it are aborted."""

    def abort(self, seq_ids: set[int]) -> None:
        """Drops these sequences wherever they are and frees their blocks; unknown ids are ignored."""

    def has_unfinished(self) -> bool: ...

    def statistics(self) -> dict: ...

    def close(self) -> None:
        """Frees the graphs and stops any worker process; the loop cannot run afterwards."""


@dataclass
class Launched:
    batch: Batch
    tokens: StepTokens


class SequentialLoop:
    """One runner (with its tensor-parallel ranks in worker processes), one step after another, launched
    `depth` steps ahead of its tokens. Depth 1 (async_scheduling, the default): each step() schedules and
    launches step N, then takes in step N-1's tokens, which the device computed meanwhile, and books step
    N, so that the host plans each step while the device runs the one before. Depth 0: each step runs to
    its tokens. Both book a step when it is launched and fill its tokens in when they arrive."""

    def __init__(self, config: Config, tokenizer=None, decode_extensions: tuple[DecodeExtension, ...] = ()):
        self.tp_group = TensorParallelGroup(config) if config.parallel.tensor_parallel_size > 1 else None
        try:
            self.runner = ModelRunner(config, config.device, 0, self.tp_group and self.tp_group.init_method,
                                      RunnerRole(decode_extensions=decode_extensions))
            if self.tp_group:
                self.tp_group.wait_ready()
        except BaseException:
            if self.tp_group:  # the workers and the process group would outlive the failed engine
                self.tp_group.close()
            raise
        if self.tp_group:
            # Stops the worker processes when this loop is collected or the interpreter exits.
            self._finalizer = weakref.finalize(self, TensorParallelGroup.close, self.tp_group)
        self.scheduler = Scheduler(config, self.runner.kv_cache.num_blocks, tokenizer)
        self.depth = 1 if config.scheduler.async_scheduling else 0
        self.in_flight: Launched | None = None

    @property
    def runners(self) -> list[ModelRunner]:
        return [self.runner]

    def add(self, seq: Sequence) -> None:
        self.scheduler.add(seq)

    def step(self) -> list[tuple[Sequence, list[int]]]:
        batch = self.scheduler.schedule()
        previous, self.in_flight = self.in_flight, None
        launched = None
        try:
            if batch is not None:
                if self.tp_group:
                    self.tp_group.broadcast("launch", batch)
                launched = Launched(batch, self.runner.launch(batch))
            produced = self._fill(previous) if previous else []
            if launched:
                self.scheduler.book(batch.seqs)
                if self.depth == 0:
                    produced += self._fill(launched)
                # Once every sequence has stopped, no token of the launched step will be used.
                elif not self.scheduler.is_finished():
                    self.in_flight = launched
        except BaseException:
            lost = [batch, previous and previous.batch]
            self.scheduler.abort({seq.seq_id for b in lost if b is not None for seq in b.seqs})
            raise
        return produced

    def _fill(self, launched: Launched) -> list[tuple[Sequence, list[int]]]:
        return self.scheduler.fill(launched.batch.seqs, launched.tokens.result())

    def abort(self, seq_ids: set[int]) -> None:
        self.scheduler.abort(seq_ids)

    def has_unfinished(self) -> bool:
        return not self.scheduler.is_finished()

    def statistics(self) -> dict:
        return {"mode": "sequential", "runner": self.runner.statistics()}

    def close(self) -> None:
        self.runner.close()
        if self.tp_group:
            self._finalizer()
            self.tp_group = None
