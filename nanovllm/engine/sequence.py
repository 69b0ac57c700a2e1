from enum import Enum, auto
from itertools import count

from nanovllm.engine.stop_strings import StopStrings
from nanovllm.sampling_params import SamplingParams

# With async scheduling, the place of a token that was sampled on the device but is not yet known here.
PENDING_TOKEN = -1


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """One request: its tokens, its KV blocks and how far its KV has been computed."""

    counter = count()

    def __init__(self, token_ids: list[int], sampling_params: SamplingParams):
        self.seq_id = next(Sequence.counter)
        self.status = SequenceStatus.WAITING
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.num_cached_tokens = 0
        self.num_computed_tokens = 0
        self.num_scheduled_tokens = 0
        self.block_table: list[int] = []
        self.temperature = sampling_params.temperature
        self.max_tokens = sampling_params.max_tokens
        self.ignore_eos = sampling_params.ignore_eos
        # Greedy sequences ignore the cuts and the seed. top_k -1 and 0 both keep all tokens: 0 here.
        sampled = sampling_params.temperature > 0
        self.top_k = max(sampling_params.top_k, 0) if sampled else 0
        self.top_p = sampling_params.top_p if sampled else 1.0
        self.min_p = sampling_params.min_p if sampled else 0.0
        self.cuts_tokens = bool(self.top_k or self.top_p < 1 or self.min_p)
        self.seed = sampling_params.seed if sampled else None
        self.stop_token_ids = sampling_params.stop_token_ids
        self.stop_strings = StopStrings(sampling_params.stop, self.num_prompt_tokens) if sampling_params.stop else None
        self.finish_reason: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def num_completion_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def scheduled_positions(self) -> range:
        return range(self.num_computed_tokens, self.num_computed_tokens + self.num_scheduled_tokens)

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
