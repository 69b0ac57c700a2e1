"""How many SMs the kernels launched now run on: a green-context partition's, or the whole device's.
Kernels that size their grids by the SM count (split-KV attention) read it here."""
import contextlib
import functools

import torch

_SM_LIMIT: int | None = None  # the SMs of the partition that kernels launched now run on; None: the device's


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@contextlib.contextmanager
def on_sms(num_sms: int | None):
    """Kernels launched inside size their grids for num_sms SMs (a partition's); None: as outside."""
    global _SM_LIMIT
    previous, _SM_LIMIT = _SM_LIMIT, num_sms or _SM_LIMIT
    try:
        yield
    finally:
        _SM_LIMIT = previous


def num_sms_of(device: torch.device) -> int:
    if _SM_LIMIT is not None:
        return _SM_LIMIT
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 132
