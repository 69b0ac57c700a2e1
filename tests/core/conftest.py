"""Starts, as soon as the tests are collected, the forkserver that tests/core/test_tp.py forks some
tensor-parallel workers from (tests/helpers.py: start_forkserver), so that its imports run beside the
tests before it. And the tiny preset's checkpoint that the model maker's and the tokenizer's tests share."""
import os

import pytest

from nanovllm.tools.make_model import make_model
from tests.helpers import FORKSERVER_LOG, start_forkserver


@pytest.fixture(scope="session")
def tiny_preset(tmp_path_factory):
    """The tiny preset with seed 0 (what ensure_model("tiny") builds), in a directory of this session's."""
    return make_model("tiny", tmp_path_factory.mktemp("tiny"), seed=0)


def pytest_collection_finish(session):
    if not session.config.option.collectonly and any(
            hasattr(item, "callspec") and item.callspec.params.get("tp_workers") == "forkserver"
            for item in session.items):
        start_forkserver()


def pytest_sessionfinish(session):
    """The forked workers' log is kept where a test failed."""
    if not session.testsfailed and os.path.exists(FORKSERVER_LOG):
        os.remove(FORKSERVER_LOG)
