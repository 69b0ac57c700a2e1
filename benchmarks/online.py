"""Online serving (--online): seeded Poisson arrivals at each --rates through each --compare mode's engine,
in process, through the streaming API; with --goodput, per mode the highest rate that meets each SLO pair
(benchmarks/goodput.py)."""
import argparse


from benchmarks.common import (device_name, engine_options, label, mode_options, model_path, print_pd_statistics,
                               vocab_size, with_engine)
from benchmarks.goodput import (KEEP_UP, MIN_REQUESTS, SLO, Goodput, RateGrid, goodput_text, missed_text, ratio_text,
                                search, slo_pairs)
from benchmarks.replay import replay
from benchmarks.report import print_table
from benchmarks.workloads import describe_workload, poisson_arrivals

COLUMNS = ["mode", "rate", "requests", "req_per_s", "tok_per_s", "ttft_p50_s", "ttft_p99_s", "itl_p50_ms",
           "itl_p99_ms", "itl_max_ms", "decode_only_steps", "decode_only_step_p50_ms", "decode_only_batch_p50",
           "itl_p99/decode_step", "itl_p99/same_batch_step"]


def run(args) -> list[dict]:
    model = model_path(args)
    vocab = vocab_size(model)
    try:
        slos = slo_pairs(args.slo_ttft_ms, args.slo_itl_ms) if args.slo_ttft_ms and args.slo_itl_ms else []
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if args.goodput and not slos:
        raise SystemExit("--goodput needs --slo-ttft-ms and --slo-itl-ms")
    if args.goodput and args.goodput_requests < 1:
        raise SystemExit(f"--goodput-requests must be at least 1 ({MIN_REQUESTS} advised), got {args.goodput_requests}")
    rates = [float(r) for r in args.rates.split(",")]
    grid = RateGrid.of(rates, args.goodput_resolution)
    results: list[tuple[str, dict[int, Goodput]]] = []  # per engine, the goodput of each SLO pair it searched

    def at_rate(llm, name: str, rate: float) -> dict:
        if args.goodput:
            arrivals = measured_arrivals(args, rate, vocab)
            row = replay(llm, arrivals, f"{name} at {rate:.3g} req/s", args.goodput_warmup, drain=False)
            row.update(steady_state(row, arrivals, rate, args.goodput_warmup))
        else:
            row = replay(llm, poisson_arrivals(rate_args(args, rate), rate, vocab), f"{name} at {rate:g} req/s")
        row = {"mode": name, "rate": rate, **row}
        if row["itl_p99_ms"] and row["decode_only_step_p50_ms"]:
            row["itl_p99/decode_step"] = row["itl_p99_ms"] / row["decode_only_step_p50_ms"]
        for i, slo in enumerate(slos):
            row[f"slo{i + 1}_missed"] = missed_text(slo.missed(row))
        print(f"[bench] {name} at {rate:.3g} req/s: {row['req_per_s']:.2f} req/s, {row['tok_per_s']:.0f} tok/s, "
              f"TTFT p99 {row['ttft_p99_s'] or 0:.3f} s, ITL p99 {row['itl_p99_ms'] or 0:.1f} ms", flush=True)
        return row

    def measure(llm, mode: str, searched: list[int], suffix: str) -> list[dict]:
        name = label(mode, llm) + suffix
        if args.goodput:
            measured: dict[float, dict] = {}  # every SLO pair's search reads the rates measured before

            def meets(slo, rate: float) -> bool:
                if rate not in measured:
                    measured[rate] = at_rate(llm, name, rate)
                return not slo.missed(measured[rate])

            results.append((name, {i: search(lambda rate: meets(slos[i], rate), grid) for i in searched}))
            for i, goodput in results[-1][1].items():
                print(f"[bench] {name}: goodput {goodput_text(goodput)} req/s under {slos[i].label}", flush=True)
            rows = sorted(measured.values(), key=lambda row: row["rate"])
        else:
            rows = [at_rate(llm, name, rate) for rate in rates]
        print_pd_statistics(llm)
        return rows

    rows = [row for mode, options, searched, suffix in engines(args, slos)
            for row in with_engine(model, options, lambda llm: measure(llm, mode, searched, suffix))]
    if args.goodput:
        arrivals = (f"for {args.goodput_warmup:g} s to reach the load, then {args.goodput_requests} measured requests, "
                    f"at rates {grid.start:g} x 2^(k/{grid.steps}) within [{grid.lowest:g}, {grid.highest:g}]")
    else:
        arrivals = f"for {args.duration:g} s per rate"
    print(f"\nonline: Poisson arrivals {arrivals}, {describe_workload(args)}; model {model}; device {device_name()}")
    print("decode_only_*: the steps taken with no prefill queued or running (their count, median time and batch);"
          " itl_p99/decode_step: the ITL p99 over that median; itl_p99/same_batch_step: the p99 of each gap over"
          " the decode-only step time at its step's batch (a line fitted through the decode-only steps)")
    for i, slo in enumerate(slos):
        print(f"slo{i + 1}: {slo.label} (p99); slo{i + 1}_missed: the bounds a rate missed, p99 over the bound")
    columns = COLUMNS[:3] + ["measured_requests"] * args.goodput + COLUMNS[3:]  # after "requests"
    if args.goodput:
        columns += ["lifetime_s", "offered_over_delivered"]
        print(f"lifetime_s: a request's expected lifetime (TTFT p50 + mean output x ITL p50), at most the "
              f"{args.goodput_warmup:g} s warm-up; offered_over_delivered: output tokens/s asked for over those "
              f"delivered after the warm-up, at most 1/{KEEP_UP:g}: else the rate misses (lifetime, backlog)")
    print_table(rows, columns + [f"slo{i + 1}_missed" for i in range(len(slos))])
    return rows + goodput_rows(slos, results, rows) if args.goodput else rows


