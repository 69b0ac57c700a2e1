"""Would a persistent decode kernel pay (--persistent-chain, CUDA only)?

A one-row decode step is a chain of dependent GEMVs. The fused step launches each link as a kernel of
its own, as a dependent launch inside the CUDA graph: a program loads its first weight tile, then waits
for the kernel before. A persistent kernel runs the whole chain in one launch: its programs meet at a
grid-wide barrier (an atomic counter in global memory) between links, and load their first weight tile of
the next link before they wait there. Both run the same GEMV code with the fused step's one-row tiles
(kernels/decode_linear.py) over a chain of square bf16 weights, more of them than L2 holds, so that each
link streams its weights from memory like a layer of a step; both must end with the same vector.
Printed per link size: microseconds per link of each, the weight bytes' time at the copy rate, and a
barrier alone (the persistent kernel over links without work).
"""
import torch
import triton
import triton.language as tl

from benchmarks.floor import copy_bytes_per_s
from benchmarks.report import print_table
from nanovllm.engine.graphs import capture
from nanovllm.kernels.decode_linear import tile_options
from nanovllm.kernels.dependent_launch import dependent_launch, wait_for_previous
from nanovllm.partitions.sm_limit import num_sms_of
from nanovllm.utils.timing import median_replay_ms

# Link sizes (N = K): about the o_proj and down weights of qwen3-0.6b, and a qwen3-8b projection.
SIZES = (1024, 2048, 4096)
# Each chain's weights, several times an H200's 50 MiB of L2.
CHAIN_BYTES = 256 << 20
# Persistent programs per SM, as many as the launches' one-row tiles aim at.
PROGRAMS_PER_SM = 2
BARRIER_LINKS = 1000
# Relative difference between the two chains' final vectors beyond which the persistent one is wrong.
MAX_DIFFERENCE = 0.1


@triton.jit
def _grid_barrier(counter_ptr, arrivals):
    """Returns once `arrivals` programs in all have arrived at this counter, this one included."""
    tl.debug_barrier()  # every thread's stores come before the arrival (release)
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")
    while tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu") < arrivals:
        pass
    tl.debug_barrier()


@triton.jit
def _finish_tile(first_w, w_rows, x_ptr, out_ptr, cols, K, BLOCK_K: tl.constexpr):
    """out[cols] = w[cols] @ x, given the first weight tile; the input read past L1 (other programs wrote it)."""
    ks = tl.arange(0, BLOCK_K)
    acc = first_w.to(tl.float32) * tl.load(x_ptr + ks, cache_modifier=".cg").to(tl.float32)[None, :]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        w = tl.load(w_rows + k0 + ks[None, :])
        acc += w.to(tl.float32) * tl.load(x_ptr + k0 + ks, cache_modifier=".cg").to(tl.float32)[None, :]
    tl.store(out_ptr + cols, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty))


