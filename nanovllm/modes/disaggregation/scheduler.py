import time
from collections.abc import Iterator
from itertools import chain

from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.scheduler import Scheduler, advance
from nanovllm.engine.sequence import Sequence, SequenceStatus


class PDScheduler:
    """The engine's Scheduler for the decode side, and the admission of prompts to a prefill runner. A
    request moves

        waiting -> prefilling -> transferring -> running (decoding) -> finished

    The core scheduler `decode` keeps the queue of waiting requests, the decoding sequences and the decode
    cache: its decode batches preempt by recompute (a victim frees its decode blocks and goes back to the
    head of `waiting`, so the prefill runner recomputes its KV), and it books and fills the decode steps.
    `prefill_manager` holds the prompts being prefilled and the prefix cache.

    Back-pressure: a request is admitted to prefill only with the decode blocks for its KV reserved, so
    the prefill runner never computes KV that the decode side cannot take.

    With one KV cache for both runners (multiplexing on one GPU: prefill_manager None) a prompt is
    admitted with its blocks in that cache, and once its KV is complete it decodes from the same blocks:
    the handoff is a change of state (`transferring` stays empty), and prefix-cache hits count the blocks
    of every sequence.
    """

    def __init__(self, decode: Scheduler, prefill_manager: BlockManager | None):
        self.decode = decode
        self.shared = prefill_manager is None
        self.prefill_manager = decode.block_manager if self.shared else prefill_manager
        self.prefilling: list[Sequence] = []  # admitted, prompt KV not complete; block_table: prefill cache
        self.reserved: dict[int, list[int]] = {}  # decode blocks held for each prefilling sequence
        # Prompt KV complete and on its way; block_table: decode cache, the value: its prefill blocks.
        self.transferring: dict[int, tuple[Sequence, list[int]]] = {}
        self.blocked_on_decode = False  # the last schedule_prefill found no decode room for the next prompt
        # When each request still without its first token was added (perf_counter seconds): the
        # first-token wait a placement may weigh.
        self.arrived: dict[int, float] = {}

    @property
    def max_num_seqs(self) -> int:
        return self.decode.max_num_seqs

    @property
    def waiting(self):
        return self.decode.waiting

    @property
    def running(self):
        return self.decode.running

    @property
    def block_manager(self) -> BlockManager:
        """The decode cache (with one cache, the only one)."""
        return self.decode.block_manager

    def add(self, seq: Sequence) -> None:
        self.decode.add(seq)
        self.arrived[seq.seq_id] = time.perf_counter()

    def queued(self) -> Iterator[Sequence]:
        """The sequences whose prompts are still to prefill, in the order schedule_prefill takes them."""
        return chain(self.prefilling, self.waiting)

    def is_finished(self) -> bool:
        return self.decode.is_finished() and not self.prefilling and not self.transferring

    def num_admitted(self) -> int:
        return len(self.prefilling) + len(self.transferring) + len(self.running)

    def num_joining(self) -> int:
        """The sequences that are to join the decoding ones: those admitted and not decoding yet, and
        the waiting ones that max_num_seqs leaves room for."""
        room = max(0, self.max_num_seqs - self.num_admitted())
        return len(self.prefilling) + len(self.transferring) + min(len(self.waiting), room)

    def schedule_prefill(self, max_tokens: int | None = None) -> list[Sequence]:
        """The next prefill batch: prompts cut by the previous batch's token budget first, then new
        admissions in arrival order while the budget (max_num_batched_tokens, or max_tokens where
        less), max_num_seqs and the caches allow."""
        scheduled, budget = [], self.decode.max_num_batched_tokens
        if max_tokens is not None:
            budget = min(budget, max_tokens)
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
        if self.shared:
            if self.block_manager.allocate(seq):
                return True
            self.blocked_on_decode = True
            return False
        needed = self.block_manager.num_blocks_for(seq.num_tokens)
        if needed > self.block_manager.num_free_blocks:
            self.blocked_on_decode = True
            return False
        if not self.prefill_manager.allocate(seq):
            return False
        self.reserved[seq.seq_id] = self.block_manager.allocate_blocks(needed)
        return True

    def finish_prefill(self, seqs: list[Sequence], tokens: list[list[int]]) -> tuple[list[Sequence], list[tuple]]:
        """Advances a collected prefill batch. A sequence whose prompt KV is now complete gains its first
        token; it finishes at once when that token stops it, and otherwise decodes: from its blocks with one
        cache, else once its KV is copied into its reserved decode blocks. Returns the sequences that gained
        a token and, per handover, (sequence, its prefill blocks) for the KV copy."""
        produced, handover = [], []
        for seq, new_tokens in zip(seqs, tokens):
            if not advance(seq, new_tokens, self.prefill_manager):
                continue
            produced.append(seq)
            self.prefilling.remove(seq)
            self.arrived.pop(seq.seq_id, None)
            prefill_blocks = None
            if not self.shared:
                prefill_blocks, seq.block_table = seq.block_table, self.reserved.pop(seq.seq_id)
            if self.decode.stopped(seq):
                seq.status = SequenceStatus.FINISHED
                if prefill_blocks is not None:
                    self.prefill_manager.free_blocks(prefill_blocks)
                self.block_manager.deallocate(seq)
            elif self.shared:
                self._start_decoding(seq)
            else:
                self.transferring[seq.seq_id] = (seq, prefill_blocks)
                handover.append((seq, prefill_blocks))
        return produced, handover

    def finish_transfer(self, seq: Sequence) -> None:
        """Its KV is in the decode cache: free the prefill blocks (they stay in the prefix cache) and decode."""
        _, prefill_blocks = self.transferring.pop(seq.seq_id)
        self.prefill_manager.free_blocks(prefill_blocks)
        self._start_decoding(seq)

    def _start_decoding(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def schedule_decode(self) -> list[Sequence]:
        return self.decode.schedule_decode()

    def book(self, seqs: list[Sequence]) -> None:
        self.decode.book(seqs)

    def fill(self, seqs: list[Sequence], tokens: list[list[int]]) -> list[tuple[Sequence, list[int]]]:
        return self.decode.fill(seqs, tokens)

    def abort(self, seq_ids: set[int]) -> None:
        """Removes these sequences from every state and frees their blocks on both sides; the caller
        makes sure no launched work still uses them."""
        self.decode.abort(seq_ids)
        for seq_id in seq_ids:
            self.arrived.pop(seq_id, None)
        for seq in [s for s in self.prefilling if s.seq_id in seq_ids]:
            self.prefilling.remove(seq)
            self.prefill_manager.deallocate(seq)
            if not self.shared:
                self.block_manager.free_blocks(self.reserved.pop(seq.seq_id))
            seq.status = SequenceStatus.FINISHED
        for seq_id in [i for i in self.transferring if i in seq_ids]:
            seq, prefill_blocks = self.transferring.pop(seq_id)
            self.prefill_manager.free_blocks(prefill_blocks)
            self.block_manager.deallocate(seq)
            seq.status = SequenceStatus.FINISHED
