"""Sampling: temperature 0 is the argmax, temperature > 0 draws from softmax(logits / temperature) cut
to the top-k, top-p and min-p tokens; a seeded request draws the same tokens whatever its batch.

The sampler is driven through the engine's own builder of its inputs, from sequences. On CUDA the
same checks run the fused kernel (plain batches) and the torch cuts before it.
"""
from dataclasses import replace

import pytest
import torch

from tests.helpers import GPU, BLOCK_SIZE
from nanovllm import LLM, SamplingParams
from nanovllm.engine.step_inputs import sampling_inputs
from nanovllm.engine.sequence import Sequence
from nanovllm.layers.sampler import Sampler, keep_top_tokens

DEVICES = ["cpu", pytest.param("cuda", marks=GPU)]
DRAWS = 20000
TOLERANCE = 0.015  # over 4 standard deviations of a frequency from DRAWS draws
PROBS = torch.tensor([0.5, 0.25, 0.15, 0.1])


def sequences(params: list[SamplingParams], token_indices: list[int] | None = None) -> list[Sequence]:
    """One sequence per params, about to draw its token_indices[i]-th completion token."""
    seqs = [Sequence([0], sp) for sp in params]
    for seq, index in zip(seqs, token_indices or []):
        seq.token_ids += [0] * index
    return seqs


def sample(logits: torch.Tensor, params: list[SamplingParams], device: str = "cpu",
           token_indices: list[int] | None = None) -> torch.Tensor:
    inputs = sampling_inputs(sequences(params, token_indices),
                             lambda values, dtype: torch.tensor(values, dtype=dtype, device=device))
    return Sampler()(logits.to(device), inputs).cpu()


def frequencies(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab_size) / len(tokens)


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_rows_take_the_argmax(device):
    torch.manual_seed(0)
    logits = torch.randn(64, 50) * 3
    # Greedy ignores the cuts and the seed.
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0),
              SamplingParams(temperature=0.0, top_k=5, top_p=0.5, min_p=0.2, seed=3),
              SamplingParams(temperature=0.5)] * 16
    tokens = sample(logits, params, device)
    greedy = torch.tensor([sp.temperature == 0 for sp in params])
    assert torch.equal(tokens[greedy], logits.argmax(-1)[greedy])
    assert not torch.equal(tokens[~greedy], logits.argmax(-1)[~greedy])


@pytest.mark.parametrize("device", DEVICES)
def test_sampling_follows_the_tempered_softmax(device):
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    for temperature in (0.5, 1.0, 2.0):
        tokens = sample(logits.repeat(DRAWS, 1), [SamplingParams(temperature=temperature)] * DRAWS, device)
        expected = torch.softmax(logits / temperature, -1)
        assert (frequencies(tokens, 4) - expected).abs().max() < TOLERANCE


