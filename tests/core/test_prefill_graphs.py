"""The static inputs of captured prefills, on CPU: buckets, padding and the batches left eager."""
import torch

from nanovllm.engine.graphs import PREFILL_GRAPH_TOKENS, PrefillGraphs, prefill_buckets
from nanovllm.utils.context import Context


def test_buckets_end_at_the_token_budget_or_the_largest_graph():
    assert prefill_buckets(16384) == list(PREFILL_GRAPH_TOKENS)
    assert prefill_buckets(4096) == list(PREFILL_GRAPH_TOKENS)
    assert prefill_buckets(300) == [16, 32, 64, 128, 256, 300]
    assert prefill_buckets(8) == [8]


def test_bucket_holds_the_tokens_and_the_sequences():
    graphs = PrefillGraphs(prefill_buckets(16384), 512, 4, torch.device("cpu"))
    assert graphs.bucket_for(1, 1) == 16
    assert graphs.bucket_for(16, 8) == 16
    assert graphs.bucket_for(16, 9) == 256  # 16 tokens hold 8 sequences; 256 tokens, 16
    assert graphs.bucket_for(500, 3) == 512
    assert graphs.bucket_for(4096, 256) == 4096
    assert graphs.bucket_for(4097, 1) is None
    assert graphs.bucket_for(100, 257) is None
    assert PrefillGraphs([16, 4096], 10, 4, torch.device("cpu")).seqs_in(4096) == 10


def test_load_pads_with_unstored_tokens_and_empty_sequences():
    graphs = PrefillGraphs([16, 32], 64, 4, torch.device("cpu"))
    graphs.slot_mapping.fill_(7)
    graphs.cu_seqlens_q.fill_(99)
    # Two prompts of 12 and 8 tokens, the second behind a cached block of 16.
    ctx = Context(is_prefill=True, cu_seqlens_q=torch.tensor([0, 12, 20], dtype=torch.int32),
                  cu_seqlens_k=torch.tensor([0, 12, 36], dtype=torch.int32), slot_mapping=torch.arange(100, 120))
    tables = torch.tensor([[3, -1], [5, 6]], dtype=torch.int32)
    bucket = graphs.load(torch.arange(20), torch.arange(20) + 1, ctx, tables)
    assert bucket == 32
    assert graphs.input_ids[:20].tolist() == list(range(20))
    assert graphs.positions[:20].tolist() == list(range(1, 21))
    assert graphs.slot_mapping[:20].tolist() == list(range(100, 120))
    assert graphs.slot_mapping[20:32].tolist() == [-1] * 12
    assert graphs.cu_seqlens_q.tolist() == [0, 12, 20] + [20] * (graphs.seqs_in(32) - 2)
    assert graphs.cu_seqlens_k[:3].tolist() == [0, 12, 36]
    assert graphs.block_tables[:2, :2].tolist() == [[3, -1], [5, 6]]
    ctx = graphs.context(bucket)
    assert ctx.is_prefill and ctx.slot_mapping.numel() == 32 and ctx.cu_seqlens_q.numel() == graphs.seqs_in(32) + 1
    assert ctx.block_tables.size(0) == graphs.seqs_in(32)
