"""Programmatic dependent launch (Hopper and later): a kernel launched with it may start while the kernel
before it on the stream finishes. Its programs first load what that kernel cannot have written (weights,
the step's inputs where they were written before it), then wait for it (`wait_for_previous`) before they
read anything else or write anything. In a decode step, a chain of small kernels inside one CUDA graph,
each launch and the first weight tile of each GEMM then overlap the tail of the kernel before.

A kernel lets the next one launch once its own wait is over, so at most two kernels of the chain are
resident at once. NANOVLLM_DEPENDENT_LAUNCH=0 (read at import) launches every kernel the ordinary way."""
import functools
import os

import torch
import triton
import triton.language as tl

_SETTING = os.environ.get("NANOVLLM_DEPENDENT_LAUNCH", "1")
if _SETTING not in ("0", "1"):
    raise ValueError(f"NANOVLLM_DEPENDENT_LAUNCH must be 0 or 1, got {_SETTING!r}")
ENABLED = _SETTING == "1" and os.environ.get("TRITON_INTERPRET") != "1"


@functools.cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def dependent_launch(device: torch.device) -> bool:
    """Whether kernels on `device` launch as dependents of the kernel before them."""
    return ENABLED and device.type == "cuda" and _capable(device.index if device.index is not None
                                                          else torch.cuda.current_device())


@triton.jit
def wait_for_previous(PDL: tl.constexpr):
    """With PDL: waits until the kernel before has finished and its writes are visible, then lets the next
    kernel launch. Without: nothing (the launch itself waited)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
