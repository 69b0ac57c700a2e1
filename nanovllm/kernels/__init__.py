"""Every Triton kernel of the engine: paged attention (attention.py), the fused per-layer ops (fused.py),
the decode GEMMs with their fused prologues and epilogues (decode_linear.py) and sampling (sampling.py);
rope.py holds the q/k norm and RoPE arithmetic that fused.py and attention.py share, dependent_launch.py
lets the decode kernels overlap the tail of the kernel before.
triton is a Linux-only dependency: where it cannot be imported, `on_gpu` is always False and the layers
run their torch paths."""
try:
    from nanovllm.kernels import decode_linear, dependent_launch, fused, sampling
except ImportError:
    decode_linear = dependent_launch = fused = sampling = None


def on_gpu(x) -> bool:
    """Whether the kernels can run on x: triton is installed and x is a CUDA tensor."""
    return fused is not None and x.is_cuda
