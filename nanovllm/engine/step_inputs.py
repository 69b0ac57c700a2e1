"""A step's inputs on the device: the prefill batch's tokens and attention context, the decode batch's
from persistent buffers (with the tokens of the step before still on the device), and the sampler's."""
import numpy as np
import torch

from nanovllm.engine.sequence import PENDING_TOKEN, Sequence
from nanovllm.layers.sampler import ALL_TOKENS, SamplingInputs
from nanovllm.utils.context import Context

# Rows of DecodeInputs.longs.
INPUT_IDS, SAMPLED_ROWS, POSITIONS, SLOTS = range(4)


class Staging:
    """One set of decode inputs in (pinned) host memory, and the block table each row holds."""

    def __init__(self, max_batch: int, width: int, pin: bool):
        self.longs = torch.zeros((4, max_batch), dtype=torch.int64, pin_memory=pin)
        self.context_lens = torch.zeros(max_batch, dtype=torch.int32, pin_memory=pin)
        self.block_tables = torch.full((max_batch, width), -1, dtype=torch.int32, pin_memory=pin)
        self.longs_np, self.context_lens_np, self.block_tables_np = (
            self.longs.numpy(), self.context_lens.numpy(), self.block_tables.numpy())
        self.rows: list[list[int] | None] = [None] * max_batch  # the block table in each row
        self.copied = torch.cuda.Event() if pin else None  # recorded once the device has copied this set


