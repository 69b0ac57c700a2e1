"""Sampling: temperature 0 is the argmax, temperature > 0 draws from softmax(logits / temperature)."""
import torch

from tests.helpers import BLOCK_SIZE
from nanovllm import LLM, SamplingParams
from nanovllm.layers.sampler import Sampler


def test_greedy_rows_take_the_argmax():
    torch.manual_seed(0)
    logits = torch.randn(64, 50) * 3
    temperatures = torch.tensor([0.0, 1.0, 0.0, 0.5] * 16)
    tokens = Sampler()(logits, temperatures)
    greedy = temperatures == 0
    assert torch.equal(tokens[greedy], logits.argmax(-1)[greedy])
    assert not torch.equal(tokens[~greedy], logits.argmax(-1)[~greedy])


def test_sampling_follows_the_tempered_softmax():
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    n = 20000
    for temperature in (0.5, 1.0, 2.0):
        tokens = Sampler()(logits.repeat(n, 1), torch.full((n,), temperature))
        frequencies = torch.bincount(tokens, minlength=4) / n
        expected = torch.softmax(logits / temperature, -1)
        assert (frequencies - expected).abs().max() < 0.015  # > 4 standard deviations


def test_engine_samples_only_where_asked(tiny_model_dir):
    torch.manual_seed(0)
    llm = LLM(tiny_model_dir, device="cpu", kvcache_block_size=BLOCK_SIZE, num_kvcache_blocks=64)
    prompt = [5, 6, 7, 8, 9]
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    hot = SamplingParams(temperature=1.5, max_tokens=16, ignore_eos=True)
    outputs = llm.generate([prompt] * 8, [greedy, hot] * 4, use_tqdm=False)
    greedy_outputs = {tuple(o["token_ids"]) for o in outputs[::2]}
    sampled_outputs = {tuple(o["token_ids"]) for o in outputs[1::2]}
    assert len(greedy_outputs) == 1
    assert len(sampled_outputs) > 1
