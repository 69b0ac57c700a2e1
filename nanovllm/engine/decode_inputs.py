import numpy as np
import torch

from nanovllm.engine.sequence import PENDING_TOKEN, Sequence

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
