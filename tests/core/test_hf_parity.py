"""nanovllm against transformers on random Qwen3 checkpoints: prefill logits and greedy generation."""
import json
import shutil

import pytest
import torch
from transformers import AutoConfig, Qwen3ForCausalLM as HFQwen3ForCausalLM

from tests.helpers import BLOCK_SIZE, MAX_NEW_TOKENS, MODEL_VARIANTS, random_prompts
from nanovllm import LLM, SamplingParams
from nanovllm.models.qwen3 import Qwen3ForCausalLM
from nanovllm.utils.context import Context, reset_context, set_context
from nanovllm.utils.loader import load_model

VARIANTS = list(MODEL_VARIANTS)
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


@torch.no_grad()
def nanovllm_prefill_logits(path: str, prompts: list[list[int]]) -> torch.Tensor:
    """Logits of every position of the prompts packed into one prefill batch, without a KV cache."""
    model = Qwen3ForCausalLM(AutoConfig.from_pretrained(path))
    load_model(model, path)
    lengths = [len(p) for p in prompts]
    cu_seqlens = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    input_ids = torch.tensor([t for p in prompts for t in p])
    positions = torch.cat([torch.arange(n) for n in lengths])
    set_context(Context(is_prefill=True, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                        max_seqlen_q=max(lengths), max_seqlen_k=max(lengths)))
    try:
        return model.compute_logits(model(input_ids, positions))
    finally:
        reset_context()


@torch.no_grad()
def hf_prefill_logits(path: str, prompts: list[list[int]]) -> torch.Tensor:
    model = HFQwen3ForCausalLM.from_pretrained(path).float().eval()
    return torch.cat([model(torch.tensor([p])).logits[0] for p in prompts])


@pytest.mark.parametrize("variant", VARIANTS)
def test_prefill_logits_match_transformers(model_dirs, variant):
    path = model_dirs(variant)
    # Longer than the yarn variant's original context (128), and many blocks long.
    prompts = random_prompts([5, 16, 150, 1, 77], seed=7)
    ours, ref = nanovllm_prefill_logits(path, prompts), hf_prefill_logits(path, prompts)
    assert ours.shape == ref.shape == (sum(map(len, prompts)), 512)
    assert relative_error(ours, ref) < 1e-4


def test_packing_does_not_mix_sequences(model_dirs):
    """A sequence's logits are the same alone and packed after other sequences."""
    path = model_dirs("untied")
    prompts = random_prompts([40, 9, 33], seed=8)
    packed = nanovllm_prefill_logits(path, prompts)
    alone = nanovllm_prefill_logits(path, prompts[2:])
    assert relative_error(packed[49:], alone) < 1e-5


# The tied variant sizes its KV cache from memory: 1 GiB on CPU, which takes a second or two to zero.
@pytest.mark.parametrize("variant", [pytest.param(v, marks=pytest.mark.slow) if v == "tied" else v for v in VARIANTS])
def test_greedy_generation_matches_transformers(model_dirs, hf_outputs, prompts, variant):
    # One variant sizes the KV cache automatically (1 GiB on CPU); the others keep it small.
    sizing = {} if variant == "tied" else {"num_kvcache_blocks": 96}
    llm = LLM(model_dirs(variant), device="cpu", kvcache_block_size=BLOCK_SIZE, **sizing)
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    expected = hf_outputs(variant)
    assert [len(o) for o in expected] == [MAX_NEW_TOKENS] * len(prompts)
    for i, (out, ref) in enumerate(zip(outputs, expected, strict=True)):
        assert out["token_ids"] == ref, f"prompt {i} ({len(prompts[i])} tokens) diverges"
    assert llm.scheduler.block_manager.num_free_blocks == llm.model_runner.kv_cache.num_blocks


def with_eos(src: str, dst, eos: int) -> str:
    shutil.copytree(src, dst)
    for name in ("config.json", "generation_config.json"):
        path = dst / name
        if path.exists():
            data = json.loads(path.read_text())
            data["eos_token_id"] = eos
            path.write_text(json.dumps(data))
    return str(dst)


def test_eos_stops_generation_unless_ignored(model_dirs, hf_outputs, prompts, tmp_path):
    expected_full = hf_outputs("untied")
    eos = expected_full[0][10]  # a token that greedy decoding of prompt 0 produces
    path = with_eos(model_dirs("untied"), tmp_path / "eos_model", eos)
    llm = LLM(path, device="cpu", kvcache_block_size=BLOCK_SIZE, num_kvcache_blocks=128)
    stopped = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS), use_tqdm=False)
    for out, ref in zip(stopped, expected_full, strict=True):
        assert out["token_ids"] == (ref[:ref.index(eos) + 1] if eos in ref else ref)
        assert out["finish_reason"] == ("stop" if eos in ref else "length")
    assert len(stopped[0]["token_ids"]) <= 11
    ignored = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o["token_ids"] for o in ignored] == expected_full
    assert all(o["finish_reason"] == "length" for o in ignored)
