"""The goodput search of bench.py --online --goodput (benchmarks/goodput.py) on synthetic measurements, the
request count per rate, and the warm-up and early stop of the replay it measures each rate with."""
import argparse
import time

import pytest

from bench import positive_floats
from benchmarks.goodput import (KEEP_UP, MIN_REQUESTS, SLO, Goodput, RateGrid, goodput_text, missed_text, ratio_text,
                                search, slo_pairs)
from benchmarks.online import engines, goodput_rows, measured_arrivals, steady_state
from benchmarks.replay import replay
from benchmarks.report import percentile
from nanovllm import SamplingParams

GRID = RateGrid(start=8.0, lowest=1.0, highest=64.0, steps=4)


def counted(meets):
    """meets(rate), recording the rates it was asked about."""
    asked = []

    def ask(rate):
        asked.append(rate)
        return meets(rate)

    return ask, asked


@pytest.mark.parametrize("boundary", [1.5, 5.0, 8.0, 13.0, 30.0, 63.0])
def test_a_monotone_boundary_is_found_to_the_grid(boundary):
    meets, asked = counted(lambda rate: rate <= boundary)
    goodput = search(meets, GRID)
    assert goodput.rate <= boundary < goodput.rate_above
    assert goodput.rate_above == pytest.approx(goodput.rate * 2 ** (1 / GRID.steps))  # neighbours on the grid
    assert len(asked) == len(set(asked))  # no rate twice
    assert asked[0] == GRID.start


def test_the_search_doubles_then_bisects():
    meets, asked = counted(lambda rate: rate <= 13.0)
    assert search(meets, GRID) == Goodput(8 * 2 ** 0.5, 8 * 2 ** 0.75)
    assert asked == pytest.approx([8, 16, 8 * 2 ** 0.5, 8 * 2 ** 0.75])
    meets, asked = counted(lambda rate: rate <= 3.0)
    search(meets, GRID)
    assert asked[:3] == [8, 4, 2]  # halving while rates miss


def test_beyond_the_range_the_answer_says_so():
    assert search(lambda rate: False, GRID) == Goodput(None, 1.0)
    assert search(lambda rate: True, GRID) == Goodput(64.0, None)
    assert goodput_text(Goodput(None, 1.0)) == "< 1"
    assert goodput_text(Goodput(64.0, None)) == ">= 64"
    assert goodput_text(Goodput(11.3137, 13.4543)) == "11.3"


def test_the_grid():
    assert RateGrid.of([8, 4, 48], 0.2) == RateGrid(8, 4, 48, 4)  # 2^(1/4): 19% apart
    assert RateGrid.of([2, 8, 32], 0.1).steps == 8
    assert RateGrid.of([2], 1.0).steps == 1
    assert GRID.bounds() == (-12, 12)
    assert RateGrid(8, 4, 48, 4).bounds() == (-4, 10)  # 8 x 2^(10/4) = 45.3
    assert search(lambda rate: True, RateGrid(8, 8, 8, 4)) == Goodput(8, None)  # one rate


def test_several_slos_share_the_measured_rates():
    """Each pair searches the same grid; a rate measured for one is read, not measured again, by the next."""
    measured = {}

    def measure(rate):
        if rate not in measured:
            measured[rate] = {"ttft_p99_s": 0.05 * rate, "itl_p99_ms": 2.0 * rate}  # both grow with the load
        return measured[rate]

    tight, loose = slo_pairs([500.0, 2000.0], [25.0, 100.0])
    results = [search(lambda rate: not slo.missed(measure(rate)), GRID) for slo in (tight, loose)]
    assert results[0].rate <= 10 < results[0].rate_above  # TTFT p99 0.5 s at 10 req/s, ITL 25 ms at 12.5
    assert results[1].rate <= 40 < results[1].rate_above  # TTFT p99 2 s at 40, ITL 100 ms at 50
    alone = [counted(lambda rate, slo=slo: not slo.missed(measure(rate))) for slo in (tight, loose)]
    searched = 0
    for (meets, asked), slo in zip(alone, (tight, loose)):
        search(meets, GRID)
        searched += len(asked)
    assert len(measured) < searched  # the rates 8 and 16 served both


