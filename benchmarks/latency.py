"""One request at a time on an otherwise idle engine of each --compare mode: its prefill alone
(--prefill-latency), or a whole stream of output tokens (--latency)."""
import time
from random import Random


from benchmarks.common import (device_name, engine_options, label, mode_options, model_path, on_gpu, synchronize,
                               vocab_size, with_engine)
from benchmarks.floor import copy_bytes_per_s, step_floor_ms
from benchmarks.report import percentile, print_table
from benchmarks.workloads import random_prompt
from nanovllm import SamplingParams


def each_mode(model: str, args, options: dict, measure) -> list[dict]:
    """measure(llm, mode) -> rows, on an engine of each --compare mode in turn."""
    return [row for mode in args.compare.split(",")
            for row in with_engine(model, mode_options(mode, options), lambda llm: measure(llm, mode))]


def prefill(args) -> list[dict]:
    """The host time of the step() that launches each prompt's prefill, and the time until the device has
    run it; medians of --repeats prompts, each different from the others (no prefix-cache hits)."""
    model = model_path(args)
    vocab = vocab_size(model)
    lengths = args.prompt_lens

    def measure(llm, mode: str) -> list[dict]:
        name = label(mode, llm)
        rng = Random(args.seed)
        rows = []
        for n in lengths:
            host, done = [], []
            for _ in range(args.repeats):
                llm.add_request(random_prompt(rng, n, vocab), SamplingParams(max_tokens=1))
                synchronize()
                start = time.perf_counter()
                llm.step()
                host.append(1e3 * (time.perf_counter() - start))
                synchronize()
                done.append(1e3 * (time.perf_counter() - start))
                while llm.has_unfinished_requests():
                    llm.step()
            rows.append({"mode": name, "prompt_tokens": n, "host_ms": percentile(host, 0.5),
                         "done_ms": percentile(done, 0.5)})
            print(f"[bench] {name}, {n}-token prompts: {rows[-1]['host_ms']:.1f} ms host, "
                  f"{rows[-1]['done_ms']:.1f} ms done", flush=True)
        return rows

    rows = each_mode(model, args, engine_options(args, max_model_len=max(lengths) + 16), measure)
    print(f"\nprefill latency: one prompt at a time, medians of {args.repeats}; model {model}; device {device_name()}")
    print("host_ms: the step() that launches the prefill; done_ms: until the device has run it")
    print_table(rows, ["mode", "prompt_tokens", "host_ms", "done_ms"])
    return rows


def stream(llm, prompt: list[int], params: SamplingParams) -> dict:
    """One request through the streaming API, every time taken when step() returns its tokens: the time to
    its first token, the time per output token after the first, and its output tokens per second."""
    start = time.perf_counter()
    llm.add_request(prompt, params)
    returned = []  # (seconds since start, tokens) of each step() that returned some
    while llm.has_unfinished_requests():
        for _, new_token_ids, _ in llm.step():
            returned.append((time.perf_counter() - start, len(new_token_ids)))
    (first, first_tokens), (last, _) = returned[0], returned[-1]
    tokens = sum(n for _, n in returned)
    return {"output_tokens": tokens, "ttft_ms": 1e3 * first, "tpot_ms": 1e3 * (last - first) / (tokens - first_tokens),
            "tok_per_s": tokens / last}


def one_stream(args) -> list[dict]:
    """--repeats requests of --prompt-tokens prompt tokens (each different: no prefix-cache hits) and
    --output-tokens greedy output tokens, one at a time, per mode and KV cache dtype; medians, and on a GPU
    the time per output token over the floor of a decode step at the request's mean context."""
    model = model_path(args)
    vocab = vocab_size(model)
    bandwidth = copy_bytes_per_s() if on_gpu() else None
    params = SamplingParams(temperature=0.0, max_tokens=args.output_tokens, ignore_eos=True)
    # A decode step reads the K and V of the prompt and of the outputs so far: half of them on average.
    mean_context = args.prompt_tokens + args.output_tokens // 2

    def measure(llm, mode: str) -> list[dict]:
        rng = Random(args.seed)
        runs = [stream(llm, random_prompt(rng, args.prompt_tokens, vocab), params) for _ in range(args.repeats)]
        row = {"mode": label(mode, llm), "kv_cache": llm.config.cache.kv_cache_dtype,
               "decode_path": llm.statistics()["runner"]["decode_paths"]["path_per_bucket"].get(1, ""),
               **{key: percentile([run[key] for run in runs], 0.5) for key in runs[0]}}
        if bandwidth:
            row["floor_ms"] = step_floor_ms(llm.model_runner, 1, mean_context, bandwidth, lm_head=True)
            row["tpot/floor"] = row["tpot_ms"] / row["floor_ms"]
        print(f"[bench] {row['mode']}, kv_cache_dtype={row['kv_cache']}: TTFT {row['ttft_ms']:.1f} ms, "
              f"TPOT {row['tpot_ms']:.2f} ms, {row['tok_per_s']:.0f} tok/s", flush=True)
        return [row]

    options = engine_options(args, max_model_len=args.prompt_tokens + args.output_tokens + 16)
    rows = []
    for kv in args.kv_cache_dtype.split(","):
        rows += each_mode(model, args, {**options, "kv_cache_dtype": kv}, measure)
    print(f"\none stream: one request at a time on an idle engine, {args.prompt_tokens}-token prompts, "
          f"{args.output_tokens} greedy output tokens (ignore_eos), medians of {args.repeats} requests; "
          f"model {model}; device {device_name()}")
    print("ttft_ms: add_request() until step() returns the first token; tpot_ms: from the first token to the last, "
          "per token after the first; tok_per_s: output tokens over the request's time; decode_path: the forward "
          "the batch-1 decode graph replays (empty without graphs)")
    if bandwidth:
        print(f"floor_ms: a decode step's bytes (layer and lm_head weights, K and V of {mean_context} tokens) at the "
              f"copy rate, {bandwidth / 1e12:.2f} TB/s (read + write); tpot/floor: tpot_ms over it")
    else:
        print("floor_ms, tpot/floor: empty: the floor needs a CUDA device's measured copy rate")
    print_table(rows, ["mode", "kv_cache", "decode_path", "output_tokens", "ttft_ms", "tpot_ms", "tok_per_s",
                       "floor_ms", "tpot/floor"])
    return rows
