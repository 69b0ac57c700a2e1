"""The decode GEMMs (nanovllm/kernels/decode_linear.py) against the layers' torch code: RMSNorm, F.linear,
SiluAndMul and the residual add, run on CPU tensors of the same dtype.

On CUDA the checks run directly; on CPU they run with small sizes under the Triton interpreter. The
cases cover one row, row counts that are not powers of two on both sides of the CUDA-core/tensor-core
switch (2 rows), and column and reduction sizes that are not multiples of any tile.
"""
import itertools
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from nanovllm.layers.activation import SiluAndMul
from nanovllm.layers.layernorm import RMSNorm
from tests.helpers import gpu
from tests.kernels import common
from tests.kernels.common import assert_close, norm_weight
from tests.kernels.kernel_checks import kernel_tests

DTYPES = {**common.DTYPES, "fp16": torch.float16}


def inputs(dtype, m, n, k, seed, rows_of=1):
    """x [m, k] as rows of a wider tensor (its row stride is not k), and a weight [rows_of * n, k] scaled
    like a trained one, so that outputs are of order one."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k + 8, generator=gen) * 2).to(dtype)[:, 8:]
    weight = (torch.randn(rows_of * n, k, generator=gen) / k ** 0.5).to(dtype)
    return gen, x, weight


def norm_layer(k, dtype, gen):
    norm = RMSNorm(k, eps=1e-6).to(dtype)
    norm.weight.data = norm_weight(k, dtype, gen)
    return norm


def check_linear(device, dtype, m, n, k):
    from nanovllm.kernels.decode_linear import linear
    _, x, weight = inputs(dtype, m, n, k, seed=m * 1000 + n + k)
    assert_close(linear(x.to(device), weight.to(device)), F.linear(x, weight), dtype)


def check_linear_residual(device, dtype, m, n, k):
    """The epilogue adds the residual to the rounded product, as the next RMSNorm adds it."""
    from nanovllm.kernels.decode_linear import linear
    gen, x, weight = inputs(dtype, m, n, k, seed=m * 1000 + n + k + 1)
    residual = (torch.randn(m, n, generator=gen) * 4).to(dtype)
    out = linear(x.to(device), weight.to(device), residual.to(device))
    assert_close(out, F.linear(x, weight) + residual, dtype)


def check_norm_linear(device, dtype, m, n, k):
    from nanovllm.kernels.decode_linear import norm_linear
    gen, x, weight = inputs(dtype, m, n, k, seed=m * 1000 + n + k + 2)
    norm = norm_layer(k, dtype, gen)
    out = norm_linear(x.to(device), norm.weight.to(device), norm.eps, weight.to(device))
    assert_close(out, F.linear(norm(x), weight), dtype)


def check_norm_linear_silu(device, dtype, m, n, k):
    """A packed gate/up weight [2n, k]: silu(gate) * up of the normalized rows, [m, n]."""
    from nanovllm.kernels.decode_linear import norm_linear
    gen, x, weight = inputs(dtype, m, n, k, seed=m * 1000 + n + k + 3, rows_of=2)
    norm = norm_layer(k, dtype, gen)
    out = norm_linear(x.to(device), norm.weight.to(device), norm.eps, weight.to(device), silu=True)
    assert_close(out, SiluAndMul()(F.linear(norm(x), weight)), dtype)


def cases(small):
    """(dtype, m, n, k): under the interpreter a few small shapes, the last two over several K tiles, the last
    of them partial; on the GPU also shapes of Qwen3-0.6B
    layers (qkv or gate/up halves, down) and an odd one at decode batch sizes and past the largest row
    tile, and Qwen3-8B's qkv in fp16 and bf16."""
    shapes = [("bf16", 1, 100, 72), ("fp32", 2, 37, 200), ("fp32", 3, 37, 200), ("bf16", 8, 50, 33),
              ("fp32", 13, 70, 90), ("bf16", 21, 33, 64), ("fp32", 0, 16, 32), ("bf16", 5, 24, 520),
              ("fp32", 2, 20, 3000)]
    if small:
        return shapes
    layers = [(4096, 1024), (1024, 3072), (1000, 3000)]
    return shapes + [(d, m, n, k) for d in ("bf16", "fp32") for m in (1, 2, 5, 33, 100) for n, k in layers] + \
        [("fp16", m, 6144, 4096) for m in (1, 64)] + [("bf16", 8, 6144, 4096), ("bf16", 4, 4096, 12288)]


def run_with(check):
    return lambda device, case: check(device, DTYPES[case[0]], *case[1:])


KINDS = {"linear": (cases, run_with(check_linear)),
         "linear_residual": (cases, run_with(check_linear_residual)),
         "norm_linear": (cases, run_with(check_norm_linear)),
         "norm_linear_silu": (cases, run_with(check_norm_linear_silu))}


test_cuda, test_interpreter = kernel_tests(KINDS, __file__)


