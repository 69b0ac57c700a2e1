import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class Lane:
    """Where a role's kernels run: a stream (a green context's) and the SMs it has."""
    stream: torch.cuda.Stream
    num_sms: int


@contextmanager
def use_streams(*streams: torch.cuda.Stream | None):
    """Makes each stream current on its device (and the first one's device current); on CPU, where
    there are no streams, does nothing."""
    with ExitStack() as stack:
        streams = [s for s in streams if s is not None]
        if streams:
            stack.enter_context(torch.cuda.device(streams[0].device))
        for stream in streams:
            stack.enter_context(torch.cuda.stream(stream))
        yield


class StreamTimer:
    """Marks the start and the end of work queued on a stream with CUDA events, so that other streams
    can be ordered after it and the host can poll it. On CPU (stream None) work runs as it is queued:
    the marks are wall-clock times and the work is always done."""

    def __init__(self, stream: torch.cuda.Stream | None):
        self.stream = stream
        if stream is None:
            self.start_time = self.end_time = time.perf_counter()
        else:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record(stream)

    def stop(self) -> None:
        if self.stream is None:
            self.end_time = time.perf_counter()
        else:
            self.end.record(self.stream)

    def done(self) -> bool:
        return self.stream is None or self.end.query()

    def wait(self) -> None:
        if self.stream is not None:
            self.end.synchronize()

    def seconds(self) -> float:
        if self.stream is None:
            return self.end_time - self.start_time
        self.wait()
        return self.start.elapsed_time(self.end) / 1e3

    def order_before(self, stream: torch.cuda.Stream | None) -> None:
        """Makes work queued later on `stream` wait for the work this timer marks."""
        if stream is not None and self.stream is not None:
            stream.wait_event(self.end)


def order_after(timers: tuple[StreamTimer | None, ...], stream: torch.cuda.Stream | None) -> None:
    """Makes work queued later on `stream` wait for the work each timer (None: no work) marks."""
    for timer in timers:
        if timer is not None:
            timer.order_before(stream)
