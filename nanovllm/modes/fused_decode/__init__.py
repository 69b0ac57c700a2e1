"""The fused decode forward (fused_decode): RMSNorm, SiLU·mul and the residual adds fused into skinny
GEMMs that stream the weights (kernels/decode_linear.py), added to the runner's decode paths."""
from nanovllm.modes.fused_decode.extension import fused_decode_extension

__all__ = ["fused_decode_extension"]
