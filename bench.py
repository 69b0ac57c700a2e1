"""Throughput and decode-step benchmarks.

python bench.py                                   # graph mode on the default workload
python bench.py --compare eager,graph,pipeline,pipeline-forced --hf-peer 32
python bench.py --compare graph,graph-sync         # async scheduling on and off (also two-gpu-sync, pd-mux-sync)
python bench.py --decode-sweep --sm-splits 56:64,48:72
python bench.py --attention-kernel
python bench.py --sampler
python bench.py --prefill-latency --compare graph,eager   # one prompt at a time: host and GPU time of its prefill
python bench.py --online --rates 2,8,32 --duration 60 --compare graph,two-gpu,pd-mux [--workload prefill-heavy]
python bench.py --workload steady --compare graph,pd-mux [--pd-max-itl-ms 30]   # 2048 requests queued at once, max_num_seqs=256
python bench.py --kv-cache-dtype auto,fp8_e4m3    # the default workload with each KV cache dtype
python bench.py --kv-quality --presets hf-parity,qwen3-0.6b,qwen3-8b
"""
import argparse
import gc
import json
import tempfile
import time
from collections import deque
from random import Random

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig

from nanovllm import LLM, SamplingParams
from nanovllm.attention.kv_quant import KV_CACHE_DTYPES
from nanovllm.engine.cuda_graph import DecodeGraphs, sequential_forward
from nanovllm.engine.sampling_inputs import sampling_inputs
from nanovllm.engine.sequence import Sequence
from nanovllm.layers.sampler import Sampler
from nanovllm.pipeline.green_manager import GreenContextManager
from nanovllm.pipeline.paths import pipeline_wins
from nanovllm.pipeline.scheduler import PipelineScheduler
from nanovllm.pipeline.stats import BucketTiming
from nanovllm.tools.floor import ScheduleFloor, copy_bytes_per_s, gemm_flops_per_s
from nanovllm.tools.kv_quality import measure, reference_run
from nanovllm.tools.make_model import VOCAB_SIZE, default_preset, ensure_model
from nanovllm.utils.timing import median_replay_ms

MODES = {
    "eager": {"enforce_eager": True},
    "graph": {},
    "graph-sync": {"async_scheduling": False},
    "pipeline": {"enable_pipeline": True},
    "pipeline-forced": {"enable_pipeline": True, "pipeline_force": True},
    "two-gpu": {"enable_two_gpu_pd": True},
    "two-gpu-sync": {"enable_two_gpu_pd": True, "async_scheduling": False},
    "pd-mux": {"enable_pd_multiplexing": True},
    "pd-mux-sync": {"enable_pd_multiplexing": True, "async_scheduling": False},
}
WORKLOADS = ("default", "prefill-heavy", "steady")
# The steady workload: this many requests of the default lengths, all queued at the start, at most
# STEADY_MAX_NUM_SEQS decoding, so that prefills keep arriving while others decode.
STEADY_REQUESTS = 2048
STEADY_MAX_NUM_SEQS = 256
# --attention-kernel: layers' caches per graph replay, over which the replay's launch is spread.
ATTENTION_LAYERS = 8


def mode_options(mode: str) -> dict:
    """The LLM options of a mode; two-gpu takes GPUs 0 and 1, or runs same-device mode on one device."""
    options = dict(MODES[mode])
    if options.get("enable_two_gpu_pd"):
        decode_device = 1 if torch.cuda.device_count() >= 2 else 0
        if decode_device == 0:
            print("[bench] two-gpu: fewer than 2 GPUs here, running same-device mode (both runners on one device)")
        options.update(prefill_device_id=0, decode_device_id=decode_device)
    return options


def new_llm(model: str, mode: str, options: dict) -> LLM:
    options = {**mode_options(mode), **options}
    if not options.get("enable_pd_multiplexing"):
        options.pop("pd_max_itl_ms", None)  # --pd-max-itl-ms is for the multiplexing modes only
    llm = LLM(model, **options)
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up
    return llm


def request_lengths(args) -> tuple[tuple[int, int], tuple[int, int]]:
    """(prompt, output) length ranges of the workload."""
    if args.workload == "prefill-heavy":
        return (1000, 4000), (50, 200)
    return (args.min_len, args.max_len), (args.min_len, args.max_len)


def random_request(rng: Random, args, vocab_size: int) -> tuple[list[int], SamplingParams]:
    (min_in, max_in), (min_out, max_out) = request_lengths(args)
    top = min(10000, vocab_size - 1)
    prompt = [rng.randint(0, top) for _ in range(rng.randint(min_in, max_in))]
    return prompt, SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=rng.randint(min_out, max_out))