def test_which_slo_failed_first():
    slo = SLO(500.0, 25.0)
    assert slo.missed({"ttft_p99_s": 0.4, "itl_p99_ms": 20.0}) == {}
    assert slo.missed({"ttft_p99_s": 0.75, "itl_p99_ms": 20.0}) == {"ttft": 1.5}
    assert list(slo.missed({"ttft_p99_s": 0.6, "itl_p99_ms": 50.0})) == ["itl", "ttft"]  # the furthest over first
    assert missed_text(slo.missed({"ttft_p99_s": 0.6, "itl_p99_ms": 50.0})) == "itl 2.00x, ttft 1.20x"
    assert missed_text({}) == "-"
    assert slo.label == "TTFT 500 ms, ITL 25 ms"


def test_slo_pairs():
    assert slo_pairs([500, 2000], [25, 100]) == [SLO(500, 25), SLO(2000, 100)]
    assert slo_pairs([500], [25, 100]) == [SLO(500, 25), SLO(500, 100)]
    with pytest.raises(ValueError, match="--slo-ttft-ms has 2 bounds and --slo-itl-ms 3"):
        slo_pairs([500, 2000], [25, 50, 100])
    assert positive_floats("500,2e3") == [500.0, 2000.0]
    for bad in ("", "500,x", "0", "-5", "inf"):
        with pytest.raises(argparse.ArgumentTypeError):
            positive_floats(bad)


def test_ratios_to_the_first_mode():
    assert ratio_text(Goodput(16.0, 19.0), Goodput(8.0, 9.5)) == "2.00x"
    assert ratio_text(Goodput(16.0, 19.0), Goodput(None, 4.0)) == "> 4.00x"  # the first is below 4
    assert ratio_text(Goodput(None, 4.0), Goodput(8.0, 9.5)) == "< 0.50x"
    assert ratio_text(Goodput(None, 4.0), Goodput(None, 4.0)) == "n/a"


def test_the_request_count_lets_one_request_in_a_hundred_over_the_bound():
    """percentile() takes rank round(0.99 (n - 1)): with MIN_REQUESTS first-token times, one over the bound
    leaves the p99 within it and two do not; with 50, one alone decides."""
    def p99_within(n, over):
        return percentile([1.0] * (n - over) + [9.0] * over, 0.99) <= 1.0

    assert MIN_REQUESTS == 100
    assert p99_within(MIN_REQUESTS, 1) and not p99_within(MIN_REQUESTS, 2)
    assert not p99_within(50, 1)


def workload_args(**values):
    return argparse.Namespace(workload="default", min_len=4, max_len=8, seed=0, duration=None, goodput_warmup=2.0,
                              goodput_requests=MIN_REQUESTS, **values)


@pytest.mark.parametrize("rate", [4.0, 50.0])
def test_each_rate_measures_the_request_count_after_its_warm_up(rate):
    args = workload_args()
    arrivals = measured_arrivals(args, rate, vocab_size=64)
    warm = [at for at, _, _ in arrivals if at < args.goodput_warmup]
    assert len(arrivals) - len(warm) == MIN_REQUESTS
    assert warm == [at for at, _, _ in arrivals[:len(warm)]]
    # The duration follows from the count: about warm-up + requests / rate.
    assert arrivals[-1][0] == pytest.approx(args.goodput_warmup + MIN_REQUESTS / rate, rel=0.35)
    # Every mode gets the same prompts at a rate; another rate draws its own (no prefix-cache hits).
    assert [p for _, p, _ in measured_arrivals(args, rate, vocab_size=64)] == [p for _, p, _ in arrivals]
    other = {tuple(p) for _, p, _ in measured_arrivals(args, 2 * rate, vocab_size=64)}
    assert not other & {tuple(p) for _, p, _ in arrivals}


class FakeEngine:
    """The streaming API of an engine that gives each request one token per step() (of 2 ms at least)."""

    def __init__(self):
        self.left, self.added, self.aborted, self.steps = {}, 0, [], []

    def add_request(self, prompt, params):
        request_id, self.added = self.added, self.added + 1
        self.left[request_id] = params.max_tokens
        return request_id

    def has_unfinished_requests(self):
        return bool(self.left)

    def step(self):
        time.sleep(0.002)
        outputs = []
        for request_id in list(self.left):
            self.left[request_id] -= 1
            outputs.append((request_id, [7], self.left[request_id] == 0))
            if not self.left[request_id]:
                del self.left[request_id]
        self.steps.append(outputs)
        return outputs

    def abort_requests(self, request_ids):
        for request_id in request_ids:
            del self.left[request_id]
            self.aborted.append(request_id)


