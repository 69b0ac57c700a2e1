"""Kernels alone (CUDA only): the Triton paged decode attention (--attention-kernel) and the sampler
(--sampler)."""
import torch

from benchmarks.floor import copy_bytes_per_s
from benchmarks.report import print_table
from nanovllm import SamplingParams
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.step_inputs import sampling_inputs
from nanovllm.kernels.attention import longest_first, paged_decode
from nanovllm.layers.sampler import Sampler
from nanovllm.tools.make_model import VOCAB_SIZE
from nanovllm.utils.timing import median_replay_ms

# --attention-kernel: layers' caches per graph replay, over which the replay's launch is spread.
ATTENTION_LAYERS = 8
SAMPLER_MODES = {
    "plain": [SamplingParams(temperature=0.7)],
    "greedy": [SamplingParams(temperature=0.0)],
    "seeded": [SamplingParams(temperature=0.7, seed=0)],
    "top_k50": [SamplingParams(temperature=0.7, top_k=50)],
    "top_p0.9": [SamplingParams(temperature=0.7, top_p=0.9)],
    "mixed": [SamplingParams(temperature=0.7), SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, seed=1),
              SamplingParams(temperature=0.7, top_k=50), SamplingParams(temperature=0.7, top_p=0.9)],
}


def attention(args) -> list[dict]:
    """The Triton paged decode kernel alone, Qwen3-0.6B heads (16 q / 8 kv, head_dim 128), bf16 queries,
    block size 256, on random K/V spread over shuffled blocks, with a bf16 and a float8 cache (float8:
    at each tile size in --fp8-tiles): its K+V read rate, counting the bytes the cache holds, against the
    copy rate. As in a decode step's CUDA graph, one replay runs the kernel over ATTENTION_LAYERS layers'
    caches with the longest-first order computed once, and L2 is overwritten before each replay; the
    time per layer is the replay's divided by the layers."""
    bandwidth = copy_bytes_per_s()
    heads, kv_heads, head_dim, block = 16, 8, 128, 256
    l2_flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    variants = [(torch.bfloat16, None)] + [(torch.float8_e4m3fn, int(t)) for t in args.fp8_tiles.split(",")]
    rows = []
    for cache_dtype, tile_n in variants:
        scales = torch.full((2, kv_heads), 0.01, device="cuda") if cache_dtype == torch.float8_e4m3fn else None
        for batch in (1, 64, 256):
            for context in (1024, 2048, 4096):
                blocks = batch * context // block
                caches = [torch.randn(blocks, 2, block, kv_heads, head_dim, dtype=torch.bfloat16,
                                      device="cuda").to(cache_dtype) for _ in range(ATTENTION_LAYERS)]
                tables = torch.randperm(blocks, device="cuda").view(batch, -1).int()
                lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
                q = torch.randn(batch, heads, head_dim, dtype=torch.bfloat16, device="cuda")
                order = longest_first(lens)

                def decode():
                    for kv in caches:
                        paged_decode(q, kv[:, 0], kv[:, 1], tables, lens, head_dim ** -0.5, tile_n=tile_n,
                                     kv_scales=scales, order=order)

                decode()  # compile outside the graph
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    decode()
                ms = median_replay_ms({"decode": graph.replay}, repeats=args.repeats,
                                      before=l2_flush.zero_)["decode"] / ATTENTION_LAYERS
                read = caches[0].numel() * caches[0].element_size()
                rows.append({"cache": str(cache_dtype).removeprefix("torch."), "tile_n": tile_n or "default",
                             "batch": batch, "context": context, "us": ms * 1e3, "TB/s": read / ms / 1e9,
                             "of_copy_rate": read / (ms / 1e3) / bandwidth})
                del caches, graph
    print(f"\nTriton paged decode attention, per layer of {ATTENTION_LAYERS} in a graph; copy rate "
          f"{bandwidth / 1e12:.2f} TB/s; device {torch.cuda.get_device_name()}")
    print_table(rows, list(rows[0].keys()))
    return rows


def sampler(args) -> list[dict]:
    """The sampler alone on bf16 logits over Qwen3's vocabulary, its inputs built beforehand. Plain,
    greedy and seeded batches take the fused kernel; a batch with any top-k or top-p row cuts the
    logits in torch first. Rows of a mixed batch cycle through the other modes' params."""
    sample = Sampler()
    sample.warm_up(VOCAB_SIZE, torch.bfloat16, torch.device("cuda"))

    def to_cuda(values, dtype):
        return torch.tensor(values, dtype=dtype, device="cuda")

    rows = []
    for batch in (1, 64, 256, 512):
        logits = (torch.randn(batch, VOCAB_SIZE, device="cuda") * 3).bfloat16()
        inputs = {mode: sampling_inputs([Sequence([0], params[i % len(params)]) for i in range(batch)], to_cuda)
                  for mode, params in SAMPLER_MODES.items()}
        ms = median_replay_ms({mode: lambda x=x: sample(logits, x) for mode, x in inputs.items()},
                              repeats=args.repeats)
        rows.append({"batch": batch, **{f"{mode}_us": t * 1e3 for mode, t in ms.items()}})
    print(f"\nsampler over {VOCAB_SIZE} tokens, median of {args.repeats} event-timed calls; "
          f"device {torch.cuda.get_device_name()}")
    print_table(rows, list(rows[0].keys()))
    return rows