def workload(args, vocab_size: int) -> tuple[list[list[int]], list[SamplingParams]]:
    rng = Random(args.seed)
    requests = [random_request(rng, args, vocab_size) for _ in range(args.num_seqs)]
    return [prompt for prompt, _ in requests], [params for _, params in requests]


def max_model_len(args) -> int:
    (_, max_in), (_, max_out) = request_lengths(args)
    return max_in + max_out + 16


def engine_options(args, **options) -> dict:
    return {"max_model_len": max_model_len(args), "pd_max_itl_ms": args.pd_max_itl_ms, **options}


def uses_pd(llm: LLM) -> bool:
    return llm.config.enable_two_gpu_pd or llm.config.enable_pd_multiplexing


def free_gpu() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_mode(model: str, mode: str, prompts, params, options: dict, ceilings: tuple[float, float] | None) -> dict:
    """One engine of this mode on the workload. With the device's ceilings (copy bytes/s, matrix
    FLOP/s), also the floor of the schedule it ran and the run's time over it (single-device modes)."""
    start = time.perf_counter()
    llm = new_llm(model, mode, options)
    startup = time.perf_counter() - start
    devices = {runner.device for runner in llm.runners}
    floor = ScheduleFloor(llm, *ceilings) if ceilings and len(devices) == 1 else None
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=True)
    seconds = time.perf_counter() - start
    tokens = sum(p.max_tokens for p in params)
    result = {"mode": mode, "kv_cache": llm.config.kv_cache_dtype, "startup_s": startup, "output_tokens": tokens,
              "seconds": seconds, "tok_per_s": tokens / seconds}
    if floor:
        result.update({"floor_s": floor.seconds, "s/floor": seconds / floor.seconds})
    print(f"[bench] {mode}, kv_cache_dtype={llm.config.kv_cache_dtype}: {tokens} tokens in {seconds:.2f} s = "
          f"{tokens / seconds:.0f} tok/s" + (f", {seconds / floor.seconds:.2f}x its floor of {floor.seconds:.2f} s"
                                             if floor else ""), flush=True)
    if llm.config.enable_pipeline:
        stats = llm.runners[-1].get_pipeline_statistics()  # the decode runner
        result["pipelined_buckets"] = sorted(b for b, p in stats["path_per_bucket"].items() if p == "pipeline")
    if uses_pd(llm):
        llm.print_pd_statistics()
        result["pd_statistics"] = llm.get_pd_statistics()
    llm.exit()
    del llm
    free_gpu()
    return result


def run_hf_peer(model: str, prompts, params) -> dict:
    """Hugging Face transformers' generate on the same weights, one padded batch."""
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).cuda().eval()
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device="cuda")
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device="cuda")
    new_tokens = max(p.max_tokens for p in params)
    start = time.perf_counter()
    hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = sum(p.max_tokens for p in params)
    print(f"[bench] hf-transformers: {tokens} tokens in {seconds:.2f} s = {tokens / seconds:.0f} tok/s", flush=True)
    del hf
    free_gpu()
    return {"mode": "hf-transformers", "output_tokens": tokens, "seconds": seconds, "tok_per_s": tokens / seconds}


def print_table(rows: list[dict], columns: list[str]) -> None:
    print(" | ".join(f"{c:>12}" for c in columns))
    for row in rows:
        cells = [row.get(c, "") for c in columns]
        print(" | ".join(f"{c:>12.3f}" if isinstance(c, float) else f"{str(c):>12}" for c in cells))


def steady(args) -> list[dict]:
    """Offline steady state: every request queued at once through the streaming API, at most
    STEADY_MAX_NUM_SEQS decoding; throughput, ITL and TTFT per mode, and where pd-mux spent its decode time."""
    model = args.model or str(ensure_model(default_preset()))
    prompts, params = workload(args, AutoConfig.from_pretrained(model).vocab_size)
    arrivals = [(0.0, prompt, p) for prompt, p in zip(prompts, params)]
    rows = []
    for mode in args.compare.split(","):
        llm = new_llm(model, mode, engine_options(args, max_num_seqs=STEADY_MAX_NUM_SEQS))
        row = {"mode": mode, **replay(llm, arrivals)}
        if uses_pd(llm):
            llm.print_pd_statistics()
            shares = llm.get_pd_statistics().get("decode_time_share_per_split", {})
            row["split_time_share"] = ", ".join(f"{split}: {100 * share:.0f}%" for split, share in shares.items())
        first = rows[0] if rows else row
        row["ratio"] = row["tok_per_s"] / first["tok_per_s"]
        mid = row["tok_per_s_mid"], first["tok_per_s_mid"]
        row["mid_ratio"] = mid[0] / mid[1] if all(mid) else None
        print(f"[bench] {mode}: {row['tok_per_s']:.0f} tok/s, ITL p99 {row['itl_p99_ms'] or 0:.1f} ms", flush=True)
        rows.append(row)
        llm.exit()
        del llm
        free_gpu()
    print(f"\nsteady: {args.num_seqs} requests queued at once, max_num_seqs={STEADY_MAX_NUM_SEQS}, "
          f"{describe_workload(args)}; model {model}; device {device_name()}")
    print("ratio: tok/s over the first mode's; tok_per_s_mid: over the middle half of the output tokens (mid_ratio "
          "likewise); tokens_per_step: output tokens per step() that returned any; split_time_share: pd-mux's decode "
          "time per SM split")
    print_table(rows, ["mode", "requests", "seconds", "tok_per_s", "ratio", "tok_per_s_mid", "mid_ratio",
                       "tokens_per_step", "itl_p50_ms", "itl_p99_ms", "itl_max_ms", "ttft_p50_s", "ttft_p99_s",
                       "split_time_share"])
    return rows