@triton.jit
def _link_kernel(w_ptr, x_ptr, out_ptr, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """One link, one column tile per program, as the fused step launches a GEMM."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * K
    first_w = tl.load(w_rows + tl.arange(0, BLOCK_K)[None, :])
    wait_for_previous(PDL)
    _finish_tile(first_w, w_rows, x_ptr, out_ptr, cols, K, BLOCK_K)


@triton.jit
def _chain_kernel(w_ptr, x_ptr, counter_ptr, links, N, K, WORK: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """Every link in one launch: link i reads x_ptr[i % 2] and writes x_ptr[(i + 1) % 2]."""
    pid, programs = tl.program_id(0), tl.num_programs(0)
    for link in range(links):
        w = w_ptr + link.to(tl.int64) * N * K
        x_in, x_out = x_ptr + (link % 2) * K, x_ptr + ((link + 1) % 2) * K
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        w_rows = w + cols.to(tl.int64)[:, None] * K
        if WORK:
            first_w = tl.load(w_rows + tl.arange(0, BLOCK_K)[None, :])
        if link > 0:
            _grid_barrier(counter_ptr, link * programs)
        if WORK:
            _finish_tile(first_w, w_rows, x_in, x_out, cols, K, BLOCK_K)
            for tile in range(pid + programs, tl.cdiv(N, BLOCK_N), programs):
                cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
                w_rows = w + cols.to(tl.int64)[:, None] * K
                _finish_tile(tl.load(w_rows + tl.arange(0, BLOCK_K)[None, :]), w_rows, x_in, x_out, cols, K,
                             BLOCK_K)


def run(args) -> list[dict]:
    device = torch.device("cuda")
    bandwidth = copy_bytes_per_s()
    num_sms = num_sms_of(device)
    pdl = dependent_launch(device)
    counter = torch.zeros(1, dtype=torch.int32, device=device)
    rows = []
    for size in SIZES:
        links = max(8, CHAIN_BYTES // (2 * size * size))
        weights = torch.randn(links, size, size, dtype=torch.bfloat16, device=device) / size ** 0.5
        start = torch.randn(size, dtype=torch.bfloat16, device=device)
        tile = tile_options(1, size, size, False, 2, device)
        block_n, block_k = tile["BLOCK_N"], tile["BLOCK_K"]
        assert not tile["DOT"] and size % block_n == 0 and size % block_k == 0
        launched = torch.empty(2, size, dtype=torch.bfloat16, device=device)
        persistent = torch.empty_like(launched)
        programs = min(size // block_n, PROGRAMS_PER_SM * num_sms)

        def launches():
            launched[0].copy_(start)
            for link in range(links):
                _link_kernel[(size // block_n,)](weights[link], launched[link % 2], launched[(link + 1) % 2], size,
                                                 BLOCK_N=block_n, BLOCK_K=block_k, PDL=pdl, launch_pdl=pdl,
                                                 num_warps=tile["num_warps"])

        def chain(work: bool = True, num_links: int = links):
            persistent[0].copy_(start)
            counter.zero_()
            _chain_kernel[(programs,)](weights, persistent, counter, num_links, size, size, WORK=work,
                                       BLOCK_N=block_n, BLOCK_K=block_k, num_warps=tile["num_warps"])

        stream = torch.cuda.Stream(device)  # CUDA captures only on a side stream
        graphs = {"launches": capture(launches, None, stream), "persistent": capture(chain, None, stream),
                  "barriers": capture(lambda: chain(False, BARRIER_LINKS), None, stream)}
        ms = median_replay_ms({name: g.replay for name, g in graphs.items()}, repeats=args.repeats)
        # Each program arrives once at each barrier; the two kernels may sum a tile in another order, which
        # compounds over the links, but a link that read a stale input would end far off.
        arrivals = counter.item() // (BARRIER_LINKS - 1)
        chain()
        difference = ((persistent[links % 2].float() - launched[links % 2].float()).norm()
                      / launched[links % 2].float().norm()).item()
        if counter.item() != (links - 1) * programs or arrivals != programs or not difference < MAX_DIFFERENCE:
            raise RuntimeError(f"--persistent-chain: the {size}x{size} chains differ by {difference:.3g} (relative) "
                               f"and {counter.item()} arrivals were counted, {(links - 1) * programs} expected")
        floor_us = 2 * size * size / bandwidth * 1e6
        rows.append({"link": f"{size}x{size}", "link_MiB": 2 * size * size / 2 ** 20, "links": links,
                     "BLOCK_N": block_n, "programs": programs, "floor_us": floor_us,
                     "launches_us": ms["launches"] * 1e3 / links, "persistent_us": ms["persistent"] * 1e3 / links,
                     "persistent/launches": ms["persistent"] / ms["launches"], "difference": difference,
                     "barrier_us": ms["barriers"] * 1e3 / BARRIER_LINKS})
    print(f"\none-row GEMV chains, bf16, dependent launch {'on' if pdl else 'off'}; median of {args.repeats} "
          f"replays; device {torch.cuda.get_device_name(device)}")
    print_table(rows, list(rows[0]))
    return rows
