"""CUDA graphs of the forward: capture, and the static inputs that decode and prefill graphs replay from.
A batch replays the smallest captured bucket that holds it, its padding rows storing nothing (slot -1)."""
import functools
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


@functools.cache
def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream every capture of the process on `device` runs on where no other is given, made once
    per device: cuBLAS keeps a workspace for each stream it has run on until the process ends, so a new
    stream for each engine would leave 64 MiB behind for each (H200)."""
    return torch.cuda.Stream(device)


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
        graphs reuse the pool. forward sets the attention context itself; see capture() for `stream` (default:
        side_stream())."""
        graphs = {}
        # torch's own side stream is made on the first capture's device and reused for every device.
        stream = stream or side_stream(self.input_ids.device)
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


# Token counts a prefill is captured at. An eager prefill costs the host about 20 ms of kernel
# launches (some 280, at 15-60 us each) whatever its size, while the GPU runs a few thousand tokens
# of a small model in less: up to there, a prefill is bound by its launches. Steps are finer where
# the padding costs compute.
PREFILL_GRAPH_TOKENS = (16, 32, 64, 128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096)


def prefill_buckets(max_num_batched_tokens: int) -> list[int]:
    """The captured token counts: those of PREFILL_GRAPH_TOKENS that a step's budget can fill."""
    largest = min(max_num_batched_tokens, PREFILL_GRAPH_TOKENS[-1])
    return [t for t in PREFILL_GRAPH_TOKENS if t < largest] + [largest]


class PrefillGraphs:
    """Static inputs and one memory pool shared by the prefill forwards captured at each bucket of
    tokens. A prompt batch replays the smallest bucket that holds its tokens. The padding rows past
    its tokens store nothing (slot -1) and belong to no sequence; the sequences past its own are empty
    (the attention kernel's grid depends on the token and sequence counts only). Attention reads every
    key from the cache, after the step's keys are stored, so one graph serves prompts with and without
    a cached prefix."""

    def __init__(self, buckets: list[int], max_num_seqs: int, block_table_width: int, device: torch.device):
        self.buckets = sorted(buckets)
        max_tokens = self.buckets[-1]
        self.max_num_seqs = max_num_seqs
        self.input_ids = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((max_tokens,), -1, dtype=torch.int64, device=device)
        seqs = self.seqs_in(max_tokens)
        self.cu_seqlens_q = torch.zeros(seqs + 1, dtype=torch.int32, device=device)
        self.cu_seqlens_k = torch.zeros(seqs + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.full((seqs, block_table_width), -1, dtype=torch.int32, device=device)
        self.pool = None

    def seqs_in(self, bucket: int) -> int:
        """Sequences a bucket's graph is captured for. Each one costs every layer's attention a
        program per head even when empty, so a bucket holds one per 16 tokens (at least 8)."""
        return min(self.max_num_seqs, max(8, bucket // 16))

    def bucket_for(self, num_tokens: int, num_seqs: int) -> int | None:
        """The smallest bucket that holds the batch; None: the batch runs eagerly."""
        return next((b for b in self.buckets if b >= num_tokens and self.seqs_in(b) >= num_seqs), None)

    def context(self, bucket: int) -> Context:
        seqs = self.seqs_in(bucket)
        return Context(is_prefill=True, cu_seqlens_q=self.cu_seqlens_q[:seqs + 1],
                       cu_seqlens_k=self.cu_seqlens_k[:seqs + 1], slot_mapping=self.slot_mapping[:bucket],
                       block_tables=self.block_tables[:seqs])

    def capture(self, model, stream: torch.cuda.Stream | None = None) -> dict[int, CapturedGraph]:
        """model(input_ids, positions) for every bucket, largest first so that smaller graphs reuse the
        pool; captured with empty sequences, so the warm-up runs store nothing. See capture()
        for `stream` (default: side_stream())."""
        graphs = {}
        stream = stream or side_stream(self.input_ids.device)
        for bucket in reversed(self.buckets):
            def forward():
                set_context(self.context(bucket))
                return model(self.input_ids[:bucket], self.positions[:bucket])
            graphs[bucket] = capture(forward, self.pool, stream)
            self.pool = graphs[bucket].graph.pool()
        reset_context()
        return graphs

    def load(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: Context, block_tables: torch.Tensor) -> int:
        """Copies a prompt batch (its context ctx, a block table for every sequence) into the static
        inputs and returns the bucket to replay."""
        num_tokens, num_seqs = input_ids.size(0), ctx.cu_seqlens_q.size(0) - 1
        bucket = self.bucket_for(num_tokens, num_seqs)
        self.input_ids[:num_tokens] = input_ids
        self.positions[:num_tokens] = positions
        self.slot_mapping[:num_tokens] = ctx.slot_mapping
        self.slot_mapping[num_tokens:bucket].fill_(-1)
        self.cu_seqlens_q[:num_seqs + 1] = ctx.cu_seqlens_q
        self.cu_seqlens_q[num_seqs + 1:].fill_(num_tokens)
        self.cu_seqlens_k[:num_seqs + 1] = ctx.cu_seqlens_k
        self.block_tables[:num_seqs, :block_tables.size(1)] = block_tables
        return bucket