def compare(args) -> list[dict]:
    if args.workload == "steady":
        return steady(args)
    if not torch.cuda.is_available():
        print("[bench] no CUDA device: these are CPU numbers, not comparable with the GPU figures in docs/benchmarks.md")
    model = args.model or str(ensure_model(default_preset()))
    prompts, params = workload(args, AutoConfig.from_pretrained(model).vocab_size)
    options = engine_options(args)
    ceilings = (copy_bytes_per_s(), gemm_flops_per_s()) if torch.cuda.is_available() else None
    if ceilings:
        print(f"[bench] ceilings: copy {ceilings[0] / 1e12:.2f} TB/s (read + write), bf16 matrix {ceilings[1] / 1e12:.0f} TFLOP/s")
    rows = [run_mode(model, mode, prompts, params, {**options, "kv_cache_dtype": kv}, ceilings)
            for kv in args.kv_cache_dtype.split(",") for mode in args.compare.split(",")]
    compared = len(rows)
    if args.hf_peer:
        peer = slice(0, args.hf_peer)
        ours = run_mode(model, "graph", prompts[peer], params[peer], options, ceilings)
        ours["mode"] = f"graph-{args.hf_peer}seqs"
        rows += [ours, run_hf_peer(model, prompts[peer], params[peer])]
        rows[-1]["ratio"] = ours["tok_per_s"] / rows[-1]["tok_per_s"]
    for row in rows[:compared]:
        row["ratio"] = row["tok_per_s"] / rows[0]["tok_per_s"]
    print(f"\nworkload: {args.num_seqs} seqs, {describe_workload(args)}; model {model}; device {device_name()}")
    print("ratio: tok/s over the first row's (for hf-transformers: nanovllm graph over transformers on the same seqs)")
    print("s/floor: seconds over the floor of the schedule each run executed (bytes at the copy rate, FLOPs at the matrix rate, per step)")
    print_table(rows, ["mode", "kv_cache", "startup_s", "output_tokens", "seconds", "tok_per_s", "floor_s", "s/floor",
                       "ratio"])
    return rows


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def describe_workload(args) -> str:
    (min_in, max_in), (min_out, max_out) = request_lengths(args)
    return (f"{args.workload} workload: input lengths uniform in [{min_in}, {max_in}], output lengths in "
            f"[{min_out}, {max_out}], seed {args.seed}, ignore_eos")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def poisson_arrivals(args, rate: float, vocab_size: int) -> list[tuple[float, list[int], SamplingParams]]:
    """Requests arriving at `rate` per second for args.duration seconds, seeded by args.seed."""
    rng = Random(args.seed)
    arrivals, t = [], rng.expovariate(rate)
    while t < args.duration:
        arrivals.append((t, *random_request(rng, args, vocab_size)))
        t += rng.expovariate(rate)
    return arrivals