@gpu
def test_a_captured_chain_reads_each_result_of_the_kernel_before():
    """A layer's four decode GEMMs, each reading the one before's output, captured in a CUDA graph and replayed
    on new inputs: with dependent launch a kernel that read its input before the kernel before had written it
    would see the previous replay's values."""
    from nanovllm.kernels.decode_linear import linear, norm_linear
    from nanovllm.kernels.dependent_launch import dependent_launch
    device = torch.device("cuda")
    if not dependent_launch(device):
        pytest.skip("kernels on this GPU launch the ordinary way (compute capability below 9 or "
                    "NANOVLLM_DEPENDENT_LAUNCH=0)")
    dtype, hidden, inner = torch.float32, 1024, 3072
    gen = torch.Generator().manual_seed(0)
    attn_w, out_w = (torch.randn(hidden, hidden, generator=gen) / hidden ** 0.5 for _ in range(2))
    up_w = torch.randn(2 * inner, hidden, generator=gen) / hidden ** 0.5
    down_w = torch.randn(hidden, inner, generator=gen) / inner ** 0.5
    norm1, norm2 = norm_layer(hidden, dtype, gen), norm_layer(hidden, dtype, gen)

    def layer(x, ops):
        attn_w_, out_w_, up_w_, down_w_, n1, n2 = ops
        residual = linear(norm_linear(x, n1, 1e-6, attn_w_), out_w_, x)
        return linear(norm_linear(residual, n2, 1e-6, up_w_, silu=True), down_w_, residual)

    def reference(x):
        residual = F.linear(F.linear(norm1(x), attn_w), out_w) + x
        return F.linear(SiluAndMul()(F.linear(norm2(residual), up_w)), down_w) + residual

    ops = [t.to(device) for t in (attn_w, out_w, up_w, down_w, norm1.weight.data, norm2.weight.data)]
    for rows in (1, 2, 16):
        static_x = torch.randn(rows, hidden, generator=gen).to(device)
        layer(static_x, ops)  # compiles outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = layer(layer(static_x, ops), ops)
        for _ in range(3):
            x = torch.randn(rows, hidden, generator=gen) * 2
            static_x.copy_(x.to(device))
            graph.replay()
            assert_close(static_out, reference(reference(x)), dtype)


def test_tiles_fit_shared_memory_and_give_most_sms_a_column_tile():
    """The tile choice on the layer shapes of both presets, in 16- and 32-bit, for 132 SMs (a CPU device's
    stand-in): one row on the CUDA cores, two there only of a narrow weight, more on the tensor cores in tiles
    that hold them (up to 64), and one row there too of a long and wide SiLU weight; on the CUDA cores RMSNorm
    chunks of whole K tiles within the register budget; on the tensor cores pipeline stages, with the one
    extra tile, within the shared memory budget, and column tiles for at least 0.7 of the SMs where 16-column
    tiles allow it."""
    from nanovllm.kernels import decode_linear as dl
    shapes = [(4096, 1024), (1024, 2048), (3072, 1024), (1024, 3072), (6144, 4096), (4096, 4096), (12288, 4096),
              (4096, 12288), (100, 72)]
    for (n, k), m, silu, element_size in itertools.product(shapes, (1, 2, 3, 8, 16, 17, 64, 65, 512),
                                                           (False, True), (2, 4)):
        tiles = dl.tile_options(m, n, k, silu, element_size, torch.device("cpu"))
        wide = n >= 3072
        assert tiles["DOT"] == (m > 2 or (m == 2 and wide) or (m == 1 and silu and wide and k >= 2048))
        if not tiles["DOT"]:
            assert tiles["BLOCK_M"] >= m
            assert tiles["NORM_BLOCK"] % tiles["BLOCK_K"] == 0
            assert tiles["BLOCK_M"] * tiles["NORM_BLOCK"] <= dl.NORM_TILE or tiles["NORM_BLOCK"] == tiles["BLOCK_K"]
            continue
        assert tiles["BLOCK_M"] >= min(m, dl.MAX_DOT_ROWS) and tiles["BLOCK_N"] >= 16
        stage = (tiles["BLOCK_M"] + tiles["BLOCK_N"] * (2 if silu else 1)) * tiles["BLOCK_K"] * element_size
        assert 2 <= tiles["num_stages"] <= dl.MAX_STAGES
        assert stage * (tiles["num_stages"] + 1) <= dl.STAGE_BYTES, (n, k, m, silu, element_size, tiles)
        if m > dl.MAX_DOT_ROWS:
            continue
        assert -(-n // tiles["BLOCK_N"]) >= dl.SM_SHARE * 132 or tiles["BLOCK_N"] == 16


def test_dependent_launch_only_on_cuda_off_when_asked_and_nonsense_rejected():
    from nanovllm.kernels.dependent_launch import dependent_launch
    assert dependent_launch(torch.device("cpu")) is False
    code = "from nanovllm.kernels.dependent_launch import ENABLED; print(ENABLED)"
    for value, expected in (("0", "False"), ("1", "True"), ("yes", None)):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"NANOVLLM_DEPENDENT_LAUNCH": value}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        if expected is None:
            assert out.returncode != 0
            assert "ValueError: NANOVLLM_DEPENDENT_LAUNCH must be 0 or 1, got 'yes'" in out.stderr
        else:
            assert out.returncode == 0, out.stderr
            assert out.stdout.strip() == expected
