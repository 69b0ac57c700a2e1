"""Offline throughput of each --compare mode: the default and prefill-heavy workloads through generate(),
against the floor of the schedule each ran; the steady workload through the streaming API."""
import time

import torch

from benchmarks.common import (device_name, engine_options, free_gpu, label, mode_options, model_path, on_gpu,
                               print_pd_statistics, vocab_size, with_engine)
from benchmarks.floor import ScheduleFloor, copy_bytes_per_s, gemm_flops_per_s
from benchmarks.replay import replay
from benchmarks.report import print_table
from benchmarks.workloads import describe_workload, workload

# The steady workload: this many requests of the default lengths, all queued at the start, at most
# STEADY_MAX_NUM_SEQS decoding, so that prefills keep arriving while others decode.
STEADY_REQUESTS = 2048
STEADY_MAX_NUM_SEQS = 256


def run_mode(model: str, mode: str, prompts, params, options: dict, ceilings: tuple[float, float] | None) -> dict:
    """One engine of this mode on the workload. With the device's ceilings (copy bytes/s, matrix
    FLOP/s), also the floor of the schedule it ran and the run's time over it (single-device modes)."""
    start = time.perf_counter()

    def measure(llm) -> dict:
        startup = time.perf_counter() - start
        name = label(mode, llm)
        devices = {runner.device for runner in llm.runners}
        floor = ScheduleFloor(llm, *ceilings) if ceilings and len(devices) == 1 else None
        if ceilings and not floor:
            print(f"[bench] {name}: no floor: its runners are on {len(devices)} devices")
        start_run = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=True)
        seconds = time.perf_counter() - start_run
        tokens = sum(p.max_tokens for p in params)
        kv = llm.config.cache.kv_cache_dtype
        result = {"mode": name, "kv_cache": kv, "startup_s": startup, "output_tokens": tokens, "seconds": seconds,
                  "tok_per_s": tokens / seconds}
        if floor:
            result.update({"floor_s": floor.seconds, "s/floor": seconds / floor.seconds})
        print(f"[bench] {name}, kv_cache_dtype={kv}: {tokens} tokens in {seconds:.2f} s = {tokens / seconds:.0f} tok/s"
              + (f", {seconds / floor.seconds:.2f}x its floor of {floor.seconds:.2f} s" if floor else ""), flush=True)
        if floor:
            result.update(print_steps(name, floor, seconds))
        paths = llm.model_runner.get_pipeline_statistics().get("path_per_bucket")
        if paths is not None:
            result["pipelined_buckets"] = sorted(b for b, p in paths.items() if p == "pipeline")
        stats = print_pd_statistics(llm)
        if stats:
            result["pd_statistics"] = stats
        return result

    return with_engine(model, mode_options(mode, options), measure)


def print_steps(name: str, floor: ScheduleFloor, seconds: float) -> dict:
    """Where the run's time went: its prefill and decode steps' work on the device against their floors,
    and the rest of the run (the device waiting for the host between steps, where the steps ran one at
    a time). Returned as result columns."""
    kinds = floor.by_kind()
    parts = [f"{kind} {each['steps']} steps {each['seconds']:.2f} s ({each['seconds'] / each['floor_s']:.2f}x their "
             f"floor of {each['floor_s']:.2f} s)" for kind, each in kinds.items() if each["steps"]]
    between = seconds - sum(each["seconds"] for each in kinds.values())
    print(f"[bench] {name}: {', '.join(parts)}; outside the steps {between:.2f} s", flush=True)
    columns = {f"{kind}_{key}": value for kind, each in kinds.items() for key, value in each.items()}
    return columns | {"outside_steps_s": between}


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


def compare(args) -> list[dict]:
    """--compare modes (each with every --kv-cache-dtype) on the default or prefill-heavy workload."""
    if not on_gpu():
        print("[bench] no CUDA device: these are CPU numbers, not comparable with the GPU figures in "
              "docs/benchmarks.md")
    model = model_path(args)
    prompts, params = workload(args, vocab_size(model))
    options = engine_options(args)
    ceilings = (copy_bytes_per_s(), gemm_flops_per_s()) if on_gpu() else None
    if ceilings:
        print(f"[bench] ceilings: copy {ceilings[0] / 1e12:.2f} TB/s (read + write), "
              f"bf16 matrix {ceilings[1] / 1e12:.0f} TFLOP/s")
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
    print("s/floor: seconds over the floor of the schedule each run executed (bytes at the copy rate, FLOPs at the "
          "matrix rate, per step)")
    if not ceilings:
        print("floor_s, s/floor: empty: the floor needs a CUDA device's measured copy and matrix rates")
    print_table(rows, ["mode", "kv_cache", "startup_s", "output_tokens", "seconds", "tok_per_s", "floor_s", "s/floor",
                       "ratio"])
    return rows


def steady(args) -> list[dict]:
    """Offline steady state: every request queued at once through the streaming API, at most
    STEADY_MAX_NUM_SEQS decoding; throughput, ITL and TTFT per mode, and where pd-mux spent its decode time."""
    model = model_path(args)
    prompts, params = workload(args, vocab_size(model))
    arrivals = [(0.0, prompt, p) for prompt, p in zip(prompts, params)]
    options = engine_options(args, max_num_seqs=STEADY_MAX_NUM_SEQS)
    rows = []

    def measure(llm, mode: str) -> dict:
        name = label(mode, llm)
        row = {"mode": name, **replay(llm, arrivals, name)}
        shares = print_pd_statistics(llm).get("decode_time_share_per_split", {})
        if shares:
            row["split_time_share"] = ", ".join(f"{split}: {100 * share:.0f}%" for split, share in shares.items())
        return row

    for mode in args.compare.split(","):
        row = with_engine(model, mode_options(mode, options), lambda llm: measure(llm, mode))
        first = rows[0] if rows else row
        row["ratio"] = row["tok_per_s"] / first["tok_per_s"]
        mid = row["tok_per_s_mid"], first["tok_per_s_mid"]
        row["mid_ratio"] = mid[0] / mid[1] if all(mid) else None
        print(f"[bench] {row['mode']}: {row['tok_per_s']:.0f} tok/s, ITL p99 {row['itl_p99_ms'] or 0:.1f} ms",
              flush=True)
        rows.append(row)
    print(f"\nsteady: {args.num_seqs} requests queued at once, max_num_seqs={STEADY_MAX_NUM_SEQS}, "
          f"{describe_workload(args)}; model {model}; device {device_name()}")
    print("ratio: tok/s over the first mode's; tok_per_s_mid: over the middle half of the output tokens (mid_ratio "
          "likewise); tokens_per_step: output tokens per step() that returned any; split_time_share: pd-mux's decode "
          "time per SM split")
    print_table(rows, ["mode", "requests", "seconds", "tok_per_s", "ratio", "tok_per_s_mid", "mid_ratio",
                       "tokens_per_step", "itl_p50_ms", "itl_p99_ms", "itl_max_ms", "ttft_p50_s", "ttft_p99_s",
                       "split_time_share"])
    return rows


def run(args) -> list[dict]:
    return steady(args) if args.workload == "steady" else compare(args)