def replay(llm: LLM, arrivals) -> dict:
    """Feeds the arrivals through the streaming API in real time; every time is taken when step()
    returns the tokens. TTFT counts from the scheduled arrival, so it includes any queueing.
    Steps taken while every request had its first token (no prefill queued or running) give the
    decode step time without prefills that the ITL is judged against, with their batch sizes; each
    gap is also divided by that time at the batch of the step that ended it (itl_p99/same_batch_step).
    tok_per_s_mid counts the middle half of the output tokens only, away from the first fill and
    the final drain."""
    pending, arrival, last_seen = deque(arrivals), {}, {}
    ttft, itl, itl_batch, num_tokens, completed = [], [], [], 0, 0
    progress = []  # (seconds, output tokens so far) after each step with outputs
    decode_only_ms, decode_only_batch = [], []
    start = time.perf_counter()
    while pending or llm.has_unfinished_requests():
        now = time.perf_counter() - start
        while pending and pending[0][0] <= now:
            at, prompt, params = pending.popleft()
            arrival[llm.add_request(prompt, params)] = at
        if not llm.has_unfinished_requests():
            time.sleep(pending[0][0] - now)
            continue
        without_prefills = len(ttft) == len(arrival)
        step_start = time.perf_counter()
        outputs = llm.step()
        if without_prefills and outputs:
            decode_only_ms.append(1e3 * (time.perf_counter() - step_start))
            decode_only_batch.append(len(outputs))
        now = time.perf_counter() - start
        for request_id, new_token_ids, finished in outputs:
            num_tokens += len(new_token_ids)
            if request_id in last_seen:
                itl += [(now - last_seen[request_id]) / len(new_token_ids)] * len(new_token_ids)
                itl_batch += [len(outputs)] * len(new_token_ids)
            else:
                ttft.append(now - arrival[request_id])
                itl += [0.0] * (len(new_token_ids) - 1)
                itl_batch += [len(outputs)] * (len(new_token_ids) - 1)
            last_seen[request_id] = now
            completed += finished
        if outputs:
            progress.append((now, num_tokens))
    seconds = time.perf_counter() - start
    ms = [1e3 * v for v in itl]
    step_ms = decode_step_by_batch(decode_only_batch, decode_only_ms)
    same_batch = [gap / step_ms(batch) for gap, batch in zip(ms, itl_batch)] if step_ms else []
    return {"requests": len(arrivals), "seconds": seconds, "req_per_s": completed / seconds,
            "tok_per_s": num_tokens / seconds, "ttft_p50_s": percentile(ttft, 0.5), "ttft_p99_s": percentile(ttft, 0.99),
            "itl_p50_ms": percentile(ms, 0.5), "itl_p99_ms": percentile(ms, 0.99), "itl_max_ms": max(ms, default=None),
            "decode_only_steps": len(decode_only_ms), "decode_only_step_p50_ms": percentile(decode_only_ms, 0.5),
            "decode_only_batch_p50": percentile(decode_only_batch, 0.5),
            "itl_p99/same_batch_step": percentile(same_batch, 0.99),
            "tokens_per_step": num_tokens / len(progress) if progress else None, "tok_per_s_mid": middle_rate(progress)}


def decode_step_by_batch(batches: list[int], step_ms: list[float]):
    """The decode step time without prefills as a function of the batch: the least-squares line through
    the decode-only steps; None with fewer than two batch sizes among them."""
    if len(set(batches)) < 2:
        return None
    mean_b, mean_ms = sum(batches) / len(batches), sum(step_ms) / len(step_ms)
    slope = (sum((b - mean_b) * (t - mean_ms) for b, t in zip(batches, step_ms))
             / sum((b - mean_b) ** 2 for b in batches))
    return lambda batch: mean_ms + slope * (batch - mean_b)


def middle_rate(progress: list[tuple[float, int]]) -> float | None:
    """Tokens per second between the steps that passed a quarter and three quarters of the tokens."""
    if not progress:
        return None
    total = progress[-1][1]
    (t0, n0), (t1, n1) = (next(p for p in progress if p[1] >= share * total) for share in (0.25, 0.75))
    return (n1 - n0) / (t1 - t0) if t1 > t0 else None


