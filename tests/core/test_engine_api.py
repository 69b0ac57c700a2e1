"""The streaming API (add_request/step), cleanup after an interrupted generate, and threads sharing one LLM."""
import importlib
import logging
import sys
import threading

import pytest
import torch

from nanovllm import LLM, SamplingParams
from tests.helpers import BLOCK_SIZE, assert_idle, fail_on_call, random_prompts, stream_to_completion, tokens

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(model_dir):
    return LLM(model_dir, device="cpu", kvcache_block_size=BLOCK_SIZE, num_kvcache_blocks=128)


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
    assert len(tokens(engine, prompt, GREEDY)[0]) == GREEDY.max_tokens


def test_an_idle_engine_steps_to_nothing_and_aborts_one_id_or_several(engine):
    assert engine.step() == [] and engine.step() == []
    prompts = random_prompts([8, 20, 5], seed=24)
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    engine.abort_requests(ids[1])  # one id, not in a list
    engine.abort_requests(iter(ids[2:] + [10 ** 9]))  # any iterable; an unknown id is ignored
    assert stream_to_completion(engine, ids[:1]) == tokens(engine, prompts[:1], GREEDY)
    with pytest.raises(TypeError, match="request_ids"):
        engine.abort_requests("0")
    assert_idle(engine)


def test_an_engine_that_exited_refuses_work(model_dir):
    llm = LLM(model_dir, device="cpu", kvcache_block_size=BLOCK_SIZE, num_kvcache_blocks=32)
    llm.exit()
    with pytest.raises(RuntimeError, match="exit"):
        llm.generate(random_prompts([5], seed=25), GREEDY, use_tqdm=False)
    with pytest.raises(RuntimeError, match="exit"):
        llm.add_request([1, 2, 3], GREEDY)


def test_statistics_of_the_sequential_engine(engine, capsys):
    stats = engine.statistics()
    assert stats["mode"] == "sequential" and "pd" not in stats and engine.get_pd_statistics() == {}
    assert set(stats["runner"]) == {"startup_s", "decode_paths"}
    assert stats["runner"]["decode_paths"] == {"path_per_bucket": {}, "timings_ms": {}}  # eager on CPU: no graphs
    assert engine.model_runner.get_pipeline_statistics() == {"enabled": False}
    capsys.readouterr()
    engine.print_pd_statistics()
    assert capsys.readouterr().out == "[PD Statistics]\n  Prefill/decode disaggregation is off\n"


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, RuntimeError])
def test_interrupted_generate_removes_its_requests(engine, monkeypatch, interrupt):
    prompts = random_prompts([30, 12, 50, 7], seed=23)
    expected = tokens(engine, prompts, GREEDY)
    fail_on_call(monkeypatch, engine.model_runner, "launch", 4, interrupt("stopped mid-generate"))
    with pytest.raises(interrupt):
        engine.generate(prompts, GREEDY, use_tqdm=False)
    monkeypatch.undo()
    assert_idle(engine)
    assert tokens(engine, prompts, GREEDY) == expected


def test_threads_sharing_one_llm_get_their_own_tokens(engine):
    batches = [random_prompts([4 + 9 * i + t for i in range(4)], seed=30 + t) for t in range(3)]
    expected = [tokens(engine, b, GREEDY) for b in batches]
    results, errors = [None] * len(batches), []

    def work(t):
        try:
            results[t] = tokens(engine, batches[t], GREEDY)
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


def test_the_package_imports_where_triton_is_missing(monkeypatch):
    """triton is a Linux-only dependency: elsewhere the engine runs on the torch paths (every mode imports,
    the kernels package says it has no kernels). The package is imported afresh in this process with triton
    hidden (an entry None in sys.modules fails its import); then the modules as they were are put back."""
    def ours(name):
        return name == "nanovllm" or name.startswith("nanovllm.")

    saved = {name: module for name, module in sys.modules.items() if ours(name)}
    logger = logging.getLogger("nanovllm")  # nanovllm.utils.log configures it again when imported again
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    try:
        for name in saved:
            del sys.modules[name]
        monkeypatch.setitem(sys.modules, "triton", None)
        for name in ("nanovllm", "nanovllm.llm", "nanovllm.modes", "nanovllm.modes.multiplexing.placement",
                     "nanovllm.modes.pipeline.extension", "nanovllm.layers.sampler"):
            importlib.import_module(name)
        kernels = importlib.import_module("nanovllm.kernels")
        assert kernels is not saved["nanovllm.kernels"]  # imported afresh
        assert kernels.fused is None and kernels.sampling is None
        assert not kernels.on_gpu(torch.zeros(1))
    finally:
        for name in [name for name in sys.modules if ours(name)]:
            del sys.modules[name]
        sys.modules.update(saved)
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate
