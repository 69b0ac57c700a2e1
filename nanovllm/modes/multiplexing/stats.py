FULL_GPU = "full GPU"
IN_LINE = "full GPU, between decode steps"
FILLING = "full GPU, between decode steps, filling the batch"
FILLING_IN_BOUND = "full GPU, between decode steps, filling the batch, cut to the ITL bound"
FIRST_TOKEN = "full GPU, between decode steps, first-token bound"


class SplitStatistics:
    """Where the multiplexing loop's work ran: each decode step and each prefill on the whole GPU (a
    prefill alone, or between decode steps: short, filling the batch or for the first-token bound) or on a
    split, the split chosen for each range of decode batches (and how often a choice changed while
    serving), the start-up profile of every split and the decode steps observed on it per bucket; and how
    often each bound was at risk: decode steps on a split over the ITL bound (what moves a bucket), and
    prefills beside decoding sequences launched while a queued prompt's first token was at risk of coming
    past the first-token bound, by where they ran; and the prefills between decode steps that spent the ITL
    allowance (and may have pushed a step past the ITL bound), by label. Reported beside the PDStatistics."""

    def __init__(self, partitions: str):
        self.partitions = partitions  # how prefill and decode share the GPU
        self.split_per_batch: dict[str, str] = {}  # ranges of decode batches -> the split each takes
        self.split_profiles: dict[str, dict] = {}
        self.split_observed: dict[str, dict[int, tuple[int, float]]] = {}  # bucket -> (steps, mean ms)
        self.split_changes = 0
        self.decode_steps_in: dict[str, int] = {}
        self.decode_seconds_in: dict[str, float] = {}
        self.prefills_in: dict[str, int] = {}
        self.bounds: dict[str, str] = {}  # the ITL and first-token bounds the choices follow
        self.itl_over_bound_steps = 0
        self.ttft_at_risk: dict[str, int] = {}  # where each prefill run with a first token at risk ran
        self.itl_allowance_spent_by: dict[str, int] = {}  # the prefills that spent the ITL allowance, by label

    def record_split_decode(self, split: str, seconds: float) -> None:
        self.decode_steps_in[split] = self.decode_steps_in.get(split, 0) + 1
        self.decode_seconds_in[split] = self.decode_seconds_in.get(split, 0.0) + seconds

    def record_split_change(self, split_per_batch: dict[str, str]) -> None:
        self.split_per_batch = split_per_batch
        self.split_changes += 1

    def record_split_prefill(self, split: str) -> None:
        self.prefills_in[split] = self.prefills_in.get(split, 0) + 1

    def record_ttft_at_risk(self, ran_on: str) -> None:
        self.ttft_at_risk[ran_on] = self.ttft_at_risk.get(ran_on, 0) + 1

    def record_itl_allowance_spent(self, label: str) -> None:
        self.itl_allowance_spent_by[label] = self.itl_allowance_spent_by.get(label, 0) + 1

    def as_dict(self) -> dict:
        total = sum(self.decode_seconds_in.values())
        return {
            "partitions": self.partitions, "split_per_batch": dict(self.split_per_batch),
            "split_changes": self.split_changes, "split_profiles": self.split_profiles,
            "decode_step_ms_observed_per_split": {
                split: {bucket: {"steps": steps, "mean_ms": ms} for bucket, (steps, ms) in sorted(observed.items())}
                for split, observed in self.split_observed.items() if observed},
            "decode_steps_per_split": dict(self.decode_steps_in),
            "decode_time_per_split_s": dict(self.decode_seconds_in),
            "decode_time_share_per_split": {k: v / total for k, v in self.decode_seconds_in.items()} if total else {},
            "prefills_per_split": dict(self.prefills_in),
            "bounds": dict(self.bounds), "itl_over_bound_steps": self.itl_over_bound_steps,
            "ttft_at_risk_prefills": sum(self.ttft_at_risk.values()), "ttft_at_risk_ran_on": dict(self.ttft_at_risk),
            "itl_allowance_spent_by": dict(self.itl_allowance_spent_by),
        }


def report_lines(stats: dict) -> list[str]:
    """The lines SplitStatistics.as_dict adds to the prefill/decode report (disaggregation/stats.py)."""
    chosen = "; ".join(f"{batches}: {split}" for batches, split in stats["split_per_batch"].items())
    lines = [f"  Partitions: {stats['partitions']}; split under prefill by decode batch: {chosen or 'none'} "
             f"({stats['split_changes']} changes while serving)"]
    for split, observed in stats["decode_step_ms_observed_per_split"].items():
        steps = ", ".join(f"{bucket}: {o['mean_ms']:.2f} ms ({o['steps']})" for bucket, o in observed.items())
        lines.append(f"  Decode step beside prefills on {split}, per batch bucket: {steps}")
    for split, steps in stats["decode_steps_per_split"].items():
        share = stats["decode_time_share_per_split"].get(split, 0.0)
        lines.append(f"  Decode on {split}: {steps} steps, {stats['decode_time_per_split_s'][split]:.3f} s "
                     f"({100 * share:.1f}% of decode time)")
    for split, count in stats["prefills_per_split"].items():
        lines.append(f"  Prefill batches on {split}: {count}")
    if stats["bounds"]:
        ran_on = "; ".join(f"{where}: {n}" for where, n in stats["ttft_at_risk_ran_on"].items())
        spent = "; ".join(f"{label}: {n}" for label, n in stats["itl_allowance_spent_by"].items()) or "none"
        lines.append(f"  Bounds: ITL {stats['bounds']['itl']}, first token {stats['bounds']['ttft']}; decode steps "
                     f"over the ITL bound on a split: {stats['itl_over_bound_steps']}; prefills with a first token "
                     f"at risk: {stats['ttft_at_risk_prefills']}{f' ({ran_on})' if ran_on else ''}; prefills "
                     f"that spent the ITL allowance: {spent}")
    return lines
