"""Throughput, latency, decode-step, kernel and KV-quality benchmarks: the command line of benchmarks/.

python bench.py                                   # graph mode on the default workload
python bench.py --compare eager,graph,pipeline,pipeline-forced --hf-peer 32
python bench.py --compare graph,graph-sync         # async scheduling on and off (also two-gpu-sync, pd-mux-sync)
python bench.py --decode-sweep --sm-splits 56:64,48:72
python bench.py --step-profile --presets qwen3-0.6b --batches 1,8   # each kernel's share of a decode step
python bench.py --attention-kernel
python bench.py --decode-gemms --presets qwen3-8b --batches 1,8,64   # the fused step's GEMMs alone, fused and plain
python bench.py --sampler
python bench.py --persistent-chain                # a chain of GEMVs: one launch per link, or one persistent kernel
python bench.py --prefill-latency --compare graph,eager   # one prompt at a time: host and GPU time of its prefill
python bench.py --latency --compare graph-unfused,fused   # one request at a time: TTFT, time per output token
python bench.py --online --rates 2,8,32 --duration 60 --compare graph,two-gpu,pd-mux [--workload prefill-heavy]
python bench.py --online --goodput --slo-ttft-ms 500,2000 --slo-itl-ms 25,100 --rates 8,4,48 --compare graph,pd-mux
python bench.py --online --goodput --slo-ttft-ms 500,2000 --slo-itl-ms 25,100 --compare graph,pd-mux --pd-bounds-from-slo
python bench.py --workload steady --compare graph,pd-mux [--pd-max-itl-ms 30]   # 2048 requests queued at once, max_num_seqs=256
python bench.py --kv-cache-dtype auto,fp8_e4m3    # the default workload with each KV cache dtype
python bench.py --kv-quality --presets hf-parity,qwen3-0.6b,qwen3-8b
python bench.py --startup                         # where start-up time goes, first start and later ones

On CPU the defaults are smaller (listed at the end of --help) and modes run eagerly: their rows say so.
"""
import argparse
import importlib
import math

import torch

from benchmarks.common import MODES
from benchmarks.goodput import MIN_REQUESTS
from benchmarks.report import save
from benchmarks.throughput import STEADY_MAX_NUM_SEQS, STEADY_REQUESTS
from benchmarks.workloads import WORKLOADS
from nanovllm.attention.kv_quant import KV_CACHE_DTYPES

# The flag of each benchmark -> (its module in benchmarks/, function), in order of precedence; without
# any, the throughput comparison. Modules are imported when chosen: the kernels' imports Triton.
BENCHMARKS = {"attention_kernel": ("kernels", "attention"), "decode_gemms": ("kernels", "decode_gemms"),
              "sampler": ("kernels", "sampler"), "persistent_chain": ("persistent", "run"),
              "online": ("online", "run"), "latency": ("latency", "one_stream"),
              "prefill_latency": ("latency", "prefill"), "kv_quality": ("quality", "run"),
              "decode_sweep": ("sweeps", "run"), "step_profile": ("step_profile", "run"), "startup": ("startup", "run")}
GPU_ONLY = ("decode_sweep", "step_profile", "attention_kernel", "decode_gemms", "sampler", "persistent_chain",
            "hf_peer")
# Where the GPU's defaults take many minutes on CPU (the tiny preset makes tens to hundreds of tokens/s).
CPU_DEFAULTS = {"max_len": 128, "rates": "1,4", "duration": 10.0, "prompt_lens": "100,500,2000",
                "output_tokens": 32, "quality_prompts": 8, "quality_tokens": 32, "presets": "tiny"}
# --num-seqs: (default and prefill-heavy workloads, steady workload) on a GPU and on CPU.
NUM_SEQS = {"gpu": (256, STEADY_REQUESTS), "cpu": (16, 64)}


def flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def positive(kind: type, many: bool = False):
    """An argparse type: a finite number of `kind` > 0, or with `many` a comma-separated list of them."""
    what = {(int, False): "an integer >= 1", (int, True): "comma-separated integers >= 1",
            (float, False): "a number > 0", (float, True): "comma-separated numbers > 0"}[kind, many]

    def parse(text: str):
        try:
            values = [kind(v) for v in text.split(",")] if many else [kind(text)]
        except ValueError:
            values = []
        if not values or not all(0 < v < math.inf for v in values):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return values if many else values[0]
    return parse


