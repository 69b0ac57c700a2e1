from dataclasses import dataclass

MAX_SEED = 2 ** 63
# The sampler divides by temperatures in float32; no vocabulary reaches 2**31 tokens.
MAX_TEMPERATURE = 3.0e38
MAX_TOP_K = 2 ** 31


@dataclass(frozen=True)
class SamplingParams:
    """How one request is sampled and when it stops; immutable, so validated once, here.

    temperature 0 is greedy and ignores top_k, top_p and min_p. Otherwise the logits are divided by
    the temperature, then cut to the top_k most likely tokens (-1 or 0: all), then to the fewest of
    those whose probability adds up to top_p (1: all), then to the tokens at least min_p times as
    likely as the most likely one (0: all); the token is drawn from what is left, renormalised.
    """
    temperature: float = 1.0
    max_tokens: int = 64
    ignore_eos: bool = False
    top_k: int = -1
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | tuple[str, ...] | None = ()
    stop_token_ids: list[int] | tuple[int, ...] | None = ()

    def __post_init__(self):
        _check("temperature", self.temperature, float, lambda t: 0 <= t <= MAX_TEMPERATURE,
               "a finite number >= 0 (0 is greedy), at most 3e38")
        _check("max_tokens", self.max_tokens, int, lambda n: n >= 1, "an integer >= 1")
        if not isinstance(self.ignore_eos, bool):
            raise TypeError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        _check("top_k", self.top_k, int, lambda k: -1 <= k < MAX_TOP_K,
               "an integer in [1, 2**31), or -1 or 0 for all tokens")
        _check("top_p", self.top_p, float, lambda p: 0 < p <= 1, "in (0, 1] (1 keeps all tokens)")
        _check("min_p", self.min_p, float, lambda p: 0 <= p <= 1, "in [0, 1] (0 keeps all tokens)")
        if self.seed is not None:
            _check("seed", self.seed, int, lambda s: 0 <= s < MAX_SEED, "None or an integer in [0, 2**63)")
        object.__setattr__(self, "stop", _stop_strings(self.stop))
        object.__setattr__(self, "stop_token_ids", _stop_token_ids(self.stop_token_ids))


def _check(name: str, value, kind: type, ok, allowed: str) -> None:
    """A TypeError unless value is an int (kind int) or a real number (kind float), then a
    ValueError unless ok(value); NaN fails every range."""
    types = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, types):
        raise TypeError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if not ok(value):
        raise ValueError(f"invalid {name} {value!r}: must be {allowed}")


def _stop_strings(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    strings = (stop,) if isinstance(stop, str) else stop
    if not isinstance(strings, (list, tuple)) or not all(isinstance(s, str) for s in strings):
        raise TypeError(f"stop must be a string or a list of strings, got {stop!r}")
    if not all(strings):
        raise ValueError(f"invalid stop {stop!r}: stop strings must not be empty")
    return tuple(strings)


def _stop_token_ids(token_ids) -> tuple[int, ...]:
    if token_ids is None:
        return ()
    if not isinstance(token_ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                           for t in token_ids):
        raise TypeError(f"stop_token_ids must be a list of integer token ids, got {token_ids!r}")
    if any(t < 0 for t in token_ids):
        raise ValueError(f"invalid stop_token_ids {token_ids!r}: token ids must be >= 0")
    return tuple(token_ids)
