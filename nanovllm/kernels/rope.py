"""Triton helpers for Qwen3's per-head RMSNorm and rotate-half RoPE, shared by the kernels that apply them
(fused.qk_norm_rope, and the decode attention that normalizes and rotates its own queries and new key).
Each rounds to the activation dtype where the torch reference (RMSNorm, then RotaryEmbedding) does."""
import triton
import triton.language as tl


@triton.jit
def normed(a, rstd, weight, dtype: tl.constexpr):
    """RMSNorm's output, float32 holding dtype values: round(round(a * rstd) * weight)."""
    return ((a * rstd).to(dtype).to(tl.float32) * weight).to(dtype).to(tl.float32)


@triton.jit
def rotated(y, partner, cos, signed_sin, dtype: tl.constexpr):
    """x * cos + rotate_half(x) * sin at the elements y of x, where partner holds x's other half there and
    signed_sin is -sin on the first half, +sin on the second; cos and sin rounded to dtype as the reference
    rounds its float32 table, and each product rounded."""
    cos = cos.to(dtype).to(tl.float32)
    signed_sin = signed_sin.to(dtype).to(tl.float32)
    return ((y * cos).to(dtype).to(tl.float32) + (partner * signed_sin).to(dtype).to(tl.float32)).to(dtype)