positive_int, positive_ints = positive(int), positive(int, many=True)
positive_float, positive_floats = positive(float), positive(float, many=True)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory (default: the qwen3-0.6b random-weight preset; tiny on CPU)")
    p.add_argument("--compare", default="graph", help=f"comma-separated modes from {list(MODES)}")
    p.add_argument("--num-seqs", type=int, help="requests (default {}; {} for --workload steady; on CPU {} and {})"
                   .format(*NUM_SEQS["gpu"], *NUM_SEQS["cpu"]))
    p.add_argument("--min-len", type=int, help="default: 100, or --max-len if that is less")
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workload", default="default", choices=WORKLOADS,
                   help="prefill-heavy: prompts of 1000-4000 tokens, outputs of 50-200; steady: "
                        f"{STEADY_REQUESTS} requests queued at once, max_num_seqs={STEADY_MAX_NUM_SEQS}")
    p.add_argument("--online", action="store_true", help="replay Poisson arrivals through the streaming API")
    p.add_argument("--rates", default="2,8,32", help="arrival rates (requests/s) for --online")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per rate for --online")
    p.add_argument("--pd-max-itl-ms", type=positive_float,
                   help="pd_max_itl_ms of the pd-mux modes (default: the engine's, 1.5x the full-GPU decode step)")
    p.add_argument("--pd-max-ttft-ms", type=positive_float, help="pd_max_ttft_ms of the pd-mux modes (default: the "
                   "engine's, the full-GPU prefill of a full token budget)")
    p.add_argument("--slo-ttft-ms", type=positive_floats,
                   help="--online: bounds on the TTFT p99, comma-separated, paired in order with --slo-itl-ms")
    p.add_argument("--slo-itl-ms", type=positive_floats, help="--online: bounds on the ITL p99, comma-separated")
    p.add_argument("--goodput", action="store_true",
                   help="--online: per mode and SLO pair, the highest Poisson rate that meets it; the search starts "
                        "at the first of --rates and stays within the smallest and the largest")
    p.add_argument("--pd-bounds-from-slo", action="store_true",
                   help="--goodput: each pd-mux mode runs once per SLO pair, with its bounds as pd_max_ttft_ms and "
                        "pd_max_itl_ms")
    p.add_argument("--goodput-requests", type=int, default=MIN_REQUESTS,
                   help=f"--goodput: measured requests per rate (default {MIN_REQUESTS}, the fewest for a p99)")
    p.add_argument("--goodput-warmup", type=positive_float, default=10.0,
                   help="--goodput: seconds of arrivals per rate before the measured requests; a rate whose "
                        "requests live longer misses (lifetime)")
    p.add_argument("--goodput-resolution", type=positive_float, default=0.2,
                   help="--goodput: the most by which neighbouring rates of the search differ (0.2: 20%%)")
    p.add_argument("--hf-peer", type=int, default=0, help="also run transformers' generate on this many seqs")
    p.add_argument("--decode-sweep", action="store_true")
    p.add_argument("--step-profile", action="store_true",
                   help="trace decode-step graphs: each kernel's launches and time per layer (--presets, --batches, "
                        "the first of --contexts)")
    p.add_argument("--attention-kernel", action="store_true", help="time the Triton decode attention kernel")
    p.add_argument("--decode-gemms", action="store_true",
                   help="time the fused decode step's GEMMs alone, fused and plain, on --presets at --batches rows")
    p.add_argument("--sampler", action="store_true", help="time the sampler alone per batch and option")
    p.add_argument("--persistent-chain", action="store_true",
                   help="a chain of one-row GEMVs: dependent launches, or one persistent kernel with grid barriers")
    p.add_argument("--startup", action="store_true",
                   help="where start-up time goes: fresh processes, the first with an empty kernel cache")
    p.add_argument("--prefill-latency", action="store_true",
                   help="host and device time of one prompt's prefill per --compare mode and --prompt-lens")
    p.add_argument("--prompt-lens", type=positive_ints, default="100,500,2000,4000,8000",
                   help="comma-separated prompt lengths (integers >= 1) for --prefill-latency")
    p.add_argument("--latency", action="store_true",
                   help="one request at a time per --compare mode: TTFT, time per output token and its floor")
    p.add_argument("--prompt-tokens", type=positive_int, default=128, help="prompt length for --latency")
    p.add_argument("--output-tokens", type=positive_int, default=512,
                   help="output tokens per request for --latency (at least 2)")
    p.add_argument("--fp8-tiles", default="64,128", help="--attention-kernel: tile sizes to time the float8 cache at")
    p.add_argument("--kv-cache-dtype", default="auto",
                   help=f"comma-separated KV cache dtypes from {list(KV_CACHE_DTYPES)} (workload, sweep, --latency)")
    p.add_argument("--kv-quality", action="store_true",
                   help="float8 KV cache quality against the model's dtype on --presets "
                        "(hf-parity: the test suite's checkpoints)")
    p.add_argument("--quality-prompts", type=int, default=64)
    p.add_argument("--quality-tokens", type=int, default=128)
    p.add_argument("--presets", default="qwen3-0.6b,qwen3-8b")
    p.add_argument("--batches", type=positive_ints, default="1,8,64,256,512",
                   help="comma-separated batch sizes (integers >= 1) for --decode-sweep, --step-profile and --decode-gemms")
    p.add_argument("--contexts", type=positive_ints, default="256,1024,4096",
                   help="comma-separated context lengths (integers >= 1) for --decode-sweep (--step-profile: the first)")
    p.add_argument("--sm-splits", default="", help="pipeline partitions to sweep, e.g. 56:64,48:72")
    p.add_argument("--whole-gpu-grids", action="store_true",
                   help="also sweep each split with attention grids sized for the whole GPU")
    p.add_argument("--sweep-memory", type=float, default=0.7, help="gpu_memory_utilization in the sweep")
    p.add_argument("--sweep-max-model-len", type=positive_int,
                   help="max_model_len of the engine of --decode-sweep and --step-profile (default: the longest of "
                        "--contexts + 1); it sets the block tables' width and so the decode attention's splits")
    p.add_argument("--repeats", type=positive_int, default=10,
                   help="what each median is taken over: requests, prompts or graph replays")
    p.add_argument("--json")
    p.add_argument("--plot")
    if not torch.cuda.is_available():
        p.set_defaults(**CPU_DEFAULTS)
        p.epilog = "defaults on CPU: " + ", ".join(f"{flag(dest)} {v}" for dest, v in CPU_DEFAULTS.items())
    return p