def online(args) -> list[dict]:
    """Poisson arrivals at each rate through each mode's engine, in process."""
    model = args.model or str(ensure_model(default_preset()))
    vocab_size = AutoConfig.from_pretrained(model).vocab_size
    rates = [float(r) for r in args.rates.split(",")]
    rows = []
    for mode in args.compare.split(","):
        llm = new_llm(model, mode, engine_options(args))
        for rate in rates:
            row = {"mode": mode, "rate": rate, **replay(llm, poisson_arrivals(args, rate, vocab_size))}
            if row["itl_p99_ms"] and row["decode_only_step_p50_ms"]:
                row["itl_p99/decode_step"] = row["itl_p99_ms"] / row["decode_only_step_p50_ms"]
            print(f"[bench] {mode} at {rate:g} req/s: {row['req_per_s']:.2f} req/s, {row['tok_per_s']:.0f} tok/s, "
                  f"ITL p99 {row['itl_p99_ms'] or 0:.1f} ms", flush=True)
            rows.append(row)
        if uses_pd(llm):
            llm.print_pd_statistics()
        llm.exit()
        del llm
        free_gpu()
    print(f"\nonline: Poisson arrivals for {args.duration:g} s per rate, {describe_workload(args)}; model {model}; "
          f"device {device_name()}")
    print("decode_only_*: the steps taken with no prefill queued or running (their count, median time and batch);"
          " itl_p99/decode_step: the ITL p99 over that median; itl_p99/same_batch_step: the p99 of each gap over"
          " the decode-only step time at its step's batch (a line fitted through the decode-only steps)")
    print_table(rows, ["mode", "rate", "requests", "req_per_s", "tok_per_s", "ttft_p50_s", "ttft_p99_s",
                       "itl_p50_ms", "itl_p99_ms", "itl_max_ms", "decode_only_steps", "decode_only_step_p50_ms",
                       "decode_only_batch_p50", "itl_p99/decode_step", "itl_p99/same_batch_step"])
    return rows


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def prefill_latency(args) -> list[dict]:
    """One prompt at a time on an otherwise idle engine of each mode: the host time of the step()
    that launches its prefill, and the time until the device has run it; medians of --repeats prompts,
    each different from the others (no prefix-cache hits)."""
    model = args.model or str(ensure_model(default_preset()))
    top = min(10000, AutoConfig.from_pretrained(model).vocab_size - 1)
    lengths = args.prompt_lens
    rows = []
    for mode in args.compare.split(","):
        llm = new_llm(model, mode, engine_options(args, max_model_len=max(lengths) + 16))
        rng = Random(args.seed)
        for n in lengths:
            host, done = [], []
            for _ in range(args.repeats):
                llm.add_request([rng.randint(0, top) for _ in range(n)], SamplingParams(max_tokens=1))
                synchronize()
                start = time.perf_counter()
                llm.step()
                host.append(1e3 * (time.perf_counter() - start))
                synchronize()
                done.append(1e3 * (time.perf_counter() - start))
                while llm.has_unfinished_requests():
                    llm.step()
            rows.append({"mode": mode, "prompt_tokens": n, "host_ms": percentile(host, 0.5),
                         "done_ms": percentile(done, 0.5)})
        llm.exit()
        del llm
        free_gpu()
    print(f"\nprefill latency: one prompt at a time, medians of {args.repeats}; model {model}; device {device_name()}")
    print("host_ms: the step() that launches the prefill; done_ms: until the device has run it")
    print_table(rows, ["mode", "prompt_tokens", "host_ms", "done_ms"])
    return rows


def step_floor_ms(llm: LLM, batch: int, context: int, bandwidth: float, weight_reads: int = 1) -> float:
    """Fewest bytes a decode step moves (the layers' weights weight_reads times, every sequence's K
    and V once) over the copy bandwidth."""
    runner = llm.model_runner
    weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.model.layers.parameters())
    kv_bytes = batch * context * runner.kv_block_bytes() // runner.block_size
    return (weight_reads * weight_bytes + kv_bytes) / bandwidth * 1e3


def preset_model(preset: str) -> str:
    return str(ensure_model(preset)) if preset in ("qwen3-0.6b", "qwen3-8b", "tiny") else preset


def sweep_preset(preset: str, kv_cache_dtype: str, args, batches: list[int], contexts: list[int],
                 splits: list[tuple[int, int]], bandwidth: float) -> list[dict]:
    """Decode-step timings of one model; its engine, graphs and partitions are freed on return."""
    llm = LLM(preset_model(preset), enforce_eager=True, max_num_seqs=max(batches), max_model_len=max(contexts) + 1,
              max_num_batched_tokens=max(contexts) + 1, gpu_memory_utilization=args.sweep_memory,
              kv_cache_dtype=kv_cache_dtype)
    runner = llm.model_runner
    graphs = DecodeGraphs(batches, runner.max_blocks_per_seq, runner.device)
    stages = PipelineScheduler(runner.model)

    def capture(forward):
        return graphs.capture(lambda ids, pos: forward(ids, pos, graphs.context(ids.size(0))))

    variants = {"sequential": graphs.capture(sequential_forward(runner.model, graphs)),
                "attention_only": capture(stages.attention_only), "ffn_only": capture(stages.ffn_only)}
    managers = []  # the partitions must outlive the graphs captured on their streams
    for attention, ffn in splits:
        green = GreenContextManager(runner.device, attention, ffn)
        managers.append(green)
        streams = (green.get_attention_stream(), green.get_ffn_stream())
        variants[f"pipe{attention}:{ffn}"] = capture(PipelineScheduler(runner.model, *streams, green.attention_sm_count).forward)
        if args.whole_gpu_grids:  # attention kernels sized for all SMs while running on the partition
            variants[f"pipe{attention}:{ffn}_whole_gpu_grid"] = capture(PipelineScheduler(runner.model, *streams).forward)
    rows = []
    for batch, context in tqdm([(b, c) for b in batches for c in contexts], desc=f"decode sweep {preset}"):
        graphs.load_synthetic(batch, context, runner.num_kvcache_blocks)
        ms = median_replay_ms({v: g[batch].replay for v, g in variants.items()}, repeats=args.repeats)
        floor = step_floor_ms(llm, batch, context, bandwidth)
        # Each micro-batch of the pipeline reads every layer's weights itself.
        pipe_floor = step_floor_ms(llm, batch, context, bandwidth, weight_reads=len(stages.micro_batches(batch)))
        row = {"preset": preset, "kv_cache": kv_cache_dtype, "batch": batch, "context": context, "floor_ms": floor,
               "sequential_ms": ms["sequential"], "seq/floor": ms["sequential"] / floor, "pipe_floor_ms": pipe_floor,
               "attn_only_ms": ms["attention_only"], "ffn_only_ms": ms["ffn_only"],
               "overlap_bound": ms["sequential"] / max(ms["attention_only"], ms["ffn_only"])}
        for name in variants:
            if name.startswith("pipe"):
                row[f"{name}_ms"] = ms[name]
                row[f"seq/{name}"] = ms["sequential"] / ms[name]
        rows.append(row)
    llm.exit()
    return rows


