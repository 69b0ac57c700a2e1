from collections import deque
from dataclasses import dataclass

from nanovllm.config import Config
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import PENDING_TOKEN, Sequence, SequenceStatus


@dataclass
class Batch:
    """One step's sequences: prompt chunks (is_prefill), or one decode token each."""
    seqs: list[Sequence]
    is_prefill: bool


def advance(seq: Sequence, token_ids: list[int], block_manager: BlockManager) -> bool:
    """Counts seq's scheduled tokens as computed in block_manager's cache; once all its tokens are,
    appends token_ids and returns True."""
    seq.num_computed_tokens += seq.num_scheduled_tokens
    seq.num_scheduled_tokens = 0
    block_manager.hash_computed_blocks(seq)
    if seq.num_computed_tokens < seq.num_tokens:
        return False
    seq.token_ids.extend(token_ids)
    return True


class Scheduler:
    """Continuous batching: prefill first (chunked when over the token budget), then decode; a sequence
    that finds no free block for its next token preempts the newest running one.

    A launched step is booked at once (book: its computed tokens, and a PENDING_TOKEN in place of each
    sequence's token being sampled), so that the next step can be planned before its tokens are known;
    fill() puts them in once they arrive and finishes the sequences they stop."""

    def __init__(self, config: Config, num_kvcache_blocks: int, tokenizer=None):
        self.tokenizer = tokenizer  # for stop strings
        self.max_num_seqs = config.scheduler.max_num_seqs
        self.max_num_batched_tokens = config.scheduler.max_num_batched_tokens
        self.max_model_len = config.scheduler.max_model_len
        self.eos_token_ids = set(config.eos_token_ids)
        self.block_manager = BlockManager(num_kvcache_blocks, config.cache.kvcache_block_size)
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()

    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> Batch | None:
        """The next step's batch; None when there is nothing to run (idle, or every running sequence's
        in-flight token is its last)."""
        scheduled = self.schedule_prefill()
        if scheduled:
            return Batch(scheduled, True)
        scheduled = self.schedule_decode()
        if not scheduled and self.waiting and not self.running:
            # Options were checked to hold one max_model_len sequence in an empty cache.
            raise RuntimeError("scheduler could not place any sequence; the KV cache is too small")
        return Batch(scheduled, False) if scheduled else None

    def schedule_prefill(self) -> list[Sequence]:
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

    def schedule_decode(self) -> list[Sequence]:
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

    def book(self, seqs: list[Sequence]) -> None:
        """Books a launched step whose tokens are not known yet: every sequence whose prompt is now
        computed gets a PENDING_TOKEN."""
        for seq in seqs:
            if not seq.is_finished:  # else stopped (or aborted) by its previous token while this step ran
                advance(seq, [PENDING_TOKEN], self.block_manager)

    def fill(self, seqs: list[Sequence], tokens: list[list[int]]) -> list[tuple[Sequence, list[int]]]:
        """Puts a booked step's tokens (tokens[i] for seqs[i]: one from a sampler) in place of its
        PENDING_TOKENs, stopping a sequence at the first token that stops it. Returns the sequences that
        gained tokens, with those tokens."""
        produced = []
        for seq, new_tokens in zip(seqs, tokens):
            if seq.is_finished or seq.last_token != PENDING_TOKEN:  # aborted, or a partial prompt
                continue
            seq.token_ids.pop()
            taken = []
            for token in new_tokens:
                seq.append_token(token)
                taken.append(token)
                if self.stopped(seq):
                    self._finish(seq)
                    break
            produced.append((seq, taken))
        return produced

    def _finish(self, seq: Sequence) -> None:
        # Running, or preempted while its last token was in flight.
        (self.running if seq.status == SequenceStatus.RUNNING else self.waiting).remove(seq)
        seq.status = SequenceStatus.FINISHED
        self.block_manager.deallocate(seq)

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
