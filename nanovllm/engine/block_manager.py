from collections import OrderedDict

import numpy as np
import xxhash

from nanovllm.engine.sequence import Sequence


class Block:

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash = -1


class BlockManager:
    """Paged KV blocks with prefix caching.

    A full block whose KV has been computed is registered under a hash of its token ids chained with
    the previous block's hash. Freed blocks keep their hash and stay reusable until they are handed
    out for other content, oldest-freed first.
    """

    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.hash_to_block_id: dict[int, int] = {}
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @staticmethod
    def compute_hash(token_ids: list[int], prefix_hash: int = -1) -> int:
        h = xxhash.xxh64()
        if prefix_hash != -1:
            h.update(prefix_hash.to_bytes(8, "little"))
        h.update(np.array(token_ids, dtype=np.int64).tobytes())
        return h.intdigest()

    def num_blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids holding the computed KV of the prompt's leading full blocks, last token excluded."""
        hits, prefix_hash = [], -1
        for i in range((seq.num_tokens - 1) // self.block_size):
            tokens = seq.token_ids[i * self.block_size:(i + 1) * self.block_size]
            prefix_hash = self.compute_hash(tokens, prefix_hash)
            block_id = self.hash_to_block_id.get(prefix_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def allocate(self, seq: Sequence) -> bool:
        """Gives seq the blocks for all its tokens, reusing cached prefix blocks; returns False and
        changes nothing when they do not fit."""
        assert not seq.block_table
        hits = self._cached_prefix(seq)
        reused_free = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        if self.num_blocks_for(seq.num_tokens) - len(hits) + reused_free > self.num_free_blocks:
            return False
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_block_ids[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
        for _ in range(self.num_blocks_for(seq.num_tokens) - len(hits)):
            seq.block_table.append(self._take_free_block())
        seq.num_cached_tokens = seq.num_computed_tokens = len(hits) * self.block_size
        return True

    def _take_free_block(self) -> int:
        block_id, _ = self.free_block_ids.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash != -1 and self.hash_to_block_id.get(block.hash) == block_id:
            del self.hash_to_block_id[block.hash]
        block.hash = -1
        block.ref_count = 1
        return block_id

    def allocate_blocks(self, num_blocks: int) -> list[int]:
        """Takes num_blocks fresh blocks outside any sequence's table; the caller checked that they are free."""
        assert num_blocks <= self.num_free_blocks
        return [self._take_free_block() for _ in range(num_blocks)]

    def free_blocks(self, block_ids: list[int]) -> None:
        """Drops one reference to each block, the last one first, so that a table's tail is reused first."""
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_block_ids[block_id] = None

    def deallocate(self, seq: Sequence) -> None:
        self.free_blocks(seq.block_table)
        seq.block_table.clear()
        seq.num_cached_tokens = seq.num_computed_tokens = 0

    def can_append(self, seq: Sequence) -> bool:
        return self.num_blocks_for(seq.num_tokens) <= len(seq.block_table) or self.num_free_blocks >= 1

    def may_append(self, seq: Sequence) -> None:
        if self.num_blocks_for(seq.num_tokens) > len(seq.block_table):
            seq.block_table.append(self._take_free_block())

    def hash_computed_blocks(self, seq: Sequence) -> None:
        """Registers every full block of seq whose KV is now computed, so later requests can reuse it."""
        num_full = seq.num_computed_tokens // self.block_size
        start = num_full
        while start > 0 and self.blocks[seq.block_table[start - 1]].hash == -1:
            start -= 1
        prefix_hash = self.blocks[seq.block_table[start - 1]].hash if start else -1
        for i in range(start, num_full):
            block = self.blocks[seq.block_table[i]]
            tokens = seq.token_ids[i * self.block_size:(i + 1) * self.block_size]
            block.hash = prefix_hash = self.compute_hash(tokens, prefix_hash)
            self.hash_to_block_id[block.hash] = block.block_id