def decode_sweep(args) -> list[dict]:
    bandwidth = copy_bytes_per_s()
    print(f"device copy bandwidth: {bandwidth / 1e12:.2f} TB/s (read + write)")
    batches = [int(b) for b in args.batches.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    splits = [tuple(int(n) for n in s.split(":")) for s in args.sm_splits.split(",")] if args.sm_splits else []
    rows = []
    for preset in args.presets.split(","):
        for kv in args.kv_cache_dtype.split(","):
            rows += sweep_preset(preset, kv, args, batches, contexts, splits, bandwidth)
            free_gpu()
    add_auto_column(rows, splits)
    print(f"\ndecode step (CUDA graph replay, layers only, lm_head excluded), median of {args.repeats}; "
          f"device {torch.cuda.get_device_name()}")
    print_table(rows, list(rows[0].keys()))
    return rows


def attention_kernel_bench(args) -> list[dict]:
    """The Triton paged decode kernel alone, Qwen3-0.6B heads (16 q / 8 kv, head_dim 128), bf16 queries,
    block size 256, on random K/V spread over shuffled blocks, with a bf16 and a float8 cache (float8:
    at each tile size in --fp8-tiles): its K+V read rate, counting the bytes the cache holds, against the
    copy rate. As in a decode step's CUDA graph, one replay runs the kernel over ATTENTION_LAYERS layers'
    caches with the longest-first order computed once, and L2 is overwritten before each replay; the
    time per layer is the replay's divided by the layers."""
    from nanovllm.attention.triton_kernels import longest_first, paged_decode
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


SAMPLER_MODES = {
    "plain": [SamplingParams(temperature=0.7)],
    "greedy": [SamplingParams(temperature=0.0)],
    "seeded": [SamplingParams(temperature=0.7, seed=0)],
    "top_k50": [SamplingParams(temperature=0.7, top_k=50)],
    "top_p0.9": [SamplingParams(temperature=0.7, top_p=0.9)],
    "mixed": [SamplingParams(temperature=0.7), SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, seed=1),
              SamplingParams(temperature=0.7, top_k=50), SamplingParams(temperature=0.7, top_p=0.9)],
}


def sampler_bench(args) -> list[dict]:
    """The sampler alone on bf16 logits over Qwen3's vocabulary, its inputs built beforehand. Plain,
    greedy and seeded batches take the fused kernel; a batch with any top-k or top-p row cuts the
    logits in torch first. Rows of a mixed batch cycle through the other modes' params."""
    sampler = Sampler()
    sampler.warm_up(VOCAB_SIZE, torch.bfloat16, torch.device("cuda"))

    def to_cuda(values, dtype):
        return torch.tensor(values, dtype=dtype, device="cuda")

    rows = []
    for batch in (1, 64, 256, 512):
        logits = (torch.randn(batch, VOCAB_SIZE, device="cuda") * 3).bfloat16()
        inputs = {mode: sampling_inputs([Sequence([0], params[i % len(params)]) for i in range(batch)], to_cuda)
                  for mode, params in SAMPLER_MODES.items()}
        ms = median_replay_ms({mode: lambda x=x: sampler(logits, x) for mode, x in inputs.items()},
                              repeats=args.repeats)
        rows.append({"batch": batch, **{f"{mode}_us": t * 1e3 for mode, t in ms.items()}})
    print(f"\nsampler over {VOCAB_SIZE} tokens, median of {args.repeats} event-timed calls; "
          f"device {torch.cuda.get_device_name()}")
    print_table(rows, list(rows[0].keys()))
    return rows


