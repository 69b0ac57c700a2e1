import sys
from dataclasses import dataclass

import torch
from torch import nn

from nanovllm import kernels

ALL_TOKENS = sys.maxsize


@dataclass
class SamplingInputs:
    """One step's sampling options, a row per sequence; the optional tensors are left out (None) when
    no row of the step uses them, so that plain batches pay for none of them.

    top_k [B] int64 (0: all), top_p [B] float32 (1: all), min_p [B] float32 (0: none) come together,
    with top_width: how many of the most likely tokens the widest row's top-k and top-p need to see
    (ALL_TOKENS: the whole vocabulary). row_seeds [B, 2] int64: each row's request seed (-1: none)
    and the index of the token being drawn in its completion.
    """
    temperatures: torch.Tensor
    top_k: torch.Tensor | None = None
    top_p: torch.Tensor | None = None
    min_p: torch.Tensor | None = None
    top_width: int = ALL_TOKENS
    row_seeds: torch.Tensor | None = None


class Sampler(nn.Module):
    """Greedy where temperature is 0, otherwise a draw from softmax(logits / temperature) cut to each
    row's top-k, top-p and min-p tokens."""

    def forward(self, logits: torch.Tensor, inputs: SamplingInputs) -> torch.Tensor:
        if inputs.top_k is not None:
            logits = keep_top_tokens(logits, inputs)
        if kernels.on_gpu(logits):
            # Drawn from torch's generator, so torch.manual_seed makes runs repeatable.
            seed = int(torch.randint(0, 2 ** 31 - 1, ()))
            return kernels.sampling.sample(logits, inputs.temperatures, seed, inputs.row_seeds)
        return sample_reference(logits, inputs.temperatures, inputs.row_seeds)

    def warm_up(self, vocab_size: int, dtype: torch.dtype, device: torch.device) -> None:
        """Compiles the kernels of both kinds of batch, with and without seeded rows."""
        logits = torch.zeros(2, vocab_size, dtype=dtype, device=device)
        temperatures = torch.tensor([0.0, 1.0], device=device)
        self(logits, SamplingInputs(temperatures))
        self(logits, SamplingInputs(temperatures, row_seeds=torch.tensor([[-1, 0], [0, 0]], device=device)))


def keep_top_tokens(logits: torch.Tensor, inputs: SamplingInputs) -> torch.Tensor:
    """logits with -inf outside each row's kept tokens: its top-k of softmax(logits / temperature),
    then the fewest of those whose renormalised probability reaches top-p, then those with a
    probability at least min-p times the largest. Each cut keeps every token tied with its last one.

    The cuts are thresholds on the scaled logits, found among the row's top_width largest values
    (a top-k of the batch, or a full sort where a row takes top-p over the whole vocabulary)."""
    scaled = logits.float() / inputs.temperatures.clamp(min=1e-5).unsqueeze(1)
    vocab_size = scaled.size(1)
    width = min(inputs.top_width, vocab_size)
    top = scaled.topk(width, dim=-1).values if width < vocab_size else scaled.sort(dim=-1, descending=True).values
    top_k, top_p = inputs.top_k.unsqueeze(1), inputs.top_p.unsqueeze(1)
    kth = torch.where(top_k > 0, top.gather(1, top_k.clamp(1, width) - 1), float("-inf"))
    probs = torch.softmax(top.masked_fill(top < kth, float("-inf")), dim=-1)
    mass_before = probs.cumsum(dim=-1).sub_(probs)
    num_kept = ((mass_before < top_p) & (top >= kth)).sum(dim=-1, keepdim=True)
    top_p_cut = torch.where(top_p < 1, top.gather(1, num_kept - 1), float("-inf"))
    min_p_cut = top[:, :1] + inputs.min_p.log().unsqueeze(1)
    threshold = torch.maximum(torch.maximum(kth, top_p_cut), min_p_cut)
    return logits.masked_fill(scaled < threshold, float("-inf"))


def _generator_seed(seed: int, token_index: int) -> int:
    """The torch.Generator seed of a seeded request's draw of its token_index-th token."""
    return (seed * 0x9E3779B97F4A7C15 + token_index) % 2 ** 64


def sample_reference(logits: torch.Tensor, temperatures: torch.Tensor,
                     row_seeds: torch.Tensor | None = None) -> torch.Tensor:
    """The torch path, where the fused kernel is not available (CPU, or no triton)."""
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperatures.clamp(min=1e-5).unsqueeze(1), dim=-1)
    # Gumbel-style draw: argmax(p / e) with e ~ Exp(1) samples from p without a host sync.
    noise = torch.empty_like(probs).exponential_(1)
    if row_seeds is not None:
        # Every row's noise is drawn from the global generator first, so that its state after the
        # step does not depend on which rows have seeds.
        for row, (seed, token_index) in enumerate(row_seeds.tolist()):
            if seed >= 0:
                generator = torch.Generator(logits.device).manual_seed(_generator_seed(seed, token_index))
                noise[row].exponential_(1, generator=generator)
    sampled = probs.div_(noise.clamp_(min=1e-10)).argmax(dim=-1)
    return torch.where(temperatures == 0, greedy, sampled)
