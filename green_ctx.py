"""Disjoint SM partitions of one GPU through CUDA green contexts (driver API via cuda-python)."""
import torch
from cuda.bindings import driver


class GreenContextError(RuntimeError):
    pass


def _call(name: str, *args):
    # cuda-python returns a tuple whose first element is the CUresult; the rest are the outputs.
    try:
        out = getattr(driver, name)(*args)
    except Exception as e:  # e.g. libcuda missing: the binding raises before any CUresult exists
        raise GreenContextError(f"{name} failed: {type(e).__name__}: {e}") from e
    if not isinstance(out, tuple):
        out = (out,)
    err, values = out[0], out[1:]
    if err != driver.CUresult.CUDA_SUCCESS:
        raise GreenContextError(f"{name} failed: {getattr(err, 'name', err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def driver_version() -> int:
    """CUDA version supported by the driver, as 1000 * major + 10 * minor (12.4 -> 12040)."""
    return _call("cuDriverGetVersion")


class SmCountError(ValueError):
    """The requested groups do not fit the device once each is rounded up to whole units."""

    def __init__(self, requested: list[int], sizes: list[int], available: int, unit: int):
        super().__init__(f"SM groups {requested} round up to {sizes} (multiples of {unit}), {sum(sizes)} SMs; "
                         f"the device can hand out at most {available}")
        self.requested, self.sizes, self.available, self.unit = requested, sizes, available, unit


def _granularity(resource, device_index: int) -> int:
    """The size unit of a partition: SMs come in groups of this many (8 on Hopper)."""
    # Older bindings expose only smCount; then fall back to the documented per-architecture rules.
    min_size = getattr(resource.sm, "minSmPartitionSize", 0)
    alignment = getattr(resource.sm, "smCoscheduledAlignment", 0)
    if min_size and alignment:
        return max(min_size, alignment)
    major = torch.cuda.get_device_capability(device_index)[0]
    return {9: 8, 8: 4, 7: 2}.get(min(major, 9), 1)


def rounded_sm_counts(sm_counts: list[int], unit: int) -> list[int]:
    return [-(-n // unit) * unit for n in sm_counts]


def _open_device(device_index: int):
    # Green contexts retain the primary context; having it live first avoids re-initialising it.
    try:
        torch.cuda.init()
        torch.zeros(1, device=torch.device("cuda", device_index))
    except (RuntimeError, AssertionError) as e:  # CPU-only torch raises AssertionError
        raise GreenContextError(f"CUDA initialisation for device {device_index} failed: {e}") from e
    _call("cuInit", 0)
    dev = _call("cuDeviceGet", device_index)
    resource = _call("cuDeviceGetDevResource", dev, driver.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM)
    return dev, resource


class GreenPartitions:
    """Green contexts and their streams; they live until close()."""

    def __init__(self, device_index: int, unit: int):
        self.device_index = device_index
        self.unit = unit  # every group's size is a multiple of this
        self.sm_counts: list[int] = []
        self.streams: list[torch.cuda.Stream] = []
        self.remaining_sm_count = 0
        self.remaining_stream: torch.cuda.Stream | None = None
        self._handles: list[tuple] = []  # (green context, driver stream), in creation order

    def _add(self, dev, resources: list) -> torch.cuda.Stream:
        desc = _call("cuDevResourceGenerateDesc", resources, len(resources))
        ctx = _call("cuGreenCtxCreate", desc, dev, int(driver.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM))
        try:
            stream = _call("cuGreenCtxStreamCreate", ctx, int(driver.CUstream_flags.CU_STREAM_NON_BLOCKING), 0)
        except GreenContextError:
            _call("cuGreenCtxDestroy", ctx)
            raise
        self._handles.append((ctx, stream))
        return torch.cuda.get_stream_from_external(int(stream), torch.device("cuda", self.device_index))

    def close(self):
        """Destroy streams and contexts. Graphs captured on these streams must not be replayed afterwards."""
        errors = []
        for stream in self.streams + ([self.remaining_stream] if self.remaining_stream is not None else []):
            try:
                stream.synchronize()
            except RuntimeError as e:
                errors.append(f"stream synchronize failed: {e}")
        for ctx, stream in reversed(self._handles):
            for name, handle in (("cuStreamDestroy", stream), ("cuGreenCtxDestroy", ctx)):
                try:
                    _call(name, handle)
                except GreenContextError as e:
                    errors.append(str(e))
        self._handles.clear()
        self.streams.clear()
        self.remaining_stream = None
        if errors:
            raise GreenContextError("; ".join(errors))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _split_into_units(device_index: int):
    """(device, unit, the device's SMs as groups of unit SMs, the SMs no group takes): the one split
    every partition is made from."""
    dev, resource = _open_device(device_index)
    unit = _granularity(resource, device_index)
    units, nb_units, remaining = _call("cuDevSmResourceSplitByCount", resource.sm.smCount // unit, resource, 0, unit)
    return dev, unit, list(units)[:nb_units], remaining


def available_sms(device_index: int) -> tuple[int, int]:
    """(unit, SMs that split_device can hand out): groups are multiples of unit and sum to at most that."""
    _, unit, units, _ = _split_into_units(device_index)
    return unit, len(units) * unit


def split_device(device_index: int, sm_counts: list[int], include_remaining: bool = False) -> GreenPartitions:
    """Carve disjoint SM groups of (at least) the requested sizes from one device.

    The driver cannot split a split's output again, so the device is split once into units of the
    architecture's granularity and each group is the union of consecutive units (a descriptor may
    combine outputs of one split). `sm_counts` reports the actual sizes; SmCountError says when they
    do not fit. With include_remaining, the SMs left over also get a green context (`remaining_stream`).
    """
    if not sm_counts or any(isinstance(n, bool) or not isinstance(n, int) or n <= 0 for n in sm_counts):
        raise ValueError(f"sm_counts must be a non-empty list of positive ints, got {sm_counts!r}")
    dev, unit, units, remaining = _split_into_units(device_index)
    sizes = rounded_sm_counts(sm_counts, unit)
    if sum(sizes) > len(units) * unit:
        raise SmCountError(list(sm_counts), sizes, len(units) * unit, unit)
    parts = GreenPartitions(device_index, unit)
    try:
        first = 0
        for size in sizes:
            group = units[first:first + size // unit]
            first += size // unit
            parts.streams.append(parts._add(dev, group))
            parts.sm_counts.append(sum(g.sm.smCount for g in group))
        leftover = units[first:] + ([remaining] if remaining.sm.smCount > 0 else [])
        parts.remaining_sm_count = sum(g.sm.smCount for g in leftover)
        if include_remaining and leftover:
            parts.remaining_stream = parts._add(dev, leftover)
    except BaseException:
        parts.close()
        raise
    return parts
