"""The harness that runs the kernel checks in a subprocess reports each check's real outcome: a check that
raises is a failure with its traceback, one the subprocess never reported is missing, never a pass."""
import importlib.util

import pytest
import torch

from tests.kernels import kernel_checks

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")]
FUSED = "tests/kernels/test_fused.py"


def test_outcomes_of_passing_failing_and_unreported_checks():
    compiled = (FUSED, "rms_norm", 0)
    out_of_range = (FUSED, "rms_norm", 10 ** 6)
    run = kernel_checks.CheckRun([compiled, out_of_range], interpret=False)
    try:
        outcome = run.result(compiled)
        if torch.cuda.is_available():
            assert outcome["status"] == "ok", outcome["output"]
        else:  # compiled checks need CUDA: the check raises, and that is its failure
            assert outcome["status"] == "failed" and "CUDA" in outcome["output"]
        outcome = run.result(out_of_range)
        assert outcome["status"] == "failed" and "IndexError" in outcome["output"]
        outcome = run.result((FUSED, "no_such_kind", 0))
        assert outcome["status"] == "missing" and "exit code 0" in outcome["output"]
    finally:
        run.stop()