class DecodeInputs:
    """The inputs of a decode step, kept from step to step rather than rebuilt from lists: a row's
    block table is rewritten only where the sequence in that row, or its table, changed, and the set
    reaches persistent device buffers in three copies. Two host sets alternate, so that the host fills
    one while the device may still be copying the other."""

    def __init__(self, max_batch: int, width: int, block_size: int, device: torch.device):
        self.block_size = block_size
        pin = device.type == "cuda"
        self.sets = [Staging(max_batch, width, pin) for _ in range(2)]
        self.step = 0
        self.longs = torch.zeros((4, max_batch), dtype=torch.int64, device=device)
        self.context_lens = torch.zeros(max_batch, dtype=torch.int32, device=device)
        self.block_tables = torch.full((max_batch, width), -1, dtype=torch.int32, device=device)
        # The last step's sampled tokens on the device, and each sequence's row in them.
        self.sampled: torch.Tensor | None = None
        self.sampled_rows: dict[int, int] = {}

    def remember(self, seqs: list[Sequence], token_ids: torch.Tensor) -> None:
        """Keeps a launched step's sampled tokens, which the next step reads where its inputs are PENDING_TOKEN."""
        self.sampled, self.sampled_rows = token_ids, {seq.seq_id: row for row, seq in enumerate(seqs)}

    def decode_step(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor, Context]:
        """(input_ids, positions, attention context) of a decode step of seqs."""
        input_ids, rows, positions, slot_mapping, context_lens, block_tables = self.prepare(seqs, self.sampled_rows)
        if rows is not None:
            input_ids = torch.where(rows >= 0, self.sampled[rows.clamp(min=0)], input_ids)
        return input_ids, positions, Context(is_prefill=False, slot_mapping=slot_mapping, context_lens=context_lens,
                                             block_tables=block_tables)

    def prepare(self, seqs: list[Sequence], sampled_rows: dict[int, int]):
        """seqs' input_ids (PENDING_TOKEN where the previous step's token is not known here), the rows
        of those tokens in the previous step's output (None where every token is known), positions,
        slot_mapping, context_lens and block_tables, on the device."""
        batch = len(seqs)
        staging = self.sets[self.step % 2]
        self.step += 1
        if staging.copied is not None:
            staging.copied.synchronize()
        ids, rows, lengths = [], [], []
        for i, seq in enumerate(seqs):
            table = seq.block_table
            if staging.rows[i] != table:
                staging.block_tables_np[i, :len(table)] = table
                staging.block_tables_np[i, len(table):] = -1
                staging.rows[i] = list(table)
            token = seq.token_ids[-1]
            ids.append(token)
            rows.append(sampled_rows[seq.seq_id] if token == PENDING_TOKEN else -1)
            lengths.append(len(seq.token_ids))
        positions = np.array(lengths, dtype=np.int64) - 1
        blocks = staging.block_tables_np[np.arange(batch), positions // self.block_size].astype(np.int64)
        longs = staging.longs_np
        longs[INPUT_IDS, :batch], longs[SAMPLED_ROWS, :batch], longs[POSITIONS, :batch] = ids, rows, positions
        longs[SLOTS, :batch] = blocks * self.block_size + positions % self.block_size
        staging.context_lens_np[:batch] = lengths
        self.longs.copy_(staging.longs, non_blocking=True)
        self.context_lens[:batch].copy_(staging.context_lens[:batch], non_blocking=True)
        self.block_tables[:batch].copy_(staging.block_tables[:batch], non_blocking=True)
        if staging.copied is not None:
            staging.copied.record()
        width = max(len(seq.block_table) for seq in seqs)
        return (self.longs[INPUT_IDS, :batch], self.longs[SAMPLED_ROWS, :batch] if max(rows) >= 0 else None,
                self.longs[POSITIONS, :batch], self.longs[SLOTS, :batch], self.context_lens[:batch],
                self.block_tables[:batch, :width].contiguous())


def _slots(seq: Sequence, positions: range, block_size: int) -> list[int]:
    table = seq.block_table
    return [table[p // block_size] * block_size + p % block_size for p in positions]


def block_tables(seqs: list[Sequence], to_device) -> torch.Tensor:
    width = max(len(seq.block_table) for seq in seqs)
    return to_device([seq.block_table + [-1] * (width - len(seq.block_table)) for seq in seqs], torch.int32)


def prefill_step(seqs: list[Sequence], block_size: int, to_device, paged: bool = False):
    """(input_ids, positions, attention context, the rows of each sequence's last token) of a prefill step;
    to_device(values, dtype) makes a tensor on the device. The context has block tables, so that attention
    reads every key from the cache, where `paged` or where some sequence continues computed tokens (a
    chunk, or a prefix-cache hit)."""
    input_ids, positions, slot_mapping, cu_q, cu_k = [], [], [], [0], [0]
    for seq in seqs:
        span = seq.scheduled_positions
        input_ids.extend(seq.token_ids[span.start:span.stop])
        positions.extend(span)
        slot_mapping.extend(_slots(seq, span, block_size))
        cu_q.append(cu_q[-1] + len(span))
        cu_k.append(cu_k[-1] + span.stop)
    paged = paged or any(seq.num_computed_tokens > 0 for seq in seqs)
    ctx = Context(is_prefill=True, cu_seqlens_q=to_device(cu_q, torch.int32), cu_seqlens_k=to_device(cu_k, torch.int32),
                  max_seqlen_q=max(len(s.scheduled_positions) for s in seqs),
                  max_seqlen_k=max(s.scheduled_positions.stop for s in seqs),
                  slot_mapping=to_device(slot_mapping, torch.int64),
                  block_tables=block_tables(seqs, to_device) if paged else None)
    last_indices = to_device(cu_q[1:], torch.int64) - 1
    return to_device(input_ids, torch.int64), to_device(positions, torch.int64), ctx, last_indices


def sampling_inputs(seqs: list[Sequence], to_device) -> SamplingInputs:
    """The sampler's inputs for one step; to_device(values, dtype) makes a tensor on its device.
    Only the options that some sequence of the step uses are built."""
    inputs = SamplingInputs(to_device([seq.temperature for seq in seqs], torch.float32))
    if any(seq.cuts_tokens for seq in seqs):
        inputs.top_k = to_device([seq.top_k for seq in seqs], torch.int64)
        inputs.top_p = to_device([seq.top_p for seq in seqs], torch.float32)
        inputs.min_p = to_device([seq.min_p for seq in seqs], torch.float32)
        # Top-p over a top-k needs only the top k; top-p alone needs the whole vocabulary.
        inputs.top_width = max(seq.top_k or (ALL_TOKENS if seq.top_p < 1 else 1) for seq in seqs)
    if any(seq.seed is not None for seq in seqs):
        inputs.row_seeds = to_device([[-1 if seq.seed is None else seq.seed, seq.num_completion_tokens]
                                      for seq in seqs], torch.int64)
    return inputs
