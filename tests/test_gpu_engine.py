"""The GPU fast path against references: CUDA-graph replay vs eager, and Hugging Face transformers."""
import pytest
import torch
from transformers import Qwen3ForCausalLM

from nanovllm import LLM, SamplingParams
from tests.conftest import BLOCK_SIZE, hf_greedy, random_prompts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)


def generate(model_dir, prompts, **options):
    llm = LLM(model_dir, device="cuda", kvcache_block_size=BLOCK_SIZE, max_num_seqs=64, max_model_len=512,
              gpu_memory_utilization=0.3, **options)
    outputs = [o["token_ids"] for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    return outputs, llm


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graph_replay_matches_eager(model_dir, backend, dtype):
    # 37 prompts: decode batches fall in several padded buckets (37 -> 48, then smaller as they finish).
    prompts = random_prompts([5 + 7 * i % 90 for i in range(37)], seed=7)
    eager, _ = generate(model_dir, prompts, dtype=dtype, attention_backend=backend, enforce_eager=True)
    graph, llm = generate(model_dir, prompts, dtype=dtype, attention_backend=backend)
    assert llm.model_runner.graphs is not None
    if dtype == "float32":
        assert graph == eager
    else:
        same = sum(a == b for a, b in zip(graph, eager))
        assert same >= len(prompts) - 2, f"only {same}/{len(prompts)} bf16 sequences identical"


def test_float32_greedy_matches_transformers(model_dir, prompts):
    ours, llm = generate(model_dir, prompts, dtype="float32")
    assert llm.model_runner.backend.name == "triton"
    assert ours == hf_greedy(model_dir, prompts, 32)


def test_bfloat16_logits_close_to_transformers_at_every_step(model_dir):
    """Both models are fed the same tokens (teacher forcing); nanovllm's logits at each decode step
    must stay close to transformers' bf16 logits at that position."""
    hf = Qwen3ForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    llm = LLM(model_dir, device="cuda", dtype="bfloat16", kvcache_block_size=BLOCK_SIZE, max_model_len=512,
              max_num_seqs=8, gpu_memory_utilization=0.3)
    runner = llm.model_runner
    for prompt in random_prompts([9, 40, 77], seed=11):
        forced = random_prompts([24], seed=len(prompt))[0]
        recorded = []

        def teacher(logits, temperatures, recorded=recorded, forced=forced):
            recorded.append(logits.float().clone())
            return torch.tensor([forced[len(recorded) - 1]], device=logits.device)

        runner.sampler = teacher
        llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=len(forced), ignore_eos=True),
                     use_tqdm=False)
        with torch.no_grad():
            ref = hf(torch.tensor([prompt + forced], device="cuda")).logits[0, len(prompt) - 1:-1].float()
        ours = torch.cat(recorded)
        assert ours.shape == ref.shape
        rel = (ours - ref).norm(dim=-1) / ref.norm(dim=-1)
        assert rel.max() < 3e-2, f"step errors {rel.tolist()}"
