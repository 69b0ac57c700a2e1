"""Skinny GEMMs for decode steps, with the per-layer ops around them fused in.

At decode batch sizes a linear layer reads its whole weight matrix [N, K] to compute a few rows, so its
time is that of the weight bytes if enough SMs stream them at once, each with enough bytes in flight.
Each program here owns BLOCK_N output columns over the whole K (no split-K: one program sums each
output, so the result does not depend on timing) for up to BLOCK_M rows. One row (two of a narrow
weight) multiplies on the CUDA cores, with about two programs per SM; up to 64 rows on the tensor cores
in one row tile, with about one column tile per SM and long K tiles in several pipeline stages; more
rows in several row tiles of 64, with short K tiles and about two programs per SM (_on_cuda_cores and
tile_options). Fused in:

- norm_linear: RMSNorm as the prologue on the CUDA cores. Each program computes the rows' rstd from the
  rows themselves (a few KiB, read from L2), then normalizes each chunk of K as it multiplies it. For the
  tensor cores the rows are normalized first by the row kernel of fused.py, launched as a dependent too.
- norm_linear(silu=True): of a packed gate/up weight [2N, K], a program computes matching gate and up
  columns and writes silu(gate) * up: half the output, no intermediate.
- linear(residual=...): the residual add as the epilogue.

Each program loads its first weight tile before it waits for the kernel before (dependent_launch.py):
where the GPU launches it early, that load overlaps the previous kernel's tail.

Every step rounds to the activation dtype where the torch reference (RMSNorm, F.linear, SiluAndMul,
the residual add of the next RMSNorm) does, so results differ from it only by the order of the sums.
"""
import torch
import triton
import triton.language as tl

from nanovllm.kernels import fused
from nanovllm.kernels.dependent_launch import dependent_launch, wait_for_previous
from nanovllm.partitions.sm_limit import num_sms_of

# One row multiplies on the CUDA cores, each weight element once; two rows too where the tensor cores'
# 32-column tiles would leave SMs idle; more rows on the tensor cores, which need tiles of 16 rows and 16
# columns: from there the padded rows cost less than the products on the CUDA cores (H200,
# docs/benchmarks.md).
MAX_FMA_ROWS = 2
MAX_DOT_ROWS = 64
PROGRAMS_PER_SM = 2
# Elements of a program's [BLOCK_M, BLOCK_N, BLOCK_K] product on the CUDA cores: registers of 4 warps.
FMA_TILE = 8192
# Elements of a program's chunk of its rows when it sums their squares for RMSNorm.
NORM_TILE = 16384
# Tensor-core tiles: a program's column tiles should reach about this share of the SMs (a narrower tile
# than 16 columns does not exist), and its pipeline keeps up to MAX_STAGES tiles of inputs and weights in
# flight within this much of an SM's 227 KiB of shared memory.
SM_SHARE = 0.7
MAX_STAGES = 5
STAGE_BYTES = 200 * 1024