def main():
    p = parser()
    args = p.parse_args()
    device = "gpu" if torch.cuda.is_available() else "cpu"
    if args.num_seqs is None:
        args.num_seqs = NUM_SEQS[device][args.workload == "steady"]
    if args.min_len is None:
        args.min_len = min(100, args.max_len)
    if args.min_len > args.max_len:
        p.error(f"--min-len {args.min_len} is more than --max-len {args.max_len}")
    if args.output_tokens < 2:
        p.error("--output-tokens must be at least 2: the time per output token is taken after the first")
    for dest, choices in (("compare", MODES), ("kv_cache_dtype", KV_CACHE_DTYPES)):
        unknown = set(getattr(args, dest).split(",")) - set(choices)
        if unknown:
            p.error(f"unknown {flag(dest)} {sorted(unknown)}; choose from {list(choices)}")
    if device == "cpu" and any(getattr(args, dest) for dest in GPU_ONLY):
        p.error(f"{', '.join(map(flag, GPU_ONLY[:-1]))} and {flag(GPU_ONLY[-1])} need a CUDA device")
    if args.sweep_max_model_len is not None and args.sweep_max_model_len <= max(args.contexts):
        p.error(f"--sweep-max-model-len {args.sweep_max_model_len} must exceed the longest of --contexts "
                f"({max(args.contexts)})")
    if args.goodput and not args.online:
        p.error("--goodput needs --online")
    if args.pd_bounds_from_slo and not args.goodput:
        p.error("--pd-bounds-from-slo needs --goodput")
    if args.pd_bounds_from_slo and (args.pd_max_itl_ms or args.pd_max_ttft_ms):
        p.error("--pd-bounds-from-slo sets pd_max_itl_ms and pd_max_ttft_ms from each SLO pair: "
                "leave out --pd-max-itl-ms and --pd-max-ttft-ms")
    chosen = next((dest for dest in BENCHMARKS if getattr(args, dest)), None)
    if args.plot and chosen not in (None, "online", "decode_sweep"):
        p.error("--plot draws the results of the throughput comparison, --online and --decode-sweep only")
    module, function = BENCHMARKS.get(chosen, ("throughput", "run"))
    rows = getattr(importlib.import_module(f"benchmarks.{module}"), function)(args)
    save(rows, args.json, args.plot)


if __name__ == "__main__":
    main()
