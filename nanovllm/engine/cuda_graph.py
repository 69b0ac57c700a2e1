import gc
from collections.abc import Callable

import torch

from nanovllm.utils.context import Context, reset_context, set_context

DecodeForward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def batch_buckets(max_batch: int) -> list[int]:
    small = [b for b in (1, 2, 4, 8) if b < max_batch]
    return small + list(range(16, max_batch, 16)) + [max_batch]


class CapturedGraph:
    """One forward captured for one bucket; replay() returns its static output."""

    def __init__(self, graph: torch.cuda.CUDAGraph, output: torch.Tensor):
        self.graph = graph
        self.output = output

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.output


def capture(forward: Callable[[], torch.Tensor], pool, stream: torch.cuda.Stream) -> CapturedGraph:
    """forward() captured on stream into the memory pool (None: a new one, graph.pool() afterwards), after
    a warm-up run outside the graph for lazy initialisation and autotuning. On a green context's stream,
    the graph keeps that stream's SM partition when replayed."""
    forward()
    graph = torch.cuda.CUDAGraph()
    # A garbage collection inside the capture could destroy another, unreachable graph (an engine
    # dropped earlier), which CUDA forbids while a stream captures: it would invalidate this capture.
    collecting = gc.isenabled()
    gc.disable()
    try:
        with torch.cuda.graph(graph, pool, stream=stream):
            output = forward()
    finally:
        if collecting:
            gc.enable()
    torch.cuda.synchronize()
    return CapturedGraph(graph, output)


class DecodeGraphs:
    """Static inputs and one memory pool shared by every captured decode forward. A batch replays
    the smallest bucket that holds it, its tail padded with slot -1."""

    def __init__(self, buckets: list[int], block_table_width: int, device: torch.device):
        self.buckets = sorted(buckets)
        max_batch = self.buckets[-1]
        self.input_ids = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((max_batch,), -1, dtype=torch.int64, device=device)
        self.context_lens = torch.zeros(max_batch, dtype=torch.int32, device=device)
        self.block_tables = torch.full((max_batch, block_table_width), -1, dtype=torch.int32, device=device)
        self.pool = None

    def bucket_for(self, batch: int) -> int:
        return next(b for b in self.buckets if b >= batch)

    def context(self, batch: int) -> Context:
        return Context(is_prefill=False, slot_mapping=self.slot_mapping[:batch], context_lens=self.context_lens[:batch],
                       block_tables=self.block_tables[:batch])

    def capture(self, forward: DecodeForward, stream: torch.cuda.Stream | None = None) -> dict[int, CapturedGraph]:
        """Captures forward(input_ids, positions) for every bucket, largest first so that smaller
        graphs reuse the pool. forward sets the attention context itself; see capture() for `stream`."""
        graphs = {}
        # Without a stream, torch captures on one side stream made on the first capture's device and
        # reused for every later capture in the process, whichever device that is for.
        stream = stream or torch.cuda.Stream(self.input_ids.device)
        for batch in reversed(self.buckets):
            graphs[batch] = capture(lambda: forward(self.input_ids[:batch], self.positions[:batch]), self.pool, stream)
            self.pool = graphs[batch].graph.pool()
        reset_context()
        return graphs

    def load(self, input_ids, positions, slot_mapping, context_lens, block_tables) -> int:
        """Copies a batch into the static inputs and returns the bucket to replay."""
        batch = input_ids.size(0)
        bucket = self.bucket_for(batch)
        self.input_ids[:batch] = input_ids
        self.positions[:batch] = positions
        self.slot_mapping[:bucket].fill_(-1)
        self.slot_mapping[:batch] = slot_mapping
        self.context_lens[:bucket].zero_()
        self.context_lens[:batch] = context_lens
        self.block_tables[:bucket].fill_(-1)
        self.block_tables[:batch, :block_tables.size(1)] = block_tables
        return bucket

    def load_synthetic(self, bucket: int, context_len: int, num_blocks: int) -> None:
        """Fills the static inputs with a batch of `bucket` sequences of context_len tokens that read
        arbitrary blocks and store nothing, for timing graphs."""
        width = self.block_tables.size(1)
        self.input_ids[:bucket].zero_()
        self.positions[:bucket] = context_len - 1
        self.slot_mapping[:bucket] = -1
        self.context_lens[:bucket] = context_len
        self.block_tables[:bucket] = torch.arange(bucket * width, device=self.block_tables.device).view(bucket, width) % num_blocks


def sequential_forward(model, graphs: DecodeGraphs) -> DecodeForward:
    def forward(input_ids, positions):
        set_context(graphs.context(input_ids.size(0)))
        return model(input_ids, positions)
    return forward
