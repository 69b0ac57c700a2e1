"""Requests as the engine takes them in: a prompt (text or token ids) and its SamplingParams, checked
against the model, its tokenizer and max_model_len, and made into a Sequence. Every check runs before
anything is queued, so that bad input leaves the engine untouched."""
import numbers

import numpy as np
import torch

from nanovllm.config import Config
from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams


class Requests:
    """Checked sequences for one engine; without a tokenizer, prompts must be token ids."""

    def __init__(self, config: Config, tokenizer):
        self.model = config.model
        self.vocab_size = config.hf_config.vocab_size
        self.max_model_len = config.scheduler.max_model_len
        self.tokenizer = tokenizer

    def batch(self, prompts, sampling_params) -> list[Sequence]:
        """generate()'s arguments as sequences, one per prompt; an error names the prompt's index."""
        if not isinstance(prompts, (list, tuple)):
            raise TypeError("prompts must be a list of strings or a list of token-id lists")
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if not isinstance(sampling_params, (list, tuple)) or not all(isinstance(sp, SamplingParams)
                                                                     for sp in sampling_params):
            raise TypeError("sampling_params must be a SamplingParams or a list of them")
        if len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(sampling_params)} sampling params for {len(prompts)} prompts")
        seqs = []
        for i, (prompt, params) in enumerate(zip(prompts, sampling_params)):
            try:
                seqs.append(self.sequence(prompt, params))
            except (TypeError, ValueError) as e:
                e.args = (f"prompt {i}: {e}",)
                raise
        return seqs

    def sequence(self, prompt: str | list[int], sampling_params: SamplingParams) -> Sequence:
        """One request as a sequence, after checking what SamplingParams cannot check alone."""
        if not isinstance(sampling_params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, got {type(sampling_params).__name__}")
        if sampling_params.stop and self.tokenizer is None:
            raise ValueError(f"stop strings need a tokenizer and {self.model} has no tokenizer files: "
                             "leave stop empty (stop_token_ids work without one)")
        if any(t >= self.vocab_size for t in sampling_params.stop_token_ids):
            raise ValueError(f"stop_token_ids must be in [0, {self.vocab_size}), got "
                             f"{list(sampling_params.stop_token_ids)}")
        return Sequence(self.token_ids(prompt), sampling_params)

    def token_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{self.model} has no tokenizer files: pass prompts as lists of token ids")
            token_ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple, np.ndarray, torch.Tensor)):
            token_ids = _integers(prompt)
        else:
            raise TypeError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        vocab, max_model_len = self.vocab_size, self.max_model_len
        if not token_ids:
            raise ValueError("empty prompt: a prompt needs at least one token")
        if len(token_ids) >= max_model_len:
            raise ValueError(f"prompt of {len(token_ids)} tokens does not fit max_model_len={max_model_len} "
                             f"(at most {max_model_len - 1} prompt tokens)")
        if min(token_ids) < 0 or max(token_ids) >= vocab:
            position = next(i for i, t in enumerate(token_ids) if not 0 <= t < vocab)
            raise ValueError(f"token ids must be in [0, {vocab}): token {position} of the prompt is "
                             f"{token_ids[position]}")
        return token_ids


def _integers(prompt) -> list[int]:
    """The prompt's ids as Python ints. Integers of numpy and torch count, as in vLLM (a numpy array or a
    torch tensor of ids too); anything else is a TypeError naming the element and its type."""
    if isinstance(prompt, (np.ndarray, torch.Tensor)):
        if prompt.ndim != 1:
            raise TypeError(f"an array of token ids must be one-dimensional, got one of shape {tuple(prompt.shape)}")
        prompt = prompt.tolist()
    if all(type(t) is int for t in prompt):  # the common case: no isinstance checks or conversions per token
        return list(prompt)
    ids = []
    for i, t in enumerate(prompt):
        if isinstance(t, torch.Tensor) and t.ndim == 0 and not (t.is_floating_point() or t.is_complex()
                                                                 or t.dtype == torch.bool):
            t = t.item()
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            raise TypeError(f"token ids must be integers: element {i} of the prompt is {t!r} ({type(t).__qualname__})")
        ids.append(int(t))
    return ids
