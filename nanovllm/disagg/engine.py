import copy
import time
from dataclasses import dataclass

from nanovllm.config import Config
from nanovllm.disagg.kv_transfer import KVTransfer, Transfer
from nanovllm.disagg.runner import PendingTokens, RoleRunner
from nanovllm.disagg.scheduler import PDScheduler
from nanovllm.disagg.splits import Split
from nanovllm.disagg.stats import PDStatistics
from nanovllm.disagg.streams import StreamTimer
from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.engine.sequence import Sequence


def prefill_cache_blocks(config: Config) -> int:
    """The prefill cache holds the prompts in flight and the prefix cache. On a GPU of its own it takes
    the rest of that GPU (-1: sized from memory), all of it useful as prefix cache. Sharing a device,
    it has room for two full prefill batches (one computing while the previous one's KV is copied
    out), each at least one longest prompt, and the decode cache gets the rest."""
    if config.prefill_num_kvcache_blocks != -1:
        return config.prefill_num_kvcache_blocks
    if config.prefill_device != config.decode_device:
        return -1
    block = config.kvcache_block_size
    return 2 * -(-max(config.max_num_batched_tokens, config.max_model_len) // block)


def build_runners(config: Config) -> tuple[RoleRunner, RoleRunner]:
    """The prefill runner first, with its cache sized for its role; then the decode runner, which
    sizes its cache from what is left on its device (or takes num_kvcache_blocks). On one device the
    decode runner shares the prefill runner's weights."""
    prefill_config = copy.copy(config)
    prefill_config.num_kvcache_blocks = prefill_cache_blocks(config)
    prefill_config.enable_pipeline = False  # the attention/FFN pipeline is a decode-side path
    prefill = RoleRunner(prefill_config, config.prefill_device, "prefill")
    decode = RoleRunner(config, config.decode_device, "decode", prefill_runner=prefill)
    return prefill, decode


@dataclass(eq=False)
class DecodeStep:
    """A launched decode step: its sequences, their tokens on the way, whether a prefill was in flight
    beside it, and (multiplexing) the split it runs on (None: the whole GPU, or one stream)."""
    seqs: list[Sequence]
    pending: PendingTokens
    beside_prefill: bool
    split: Split | None = None


class PDEngine(LLMEngine):
    """Prefill/decode disaggregation: a prefill runner and a decode runner, each with its own KV cache,
    under one scheduler; the request-level API (add_request, generate, abort_requests) is LLMEngine's.

    One thread drives both runners with asynchronous launches: each step() launches a prefill batch on
    the prefill runner's stream when none is in flight, runs a decode step on the decode runner, and
    collects the prefill (then its KV handoff) only once its event has completed. With async_scheduling
    the decode step is launched and the tokens of the one before are taken in, as the sequential engine
    does. On CPU every launch completes at once and the same logic runs in order.
    """

    def _build(self, config: Config) -> None:
        self._build_roles(config)
        self._prefill: tuple[list[Sequence], PendingTokens] | None = None  # the prefill batch in flight
        self._transfers: list[tuple[list[Sequence], Transfer]] = []  # handoffs in flight, oldest first
        self._decoding: DecodeStep | None = None  # async scheduling: the decode step whose tokens are not taken in
        # The latest decode step launched, collected or not: work that writes into blocks freed while
        # it ran (a sequence that stopped or was preempted) is queued after it.
        self._last_decode: StreamTimer | None = None
        # Tokens not yet returned by step(): collected by abort_requests (which waits for the work in
        # flight) or by a step() that raised half-way.
        self._collected: dict[int, tuple[Sequence, list[int]]] = {}

    def _build_roles(self, config: Config) -> None:
        """The runners, the scheduler, the KV handoff and the statistics."""
        self.prefill_runner, self.decode_runner = build_runners(config)
        self.scheduler = PDScheduler(config, self.prefill_runner.num_kvcache_blocks,
                                     self.decode_runner.num_kvcache_blocks, self.tokenizer)
        self.kv_transfer = KVTransfer(self.prefill_runner.kv_cache, self.decode_runner.kv_cache)
        self.stats = PDStatistics(config.prefill_device, config.decode_device, self.kv_transfer.mode)
        same = " (same-device mode)" if config.prefill_device == config.decode_device else ""
        for runner, duty in ((self.prefill_runner, "prompts in flight and the prefix cache"),
                             (self.decode_runner, "decoding sequences")):
            captured = runner.prefill_graphs if runner.role == "prefill" else runner.graphs
            graphs = "CUDA graphs" if captured is not None else "eager"
            print(f"[PD] {runner.role} runner on {runner.device}{same}: {runner.num_kvcache_blocks} KV blocks of "
                  f"{runner.block_size} tokens for {duty}; {graphs}")
        print(f"[PD] KV handoff: {self.kv_transfer.mode} block copies on a copy stream")

    @property
    def runners(self) -> list[RoleRunner]:
        return [self.prefill_runner, self.decode_runner]

    def step(self) -> list[tuple[int, list[int], bool]]:
        """Launches a prefill if one is admissible and none is in flight, runs a decode step beside it,
        then collects whatever has completed. With nothing to decode it waits for the work in flight."""
        with self._lock:
            # Collected into self._collected, so that an exception half-way loses no token.
            produced = self._collected
            self._launch_prefill()
            if not self._decode(produced):
                self._wait_for_work()
            self._collect(produced, wait=False)
            self._collected = {}
            self._streamed.difference_update(i for i, (seq, _) in produced.items() if seq.is_finished)
            return [(seq_id, tokens, seq.is_finished) for seq_id, (seq, tokens) in produced.items()]

    def has_unfinished_requests(self) -> bool:
        return super().has_unfinished_requests() or bool(self._collected)

    def abort_requests(self, request_ids) -> None:
        with self._lock:
            # Blocks are freed only once no launched prefill or copy still uses them.
            self._collect(self._collected, wait=True)
            super().abort_requests(request_ids)
            for request_id in request_ids:
                self._collected.pop(request_id, None)

    def get_pd_statistics(self) -> dict:
        return self.stats.as_dict()

    def print_pd_statistics(self) -> None:
        self.stats.print()

    def _launch_prefill(self) -> None:
        if self._prefill is not None:
            return
        seqs = self.scheduler.schedule_prefill()
        self.stats.blocked_on_decode_room(self.scheduler.blocked_on_decode and not seqs)
        if seqs:
            self._prefill = (seqs, self._launch_prefill_batch(seqs))

    def _launch_prefill_batch(self, seqs: list[Sequence]) -> PendingTokens:
        return self.prefill_runner.launch(seqs, is_prefill=True)

    def _launch_decode_batch(self, seqs: list[Sequence], beside_prefill: bool) -> PendingTokens:
        return self.decode_runner.launch(seqs, is_prefill=False)

    def _launch_decode(self, seqs: list[Sequence]) -> DecodeStep:
        beside_prefill = self._prefill is not None and not self._prefill[1].ready()
        step = DecodeStep(seqs, self._launch_decode_batch(seqs, beside_prefill), beside_prefill)
        self._last_decode = step.pending.timer
        return step

    def _decode(self, produced: dict) -> bool:
        """Runs a decode step: without async scheduling to its tokens; with it, launches the step and
        then takes in the tokens of the one before, which the device computed meanwhile. Returns False
        when there was nothing to decode."""
        seqs = self.scheduler.schedule_decode()
        if not seqs and self._decoding is None:
            return False
        try:
            step = self._launch_decode(seqs) if seqs else None
            if self._decoding is not None:
                previous = self._decoding
                self._report(self.scheduler.fill(previous.seqs, self._decode_tokens(previous)), produced)
                self._decoding = None
            if step is not None and not self.config.async_scheduling:
                self._report(self.scheduler.postprocess(seqs, self._decode_tokens(step)), produced)
            elif step is not None:
                self.scheduler.book(seqs)
                self._decoding = step
        except BaseException:
            previous, self._decoding = self._decoding, None
            self._abort_lost(seqs, previous.seqs if previous else [])
            raise
        return True

    def _decode_tokens(self, step: DecodeStep) -> list[int]:
        token_ids = step.pending.result()
        self._record_decode(step)
        return token_ids

    def _record_decode(self, step: DecodeStep) -> None:
        self.stats.record_decode(len(step.seqs), step.pending.timer.seconds(), step.beside_prefill)

    def _wait_for_work(self) -> None:
        """The decode side has nothing to run: wait for the oldest handoff, else for the prefill."""
        start = time.perf_counter()
        if self._transfers:
            self._transfers[0][1].wait()
        elif self._prefill is not None:
            self._prefill[1].timer.wait()
        self.stats.decode_idle_seconds += time.perf_counter() - start

    def _collect(self, produced: dict, wait: bool) -> None:
        """Takes in a completed prefill (starting the KV copies of its finished prompts) and completed
        handoffs (their sequences start decoding); with wait=True, waits for all of them."""
        if self._prefill is not None and (wait or self._prefill[1].ready()):
            seqs, pending = self._prefill
            num_tokens = sum(seq.num_scheduled_tokens for seq in seqs)
            token_ids = pending.result()
            self._prefill = None
            self.stats.record_prefill(num_tokens, pending.timer.seconds())
            gained, handover = self.scheduler.finish_prefill(seqs, token_ids)
            self._report(gained, produced)
            if handover:
                src = [b for _, blocks in handover for b in blocks]
                dst = [b for seq, _ in handover for b in seq.block_table]
                transfer = self.kv_transfer.start(src, dst, after=(pending.timer, self._last_decode))
                self._transfers.append(([seq for seq, _ in handover], transfer))
        while self._transfers and (wait or self._transfers[0][1].done()):
            seqs, transfer = self._transfers.pop(0)
            self.stats.record_transfer(len(seqs), transfer)
            for seq in seqs:
                self.scheduler.finish_transfer(seq)

    @staticmethod
    def _report(seqs: list[Sequence], produced: dict) -> None:
        for seq in seqs:
            produced.setdefault(seq.seq_id, (seq, []))[1].append(seq.last_token)
