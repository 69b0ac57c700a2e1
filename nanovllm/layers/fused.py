import torch

try:
    from nanovllm.layers import triton_ops
except ImportError:  # triton is a Linux-only dependency
    triton_ops = None


def fused_ops(x: torch.Tensor):
    """The fused Triton ops when x can use them (a CUDA tensor and triton installed), else None."""
    return triton_ops if triton_ops is not None and x.is_cuda else None
