"""Prefill latency (--prefill-latency): one prompt at a time on an otherwise idle engine of each --compare
mode."""
import time
from random import Random

from transformers import AutoConfig

from benchmarks.common import (device_name, engine_options, label, mode_options, model_path, synchronize,
                               with_engine)
from benchmarks.report import percentile, print_table
from benchmarks.workloads import random_prompt
from nanovllm import SamplingParams


def run(args) -> list[dict]:
    """The host time of the step() that launches each prompt's prefill, and the time until the device has
    run it; medians of --repeats prompts, each different from the others (no prefix-cache hits)."""
    model = model_path(args)
    vocab_size = AutoConfig.from_pretrained(model).vocab_size
    lengths = args.prompt_lens

    def measure(llm, mode: str) -> list[dict]:
        name = label(mode, llm)
        rng = Random(args.seed)
        rows = []
        for n in lengths:
            host, done = [], []
            for _ in range(args.repeats):
                llm.add_request(random_prompt(rng, n, vocab_size), SamplingParams(max_tokens=1))
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

    options = engine_options(args, max_model_len=max(lengths) + 16)
    rows = [row for mode in args.compare.split(",")
            for row in with_engine(model, mode_options(mode, options), lambda llm: measure(llm, mode))]
    print(f"\nprefill latency: one prompt at a time, medians of {args.repeats}; model {model}; device {device_name()}")
    print("host_ms: the step() that launches the prefill; done_ms: until the device has run it")
    print_table(rows, ["mode", "prompt_tokens", "host_ms", "done_ms"])
    return rows