def quality_models(preset: str, workdir: str) -> dict[str, str]:
    """name -> checkpoint of a --kv-quality preset; hf-parity: the test suite's tiny transformers checkpoints."""
    if preset != "hf-parity":
        return {preset: preset_model(preset)}
    from tests.helpers import MODEL_VARIANTS, build_checkpoint
    paths = {}
    for variant, spec in MODEL_VARIANTS.items():
        paths[f"hf-parity-{variant}"] = f"{workdir}/{variant}"
        build_checkpoint(paths[f"hf-parity-{variant}"], **spec)
    return paths


def kv_quality(args) -> list[dict]:
    """The float8 KV cache against a cache in the model's dtype on the same model (see
    nanovllm.tools.kv_quality): random prompts with lengths in [--min-len, --max-len], greedy, with
    per-head scales (the engine's) and per-layer scales (each layer's largest head scale)."""
    rng = Random(args.seed)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        models = {name: path for preset in args.presets.split(",")
                  for name, path in quality_models(preset, workdir).items()}
        for name, model in models.items():
            vocab = AutoConfig.from_pretrained(model).vocab_size
            max_len = min(args.max_len, 400) if name.startswith("hf-parity") else args.max_len  # 512 positions
            lengths = [rng.randint(min(args.min_len, max_len), max_len) for _ in range(args.quality_prompts)]
            prompts = [[rng.randrange(min(10000, vocab)) for _ in range(n)] for n in lengths]
            options = {"max_model_len": max_len + args.quality_tokens + 16, "max_num_seqs": args.quality_prompts,
                       "attention_backend": "triton" if torch.cuda.is_available() else "torch",
                       "async_scheduling": False}  # teacher forcing
            llm = LLM(model, **options)
            ref_tokens, ref_logits = reference_run(llm, prompts, args.quality_tokens)
            reference = f"{llm.config.kv_cache_dtype} ({str(llm.config.dtype).removeprefix('torch.')})"
            llm.exit()
            del llm
            free_gpu()
            for scales in ("per-head", "per-layer"):
                llm = LLM(model, kv_cache_dtype="fp8_e4m3", **options)
                if scales == "per-layer":  # before any request, so that no cached block holds other scales
                    per_head = llm.model_runner.kv_scales.clone()
                    llm.model_runner.kv_scales.copy_(per_head.amax(-1, keepdim=True).expand_as(per_head))
                rows.append({"model": name, "reference": reference, "scales": scales,
                             **measure(ref_tokens, ref_logits, llm, prompts)})
                print(f"[bench] {rows[-1]}", flush=True)
                llm.exit()
                del llm
                free_gpu()
    print(f"\nfloat8 KV cache against the model's dtype: {args.quality_prompts} prompts x {args.quality_tokens} "
          f"tokens, prompt lengths in [{args.min_len}, {args.max_len}], seed {args.seed}; device {device_name()}")
    print_table(rows, list(rows[0].keys()))
    return rows


def add_auto_column(rows: list[dict], splits: list[tuple[int, int]]) -> None:
    """What enable_pipeline=True would run at each point, by the engine's rule applied to every
    context swept at that batch."""
    for attention, ffn in splits:
        key = f"pipe{attention}:{ffn}_ms"
        for row in rows:
            same_batch = [r for r in rows if (r["preset"], r["kv_cache"], r["batch"]) ==
                          (row["preset"], row["kv_cache"], row["batch"])]
            pipelined = pipeline_wins([BucketTiming(r["context"], r["sequential_ms"], r[key]) for r in same_batch])
            row[f"auto{attention}:{ffn}/seq"] = (row["sequential_ms"] / row[key]) if pipelined else 1.0


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if "rate" in rows[0]:
        plot_online(plt, rows, path)
        return
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"{r.get('preset', r.get('mode'))} b{r.get('batch', '')} c{r.get('context', '')}" for r in rows]
    key = "seq/floor" if "seq/floor" in rows[0] else "tok_per_s"
    ax.bar(range(len(rows)), [r[key] for r in rows])
    ax.set_xticks(range(len(rows)), labels, rotation=90, fontsize=6)
    ax.set_ylabel(key)
    fig.tight_layout()
    fig.savefig(path)


