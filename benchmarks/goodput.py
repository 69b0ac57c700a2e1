"""Goodput under latency SLOs (--online --goodput): the highest Poisson arrival rate at which a mode keeps
the p99 of the time to first token and the p99 of the inter-token latency within their bounds, found by a
search over a grid of rates whose measurements every SLO pair shares."""
import math
from collections.abc import Callable
from dataclasses import dataclass

# Requests measured per rate. percentile() takes the value at rank round(0.99 (n - 1)): from 100 requests
# on, the TTFT p99 lets one request in 100 exceed the bound, what a p99 means; with 51-99 it lets one of
# fewer than 100 (more than 1%) and below 51 none (the p99 is then the slowest request).
MIN_REQUESTS = 100
# A rate is served in a steady state only if, after the warm-up, the output tokens come at least this share
# as fast as the arrivals ask for them (their rate x the mean output length): below, a backlog grows, and a
# longer run would see the latencies grow with it. The share leaves room for the window's Poisson noise.
KEEP_UP = 0.85


@dataclass(frozen=True)
class SLO:
    """Bounds on the p99 of the time to first token and of the inter-token latency."""
    ttft_ms: float
    itl_ms: float

    @property
    def label(self) -> str:
        return f"TTFT {self.ttft_ms:g} ms, ITL {self.itl_ms:g} ms"

    def missed(self, row: dict) -> dict[str, float]:
        """The bounds a measurement missed, each with how far over it, the furthest first; {} when it met
        them all: "ttft" and "itl" (the p99 over the bound), and the two signs that the window did not see
        the load's steady state, which every SLO shares: "lifetime" (a request's expected lifetime over
        the warm-up: the batch was still growing towards its size at this load) and "backlog" (KEEP_UP x
        the output tokens asked for per second over those delivered after the warm-up)."""
        over = {"ttft": 1e3 * row["ttft_p99_s"] / self.ttft_ms, "itl": (row["itl_p99_ms"] or 0.0) / self.itl_ms,
                "lifetime": row.get("lifetime_over_warmup") or 0.0,
                "backlog": KEEP_UP * (row.get("offered_over_delivered") or 0.0)}
        return dict(sorted(((k, v) for k, v in over.items() if v > 1), key=lambda kv: -kv[1]))


def slo_pairs(ttft_ms: list[float], itl_ms: list[float]) -> list[SLO]:
    """The SLOs of --slo-ttft-ms and --slo-itl-ms, paired in order; one value pairs with each of the other."""
    if len(ttft_ms) == 1 or len(itl_ms) == 1 or len(ttft_ms) == len(itl_ms):
        n = max(len(ttft_ms), len(itl_ms))
        return [SLO(ttft_ms[i % len(ttft_ms)], itl_ms[i % len(itl_ms)]) for i in range(n)]
    raise ValueError(f"--slo-ttft-ms has {len(ttft_ms)} bounds and --slo-itl-ms {len(itl_ms)}: give as many of "
                     "each (they pair in order), or one of either")


@dataclass(frozen=True)
class RateGrid:
    """The rates the search may measure: start x 2^(k / steps) for the integers k that keep them within
    [lowest, highest]. One grid for every SLO pair, so that their searches meet at the same rates."""
    start: float
    lowest: float
    highest: float
    steps: int  # grid points per doubling

    @classmethod
    def of(cls, rates: list[float], resolution: float) -> "RateGrid":
        """From --rates (the search starts at the first, within the smallest and the largest) and the
        resolution: neighbouring rates differ by at most that share."""
        return cls(rates[0], min(rates), max(rates), max(1, math.ceil(math.log(2) / math.log1p(resolution))))

    def rate(self, k: int) -> float:
        return self.start * 2 ** (k / self.steps)

    def bounds(self) -> tuple[int, int]:
        """The least and the greatest k."""
        def k_at(rate: float) -> float:
            return self.steps * math.log2(rate / self.start)
        return math.ceil(k_at(self.lowest) - 1e-9), math.floor(k_at(self.highest) + 1e-9)


@dataclass(frozen=True)
class Goodput:
    """The search's answer: the highest rate that met the SLO (None: the lowest searched did not) and the
    grid's next rate above it, which did not (None: the highest searched met it)."""
    rate: float | None
    rate_above: float | None


def search(meets: Callable[[float], bool], grid: RateGrid) -> Goodput:
    """The highest rate of the grid that meets the SLO, assuming that a rate above one that misses it misses
    it too: from the start, doubling while rates meet it (halving while they miss it), then bisecting the
    grid between the highest rate that met it and the lowest that did not."""
    k_min, k_max = grid.bounds()
    k = min(max(0, k_min), k_max)
    met, missed = (k, None) if meets(grid.rate(k)) else (None, k)
    while met is not None and missed is None and met < k_max:
        k = min(met + grid.steps, k_max)
        met, missed = (k, None) if meets(grid.rate(k)) else (met, k)
    while missed is not None and met is None and missed > k_min:
        k = max(missed - grid.steps, k_min)
        met, missed = (k, missed) if meets(grid.rate(k)) else (None, k)
    while met is not None and missed is not None and missed - met > 1:
        k = (met + missed) // 2
        met, missed = (k, missed) if meets(grid.rate(k)) else (met, k)
    return Goodput(None if met is None else grid.rate(met), None if missed is None else grid.rate(missed))


def goodput_text(goodput: Goodput) -> str:
    """The goodput in requests/s; "< r" below the lowest rate searched, ">= r" at the highest."""
    if goodput.rate is None:
        return f"< {goodput.rate_above:.3g}"
    return f"{'>= ' if goodput.rate_above is None else ''}{goodput.rate:.3g}"


def ratio_text(goodput: Goodput, first: Goodput) -> str:
    """goodput over first; where one is below the lowest rate searched, the bound that follows."""
    if goodput.rate is not None and first.rate is not None:
        return f"{goodput.rate / first.rate:.2f}x"
    if goodput.rate is not None:
        return f"> {goodput.rate / first.rate_above:.2f}x"
    if first.rate is not None:
        return f"< {goodput.rate_above / first.rate:.2f}x"
    return "n/a"


def missed_text(missed: dict[str, float]) -> str:
    """Which bounds a measurement missed and by how much: "ttft 1.42x, itl 1.05x"; "-" for none."""
    return ", ".join(f"{bound} {over:.2f}x" for bound, over in missed.items()) or "-"
