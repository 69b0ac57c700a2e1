"""Online serving (--online): seeded Poisson arrivals at each --rates through each --compare mode's engine,
in process, through the streaming API."""
from transformers import AutoConfig

from benchmarks.common import (device_name, engine_options, label, mode_options, model_path, print_pd_statistics,
                               with_engine)
from benchmarks.replay import replay
from benchmarks.report import print_table
from benchmarks.workloads import describe_workload, poisson_arrivals


def run(args) -> list[dict]:
    model = model_path(args)
    vocab_size = AutoConfig.from_pretrained(model).vocab_size
    rates = [float(r) for r in args.rates.split(",")]

    def measure(llm, mode: str) -> list[dict]:
        name = label(mode, llm)
        rows = []
        for rate in rates:
            row = {"mode": name, "rate": rate,
                   **replay(llm, poisson_arrivals(args, rate, vocab_size), f"{name} at {rate:g} req/s")}
            if row["itl_p99_ms"] and row["decode_only_step_p50_ms"]:
                row["itl_p99/decode_step"] = row["itl_p99_ms"] / row["decode_only_step_p50_ms"]
            print(f"[bench] {name} at {rate:g} req/s: {row['req_per_s']:.2f} req/s, {row['tok_per_s']:.0f} tok/s, "
                  f"ITL p99 {row['itl_p99_ms'] or 0:.1f} ms", flush=True)
            rows.append(row)
        print_pd_statistics(llm)
        return rows

    rows = [row for mode in args.compare.split(",")
            for row in with_engine(model, mode_options(mode, engine_options(args)), lambda llm: measure(llm, mode))]
    print(f"\nonline: Poisson arrivals for {args.duration:g} s per rate, {describe_workload(args)}; model {model}; "
          f"device {device_name()}")
    print("decode_only_*: the steps taken with no prefill queued or running (their count, median time and batch);"
          " itl_p99/decode_step: the ITL p99 over that median; itl_p99/same_batch_step: the p99 of each gap over"
          " the decode-only step time at its step's batch (a line fitted through the decode-only steps)")
    print_table(rows, ["mode", "rate", "requests", "req_per_s", "tok_per_s", "ttft_p50_s", "ttft_p99_s",
                       "itl_p50_ms", "itl_p99_ms", "itl_max_ms", "decode_only_steps", "decode_only_step_p50_ms",
                       "decode_only_batch_p50", "itl_p99/decode_step", "itl_p99/same_batch_step"])
    return rows
