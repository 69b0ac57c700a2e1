"""FP8 KV cache: the cache dtypes users choose from and the reference quantization of keys/values.

A quantized cache holds x / scale rounded to float8 e4m3 (saturated at +-FP8_MAX); a layer's scales
are a float32 [2, num_kv_heads] tensor, keys' scales in row 0 and values' in row 1.
"""
import torch

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
# kv_cache_dtype option -> the cache's dtype; None: the model's dtype.
KV_CACHE_DTYPES = {"auto": None, "fp8_e4m3": torch.float8_e4m3fn}


def kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    return KV_CACHE_DTYPES[name] or model_dtype


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., H, D] with per-head scale [H] -> float8 e4m3."""
    return (x.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def dequantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float8 x [..., H, D] with per-head scale [H] -> dtype."""
    return (x.float() * scale[:, None]).to(dtype)