# Over PROBS = [0.5, 0.25, 0.15, 0.1], the tokens each cut keeps, worked out by hand. Where an order
# matters the case tells it apart: top-p after top-k sees the top-k renormalised ([.56, .28, .17]
# reaches 0.8 in two tokens, the full distribution needs three), and the cuts act on the tempered
# probabilities (at temperature 2 they are proportional to sqrt(PROBS): [.37, .26, .20, .17]).
CUTS = [
    (dict(top_k=2), [0, 1]),
    (dict(top_k=1000), [0, 1, 2, 3]),
    (dict(top_p=0.8), [0, 1, 2]),
    (dict(top_p=0.4), [0]),
    (dict(min_p=0.4), [0, 1]),
    (dict(min_p=0.25), [0, 1, 2]),
    (dict(top_k=3, top_p=0.8), [0, 1]),
    (dict(top_k=3, min_p=0.25, top_p=0.95), [0, 1, 2]),
    (dict(temperature=2.0, top_p=0.7), [0, 1, 2]),
    (dict(temperature=2.0, min_p=0.7), [0, 1]),
    (dict(temperature=0.5, top_k=3), [0, 1, 2]),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cut,kept", CUTS, ids=[str(c) for c, _ in CUTS])
def test_cuts_draw_from_the_renormalised_rest(device, cut, kept):
    torch.manual_seed(1)
    logits = PROBS.log()
    params = SamplingParams(**{"temperature": 1.0, **cut})
    tokens = sample(logits.repeat(DRAWS, 1), [params] * DRAWS, device)
    expected = torch.zeros(4)
    expected[kept] = torch.softmax(logits / params.temperature, -1)[kept]
    expected /= expected.sum()
    observed = frequencies(tokens, 4)
    assert torch.all(observed[expected == 0] == 0), observed
    assert (observed - expected).abs().max() < TOLERANCE, (observed, expected)


def reference_kept(logits: torch.Tensor, sp: SamplingParams) -> set[int]:
    """The tokens a row keeps, by the definitions, in float64 and plain Python."""
    if sp.temperature == 0:
        return set(range(len(logits)))
    probs = torch.softmax(logits.double() / sp.temperature, -1).tolist()
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    if sp.top_k > 0:
        order = order[:sp.top_k]
    total = sum(probs[i] for i in order)
    kept, mass = [], 0.0
    for i in order:
        if mass >= sp.top_p:
            break
        kept.append(i)
        mass += probs[i] / total
    return {i for i in kept if probs[i] >= sp.min_p * probs[kept[0]]}


@pytest.mark.parametrize("device", DEVICES)
def test_cut_sets_match_the_definitions(device):
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(96, 200, generator=gen) * 2
    options = [dict(top_k=k, top_p=p, min_p=m) for k in (-1, 0, 1, 7, 150, 1000) for p in (1.0, 0.9, 0.3)
               for m in (0.0, 0.05, 0.5)]
    params = [SamplingParams(temperature=(0.0, 0.5, 1.0, 2.0)[i % 4], **options[i % len(options)])
              for i in range(len(logits))]
    inputs = sampling_inputs(sequences(params), lambda values, dtype: torch.tensor(values, dtype=dtype, device=device))
    cut = keep_top_tokens(logits.to(device), inputs).cpu()
    for row, sp in enumerate(params):
        kept = set(torch.isfinite(cut[row]).nonzero().flatten().tolist())
        assert kept == reference_kept(logits[row], sp), (row, sp)
        assert torch.equal(cut[row][list(kept)], logits[row][list(kept)])


@pytest.mark.parametrize("device", DEVICES)
def test_top_k_never_draws_outside_the_top_k(device):
    torch.manual_seed(3)
    logits = torch.randn(4000, 100)
    params = [SamplingParams(temperature=3.0, top_k=(1, 5, 20)[i % 3]) for i in range(len(logits))]
    tokens = sample(logits, params, device)
    ranks = (logits > logits.gather(1, tokens.unsqueeze(1))).sum(-1)
    top_k = torch.tensor([sp.top_k for sp in params])
    assert torch.all(ranks < top_k)
    assert torch.all(ranks[top_k == 20].bincount(minlength=20) > 0)  # and it does draw from all of them


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_row_draws_the_same_alone_and_in_any_batch(device):
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(12, 1000, generator=gen)
    params = [SamplingParams(seed=11), SamplingParams(), SamplingParams(temperature=0.7, seed=2 ** 62 + 5),
              SamplingParams(temperature=0.0), SamplingParams(seed=11, top_k=50), SamplingParams(top_p=0.9),
              SamplingParams(seed=11, top_p=0.95, min_p=0.001), SamplingParams(seed=12)] + [SamplingParams()] * 4
    indices = [0, 3, 5, 0, 0, 2, 7, 0, 1, 1, 1, 1]
    torch.manual_seed(0)
    batch = sample(logits, params, device, indices)
    for row, sp in enumerate(params):
        if sp.seed is None:
            continue
        torch.manual_seed(row + 1)
        alone = sample(logits[row:row + 1], [sp], device, [indices[row]])
        assert alone.item() == batch[row], row
        # Another place in another batch, after the unseeded rows' generator moved on.
        reordered = [row] + [r for r in range(len(params)) if r != row][:5]
        again = sample(logits[reordered], [params[r] for r in reordered], device, [indices[r] for r in reordered])
        assert again[0] == batch[row], row


@pytest.mark.parametrize("device", DEVICES)
def test_seeds_and_token_indices_pick_different_draws(device):
    logits = torch.zeros(20, 1000)  # uniform: two streams agree on a draw once in 1000
    one = sample(logits, [SamplingParams(seed=1)] * 20, device, list(range(20)))
    other = sample(logits, [SamplingParams(seed=2)] * 20, device, list(range(20)))
    assert (one != other).sum() >= 18
    assert len(set(one.tolist())) >= 18  # each token index draws afresh


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_draws_follow_the_tempered_softmax(device):
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    params = [SamplingParams(temperature=2.0, seed=seed) for seed in range(DRAWS // 2)] + \
        [SamplingParams(temperature=2.0, seed=99)] * (DRAWS // 2)
    tokens = sample(logits.repeat(DRAWS, 1), params, device, [0] * (DRAWS // 2) + list(range(DRAWS // 2)))
    expected = torch.softmax(logits / 2.0, -1)
    for half in tokens.chunk(2):
        assert (frequencies(half, 4) - expected).abs().max() < TOLERANCE * 2 ** 0.5


@pytest.mark.parametrize("device", DEVICES)
def test_unseeded_rows_draw_from_the_global_generator(device):
    """torch.manual_seed repeats them, and seeded rows beside them change nothing."""
    logits = torch.randn(16, 300, generator=torch.Generator().manual_seed(5))
    plain = [SamplingParams()] * 16
    mixed = [SamplingParams(seed=i) if i % 3 == 0 else SamplingParams() for i in range(16)]
    runs = []
    for params in (plain, plain, mixed):
        torch.manual_seed(6)
        runs.append(sample(logits, params, device))
    unseeded = torch.tensor([sp.seed is None for sp in mixed])
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(runs[2][unseeded], runs[0][unseeded])
    torch.manual_seed(7)
    assert not torch.equal(sample(logits, plain, device), runs[0])


# ---- through the engine ------------------------------------------------------------------------

@pytest.fixture(scope="module", params=DEVICES)
def tiny_llm(request, tiny_model_dir):
    """float32 also on CUDA, so that batch shapes change logits too little to flip a draw."""
    return LLM(tiny_model_dir, device=request.param, dtype="float32", kvcache_block_size=BLOCK_SIZE,
               num_kvcache_blocks=64, max_num_seqs=8)


def test_engine_samples_only_where_asked(tiny_llm):
    torch.manual_seed(0)
    prompt = [5, 6, 7, 8, 9]
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    hot = SamplingParams(temperature=1.5, max_tokens=16, ignore_eos=True)
    outputs = tiny_llm.generate([prompt] * 8, [greedy, hot] * 4, use_tqdm=False)
    greedy_outputs = {tuple(o["token_ids"]) for o in outputs[::2]}
    sampled_outputs = {tuple(o["token_ids"]) for o in outputs[1::2]}
    assert len(greedy_outputs) == 1
    assert len(sampled_outputs) > 1
    assert all(o["finish_reason"] == "length" for o in outputs)


def test_engine_cut_to_one_token_is_greedy(tiny_llm):
    prompts = [[5, 6, 7, 8, 9], [40, 41, 42]]
    greedy = tiny_llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
                               use_tqdm=False)
    hot = SamplingParams(temperature=1.5, max_tokens=12, ignore_eos=True)
    for cut in (dict(top_k=1), dict(min_p=1.0), dict(top_p=1e-6)):
        outputs = tiny_llm.generate(prompts, replace(hot, **cut), use_tqdm=False)
        assert [o["token_ids"] for o in outputs] == [o["token_ids"] for o in greedy], cut


def test_engine_seeded_request_is_the_same_in_any_batch(tiny_llm):
    prompt = [5, 6, 7, 8, 9]
    seeded = SamplingParams(temperature=1.5, max_tokens=12, ignore_eos=True, seed=7)
    cut = SamplingParams(temperature=1.5, max_tokens=12, ignore_eos=True, seed=7, top_k=20, top_p=0.95)
    alone = [tiny_llm.generate([prompt], sp, use_tqdm=False)[0]["token_ids"] for sp in (seeded, cut)]
    others = SamplingParams(temperature=1.5, max_tokens=20, ignore_eos=True)
    batch = tiny_llm.generate([[1, 2, 3], prompt, [9] * 40, prompt, prompt],
                              [others, seeded, SamplingParams(temperature=1.0, seed=8, max_tokens=5), cut,
                               replace(seeded, seed=8)], use_tqdm=False)
    assert batch[1]["token_ids"] == alone[0]
    assert batch[3]["token_ids"] == alone[1]
    assert batch[4]["token_ids"] != alone[0]