# M varies with the batch bucket and BLOCK_M already fits it: variants for M == 1 or M % 16 == 0 would only
# add compilations.
@triton.jit(do_not_specialize=["M"])
def _decode_linear_kernel(x_ptr, w_ptr, norm_w_ptr, res_ptr, out_ptr,
                          M, N, K, stride_xm, stride_wn, stride_rm, stride_om, eps,
                          NORM: tl.constexpr, SILU: tl.constexpr, RESIDUAL: tl.constexpr, DOT: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          PDL: tl.constexpr, NORM_BLOCK: tl.constexpr = 0):
    """out[rows, cols] = x[rows] @ w[cols].T for one (BLOCK_N columns, BLOCK_M rows) tile, with NORM the
    rows RMS-normalized first, with SILU silu(x @ w[cols].T) * (x @ w[N + cols].T), with RESIDUAL plus
    res[rows, cols]; each rounded where the reference rounds."""
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask, col_mask = rows < M, cols < N
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wn
    # The first weight tile comes in before the wait: with PDL, while the kernel before finishes.
    up_rows = w_rows + N * stride_wn
    gate_w = _weight_tile(w_rows, 0, K, col_mask, BLOCK_K)
    if SILU:
        up_w = _weight_tile(up_rows, 0, K, col_mask, BLOCK_K)
    wait_for_previous(PDL)
    if NORM:
        # Each chunk waits for its load: chunks as wide as registers allow, not K tiles, keep them few.
        squares = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, NORM_BLOCK):
            ks = k0 + tl.arange(0, NORM_BLOCK)
            x = tl.load(x_rows + ks[None, :], mask=row_mask[:, None] & (ks < K)[None, :], other=0.0).to(tl.float32)
            squares += tl.sum(x * x, axis=1)
        rstd = tl.rsqrt(squares / K + eps)[:, None]
    else:
        rstd = None
    if DOT:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        # Products summed lane by lane over the K tiles and across lanes once at the end: a reduction
        # across lanes in every tile would make each tile wait for it.
        acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
        up = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
    x = _input_tile(x_rows, norm_w_ptr, rstd, 0, K, row_mask, NORM, BLOCK_K)
    acc = _multiply_add(acc, x, gate_w, DOT)
    if SILU:
        up = _multiply_add(up, x, up_w, DOT)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        x = _input_tile(x_rows, norm_w_ptr, rstd, k0, K, row_mask, NORM, BLOCK_K)
        acc = _multiply_add(acc, x, _weight_tile(w_rows, k0, K, col_mask, BLOCK_K), DOT)
        if SILU:
            up = _multiply_add(up, x, _weight_tile(up_rows, k0, K, col_mask, BLOCK_K), DOT)
    if not DOT:
        acc = tl.sum(acc, axis=2)
        up = tl.sum(up, axis=2)
    dtype = x_ptr.dtype.element_ty
    out = acc.to(dtype)
    if SILU:
        gate = out.to(tl.float32)
        act = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)
        out = (act * up.to(dtype).to(tl.float32)).to(dtype)
    mask = row_mask[:, None] & col_mask[None, :]
    if RESIDUAL:
        res = tl.load(res_ptr + rows.to(tl.int64)[:, None] * stride_rm + cols[None, :], mask=mask, other=0.0)
        out = (out.to(tl.float32) + res.to(tl.float32)).to(dtype)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :], out, mask=mask)


@triton.jit
def _weight_tile(w_rows, k0, K, col_mask, BLOCK_K: tl.constexpr):
    """The [BLOCK_N, BLOCK_K] tile at k0 of the weight rows w_rows."""
    ks = k0 + tl.arange(0, BLOCK_K)
    return tl.load(w_rows + ks[None, :], mask=col_mask[:, None] & (ks < K)[None, :], other=0.0)


@triton.jit
def _input_tile(x_rows, norm_w_ptr, rstd, k0, K, row_mask, NORM: tl.constexpr, BLOCK_K: tl.constexpr):
    """The [BLOCK_M, BLOCK_K] input tile at k0, with NORM normalized and scaled as RMSNorm rounds it."""
    ks = k0 + tl.arange(0, BLOCK_K)
    x = tl.load(x_rows + ks[None, :], mask=row_mask[:, None] & (ks < K)[None, :], other=0.0)
    if NORM:
        norm_w = tl.load(norm_w_ptr + ks, mask=ks < K, other=0.0).to(tl.float32)[None, :]
        x = ((x.to(tl.float32) * rstd).to(x.dtype).to(tl.float32) * norm_w).to(x.dtype)
    return x


@triton.jit
def _multiply_add(acc, x, w, DOT: tl.constexpr):
    """acc + x @ w.T for x [BLOCK_M, BLOCK_K] and w [BLOCK_N, BLOCK_K] in float32: with DOT acc is the
    [BLOCK_M, BLOCK_N] sum, otherwise [BLOCK_M, BLOCK_N, BLOCK_K] products still to be summed over K."""
    if DOT:
        acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
    else:  # a compiled kernel traces code after a return inside a constexpr branch too
        acc = acc + x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    return acc


