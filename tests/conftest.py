"""Shared fixtures; the helpers they use live in tests/helpers.py."""
import pytest

from nanovllm import LLM
from tests.helpers import (BLOCK_SIZE, MAX_NEW_TOKENS, MODEL_VARIANTS, PROMPT_LENGTHS, TINY_EOS_VARIANT,
                           build_checkpoint, checkpoint_fixture, hf_greedy, random_prompts)


def pytest_configure(config):
    config.addinivalue_line("markers", "spawn: starts extra processes (tensor-parallel ranks over gloo)")


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """Lazily built checkpoints: model_dirs(variant) -> directory."""
    built = {}

    def get(variant: str) -> str:
        if variant not in built:
            path = tmp_path_factory.mktemp(f"qwen3_{variant}")
            build_checkpoint(path, **MODEL_VARIANTS[variant])
            built[variant] = str(path)
        return built[variant]

    return get


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
