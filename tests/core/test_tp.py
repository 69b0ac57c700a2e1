"""Tensor parallelism on CPU: two ranks over gloo, the second in a spawned process."""
import os
import subprocess
import sys

import pytest
import torch.distributed as dist

from tests.helpers import BLOCK_SIZE, random_prompts
from nanovllm import LLM, SamplingParams

pytestmark = pytest.mark.spawn

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


def generate(model_dir, prompts, **options) -> list[list[int]]:
    llm = LLM(model_dir, device="cpu", kvcache_block_size=BLOCK_SIZE, num_kvcache_blocks=48, max_model_len=128,
              **options)
    try:
        first = [o["token_ids"] for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
        # Again, now with prefix-cache hits: the ranks must agree on block tables with a cached prefix.
        again = [o["token_ids"] for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
        assert again == first
        return first
    finally:
        llm.exit()


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8_e4m3"])  # float8: each rank calibrates its own heads
def test_tp2_matches_tp1(model_dir, kv_cache_dtype):
    prompts = random_prompts([3, 40, 17, 64], seed=31)
    prompts += [prompts[3][:48] + [5, 6, 7]]
    tp2 = generate(model_dir, prompts, tensor_parallel_size=2, kv_cache_dtype=kv_cache_dtype)
    # After exit the process group is gone, so a later single-rank engine in this process is unsharded.
    assert not dist.is_initialized()
    tp1 = generate(model_dir, prompts, kv_cache_dtype=kv_cache_dtype)
    assert tp2 == tp1
    assert all(len(t) == 16 for t in tp2)


def test_script_without_main_guard_fails_with_the_reason(model_dir, tmp_path):
    script = tmp_path / "no_guard.py"
    script.write_text(f"from nanovllm import LLM\nLLM({model_dir!r}, device='cpu', tensor_parallel_size=2)\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert proc.returncode != 0
    assert "__name__ == \"__main__\"" in proc.stderr and "rank 1 exited" in proc.stderr


def test_broken_checkpoint_under_tp_leaves_no_process_group(model_dir, tmp_path):
    """A load that fails on every rank raises the loader's error and cleans up the workers and the group."""
    import shutil
    from safetensors.torch import load_file, save_file
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    weights = load_file(broken / "model.safetensors")
    del weights["model.layers.0.self_attn.q_proj.weight"]
    save_file(weights, broken / "model.safetensors")
    with pytest.raises(ValueError, match="q_proj"):
        LLM(str(broken), device="cpu", tensor_parallel_size=2, kvcache_block_size=BLOCK_SIZE, num_kvcache_blocks=48)
    assert not dist.is_initialized()
    assert len(generate(model_dir, random_prompts([5], seed=3))[0]) == 16
