"""The streaming API (add_request/step), cleanup after an interrupted generate, and threads sharing one LLM."""
import os
import subprocess
import sys
import threading

import pytest
import torch

from nanovllm import LLM, SamplingParams
from tests.helpers import BLOCK_SIZE, random_prompts, stream_to_completion

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(model_dir):
    return LLM(model_dir, device="cpu", kvcache_block_size=BLOCK_SIZE, num_kvcache_blocks=128)


def tokens(llm, prompts, params=GREEDY):
    return [o["token_ids"] for o in llm.generate(prompts, params, use_tqdm=False)]


def assert_idle(llm):
    assert not llm.has_unfinished_requests()
    bm = llm.scheduler.block_manager
    assert bm.num_free_blocks == len(bm.blocks)


def test_step_streams_every_token_once_and_matches_generate(engine):
    prompts = random_prompts([5, 40, 17], seed=21)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (3, 9, 6)]
    expected = tokens(engine, prompts, params)
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    assert stream_to_completion(engine, ids) == expected
    assert_idle(engine)


def test_generate_refuses_to_run_over_streamed_requests(engine):
    prompt = random_prompts([8], seed=22)
    request_id = engine.add_request(prompt[0], GREEDY)
    with pytest.raises(RuntimeError, match="add_request"):
        engine.generate(prompt, GREEDY, use_tqdm=False)
    engine.abort_requests([request_id])
    assert_idle(engine)
    assert len(tokens(engine, prompt)[0]) == GREEDY.max_tokens


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, RuntimeError])
def test_interrupted_generate_removes_its_requests(engine, monkeypatch, interrupt):
    prompts = random_prompts([30, 12, 50, 7], seed=23)
    expected = tokens(engine, prompts)
    run, calls = engine.model_runner.run, []

    def failing_run(*args):
        calls.append(1)
        if len(calls) == 4:
            raise interrupt("stopped mid-generate")
        return run(*args)

    monkeypatch.setattr(engine.model_runner, "run", failing_run)
    with pytest.raises(interrupt):
        engine.generate(prompts, GREEDY, use_tqdm=False)
    monkeypatch.undo()
    assert_idle(engine)
    assert tokens(engine, prompts) == expected


def test_threads_sharing_one_llm_get_their_own_tokens(engine):
    batches = [random_prompts([4 + 9 * i + t for i in range(4)], seed=30 + t) for t in range(3)]
    expected = [tokens(engine, b) for b in batches]
    results, errors = [None] * len(batches), []

    def work(t):
        try:
            results[t] = tokens(engine, batches[t])
        except Exception as e:  # reported below; a thread's exception would otherwise vanish
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(len(batches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and results == expected
    assert_idle(engine)


def test_constructing_an_llm_leaves_torch_global_state_as_it_was(model_dir):
    from torch.overrides import _get_current_function_mode_stack
    before = (list(_get_current_function_mode_stack()), torch.get_default_device(), torch.get_default_dtype())
    llm = LLM(model_dir, device="cpu", dtype="float16", kvcache_block_size=BLOCK_SIZE, num_kvcache_blocks=32)
    assert (list(_get_current_function_mode_stack()), torch.get_default_device(), torch.get_default_dtype()) == before
    llm.exit()


def test_the_package_imports_where_triton_is_missing():
    """triton is a Linux-only dependency: elsewhere the engine runs on the torch paths."""
    code = "import sys; sys.modules['triton'] = None; import nanovllm, nanovllm.disagg.multiplex, nanovllm.pipeline.decode"
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