def steady_state(row: dict, arrivals, rate: float, warmup_s: float) -> dict:
    """How near a goodput measurement came to the load's steady state: a request's expected lifetime (its
    first token, then the mean output length at the ITL median) and it over the warm-up, and the output
    tokens asked for per second (rate x the mean output length) over those delivered after the warm-up."""
    mean_output = sum(params.max_tokens for _, _, params in arrivals) / len(arrivals)
    lifetime_s = (row["ttft_p50_s"] or 0.0) + mean_output * (row["itl_p50_ms"] or 0.0) / 1e3
    delivered = row["tok_per_s_measured"]
    return {"lifetime_s": lifetime_s, "lifetime_over_warmup": lifetime_s / warmup_s,
            "offered_over_delivered": rate * mean_output / delivered if delivered else None}


def engines(args, slos: list[SLO]) -> list[tuple[str, dict, list[int], str]]:
    """The engines to measure: (mode, its LLM options, the SLO pairs its goodput is searched for, a suffix
    to its name). With --pd-bounds-from-slo a multiplexing mode has one engine per SLO pair, told that
    pair's bounds as pd_max_ttft_ms and pd_max_itl_ms."""
    every = list(range(len(slos)))
    chosen = []
    for mode in args.compare.split(","):
        options = mode_options(mode, engine_options(args))
        if args.pd_bounds_from_slo and options.get("enable_pd_multiplexing"):
            chosen += [(mode, {**options, "pd_max_ttft_ms": slo.ttft_ms, "pd_max_itl_ms": slo.itl_ms}, [i],
                        f" (slo{i + 1} bounds)") for i, slo in enumerate(slos)]
        else:
            chosen.append((mode, options, every, ""))
    return chosen


def rate_args(args, rate: float, **values) -> argparse.Namespace:
    """args for the arrivals at `rate`, with `values`: each rate draws prompts of its own (seeded by --seed
    and the rate), so that none hits the prefix cache with the prompts of a rate measured before it; every
    mode gets the same ones at the same rate."""
    return argparse.Namespace(**{**vars(args), "seed": f"{args.seed}/{rate!r}", **values})


def measured_arrivals(args, rate: float, vocab_size: int) -> list:
    """Poisson arrivals at `rate`: those of the first --goodput-warmup seconds, then --goodput-requests
    more; the duration follows from the count (the arrivals are seeded, so a longer one extends a shorter)."""
    duration = args.goodput_warmup + args.goodput_requests / rate
    while True:
        arrivals = poisson_arrivals(rate_args(args, rate, duration=duration), rate, vocab_size)
        warm = sum(at < args.goodput_warmup for at, _, _ in arrivals)
        if len(arrivals) >= warm + args.goodput_requests:
            return arrivals[:warm + args.goodput_requests]
        duration *= 1.5


def goodput_rows(slos, results: list[tuple[str, dict[int, Goodput]]], measured: list[dict]) -> list[dict]:
    """Prints, per SLO pair and engine that searched it, the goodput, its ratio to the first such engine's,
    and the rate above it with the bounds it missed; returns them as rows."""
    at = {(row["mode"], row["rate"]): row for row in measured}
    rows = []
    for i, slo in enumerate(slos):
        searched = [(name, goodputs[i]) for name, goodputs in results if i in goodputs]
        first = searched[0][1]
        for name, g in searched:
            met, above = at.get((name, g.rate), {}), at.get((name, g.rate_above))
            rows.append({"slo": slo.label, "mode": name, "goodput": goodput_text(g), "goodput_req_per_s": g.rate,
                         "vs_first": ratio_text(g, first), "ttft_p99_s": met.get("ttft_p99_s"),
                         "itl_p99_ms": met.get("itl_p99_ms"), "rate_above": g.rate_above,
                         "missed_above": missed_text(slo.missed(above)) if above else "none up to the highest rate"})
    print("\ngoodput (req/s): the highest rate measured that met the SLO; vs_first: over the first mode's; "
          "ttft_p99_s and itl_p99_ms at that rate; missed_above: the bounds the next rate missed")
    print_table(rows, ["slo", "mode", "goodput", "vs_first", "ttft_p99_s", "itl_p99_ms", "rate_above", "missed_above"])
    return rows
