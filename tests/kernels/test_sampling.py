"""The Triton sampling kernels (nanovllm/kernels/sampling.py) against the argmax and the tempered softmax.

On CUDA the checks run directly; on CPU they run with small sizes under the Triton interpreter.
"""
import torch

from tests.kernels.common import DTYPES
from tests.kernels.kernel_checks import kernel_tests


def check_sample(device, dtype, vocab_size, block, draws):
    check_sample_greedy_and_seeded(device, dtype, vocab_size, block)
    if draws:
        check_sample_frequencies(device, dtype, block, draws)
        check_sample_dense_frequencies(device, dtype, vocab_size, block, draws)


def sample_on(device, block, logits, temperatures, seed, row_seeds=None):
    from nanovllm.kernels.sampling import sample
    row_seeds = None if row_seeds is None else row_seeds.to(device)
    return sample(logits.to(device), temperatures.to(device), seed, row_seeds, block=block).cpu()


def check_sample_greedy_and_seeded(device, dtype, vocab_size, block):
    """Greedy rows give the argmax, the first one on ties within a tile, across tiles and across
    chunks. A seeded row draws the same token alone, in a batch and under another step seed, and
    leaves the other rows' draws as they were."""
    gen = torch.Generator().manual_seed(vocab_size)
    logits = (torch.randn(8, vocab_size, generator=gen) * 3).to(dtype)
    logits[0, [10, block + 10, vocab_size - 1]] = logits[0].max() + 1
    temperatures = torch.tensor([0.0, 1.0, 0.0, 0.5] * 2)
    greedy = temperatures == 0
    argmax = logits.float().argmax(-1)
    tokens = sample_on(device, block, logits, temperatures, seed=vocab_size)
    assert argmax[0] == 10 and tokens[0] == 10
    assert sample_on(device, block, logits[:1], temperatures[:1], seed=1).item() == 10
    assert torch.equal(tokens[greedy], argmax[greedy])
    # Where the argmax is likely, one step's four draws may all be it; three steps' are not.
    assert any(not torch.equal(sample_on(device, block, logits, temperatures, seed=seed)[~greedy], argmax[~greedy])
               for seed in (vocab_size, vocab_size + 1, vocab_size + 2))

    row_seeds = torch.tensor([[-1, 5, 7, 2 ** 62 + 3, -1, -1, 5, 5],
                              [0, 0, 3, 9, 0, 0, 0, 1]]).T.contiguous()
    seeded = sample_on(device, block, logits, temperatures, seed=vocab_size, row_seeds=row_seeds)
    unseeded = row_seeds[:, 0] < 0
    assert torch.equal(seeded[unseeded], tokens[unseeded])
    assert torch.equal(seeded[greedy], argmax[greedy])
    for row in (~greedy & ~unseeded).nonzero().flatten().tolist():
        alone = sample_on(device, block, logits[row:row + 1], temperatures[row:row + 1], seed=vocab_size + 1,
                          row_seeds=row_seeds[row:row + 1])
        assert alone.item() == seeded[row], row


def check_sample_frequencies(device, dtype, block, draws):
    """Each group of `draws` rows follows softmax(logits / temperature): two temperatures from the
    step's stream, and seeded rows (one seed at many token indices, many seeds at one index). Once
    with the four tokens side by side, once with them in three chunks (the last one partial) and -inf
    (cut tokens) everywhere else, where the draw crosses chunks."""
    from nanovllm.kernels.sampling import SAMPLE_TILES
    small = torch.tensor([2.0, 1.0, 0.0, -1.0]).to(dtype)
    temperatures = torch.tensor([0.5, 2.0, 1.0]).repeat_interleave(draws)
    row_seeds = torch.full((3 * draws, 2), -1)
    half = draws // 2
    row_seeds[2 * draws:, 0] = torch.cat([torch.full((half,), 42), torch.arange(draws - half) * 7919])
    row_seeds[2 * draws:, 1] = torch.cat([torch.arange(half), torch.full((draws - half,), 5)])
    chunk = block * SAMPLE_TILES
    for positions in ([0, 1, 2, 3], [chunk + 1, 0, 2 * chunk + 2, chunk + 3]):
        # Made where the kernel runs: on the GPU the rows take gigabytes.
        logits = torch.full((3 * draws, max(positions) + 1), float("-inf"), dtype=dtype, device=device)
        logits[:, positions] = small.to(device)
        tokens = sample_on(device, block, logits, temperatures, seed=draws, row_seeds=row_seeds)
        assert torch.isin(tokens, torch.tensor(positions)).all()
        picks = (tokens[:, None] == torch.tensor(positions)).int().argmax(-1)
        tolerance = 4 * 0.5 / draws ** 0.5  # four standard deviations of a frequency at most
        for group, temperature in enumerate((0.5, 2.0, 1.0)):
            frequencies = torch.bincount(picks[group * draws:(group + 1) * draws], minlength=4) / draws
            expected = torch.softmax(small.float() / temperature, -1)
            assert (frequencies - expected).abs().max() < tolerance, (positions, temperature, frequencies, expected)


def check_sample_dense_frequencies(device, dtype, vocab_size, block, draws):
    """One row with every token possible, its mass spread over the chunks: the draws follow its
    softmax on its four most likely tokens and on the rest together."""
    gen = torch.Generator().manual_seed(draws + vocab_size)
    logits = (torch.randn(vocab_size, generator=gen) * 2).to(dtype)
    logits[torch.randperm(vocab_size, generator=gen)[:4]] += 6.0  # four likely tokens, anywhere
    rows = min(draws, (2 ** 31 - 1) // vocab_size)
    # Repeated where the kernel runs: on the GPU the rows take gigabytes.
    tokens = sample_on(device, block, logits.to(device).repeat(rows, 1), torch.full((rows,), 0.8), seed=rows)
    expected = torch.softmax(logits.float() / 0.8, -1)
    top = expected.topk(4).indices
    observed = torch.bincount(tokens, minlength=vocab_size).float() / rows
    expected, observed = (torch.cat([p[top], p.sum(0, keepdim=True) - p[top].sum(0, keepdim=True)])
                          for p in (expected, observed))
    assert (observed - expected).abs().max() < 4 * 0.5 / rows ** 0.5, (observed, expected)


def sample_cases(small):
    # (dtype, vocabulary, tile width, draws per frequency group); the interpreter affords few draws.
    cases = [("fp32", 160, 16, 200), ("bf16", 100, 32, 0)]
    return cases if small else cases + [("bf16", 151936, 2048, 20000), ("fp32", 4097, 2048, 0),
                                        ("bf16", 5000, 2048, 0)]


KINDS = {"sample": (sample_cases, lambda device, c: check_sample(device, DTYPES[c[0]], *c[1:]))}


test_cuda, test_interpreter = kernel_tests(KINDS, __file__)
