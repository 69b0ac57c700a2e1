import statistics

import torch


def median_replay_ms(replays: dict, repeats: int = 5, before=None) -> dict:
    """Median milliseconds of each named replay function, timed with CUDA events; replays interleave
    so that drift hits all alike. before(), if given, runs ahead of each timed replay, untimed."""
    for fn in replays.values():
        fn()
    times = {name: [] for name in replays}
    for _ in range(repeats):
        for name, fn in replays.items():
            if before is not None:
                before()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end))
    return {name: statistics.median(t) for name, t in times.items()}
