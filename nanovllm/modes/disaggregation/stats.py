import time


class PDStatistics:
    """What the two runners did: work per side, KV handoffs, and the time each side waited on the other."""

    def __init__(self, prefill_device, decode_device, transfer_mode: str):
        self.prefill_device, self.decode_device = str(prefill_device), str(decode_device)
        self.transfer_mode = transfer_mode
        self.prefill_tokens = self.prefill_batches = 0
        self.prefill_seconds = 0.0
        self.decode_tokens = self.decode_steps = 0
        self.decode_seconds = 0.0
        # Decode steps that ran while a prefill was in flight, kept apart to show whether they slow down.
        self.decode_steps_beside_prefill = 0
        self.decode_seconds_beside_prefill = 0.0
        self.kv_transfers = self.kv_transfer_copies = self.kv_transfer_bytes = 0
        self.kv_transfer_seconds = 0.0
        self.prefill_wait_for_decode_room_seconds = 0.0
        self.decode_idle_seconds = 0.0
        self._blocked_since: float | None = None

    def record_prefill(self, num_tokens: int, seconds: float) -> None:
        self.prefill_batches += 1
        self.prefill_tokens += num_tokens
        self.prefill_seconds += seconds

    def record_decode(self, num_tokens: int, seconds: float, beside_prefill: bool) -> None:
        self.decode_steps += 1
        self.decode_tokens += num_tokens
        self.decode_seconds += seconds
        if beside_prefill:
            self.decode_steps_beside_prefill += 1
            self.decode_seconds_beside_prefill += seconds

    def record_transfer(self, num_seqs: int, transfer) -> None:
        self.kv_transfers += num_seqs
        self.kv_transfer_copies += transfer.num_copies
        self.kv_transfer_bytes += transfer.num_bytes
        self.kv_transfer_seconds += transfer.seconds()

    def blocked_on_decode_room(self, blocked: bool) -> None:
        """Called at each prefill admission attempt: times the stretches in which the next prompt waited
        for decode blocks."""
        now = time.perf_counter()
        if blocked and self._blocked_since is None:
            self._blocked_since = now
        elif not blocked and self._blocked_since is not None:
            self.prefill_wait_for_decode_room_seconds += now - self._blocked_since
            self._blocked_since = None

    def as_dict(self) -> dict:
        def mean_ms(seconds, count):
            return seconds / count * 1e3 if count else None

        alone = self.decode_steps - self.decode_steps_beside_prefill
        return {
            "prefill_device": self.prefill_device, "decode_device": self.decode_device,
            "kv_transfer_mode": self.transfer_mode,
            "prefill_tokens": self.prefill_tokens, "prefill_batches": self.prefill_batches,
            "prefill_time_s": self.prefill_seconds,
            "decode_tokens": self.decode_tokens, "decode_steps": self.decode_steps, "decode_time_s": self.decode_seconds,
            "decode_step_ms_alone": mean_ms(self.decode_seconds - self.decode_seconds_beside_prefill, alone),
            "decode_step_ms_beside_prefill": mean_ms(self.decode_seconds_beside_prefill, self.decode_steps_beside_prefill),
            "kv_transfers": self.kv_transfers, "kv_transfer_copies": self.kv_transfer_copies,
            "kv_transfer_bytes": self.kv_transfer_bytes, "kv_transfer_time_s": self.kv_transfer_seconds,
            "kv_transfer_gb_per_s": (self.kv_transfer_bytes / self.kv_transfer_seconds / 1e9
                                     if self.kv_transfer_seconds > 0 else None),
            "prefill_wait_for_decode_room_s": self.prefill_wait_for_decode_room_seconds,
            "decode_idle_s": self.decode_idle_seconds,
        }


def show(value, unit: str = "") -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}{unit}" if isinstance(value, float) else f"{value}{unit}"


def report(stats: dict) -> str:
    """The statistics of a two-runner loop (PDStatistics.as_dict) as lines for people."""

    lines = ["[PD Statistics]",
             f"  Prefill runner: {stats['prefill_device']}, decode runner: {stats['decode_device']}, "
             f"KV handoff: {stats['kv_transfer_mode']}",
             f"  Prefill: {stats['prefill_tokens']} tokens in {stats['prefill_batches']} batches, "
             f"{show(stats['prefill_time_s'], ' s')}",
             f"  Decode: {stats['decode_tokens']} tokens in {stats['decode_steps']} steps, "
             f"{show(stats['decode_time_s'], ' s')}",
             f"  Decode step: {show(stats['decode_step_ms_alone'], ' ms')} alone, "
             f"{show(stats['decode_step_ms_beside_prefill'], ' ms')} beside a prefill",
             f"  KV transfers: {stats['kv_transfers']} sequences, {stats['kv_transfer_copies']} copies, "
             f"{stats['kv_transfer_bytes'] / 2 ** 20:.1f} MiB in {show(stats['kv_transfer_time_s'], ' s')} "
             f"({show(stats['kv_transfer_gb_per_s'], ' GB/s')})",
             f"  Prefill waited for decode room: {show(stats['prefill_wait_for_decode_room_s'], ' s')}",
             f"  Decode idled waiting for work: {show(stats['decode_idle_s'], ' s')}"]
    return "\n".join(lines)
