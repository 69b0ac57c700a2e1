"""Scales of a float8 KV cache, measured once at start-up on a calibration prefill.

Fixed scales keep the cache's contents and the captured decode graphs static: a scale computed from
each write would change what earlier tokens' bytes mean. Each (layer, K or V, KV head) gets the
largest magnitude the calibration saw, times MARGIN, mapped to FP8_MAX; e4m3 has the same relative
precision over its whole normal range, so the headroom costs little. Keys are cached after RoPE,
which rotates dimension pairs (i, i + head_dim/2) by position: their bound is the largest pair norm,
which holds at every position, not only at those of the calibration prompt. Values past a scale's
range at run time saturate at +-FP8_MAX * scale.
"""
from contextlib import contextmanager

import torch

from nanovllm.attention.kv_quant import FP8_MAX
from nanovllm.layers.attention import Attention

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
