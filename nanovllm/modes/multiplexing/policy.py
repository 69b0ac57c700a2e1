"""The first-token side of the multiplexing policy: whether a queued prompt would get its first token past
the bound if the prefills ran on a split, how long a prefill on a split may be, and how often a prompt at
risk may take the whole GPU between two decode steps instead."""
from collections.abc import Iterable
from dataclasses import dataclass

# pd_max_ttft_ms unset: this times the start-up profile's whole-GPU prefill of a full token budget, the
# longest prefill batch the sequential engine makes a prompt wait for.
DEFAULT_TTFT_FACTOR = 1.0
# A prefill batch on a split takes at most this share of the first-token bound: a long prompt is cut into
# chunks, and between them the choice is taken again while the prompts behind can still meet the bound.
CHUNK_SHARE = 0.25
MIN_CHUNK_TOKENS = 256  # shorter chunks would spend most of their time reading the weights
# Whole-GPU prefills for the first-token bound delay a decode step past the ITL bound: at most this share
# of the decode steps, half the 1% of inter-token gaps that a p99 leaves above it.
ITL_ALLOWANCE = 0.005


@dataclass(frozen=True)
class QueuedPrompt:
    """A prompt still to prefill: the tokens left to compute and how long it has waited since it was
    added (None for a preempted sequence, whose first token is out)."""
    tokens: int
    waited_ms: float | None


def ttft_bound_ms(max_ttft_ms: float | None, full_prefill_ms: float) -> float:
    """The first-token bound: max_ttft_ms, by default DEFAULT_TTFT_FACTOR x the whole-GPU prefill of a
    full token budget."""
    return max_ttft_ms if max_ttft_ms is not None else DEFAULT_TTFT_FACTOR * full_prefill_ms


def first_token_at_risk(queue: Iterable[QueuedPrompt], ms_per_token: float, bound_ms: float) -> bool:
    """Whether a queued prompt (in the order they are prefilled) would get its first token later than
    bound_ms after it was added if the prefills ran one after the other at ms_per_token: each waits for
    its own tokens and those of every prompt ahead. Reads the queue only up to the first such prompt."""
    ahead_ms = 0.0
    for prompt in queue:
        ahead_ms += prompt.tokens * ms_per_token
        if prompt.waited_ms is not None and prompt.waited_ms + ahead_ms > bound_ms:
            return True
    return False


def chunk_tokens(bound_ms: float, ms_per_token: float) -> int:
    """The most tokens of a prefill batch on a split whose prefills take ms_per_token: CHUNK_SHARE of the
    first-token bound, at least MIN_CHUNK_TOKENS."""
    return max(MIN_CHUNK_TOKENS, int(CHUNK_SHARE * bound_ms / ms_per_token))


class ItlAllowance:
    """The decode steps taken and the whole-GPU prefills run for the first-token bound between them: one
    more may run while they are at most ITL_ALLOWANCE of the steps (the first at once)."""

    def __init__(self):
        self.steps = self.spent = 0

    def available(self) -> bool:
        return self.spent <= ITL_ALLOWANCE * self.steps
