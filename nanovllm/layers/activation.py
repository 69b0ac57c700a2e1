import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.layers.fused import fused_ops


class SiluAndMul(nn.Module):

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = fused_ops(x)
        if ops is not None:
            return ops.silu_and_mul(x)
        gate, up = x.chunk(2, -1)
        return F.silu(gate) * up
