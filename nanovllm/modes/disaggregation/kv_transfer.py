from itertools import accumulate

import torch

from nanovllm.partitions.streams import StreamTimer, order_after, use_streams
from nanovllm.utils.log import get_logger


def block_runs(src_blocks: list[int], dst_blocks: list[int]) -> list[tuple[int, int, int]]:
    """(first source block, first destination block, length) of each run of blocks that are
    consecutive on both sides."""
    runs = []
    for src, dst in zip(src_blocks, dst_blocks, strict=True):
        if runs and src == runs[-1][0] + runs[-1][2] and dst == runs[-1][1] + runs[-1][2]:
            runs[-1][2] += 1
        else:
            runs.append([src, dst, 1])
    return [tuple(run) for run in runs]


class Transfer:
    """One handoff in flight: polled with done(), its copies timed by the stream timers."""

    def __init__(self, timers: list[StreamTimer], num_bytes: int, num_copies: int, staging: torch.Tensor | None):
        self.timers = timers
        self.num_bytes = num_bytes
        self.num_copies = num_copies
        self.staging = staging  # kept alive until the copies that read it are done

    def done(self) -> bool:
        return self.timers[-1].done()

    def wait(self) -> None:
        self.timers[-1].wait()

    def seconds(self) -> float:
        return sum(timer.seconds() for timer in self.timers)


class KVTransfer:
    """Copies KV blocks from the prefill runner's cache into the decode runner's.

    Both caches are block-major, [blocks, layers, 2, block_size, kv_heads, head_dim], so every block
    (all its layers, K and V) is one contiguous unit and a run of consecutive blocks is one copy. The
    copies go to copy streams of their own, ordered after the prefill that wrote the blocks by its
    event, so that they overlap the next prefill and the decode steps. Between GPUs they are peer
    copies where the devices have peer access, and otherwise staged through pinned host memory.
    `staged` forces (True) or forbids (False) the staging; None decides by peer access.
    """

    def __init__(self, src: torch.Tensor, dst: torch.Tensor, staged: bool | None = None):
        if src.shape[1:] != dst.shape[1:] or src.dtype != dst.dtype:
            raise ValueError(f"KV caches differ in block shape or dtype: {tuple(src.shape)} {src.dtype} and "
                             f"{tuple(dst.shape)} {dst.dtype}")
        self.src, self.dst = src, dst
        self.block_bytes = src[0].numel() * src.element_size()
        cross = src.device != dst.device
        if staged is None:
            staged = cross and not torch.cuda.can_device_access_peer(dst.device, src.device)
        self.staged = staged
        self.src_stream = torch.cuda.Stream(src.device) if src.is_cuda else None
        self.dst_stream = (torch.cuda.Stream(dst.device) if cross else self.src_stream) if dst.is_cuda else None
        if staged:
            self.mode = "staged through pinned host memory"
        else:
            self.mode = "peer-to-peer" if cross else "device-local"
        if staged and cross:
            get_logger("KVTransfer").info("%s and %s have no peer access: KV copies are staged through pinned "
                                          "host memory", src.device, dst.device)

    def start(self, src_blocks: list[int], dst_blocks: list[int],
              after: tuple[StreamTimer | None, ...] = ()) -> Transfer:
        """Queues the copy of src_blocks into dst_blocks, to start once the work each timer of `after`
        marks is done (the prefill that wrote the blocks; a decode step that may still write freed ones)."""
        runs = block_runs(src_blocks, dst_blocks)
        num_bytes = len(src_blocks) * self.block_bytes
        if self.staged:
            return self._staged(runs, len(src_blocks), num_bytes, after)
        # A copy between GPUs runs on the source device's current stream, fenced against the destination
        # device's current stream: both are this transfer's streams, so no other work waits on it.
        with use_streams(self.src_stream, self.dst_stream):
            order_after(after, self.src_stream)
            timer = StreamTimer(self.src_stream)
            for src, dst, n in runs:
                self.dst[dst:dst + n].copy_(self.src[src:src + n], non_blocking=True)
            timer.stop()
        return Transfer([timer], num_bytes, len(runs), None)

    def _staged(self, runs, num_blocks: int, num_bytes: int, after: tuple[StreamTimer | None, ...]) -> Transfer:
        staging = torch.empty((num_blocks, *self.src.shape[1:]), dtype=self.src.dtype,
                              pin_memory=torch.cuda.is_available())
        offsets = list(accumulate((n for _, _, n in runs), initial=0))
        with use_streams(self.src_stream):
            order_after(after, self.src_stream)  # the copy up waits for the copy down, so for these too
            down = StreamTimer(self.src_stream)
            for (src, _, n), offset in zip(runs, offsets):
                staging[offset:offset + n].copy_(self.src[src:src + n], non_blocking=True)
            down.stop()
        with use_streams(self.dst_stream):
            down.order_before(self.dst_stream)
            up = StreamTimer(self.dst_stream)
            for (_, dst, n), offset in zip(runs, offsets):
                self.dst[dst:dst + n].copy_(staging[offset:offset + n], non_blocking=True)
            up.stop()
        return Transfer([down, up], num_bytes, 2 * len(runs), staging)
