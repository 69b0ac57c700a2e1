from collections import deque

from nanovllm.config import Config
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import PENDING_TOKEN, Sequence, SequenceStatus


class Scheduler:
    """Continuous batching: prefill first (chunked when over the token budget), then decode;
    a sequence that finds no free block for its next token preempts the newest running one."""

    def __init__(self, config: Config, num_kvcache_blocks: int, tokenizer=None):
        self.tokenizer = tokenizer  # for stop strings
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_model_len = config.max_model_len
        self.eos_token_ids = set(config.eos_token_ids)
        self.block_manager = BlockManager(num_kvcache_blocks, config.kvcache_block_size)
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()

    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> tuple[list[Sequence], bool]:
        scheduled = self._schedule_prefill()
        if scheduled:
            return scheduled, True
        scheduled = self._schedule_decode()
        # Left running but unscheduled: sequences whose in-flight token is their last (async scheduling).
        if not scheduled and not self.running:
            raise RuntimeError("scheduler could not place any sequence; the KV cache is too small")
        return scheduled, False

    def _schedule_prefill(self) -> list[Sequence]:
        # A prompt cut by the token budget stays at the head of `waiting` with its blocks and is
        # continued first, so prefill never waits on decode for blocks it already holds.
        scheduled, budget = [], self.max_num_batched_tokens
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not seq.block_table and not self.block_manager.allocate(seq):
                break
            remaining = seq.num_tokens - seq.num_computed_tokens
            seq.num_scheduled_tokens = min(remaining, budget)
            budget -= seq.num_scheduled_tokens
            scheduled.append(seq)
            if seq.num_scheduled_tokens < remaining:
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
        return scheduled

    def _schedule_decode(self) -> list[Sequence]:
        scheduled, kept = [], []
        while self.running and len(scheduled) < self.max_num_seqs:
            seq = self.running.popleft()
            if self._last_token_in_flight(seq):
                kept.append(seq)
                continue
            while not self.block_manager.can_append(seq):
                if self.running:
                    self._preempt(self.running.pop())
                else:
                    self._preempt(seq)
                    break
            else:
                self.block_manager.may_append(seq)
                seq.num_scheduled_tokens = 1
                scheduled.append(seq)
                kept.append(seq)
        self.running.extendleft(reversed(kept))
        return scheduled

    def _last_token_in_flight(self, seq: Sequence) -> bool:
        """The token being sampled for seq ends it whatever its value: there is nothing left to compute."""
        return seq.last_token == PENDING_TOKEN and (seq.num_completion_tokens >= seq.max_tokens
                                                    or seq.num_tokens >= self.max_model_len)

    def _preempt(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.block_manager.deallocate(seq)
        self.waiting.appendleft(seq)

    def abort(self, seq_ids: set[int]) -> None:
        """Removes these sequences wherever they are queued and frees their blocks."""
        for queue in (self.waiting, self.running):
            for seq in [s for s in queue if s.seq_id in seq_ids]:
                queue.remove(seq)
                self.block_manager.deallocate(seq)
                seq.status = SequenceStatus.FINISHED

    @staticmethod
    def advance(seq: Sequence, token_id: int, block_manager: BlockManager) -> bool:
        """Counts seq's scheduled tokens as computed in block_manager's cache; once all its tokens
        are, appends token_id and returns True."""
        seq.num_computed_tokens += seq.num_scheduled_tokens
        seq.num_scheduled_tokens = 0
        block_manager.hash_computed_blocks(seq)
        if seq.num_computed_tokens < seq.num_tokens:
            return False
        seq.append_token(token_id)
        return True

    def postprocess(self, seqs: list[Sequence], token_ids: list[int]) -> list[Sequence]:
        """Advances each scheduled sequence; token_ids[i] is seqs[i]'s next token, unused when its
        prompt is not yet fully computed. Returns the sequences that gained a token."""
        produced = []
        for seq, token_id in zip(seqs, token_ids):
            if not self.advance(seq, token_id, self.block_manager):
                continue
            produced.append(seq)
            if self.stopped(seq):
                self._finish(seq)
        return produced

    def _finish(self, seq: Sequence) -> None:
        # Running, or (async scheduling) preempted while its last token was in flight.
        (self.running if seq.status == SequenceStatus.RUNNING else self.waiting).remove(seq)
        seq.status = SequenceStatus.FINISHED
        self.block_manager.deallocate(seq)

    # ---- async scheduling: a step is booked when it is launched, its tokens when they arrive ----

    def book(self, seqs: list[Sequence]) -> None:
        """Books a launched step whose tokens are not known yet: every sequence whose prompt is now
        computed gets a PENDING_TOKEN, so that the next step can be planned before fill()."""
        for seq in seqs:
            if not seq.is_finished:  # else stopped (or aborted) by its previous token while this step ran
                self.advance(seq, PENDING_TOKEN, self.block_manager)

    def fill(self, seqs: list[Sequence], token_ids: list[int]) -> list[Sequence]:
        """Puts a booked step's sampled tokens (token_ids[i] for seqs[i]) in place of its PENDING_TOKENs
        and finishes the sequences they stop. Returns the sequences that gained a token."""
        produced = []
        for seq, token_id in zip(seqs, token_ids):
            if seq.is_finished or seq.last_token != PENDING_TOKEN:  # aborted, or a partial prompt
                continue
            seq.token_ids[-1] = token_id
            produced.append(seq)
            if self.stopped(seq):
                self._finish(seq)
        return produced

    def stopped(self, seq: Sequence) -> bool:
        """Whether seq is done after its last token; sets its finish_reason: "stop" for an
        end-of-sequence token (unless ignore_eos), a stop token or a stop string, checked in that
        order and before "length" (max_tokens or max_model_len), as vLLM does."""
        token_id = seq.last_token
        if (not seq.ignore_eos and token_id in self.eos_token_ids) or token_id in seq.stop_token_ids:
            seq.finish_reason = "stop"
        elif seq.stop_strings is not None and seq.stop_strings.update(self.tokenizer, seq.token_ids):
            seq.finish_reason = "stop"
        elif seq.num_completion_tokens >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.finish_reason = "length"
        return seq.finish_reason is not None
