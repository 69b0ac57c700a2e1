import torch
from torch import nn

from nanovllm.layers.fused import fused_ops


class Sampler(nn.Module):
    """Greedy where temperature is 0, otherwise a draw from softmax(logits / temperature)."""

    def forward(self, logits: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
        ops = fused_ops(logits)
        if ops is not None:
            # Drawn from torch's generator, so torch.manual_seed makes runs repeatable.
            seed = int(torch.randint(0, 2 ** 31 - 1, ()))
            return ops.sample(logits, temperatures, seed)
        logits = logits.float()
        greedy = logits.argmax(dim=-1)
        scaled = logits / temperatures.clamp(min=1e-5).unsqueeze(1)
        probs = torch.softmax(scaled, dim=-1)
        # Gumbel-style draw: argmax(p / e) with e ~ Exp(1) samples from p without a host sync.
        sampled = probs.div_(torch.empty_like(probs).exponential_(1).clamp_(min=1e-10)).argmax(dim=-1)
        return torch.where(temperatures == 0, greedy, sampled)
