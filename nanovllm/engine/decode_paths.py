"""The decode-path seam: the one place that decides what a decode step runs.

Per batch bucket, every candidate decode forward (the sequential forward, and what a mode adds through
a DecodeExtension: the attention/FFN pipeline, the fused decode step) is captured as a CUDA graph. With
more than one candidate, each bucket's graphs are timed at start-up on synthetic batches at a short and
a long context, and the bucket replays the fastest, but a candidate other than the sequential forward
only where it beat it at every context timed: auto never picks a slower path. The timings are kept on
disk per setup and source code (TimingCache), so a second start of the same setup skips them.
"""
import hashlib
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch

from nanovllm.engine.graphs import CapturedGraph, DecodeGraphs
from nanovllm.kernels import dependent_launch
from nanovllm.partitions.sm_limit import on_sms
from nanovllm.partitions.streams import Lane, use_streams
from nanovllm.utils.cache import cache_root
from nanovllm.utils.context import Context, set_context
from nanovllm.utils.log import get_logger
from nanovllm.utils.timing import median_replay_ms

logger = get_logger("ModelRunner")

# forward(input_ids, positions, ctx) -> hidden states after the final norm
Forward = Callable[[torch.Tensor, torch.Tensor, Context], torch.Tensor]
# The package whose source the timings are keyed by.
PACKAGE = Path(__file__).resolve().parents[1]
# Contexts each bucket is timed at (capped by max_model_len).
TIMED_CONTEXTS = (256, 2048)
SEQUENTIAL = "sequential"


class DecodeCandidate(Protocol):
    name: str

    def bind(self, model) -> Forward: ...

    def setup_key(self) -> dict:
        """What its timings depend on besides the model, the device, the cache and the code (an SM split, say)."""


class DecodeExtension(Protocol):
    """What a mode adds to a runner's decode paths."""
    name: str  # the runner's statistics report the extension's under this key
    candidates: list[DecodeCandidate]  # forwards that may serve a bucket
    probes: list[DecodeCandidate]  # forwards timed beside them for the statistics, never chosen
    forced: str | None  # the candidate every bucket replays, for experiments
    cache_timings: bool  # whether start-up timings may be read from and saved to disk

    def observe(self, run: Callable[[], torch.Tensor], batch: int) -> torch.Tensor:
        """Runs run() for a decode step of `batch` sequences; returns its hidden states."""

    def chosen(self, choice: dict[int, str], timings: dict[int, list[dict]]) -> None:
        """Told the candidate each bucket replays and the timings it was chosen by."""

    def statistics(self) -> dict: ...

    def report(self) -> str:
        """The statistics as lines for people."""


class Sequential:
    """The model's own forward, layer after layer."""
    name = SEQUENTIAL

    @staticmethod
    def bind(model) -> Forward:
        def forward(input_ids, positions, ctx):
            set_context(ctx)
            return model(input_ids, positions)
        return forward

    @staticmethod
    def setup_key() -> dict:
        return {}


def fastest(timings: list[dict], names: list[str]) -> str:
    """The candidate a bucket replays: of those faster than the sequential forward at every context
    timed, the one with the least total time; the sequential forward where none is."""
    faster = [n for n in names if n != SEQUENTIAL and all(t[f"{n}_ms"] < t[f"{SEQUENTIAL}_ms"] for t in timings)]
    return min(faster, key=lambda n: sum(t[f"{n}_ms"] for t in timings)) if faster else SEQUENTIAL