@pytest.mark.parametrize("drain", [True, False])
def test_the_replay_counts_after_the_warm_up_and_may_stop_at_the_last_first_token(drain):
    arrivals = [(at, [1], SamplingParams(max_tokens=max_tokens)) for at, max_tokens in
                ((0.0, 40), (0.03, 40), (0.05, 1))]
    engine = FakeEngine()
    row = replay(engine, arrivals, "fake", warmup_s=0.02, drain=drain)
    assert row["requests"] == 3 and row["measured_requests"] == 2  # the first arrived during the warm-up
    if drain:
        assert not engine.aborted and row["req_per_s"] * row["seconds"] == pytest.approx(3)
    else:  # stopped right after the step that gave the last its first token: the two long ones are aborted
        assert sorted(engine.aborted) == [0, 1] and (2, [7], True) in engine.steps[-1]
    assert row["itl_p99_ms"] > 0


def test_multiplexing_told_each_slo_gets_an_engine_per_pair():
    """--pd-bounds-from-slo: graph mode searches every SLO pair on one engine; pd-mux runs once per pair with
    that pair's bounds, and each SLO's ratios are to the first engine that searched it."""
    slos = slo_pairs([500.0, 2000.0], [25.0, 100.0])
    args = workload_args(compare="graph,pd-mux", pd_bounds_from_slo=True, pd_max_itl_ms=None, pd_max_ttft_ms=None)
    chosen = engines(args, slos)
    assert [(mode, searched, suffix) for mode, _, searched, suffix in chosen] == [
        ("graph", [0, 1], ""), ("pd-mux", [0], " (slo1 bounds)"), ("pd-mux", [1], " (slo2 bounds)")]
    assert "pd_max_itl_ms" not in chosen[0][1]
    assert [(o["pd_max_ttft_ms"], o["pd_max_itl_ms"], o["enable_pd_multiplexing"]) for _, o, _, _ in chosen[1:]] == \
        [(500.0, 25.0, True), (2000.0, 100.0, True)]
    untold = engines(workload_args(compare="graph,pd-mux", pd_bounds_from_slo=False, pd_max_itl_ms=None,
                                   pd_max_ttft_ms=None), slos)
    assert [(mode, searched, o.get("pd_max_itl_ms")) for mode, o, searched, _ in untold] == \
        [("graph", [0, 1], None), ("pd-mux", [0, 1], None)]

    results = [("graph", {0: Goodput(5.66, 6.73), 1: Goodput(22.6, 26.9)}),
               ("pd-mux (slo1 bounds)", {0: Goodput(13.5, 16.0)}), ("pd-mux (slo2 bounds)", {1: Goodput(22.6, 26.9)})]
    rows = goodput_rows(slos, results, [])
    assert [(row["mode"], row["vs_first"]) for row in rows] == [
        ("graph", "1.00x"), ("pd-mux (slo1 bounds)", "2.39x"), ("graph", "1.00x"), ("pd-mux (slo2 bounds)", "1.00x")]


def test_a_rate_not_served_in_a_steady_state_misses_every_slo():
    """Requests that live longer than the warm-up, or output tokens that come slower than KEEP_UP of the rate
    the arrivals ask for, mean that the window saw the batch still growing: the rate misses, whatever its p99s."""
    slo = SLO(2000.0, 100.0)
    within = {"ttft_p99_s": 0.1, "itl_p99_ms": 50.0}
    assert slo.missed({**within, "lifetime_over_warmup": 0.9, "offered_over_delivered": 1.1}) == {}
    assert slo.missed({**within, "lifetime_over_warmup": 1.5, "offered_over_delivered": 1.0}) == {"lifetime": 1.5}
    assert slo.missed({**within, "lifetime_over_warmup": 0.5, "offered_over_delivered": 1 / KEEP_UP * 1.2}) == \
        {"backlog": pytest.approx(1.2)}
    arrivals = [(0.0, [1], SamplingParams(max_tokens=n)) for n in (100, 300)]
    row = {"ttft_p50_s": 0.5, "itl_p50_ms": 20.0, "tok_per_s_measured": 1000.0}
    steady = steady_state(row, arrivals, rate=8.0, warmup_s=10.0)
    assert steady["lifetime_s"] == pytest.approx(0.5 + 200 * 0.02)
    assert steady["lifetime_over_warmup"] == pytest.approx(0.45)
    assert steady["offered_over_delivered"] == pytest.approx(8 * 200 / 1000)
