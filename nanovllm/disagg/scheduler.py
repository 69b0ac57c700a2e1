from nanovllm.config import Config
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence, SequenceStatus


class PDScheduler(Scheduler):
    """One scheduler over two KV caches. A request moves

        waiting -> prefilling -> transferring -> running (decoding) -> finished

    The inherited parts serve the decode side: `block_manager` is the decode cache, `running` the
    decoding sequences, and decode batches preempt by recompute (a victim frees its decode blocks and
    goes back to the head of `waiting`, so the prefill runner recomputes its KV). `prefill_manager`
    holds the prompts being prefilled and the prefix cache.

    Back-pressure: a request is admitted to prefill only with the decode blocks for its KV reserved, so
    the prefill runner never computes KV that the decode side cannot take.
    """

    def __init__(self, config: Config, num_prefill_blocks: int, num_decode_blocks: int, tokenizer=None):
        super().__init__(config, num_decode_blocks, tokenizer)
        self.prefill_manager = BlockManager(num_prefill_blocks, config.kvcache_block_size)
        self.prefilling: list[Sequence] = []  # admitted, prompt KV not complete; block_table: prefill cache
        self.reserved: dict[int, list[int]] = {}  # decode blocks held for each prefilling sequence
        # Prompt KV complete and on its way; block_table: decode cache, the value: its prefill blocks.
        self.transferring: dict[int, tuple[Sequence, list[int]]] = {}
        self.blocked_on_decode = False  # the last schedule_prefill found no decode room for the next prompt

    def is_finished(self) -> bool:
        return super().is_finished() and not self.prefilling and not self.transferring

    def num_admitted(self) -> int:
        return len(self.prefilling) + len(self.transferring) + len(self.running)

    def num_joining(self) -> int:
        """The sequences that are to join the decoding ones: those admitted and not decoding yet, and
        the waiting ones that max_num_seqs leaves room for."""
        room = max(0, self.max_num_seqs - self.num_admitted())
        return len(self.prefilling) + len(self.transferring) + min(len(self.waiting), room)

    def schedule_prefill(self) -> list[Sequence]:
        """The next prefill batch: prompts cut by the previous batch's token budget first, then new
        admissions in arrival order while the budget, max_num_seqs and both caches allow."""
        scheduled, budget = [], self.max_num_batched_tokens
        self.blocked_on_decode = False
        for seq in self.prefilling:
            if budget == 0:
                return scheduled
            budget = self._schedule_chunk(seq, budget, scheduled)
        while self.waiting and budget > 0 and self.num_admitted() < self.max_num_seqs:
            seq = self.waiting[0]
            if not self._admit(seq):
                break
            self.waiting.popleft()
            self.prefilling.append(seq)
            budget = self._schedule_chunk(seq, budget, scheduled)
        return scheduled

    @staticmethod
    def _schedule_chunk(seq: Sequence, budget: int, scheduled: list[Sequence]) -> int:
        seq.num_scheduled_tokens = min(seq.num_tokens - seq.num_computed_tokens, budget)
        scheduled.append(seq)
        return budget - seq.num_scheduled_tokens

    def _admit(self, seq: Sequence) -> bool:
        needed = self.block_manager.num_blocks_for(seq.num_tokens)
        if needed > self.block_manager.num_free_blocks:
            self.blocked_on_decode = True
            return False
        if not self.prefill_manager.allocate(seq):
            return False
        self.reserved[seq.seq_id] = self.block_manager.allocate_blocks(needed)
        return True

    def finish_prefill(self, seqs: list[Sequence], token_ids: list[int]) -> tuple[list[Sequence], list[tuple]]:
        """Advances a collected prefill batch. A sequence whose prompt KV is now complete gains its first
        token and switches to its reserved decode blocks; it finishes at once when that token stops it,
        and is otherwise handed over. Returns the sequences that gained a token and, per handover,
        (sequence, its prefill blocks) for the KV copy."""
        produced, handover = [], []
        for seq, token_id in zip(seqs, token_ids):
            if not self.advance(seq, token_id, self.prefill_manager):
                continue
            produced.append(seq)
            self.prefilling.remove(seq)
            prefill_blocks, seq.block_table = seq.block_table, self.reserved.pop(seq.seq_id)
            if self.stopped(seq):
                seq.status = SequenceStatus.FINISHED
                self.prefill_manager.free_blocks(prefill_blocks)
                self.block_manager.deallocate(seq)
            else:
                self.transferring[seq.seq_id] = (seq, prefill_blocks)
                handover.append((seq, prefill_blocks))
        return produced, handover

    def finish_transfer(self, seq: Sequence) -> None:
        """Its KV is in the decode cache: free the prefill blocks (they stay in the prefix cache) and decode."""
        _, prefill_blocks = self.transferring.pop(seq.seq_id)
        self.prefill_manager.free_blocks(prefill_blocks)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def schedule_decode(self) -> list[Sequence]:
        return self._schedule_decode()

    def abort(self, seq_ids: set[int]) -> None:
        """Removes these sequences from every state and frees their blocks on both sides; the caller
        makes sure no launched work still uses them."""
        super().abort(seq_ids)
        for seq in [s for s in self.prefilling if s.seq_id in seq_ids]:
            self.prefilling.remove(seq)
            self.prefill_manager.deallocate(seq)
            self.block_manager.free_blocks(self.reserved.pop(seq.seq_id))
            seq.status = SequenceStatus.FINISHED
        for seq_id in [i for i in self.transferring if i in seq_ids]:
            seq, prefill_blocks = self.transferring.pop(seq_id)
            self.prefill_manager.free_blocks(prefill_blocks)
            self.block_manager.deallocate(seq)
            seq.status = SequenceStatus.FINISHED


class SharedCacheScheduler(PDScheduler):
    """The PD scheduler over one KV cache that both runners use (prefill/decode multiplexing on one GPU):

        waiting -> prefilling -> running (decoding) -> finished

    A prompt is admitted with the blocks for its KV in that cache, and once its KV is complete it
    decodes from the same blocks: the handoff is a change of state, with nothing copied. Prefix-cache
    hits count the blocks of every sequence. Decode steps preempt running sequences as the
    single-runner engine does.
    """

    def __init__(self, config: Config, num_kvcache_blocks: int, tokenizer=None):
        super().__init__(config, 0, num_kvcache_blocks, tokenizer)
        self.prefill_manager = self.block_manager

    def _admit(self, seq: Sequence) -> bool:
        if self.block_manager.allocate(seq):
            return True
        self.blocked_on_decode = True
        return False

    def finish_prefill(self, seqs: list[Sequence], token_ids: list[int]) -> tuple[list[Sequence], list[tuple]]:
        """Advances a collected prefill batch: a sequence whose prompt KV is now complete gains its first
        token and decodes (or finishes, when that token stops it). Returns those sequences and no handover."""
        produced = []
        for seq, token_id in zip(seqs, token_ids):
            if not self.advance(seq, token_id, self.block_manager):
                continue
            produced.append(seq)
            self.prefilling.remove(seq)
            if self.stopped(seq):
                seq.status = SequenceStatus.FINISHED
                self.block_manager.deallocate(seq)
            else:
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
        return produced, []

    def abort(self, seq_ids: set[int]) -> None:
        Scheduler.abort(self, seq_ids)
        for seq in [s for s in self.prefilling if s.seq_id in seq_ids]:
            self.prefilling.remove(seq)
            self.block_manager.deallocate(seq)
            seq.status = SequenceStatus.FINISHED