class DecodePaths:
    """One runner's decode forwards and their graphs. `run` is what every decode step calls."""

    def __init__(self, model, extensions: list[DecodeExtension] = ()):
        self.extensions = list(extensions)
        candidates = [Sequential, *(c for e in self.extensions for c in e.candidates)]
        self.forwards = {c.name: c.bind(model) for c in candidates}
        self.candidates = {c.name: c for c in candidates}
        forced = [e.forced for e in self.extensions if e.forced]
        self.forced = forced[0] if forced else None
        self.graphs: DecodeGraphs | None = None
        self.captured: dict[str, dict[int, CapturedGraph]] = {}
        # SM count of a lane (None: the whole GPU) -> bucket -> the graph a step replays there.
        self.plans: dict[int | None, dict[int, CapturedGraph]] = {}
        self.choice: dict[int, str] = {}
        self.timings: dict[int, list[dict]] = {}
        self._model = model

    def capture(self, graphs: DecodeGraphs, setup: dict, num_kvcache_blocks: int, max_model_len: int) -> None:
        """Captures every candidate for every bucket of `graphs` and chooses each bucket's. setup: what
        the timings depend on (device, model, dtypes, cache), for the on-disk record."""
        self.graphs = graphs
        for name, forward in self.forwards.items():
            start = time.perf_counter()
            self.captured[name] = graphs.capture(_static(forward, graphs))
            logger.info("captured %d %s decode CUDA graphs (batch 1..%d) in %.1f s", len(graphs.buckets),
                        name, graphs.buckets[-1], time.perf_counter() - start)
        if self.forced or len(self.forwards) == 1:
            self.choice = dict.fromkeys(graphs.buckets, self.forced or SEQUENTIAL)
            if any(e.probes for e in self.extensions):
                self.timings = self._time(num_kvcache_blocks, max_model_len, None)
        else:
            self.timings = self._timings(setup, num_kvcache_blocks, max_model_len)
            self.choice = {b: fastest(self.timings[b], list(self.forwards)) for b in graphs.buckets}
            paths = {name: sorted(b for b, c in self.choice.items() if c == name) for name in self.forwards}
            logger.info("decode path per batch bucket: %s", "; ".join(f"{n} for {b or 'none'}" for n, b in paths.items()))
        self.plans[None] = {b: self.captured[self.choice[b]][b] for b in graphs.buckets}
        for extension in self.extensions:
            extension.chosen(self.choice, self.timings)

    def capture_lane(self, lane: Lane) -> None:
        """Captures the sequential forward again on a lane (a green context's stream), with kernels sized for
        its SMs: a graph runs on the partition it was captured on, wherever it is launched."""
        with use_streams(lane.stream), on_sms(lane.num_sms):
            self.plans[lane.num_sms] = self.graphs.capture(_static(self.forwards[SEQUENTIAL], self.graphs), lane.stream)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: Context,
            lane: Lane | None = None) -> torch.Tensor:
        """The decode step's hidden states [batch, hidden]: the bucket's chosen graph on the lane (None: the
        whole GPU), or eagerly without graphs or past the largest bucket."""
        batch = input_ids.size(0)
        graphs = self.graphs
        if graphs is None or batch > graphs.buckets[-1]:
            forward = self.forwards[self.forced or SEQUENTIAL]
            return self._observed(lambda: forward(input_ids, positions, ctx), batch)
        bucket = graphs.load(input_ids, positions, ctx.slot_mapping, ctx.context_lens, ctx.block_tables)
        graph = self.plans[lane.num_sms if lane else None][bucket]
        return self._observed(graph.replay, batch)[:batch]

    def statistics(self) -> dict:
        return {"path_per_bucket": dict(self.choice), "timings_ms": dict(self.timings)}

    def close(self) -> None:
        """Frees the graphs and their memory pool."""
        self.graphs, self.captured, self.plans = None, {}, {}

    def _observed(self, run: Callable[[], torch.Tensor], batch: int) -> torch.Tensor:
        for extension in self.extensions:
            inner = run
            run = (lambda e, f: lambda: e.observe(f, batch))(extension, inner)
        return run()

    def _timings(self, setup: dict, num_kvcache_blocks: int, max_model_len: int) -> dict[int, list[dict]]:
        cache = None
        if all(e.cache_timings for e in self.extensions):
            key = {**setup, "buckets": self.graphs.buckets, "contexts": _contexts(max_model_len),
                   "candidates": {n: c.setup_key() for n, c in self.candidates.items()}}
            cache = TimingCache(key)
            cached = cache.load()
            if cached is not None:
                logger.info("decode path timings read from %s: path timing skipped", cache.path)
                return cached
        timings = self._time(num_kvcache_blocks, max_model_len, cache)
        if cache:
            cache.save(timings)
        return timings

    def _time(self, num_kvcache_blocks: int, max_model_len: int, cache) -> dict[int, list[dict]]:
        """Each bucket's captured graphs (and the extensions' probes) timed on synthetic batches."""
        start = time.perf_counter()
        graphs = self.graphs
        probes = {p.name: graphs.capture(_static(p.bind(self._model), graphs))
                  for e in self.extensions for p in e.probes}
        timings = {}
        for bucket in graphs.buckets:
            timings[bucket] = []
            for context_len in _contexts(max_model_len):
                graphs.load_synthetic(bucket, context_len, num_kvcache_blocks)
                replays = {f"{name}_ms": g[bucket].replay for name, g in {**self.captured, **probes}.items()}
                timings[bucket].append({"context_len": context_len, **median_replay_ms(replays)})
        logger.info("decode paths timed in %.1f s%s", time.perf_counter() - start,
                    f", saved to {cache.path}" if cache else "")
        return timings