def plot_online(plt, rows: list[dict], path: str) -> None:
    """ITL p99 and output tok/s against the arrival rate, one line per mode."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for mode in dict.fromkeys(r["mode"] for r in rows):
        mine = [r for r in rows if r["mode"] == mode]
        for ax, key in zip(axes, ("itl_p99_ms", "tok_per_s")):
            ax.plot([r["rate"] for r in mine], [r[key] for r in mine], marker="o", label=mode)
    for ax, key in zip(axes, ("inter-token latency p99 (ms)", "output tok/s")):
        ax.set_xscale("log")
        ax.set_xlabel("arrival rate (requests/s)")
        ax.set_ylabel(key)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def positive_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return values


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory (default: the qwen3-0.6b random-weight preset; tiny on CPU)")
    parser.add_argument("--compare", default="graph", help=f"comma-separated modes from {list(MODES)}")
    parser.add_argument("--num-seqs", type=int, help=f"requests (default 256; {STEADY_REQUESTS} for --workload steady)")
    parser.add_argument("--min-len", type=int, default=100)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workload", default="default", choices=WORKLOADS,
                        help="prefill-heavy: prompts of 1000-4000 tokens, outputs of 50-200; steady: "
                             f"{STEADY_REQUESTS} requests queued at once, max_num_seqs={STEADY_MAX_NUM_SEQS}")
    parser.add_argument("--online", action="store_true", help="replay Poisson arrivals through the streaming API")
    parser.add_argument("--rates", default="2,8,32", help="arrival rates (requests/s) for --online")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per rate for --online")
    parser.add_argument("--pd-max-itl-ms", type=positive_float,
                        help="pd_max_itl_ms of the pd-mux modes (default: the engine's, 1.5x the full-GPU decode step)")
    parser.add_argument("--hf-peer", type=int, default=0, help="also run transformers' generate on this many seqs")
    parser.add_argument("--decode-sweep", action="store_true")
    parser.add_argument("--attention-kernel", action="store_true", help="time the Triton decode attention kernel")
    parser.add_argument("--sampler", action="store_true", help="time the sampler alone per batch and option")
    parser.add_argument("--prefill-latency", action="store_true",
                        help="host and device time of one prompt's prefill per --compare mode and --prompt-lens")
    parser.add_argument("--prompt-lens", type=positive_ints, default="100,500,2000,4000,8000",
                        help="comma-separated prompt lengths (integers >= 1) for --prefill-latency")
    parser.add_argument("--fp8-tiles", default="64,128",
                        help="--attention-kernel: tile sizes to time the float8 cache at")
    parser.add_argument("--kv-cache-dtype", default="auto",
                        help=f"comma-separated KV cache dtypes from {list(KV_CACHE_DTYPES)} (workload and sweep)")
    parser.add_argument("--kv-quality", action="store_true",
                        help="float8 KV cache quality against the model's dtype on --presets "
                             "(hf-parity: the test suite's checkpoints)")
    parser.add_argument("--quality-prompts", type=int, default=64)
    parser.add_argument("--quality-tokens", type=int, default=128)
    parser.add_argument("--presets", default="qwen3-0.6b,qwen3-8b")
    parser.add_argument("--batches", default="1,8,64,256,512")
    parser.add_argument("--contexts", default="256,1024,4096")
    parser.add_argument("--sm-splits", default="", help="pipeline partitions to sweep, e.g. 56:64,48:72")
    parser.add_argument("--whole-gpu-grids", action="store_true",
                        help="also sweep each split with attention grids sized for the whole GPU")
    parser.add_argument("--sweep-memory", type=float, default=0.7, help="gpu_memory_utilization in the sweep")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json")
    parser.add_argument("--plot")
    args = parser.parse_args()
    if args.num_seqs is None:
        args.num_seqs = STEADY_REQUESTS if args.workload == "steady" else 256
    unknown = set(args.compare.split(",")) - set(MODES)
    if unknown:
        parser.error(f"unknown --compare modes {sorted(unknown)}; choose from {list(MODES)}")
    unknown = set(args.kv_cache_dtype.split(",")) - set(KV_CACHE_DTYPES)
    if unknown:
        parser.error(f"unknown --kv-cache-dtype {sorted(unknown)}; choose from {list(KV_CACHE_DTYPES)}")
    if (args.decode_sweep or args.attention_kernel or args.sampler or args.hf_peer) and not torch.cuda.is_available():
        parser.error("--decode-sweep, --attention-kernel, --sampler and --hf-peer need a CUDA device")
    if args.attention_kernel:
        rows = attention_kernel_bench(args)
    elif args.sampler:
        rows = sampler_bench(args)
    elif args.online:
        rows = online(args)
    elif args.prefill_latency:
        rows = prefill_latency(args)
    elif args.kv_quality:
        rows = kv_quality(args)
    else:
        rows = decode_sweep(args) if args.decode_sweep else compare(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
