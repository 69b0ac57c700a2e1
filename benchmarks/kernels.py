"""Kernels alone (CUDA only): the Triton paged decode attention (--attention-kernel), the fused decode
step's GEMMs (--decode-gemms) and the sampler (--sampler)."""
import torch

from benchmarks.floor import copy_bytes_per_s
from benchmarks.report import print_table
from nanovllm import SamplingParams
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.step_inputs import sampling_inputs
from nanovllm.kernels import decode_linear
from nanovllm.kernels.attention import longest_first, paged_decode
from nanovllm.layers.sampler import Sampler
from nanovllm.tools.make_model import PRESETS, VOCAB_SIZE
from nanovllm.utils.timing import median_replay_ms

# --attention-kernel: layers' caches per graph replay, over which the replay's launch is spread.
ATTENTION_LAYERS = 8
# --decode-gemms: distinct weights per graph replay, likewise.
GEMM_LAYERS = 8
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


def decode_gemms(args) -> list[dict]:
    """The fused decode step's four GEMMs of a layer alone (kernels/decode_linear.py), bf16, on the layer
    shapes of each of --presets at each of --batches rows: as the fused step runs them (RMSNorm + qkv,
    o_proj + residual, RMSNorm + gate/up + SiLU·mul, down + residual) and plain (the same weight, nothing
    fused), against the time of the weight bytes at the copy rate. One replay runs GEMM_LAYERS of them on
    distinct weights, after L2 is overwritten; the time per GEMM is the replay's divided by GEMM_LAYERS."""
    presets = args.presets.split(",")
    unknown = sorted(set(presets) - set(PRESETS))
    if unknown:
        raise SystemExit(f"--decode-gemms: unknown --presets {unknown}; choose from {sorted(PRESETS)}")
    bandwidth = copy_bytes_per_s()
    l2_flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    dtype, device, eps = torch.bfloat16, torch.device("cuda"), 1e-6
    rows = []
    for preset in presets:
        shape = PRESETS[preset]
        hidden, inner, head_dim = shape["hidden_size"], shape["intermediate_size"], shape["head_dim"]
        q_size = shape["num_attention_heads"] * head_dim
        qkv_size = q_size + 2 * shape["num_key_value_heads"] * head_dim
        # name: (output columns, reduction, the fused step's prologue/epilogue)
        gemms = {"qkv": (qkv_size, hidden, "norm"), "o_proj": (hidden, q_size, "residual"),
                 "gate_up": (inner, hidden, "norm+silu"), "down": (hidden, inner, "residual")}
        for name, (n, k, fused) in gemms.items():
            silu = fused == "norm+silu"
            weights = [torch.randn(2 * n if silu else n, k, dtype=dtype, device=device) / k ** 0.5
                       for _ in range(GEMM_LAYERS)]
            norm_weight = torch.ones(k, dtype=dtype, device=device)
            for batch in args.batches:
                x = torch.randn(batch, k, dtype=dtype, device=device)
                residual = torch.randn(batch, n, dtype=dtype, device=device)

                def plain(w):
                    return decode_linear.linear(x, w)

                def as_fused(w):
                    if fused == "residual":
                        return decode_linear.linear(x, w, residual)
                    return decode_linear.norm_linear(x, norm_weight, eps, w, silu=silu)

                graphs = {}
                for variant, gemm in (("plain", plain), ("fused", as_fused)):
                    gemm(weights[0])  # compile outside the graph
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        for w in weights:
                            gemm(w)
                    graphs[variant] = graph
                ms = median_replay_ms({v: g.replay for v, g in graphs.items()}, repeats=args.repeats,
                                      before=l2_flush.zero_)
                floor_us = weights[0].numel() * weights[0].element_size() / bandwidth * 1e6
                tiles = decode_linear.tile_options(batch, n, k, silu, x.element_size(), device)
                rows.append({"preset": preset, "gemm": name, "fused": fused, "n": weights[0].size(0), "k": k,
                             "batch": batch, "fused_tiles": tile_label(tiles), "floor_us": floor_us,
                             **{f"{v}_us": t * 1e3 / GEMM_LAYERS for v, t in ms.items()},
                             **{f"{v}/floor": t * 1e3 / GEMM_LAYERS / floor_us for v, t in ms.items()}})
                del graphs
            del weights
    print(f"\nfused decode GEMMs, per GEMM of {GEMM_LAYERS} in a graph; floor: the weight bytes at the copy rate "
          f"{bandwidth / 1e12:.2f} TB/s; device {torch.cuda.get_device_name()}")
    print_table(rows, list(rows[0].keys()))
    return rows


def tile_label(tiles: dict) -> str:
    """decode_linear's tile options as 'fma 1x8x1024' or 'dot 16x64x128 s5' (rows x columns x K, stages)."""
    size = f"{tiles['BLOCK_M']}x{tiles['BLOCK_N']}x{tiles['BLOCK_K']}"
    return f"dot {size} s{tiles['num_stages']}" if tiles["DOT"] else f"fma {size}"


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
