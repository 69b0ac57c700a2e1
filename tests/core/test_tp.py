"""Tensor parallelism on CPU: two ranks over gloo, the second in a spawned process."""
import multiprocessing
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch.distributed as dist

from nanovllm import LLM, SamplingParams
from nanovllm.engine import tp_worker
from tests.helpers import BLOCK_SIZE, random_prompts, start_forkserver, tokens

pytestmark = [pytest.mark.spawn, pytest.mark.slow]

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def script_without_main_guard(model_dir, tmp_path_factory):
    """A script that makes a tensor-parallel LLM without `if __name__ == "__main__":`, run in a subprocess
    started with the module's first test: its two Python processes (the script, and the worker that imports
    it again) start up beside the other tests; the last test of the module waits for its outcome."""
    folder = tmp_path_factory.mktemp("no_guard")
    script = folder / "no_guard.py"
    script.write_text(f"from nanovllm import LLM\nLLM({model_dir!r}, device='cpu', tensor_parallel_size=2)\n")
    with open(folder / "stderr", "w+") as stderr:
        process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=stderr, text=True,
                                   env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
        yield process, stderr
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture
def tp_workers(request, monkeypatch):
    """How TensorParallelGroup starts its rank-1 worker: "spawn", as the library does, or "forkserver": forked
    from a server that imported nanovllm's worker module once, when collection ended (tests/core/conftest.py),
    beside the tests before these. Both run the same worker_main with the same pickled Config in a process
    that imported nanovllm afresh; a forked worker skips a new interpreter's imports, which take seconds on
    CPU and over ten on some GPU machines. The plain run and the script without a main guard keep spawn."""
    if request.param == "forkserver" and start_forkserver():
        context = multiprocessing.get_context("forkserver")
        monkeypatch.setattr(tp_worker, "mp", SimpleNamespace(get_context=lambda method: context))
    return request.param


def assert_ranks(llm, world_size: int) -> None:
    """The engine runs on world_size ranks: the others in live worker processes, in a process group of that
    size, each rank holding its share of the attention heads."""
    runner, group = llm.model_runner, llm.loop.tp_group
    assert runner.world_size == world_size
    if world_size == 1:
        assert group is None and not dist.is_initialized()
    else:
        assert [p.is_alive() for p in group.processes] == [True] * (world_size - 1)
        assert dist.get_world_size() == world_size
    hf = llm.config.hf_config
    qkv = runner.model.model.layers[0].self_attn.qkv_proj.weight
    assert qkv.shape[0] == (hf.num_attention_heads + 2 * hf.num_key_value_heads) * hf.head_dim // world_size


def generate(model_dir, prompts, **options) -> list[list[int]]:
    llm = LLM(model_dir, device="cpu", kvcache_block_size=BLOCK_SIZE, num_kvcache_blocks=48, max_model_len=128,
              **options)
    try:
        assert_ranks(llm, options.get("tensor_parallel_size", 1))
        first = tokens(llm, prompts, GREEDY)
        # Again, now with prefix-cache hits: the ranks must agree on block tables with a cached prefix.
        again = tokens(llm, prompts, GREEDY)
        assert again == first
        return first
    finally:
        llm.exit()


# float8: each rank calibrates its own heads
@pytest.mark.parametrize("kv_cache_dtype,tp_workers", [("auto", "spawn"), ("fp8_e4m3", "forkserver")],
                         indirect=["tp_workers"])
def test_tp2_matches_tp1(model_dir, kv_cache_dtype, tp_workers):
    prompts = random_prompts([3, 40, 17, 64], seed=31)
    prompts += [prompts[3][:48] + [5, 6, 7]]
    tp2 = generate(model_dir, prompts, tensor_parallel_size=2, kv_cache_dtype=kv_cache_dtype)
    # After exit the process group is gone, so a later single-rank engine in this process is unsharded.
    assert not dist.is_initialized()
    tp1 = generate(model_dir, prompts, kv_cache_dtype=kv_cache_dtype)
    assert tp2 == tp1
    assert all(len(t) == 16 for t in tp2)


@pytest.mark.parametrize("tp_workers", ["forkserver"], indirect=True)
def test_broken_checkpoint_under_tp_leaves_no_process_group(model_dir, tmp_path, tp_workers, monkeypatch):
    """A load that fails on every rank raises the loader's error and cleans up the workers and the group."""
    import shutil
    from safetensors.torch import load_file, save_file
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    weights = load_file(broken / "model.safetensors")
    del weights["model.layers.0.self_attn.q_proj.weight"]
    save_file(weights, broken / "model.safetensors")
    # What makes the failure a tensor-parallel one: rank 0 joins a group of two, and a worker is started.
    world_sizes, closed = [], []
    init, close = dist.init_process_group, tp_worker.TensorParallelGroup.close
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **kw: (world_sizes.append(kw["world_size"]),
                                                                      init(*a, **kw))[1])
    monkeypatch.setattr(tp_worker.TensorParallelGroup, "close", lambda self: (closed.append(self), close(self))[1])
    with pytest.raises(ValueError, match="q_proj"):
        LLM(str(broken), device="cpu", tensor_parallel_size=2, kvcache_block_size=BLOCK_SIZE, num_kvcache_blocks=48)
    assert world_sizes == [2]
    [group] = closed
    assert len(group.processes) == 1 and not group.processes[0].is_alive()
    assert not dist.is_initialized()
    assert len(generate(model_dir, random_prompts([5], seed=3))[0]) == 16


def test_script_without_main_guard_fails_with_the_reason(script_without_main_guard):
    process, stderr = script_without_main_guard
    assert process.wait(timeout=120) != 0
    stderr.seek(0)
    said = stderr.read()
    assert "__name__ == \"__main__\"" in said and "rank 1 exited" in said
