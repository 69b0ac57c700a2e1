import torch

from nanovllm.engine.sequence import Sequence
from nanovllm.layers.sampler import ALL_TOKENS, SamplingInputs


def sampling_inputs(seqs: list[Sequence], to_device) -> SamplingInputs:
    """The sampler's inputs for one step; to_device(values, dtype) makes a tensor on its device.
    Only the options that some sequence of the step uses are built."""
    inputs = SamplingInputs(to_device([seq.temperature for seq in seqs], torch.float32))
    if any(seq.cuts_tokens for seq in seqs):
        inputs.top_k = to_device([seq.top_k for seq in seqs], torch.int64)
        inputs.top_p = to_device([seq.top_p for seq in seqs], torch.float32)
        inputs.min_p = to_device([seq.min_p for seq in seqs], torch.float32)
        # Top-p over a top-k needs only the top k; top-p alone needs the whole vocabulary.
        inputs.top_width = max(seq.top_k or (ALL_TOKENS if seq.top_p < 1 else 1) for seq in seqs)
    if any(seq.seed is not None for seq in seqs):
        inputs.row_seeds = to_device([[-1 if seq.seed is None else seq.seed, seq.num_completion_tokens]
                                      for seq in seqs], torch.int64)
    return inputs
