"""Shared fixtures; the helpers they use live in tests/helpers.py."""
import os

import pytest
import torch

from nanovllm import LLM
from tests.helpers import (BLOCK_SIZE, MAX_NEW_TOKENS, MODEL_VARIANTS, PROMPT_LENGTHS, TINY_EOS_VARIANT, checkpoint_fixture,
                           hf_greedy, propagating_logs, random_prompts, shared_checkpoint)


@pytest.fixture(scope="session", autouse=True)
def one_thread_per_process():
    """The tests' models are tiny: torch's intra-op threads only add overhead, and on a machine of few cores they
    contend with each other and with the processes some tests start (tensor-parallel ranks over gloo, the
    Triton interpreter), which made the CPU suite about twice as slow. One thread here and in those processes."""
    threads, variable = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    if variable is None:
        del os.environ["OMP_NUM_THREADS"]
    else:
        os.environ["OMP_NUM_THREADS"] = variable


@pytest.fixture(autouse=True)
def nanovllm_log_records():
    """Every test sees the library's log records in caplog (assert on records, not on printed text)."""
    with propagating_logs():
        yield


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """Lazily built checkpoints: model_dirs(variant) -> directory."""
    return lambda variant: shared_checkpoint(tmp_path_factory, **MODEL_VARIANTS[variant])


@pytest.fixture(scope="session")
def model_dir(model_dirs):
    return model_dirs("untied")


# One layer and an end-of-sequence token, for tests that run many requests.
tiny_model_dir = checkpoint_fixture("session", **TINY_EOS_VARIANT)


@pytest.fixture(scope="session")
def llm(model_dir):
    """A shared engine; tests that use it must leave it idle (every request finished)."""
    engine = LLM(model_dir, device="cpu", kvcache_block_size=BLOCK_SIZE, num_kvcache_blocks=256)
    yield engine
    engine.exit()


@pytest.fixture(scope="session")
def prompts():
    return random_prompts(PROMPT_LENGTHS, seed=1234)


@pytest.fixture(scope="session")
def hf_outputs(model_dirs, prompts):
    """hf_outputs(variant) -> transformers' greedy MAX_NEW_TOKENS tokens for each of `prompts`."""
    cache = {}

    def get(variant: str) -> list[list[int]]:
        if variant not in cache:
            cache[variant] = hf_greedy(model_dirs(variant), prompts, MAX_NEW_TOKENS)
        return cache[variant]

    return get
