from collections import deque

from nanovllm.config import Config
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import Sequence, SequenceStatus


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
        if not scheduled:
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
        scheduled = []
        while self.running and len(scheduled) < self.max_num_seqs:
            seq = self.running.popleft()
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
        self.running.extendleft(reversed(scheduled))
        return scheduled

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
                seq.status = SequenceStatus.FINISHED
                self.block_manager.deallocate(seq)
                self.running.remove(seq)
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