def tile_options(m: int, n: int, k: int, silu: bool, element_size: int, device: torch.device) -> dict:
    """The tile of one program and its launch options for an [m, k] x [n, k].T product (silu: two of them)."""
    num_sms = num_sms_of(device)
    if _on_cuda_cores(m, n, k, silu, device):
        block_m = triton.next_power_of_2(m)
        # The widest tile that still gives every SM its programs, at least 4 columns for wide loads.
        block_n = max(4, min(64, _prev_power_of_2(n // (PROGRAMS_PER_SM * num_sms))))
        block_k = FMA_TILE // (block_m * block_n * (2 if silu else 1))
        block_k = max(32, min(block_k, triton.next_power_of_2(k)))
        return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT=False, num_warps=4,
                    NORM_BLOCK=_norm_block(block_m, block_k, k))
    block_m = min(MAX_DOT_ROWS, max(16, triton.next_power_of_2(m)))
    row_tiles = triton.cdiv(m, block_m)
    if row_tiles > 1:
        # Every row tile reads the weights again, mostly from L2: small tiles in short stages, about two
        # programs per SM, were the fastest there (H200).
        block_n = max(16, min(64, _prev_power_of_2(n * row_tiles // (PROGRAMS_PER_SM * num_sms))))
        block_k, max_stages = 64, 3
    else:
        block_n = 64
        while block_n > 16 and triton.cdiv(n, block_n) < SM_SHARE * num_sms:
            block_n //= 2
        # Narrow tiles of few rows stream long weight rows: longer K tiles keep as many bytes in flight.
        block_k = 256 if block_n <= 32 and block_m == 16 and k >= 2048 else 128
        max_stages = MAX_STAGES
    # The pipeline holds one tile more than its stages: at least three tiles of inputs and weights.
    while block_k > 32 and 3 * _stage_bytes(block_m, block_n, block_k, silu, element_size) > STAGE_BYTES:
        block_k //= 2
    stage = _stage_bytes(block_m, block_n, block_k, silu, element_size)
    stages = max(2, min(max_stages, STAGE_BYTES // stage - 1))
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT=True, num_warps=4, num_stages=stages)


def _stage_bytes(block_m: int, block_n: int, block_k: int, silu: bool, element_size: int) -> int:
    """Shared memory of one pipeline stage: an input tile and one or two weight tiles."""
    return (block_m + block_n * (2 if silu else 1)) * block_k * element_size


def _on_cuda_cores(m: int, n: int, k: int, silu: bool, device: torch.device) -> bool:
    """Whether m rows of an [n, k] weight (silu: two of them) multiply on the CUDA cores rather than the
    tensor cores."""
    wide = triton.cdiv(n, 32) >= SM_SHARE * num_sms_of(device)
    if m == 1:
        # SiLU's two products fill twice the registers on the CUDA cores: over a long K the tensor cores'
        # pipeline streams a wide weight faster, padded row and all (H200).
        return not (silu and wide and k >= 2048)
    return m <= MAX_FMA_ROWS and not wide


def _norm_block(block_m: int, block_k: int, k: int) -> int:
    """Columns of the rows' sum of squares per load: up to NORM_TILE elements, at least a K tile or the row."""
    return min(triton.next_power_of_2(k), max(block_k, NORM_TILE // block_m))


def _prev_power_of_2(x: int) -> int:
    return 1 << (x.bit_length() - 1) if x > 0 else 1


def _launch(x: torch.Tensor, weight: torch.Tensor, n: int, norm_weight: torch.Tensor | None, eps: float,
            residual: torch.Tensor | None, silu: bool) -> torch.Tensor:
    m, k = x.shape
    assert x.stride(1) == 1 and weight.is_contiguous() and weight.shape[1] == k and x.dtype == weight.dtype
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    if residual is not None:
        assert residual.shape == (m, n) and residual.stride(1) == 1 and residual.dtype == x.dtype
    if norm_weight is not None:
        assert norm_weight.shape == (k,) and norm_weight.is_contiguous()
    blocks = tile_options(m, n, k, silu, x.element_size(), x.device)
    if norm_weight is not None and blocks["DOT"]:
        # On the tensor cores, normalizing each input tile between its load and its product stalled every K
        # tile: it doubled or tripled these GEMMs (docs/benchmarks.md). A row kernel normalizes them first.
        x, norm_weight = fused.rms_norm(x, norm_weight, eps), None
    pdl = dependent_launch(x.device)
    grid = (triton.cdiv(n, blocks["BLOCK_N"]), triton.cdiv(m, blocks["BLOCK_M"]))
    _decode_linear_kernel[grid](
        x, weight, x if norm_weight is None else norm_weight, x if residual is None else residual, out,
        m, n, k, x.stride(0), weight.stride(0), 0 if residual is None else residual.stride(0), out.stride(0), eps,
        NORM=norm_weight is not None, SILU=silu, RESIDUAL=residual is not None, **blocks,
        PDL=pdl, launch_pdl=pdl)
    return out


def norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                silu: bool = False) -> torch.Tensor:
    """F.linear(RMSNorm(x), weight) for x [M, K] and weight [N, K]; with silu, weight is a packed
    gate/up weight [2N, K] and the result is SiluAndMul of that product, [M, N]."""
    n = weight.size(0) // 2 if silu else weight.size(0)
    return _launch(x, weight, n, norm_weight, eps, None, silu)


def linear(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight) for x [M, K] and weight [N, K], plus residual [M, N] if given, rounded as
    the reference rounds each."""
    return _launch(x, weight, weight.size(0), None, 0.0, residual, False)
