"""What the kernel checks share: the dtypes of their cases' names, how close a kernel's output must be to the
torch reference's, and random norm weights."""
import torch

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def assert_close(out, ref, dtype, fp32_atol: float | None = None):
    """Only the order of the float32 sums differs from the reference. fp32: to that rounding (absolute
    tolerance fp32_atol, by default 1e-5 of the largest reference value). 16-bit: the kernels round where the
    reference does, so nearly every element is bit-identical and none is off by more than 2^-7 of the largest
    value (a unit or two in its last place in bf16)."""
    out, ref = out.cpu().float(), ref.float()
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    if not out.numel():
        return
    scale = ref.abs().max().item()
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * scale if fp32_atol is None else fp32_atol)
    else:
        assert (out - ref).abs().max() <= 2 ** -7 * scale, (out - ref).abs().max()
        assert (out == ref).float().mean() >= 0.95, f"only {(out == ref).float().mean():.3f} bit-identical"


def norm_weight(size: int, dtype, gen) -> torch.Tensor:
    """RMSNorm weights in [0.5, 1.5): a kernel that skips or misplaces them gives other outputs."""
    return (torch.rand(size, generator=gen) + 0.5).to(dtype)
