import torch
import torch.nn.functional as F
from torch import nn

from nanovllm import kernels


class SiluAndMul(nn.Module):

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.on_gpu(x):
            return kernels.fused.silu_and_mul(x)
        gate, up = x.chunk(2, -1)
        return F.silu(gate) * up
