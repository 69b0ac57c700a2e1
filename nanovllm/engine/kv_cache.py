"""One runner's paged KV cache: how many blocks fit beside the weights and the activations, its
allocation and binding to the attention layers, and the scales of a float8 cache.

The cache is block-major, [blocks, layers, 2 (K, V), block_size, kv_heads, head_dim]: a block with all its
layers is one contiguous unit, which the prefill/decode handoff copies as such.

The scales of a float8 cache are measured once at start-up on a calibration prefill. Fixed scales keep
the cache's contents and the captured decode graphs static: a scale computed from each write would
change what earlier tokens' bytes mean. Each (layer, K or V, KV head) gets the
largest magnitude the calibration saw, times MARGIN, mapped to FP8_MAX; e4m3 has the same relative
precision over its whole normal range, so the headroom costs little. Keys are cached after RoPE,
which rotates dimension pairs (i, i + head_dim/2) by position: their bound is the largest pair norm,
which holds at every position, not only at those of the calibration prompt. Values past a scale's
range at run time saturate at +-FP8_MAX * scale.
"""
import time
from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.distributed as dist

from nanovllm.attention.kv_quant import FP8_MAX
from nanovllm.layers.attention import Attention
from nanovllm.utils.log import get_logger

logger = get_logger("ModelRunner")

# The options that give a cache its blocks outright (-1: sized from memory).
BLOCK_OPTIONS = ("num_kvcache_blocks", "prefill_num_kvcache_blocks")
# The cache of a CPU runner sized from memory.
CPU_KV_CACHE_BYTES = 1 << 30
MARGIN = 2.0
# Random tokens in sequences of CALIBRATION_SEQ_LEN (fewer where the model has fewer positions).
CALIBRATION_TOKENS = 2048
CALIBRATION_SEQ_LEN = 256


@contextmanager
def record_kv_amax(layers: list[Attention], num_kv_heads: int, device: torch.device):
    """Yields a float32 [layers, 2, num_kv_heads] tensor that collects, while the context is open, the
    largest key pair norm and value magnitude each layer's attention receives per KV head."""
    amax = torch.zeros(len(layers), 2, num_kv_heads, dtype=torch.float32, device=device)

    def recorder(i: int):
        def record(module, args):
            _, k, v = args
            pair_norms = k.float().unflatten(-1, (2, -1)).norm(dim=-2)
            torch.maximum(amax[i, 0], pair_norms.amax(dim=(0, 2)), out=amax[i, 0])
            torch.maximum(amax[i, 1], v.float().abs().amax(dim=(0, 2)), out=amax[i, 1])
        return record

    handles = [layer.register_forward_pre_hook(recorder(i)) for i, layer in enumerate(layers)]
    try:
        yield amax
    finally:
        for handle in handles:
            handle.remove()


def scales_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """Scales for the measured ranges; a head that only saw zeros gets scale 1."""
    return torch.where(amax > 0, amax * (MARGIN / FP8_MAX), 1.0)


def calibrate_scales(layers: list[Attention], num_kv_heads: int, device: torch.device,
                     prefill: Callable[[int, int], None]) -> torch.Tensor:
    """Per-head scales [layers, 2, kv_heads] of a float8 KV cache from prefill(CALIBRATION_TOKENS, seq_len)
    of random tokens, independent of the batching and length options."""
    with record_kv_amax(layers, num_kv_heads, device) as amax:
        prefill(CALIBRATION_TOKENS, CALIBRATION_SEQ_LEN)
    return scales_from_amax(amax)


class KVCache:
    """The blocks of one runner (or, shared, of two runners on one GPU), with their float8 scales."""

    def __init__(self, block_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                 scales: torch.Tensor | None):
        self.block_shape = block_shape  # (layers, 2, block_size, kv_heads, head_dim)
        self.dtype = dtype
        self.device = device
        self.scales = scales
        self.tensor: torch.Tensor | None = None
        self.num_blocks = 0

    @property
    def block_size(self) -> int:
        return self.block_shape[2]

    @property
    def block_bytes(self) -> int:
        return torch.Size(self.block_shape).numel() * self.dtype.itemsize

    def blocks_that_fit(self, gpu_memory_utilization: float, min_blocks: int, prefill: Callable[[], None],
                        log: bool) -> int:
        """KV blocks that fit beside the weights and the activation peak of prefill()."""
        if self.device.type == "cpu":
            return max(min_blocks, CPU_KV_CACHE_BYTES // self.block_bytes)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        prefill()
        free, total = torch.cuda.mem_get_info(self.device)
        stats = torch.cuda.memory_stats(self.device)
        activation_peak = stats["allocated_bytes.all.peak"] - stats["allocated_bytes.all.current"]
        usable = total * gpu_memory_utilization - (total - free) - activation_peak
        num_blocks = max(int(usable) // self.block_bytes - 1, 0)
        if log:
            logger.debug("warm-up in %.1f s: activation peak %.2f GiB, room for %d KV blocks of %d tokens (%.1f GiB)",
                         time.perf_counter() - start, activation_peak / 2 ** 30, num_blocks, self.block_size,
                         num_blocks * self.block_bytes / 2 ** 30)
        return num_blocks

    def check_fits(self, num_blocks: int, option: str) -> None:
        """A ValueError naming the option when num_blocks blocks would not fit in the device's free memory."""
        needed = (num_blocks + 1) * self.block_bytes
        free = free_memory(self.device)
        if free is not None and needed > free:
            raise ValueError(f"invalid {option}: {num_blocks} KV blocks of {self.block_size} tokens need "
                             f"{needed / 2 ** 30:.2f} GiB, and {self.device} has {free / 2 ** 30:.2f} GiB free "
                             f"(room for about {free // self.block_bytes - 1} blocks): lower {option}"
                             + (", or leave it at -1 to size the cache from memory" if option in BLOCK_OPTIONS else ""))

    def allocate(self, num_blocks: int, distributed: bool) -> None:
        """Allocates num_blocks blocks (the least of all tensor-parallel ranks' where distributed), and one
        more that absorbs the writes of padded slots (-1) that some backends do not skip. Zeroed, because
        masked-out positions still enter softmax(scores) @ V with weight 0, and 0 * NaN from uninitialised
        memory would poison the output."""
        if distributed:
            agreed = torch.tensor([num_blocks], device=self.device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
            num_blocks = int(agreed.item())
        self.tensor = torch.zeros((num_blocks + 1, *self.block_shape), dtype=self.dtype, device=self.device)
        self.num_blocks = num_blocks

    def bind(self, layers: list[Attention]) -> None:
        """Points each attention layer at its slice of the cache and its scales."""
        for i, layer in enumerate(layers):
            layer.k_cache, layer.v_cache = self.tensor[:, i, 0], self.tensor[:, i, 1]
            layer.kv_scales = None if self.scales is None else self.scales[i]


def free_memory(device: torch.device) -> int | None:
    """Bytes free on the device: the GPU's, or the host's available memory (None where unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