def _static(forward: Forward, graphs: DecodeGraphs):
    """forward on the graphs' static inputs, for capture."""
    return lambda input_ids, positions: forward(input_ids, positions, graphs.context(input_ids.size(0)))


def _contexts(max_model_len: int) -> list[int]:
    return sorted({min(c, max_model_len - 1) for c in TIMED_CONTEXTS})


def setup_key(device: torch.device, hf_config, dtype: torch.dtype, kv_cache_dtype: str, block_size: int,
              attention_backend: str) -> dict:
    """Everything the path timings depend on besides the buckets and the candidates."""
    try:  # the exact driver build where the kernel module reports it
        driver = Path("/proc/driver/nvidia/version").read_text().splitlines()[0]
    except OSError:
        driver = str(torch._C._cuda_getDriverVersion())
    return {"gpu": torch.cuda.get_device_name(device), "driver": driver, "torch": torch.__version__,
            "source": source_digest(), "dependent_launch": bool(dependent_launch and dependent_launch.ENABLED),
            "model": hf_config.to_diff_dict(), "dtype": str(dtype), "kv_cache_dtype": kv_cache_dtype,
            "block_size": block_size, "attention_backend": attention_backend}


def source_digest(package: Path = PACKAGE) -> str:
    """A digest of the engine's Python source: timings taken by other code (kernels, models, modes) are not
    this code's, whichever path they favoured."""
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:20]


class TimingCache:
    """Start-up path timings of one setup in a JSON file under the cache root. The file is named by a
    digest of the setup's key and holds the key, so another setup never reads its timings."""

    def __init__(self, key: dict):
        self.key = json.loads(json.dumps(key, sort_keys=True, default=str))
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:20]
        self.path = cache_root() / "decode_paths" / f"{digest}.json"

    def load(self) -> dict[int, list[dict]] | None:
        if not self.path.exists():
            return None
        try:
            record = json.loads(self.path.read_text())
            if record["key"] != self.key:
                raise ValueError("its key does not match this setup")
            timings = {int(b): ts for b, ts in record["timings"].items()}
            names = [f"{n}_ms" for n in self.key["candidates"]]
            if sorted(timings) != sorted(self.key["buckets"]) or not all(timings.values()):
                raise ValueError("it does not cover every batch bucket")
            if not all(isinstance(t, dict) and all(isinstance(t.get(n), float) for n in names)
                       for ts in timings.values() for t in ts):
                raise ValueError("it lacks the time of some candidate")
            return timings
        except (OSError, ValueError, KeyError, TypeError) as e:
            logger.warning("ignoring the decode path cache %s: %s: %s", self.path, type(e).__name__, e)
            return None

    def save(self, timings: dict[int, list[dict]]) -> None:
        record = {"key": self.key, "timings": timings}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(record))
            tmp.replace(self.path)
        except OSError as e:
            logger.warning("could not save the decode path cache %s: %s", self.path, e)


def mean_ms(timings: dict[int, list[dict]], name: str) -> float | None:
    """The mean start-up time of a candidate or probe over every bucket and context timed."""
    times = [t.get(f"{name}_ms") for ts in timings.values() for t in ts]
    return statistics.mean(times) if times and None not in times else None
