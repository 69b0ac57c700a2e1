"""Runs the Triton kernel checks on CPU under the Triton interpreter.

A test file defines KINDS = {kind: (cases(small) -> list, run(device, case))} and takes its tests from
kernel_tests(KINDS, __file__): test_cuda runs every case compiled on CUDA; test_interpreter[kind] runs the small
cases of a kind under the interpreter on CPU.

The interpreter runs in a subprocess, because TRITON_INTERPRET must be set before triton is imported. One
subprocess serves the whole session (each pays some 3 s of imports): tests/kernels/conftest.py starts it in the
background as soon as collection ends, with every selected (file, kind), so that it runs beside the rest of the
suite; each test_interpreter then waits for its kind's result. A kind's failure is that test's failure, with the
kind's output and traceback.
"""
import atexit
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
INTERPRETER_UNAVAILABLE = 77
RESULT = "INTERPRETER-RESULT "  # the subprocess's line for one kind: this prefix, then JSON
TIMEOUT_S = 900


def kernel_tests(kinds: dict, test_file: str):
    """(test_cuda, test_interpreter): every case compiled on CUDA, or the small cases of each kind
    under the interpreter on CPU."""
    cuda = torch.cuda.is_available()

    @pytest.mark.gpu
    @pytest.mark.skipif(not cuda, reason="needs CUDA; the CPU run is test_interpreter")
    @pytest.mark.parametrize("kind,case", [(kind, case) for kind, (cases, _) in kinds.items() for case in cases(False)],
                             ids=str)
    def test_cuda(kind, case):
        kinds[kind][1]("cuda", case)

    @pytest.mark.slow
    @pytest.mark.skipif(cuda, reason="CUDA present: test_cuda runs the compiled kernels")
    @pytest.mark.parametrize("kind", list(kinds))
    def test_interpreter(kind):
        outcome = interpreter_result(test_file, kind)
        if outcome["status"] == "unavailable":
            pytest.skip(f"Triton interpreter unavailable: {outcome['output'][-500:]}")
        assert outcome["status"] == "ok", outcome["output"]

    return test_cuda, test_interpreter


# ---- the session's subprocess (the pytest side) -----------------------------------------------------------

def job(test_file) -> str:
    """A test file as the subprocess names it: its path from the repository root."""
    return Path(test_file).resolve().relative_to(ROOT).as_posix()


class InterpreterRun:
    """One subprocess running the kinds of jobs [(test file, kind)], its output in a temporary file."""

    def __init__(self, jobs: list[tuple[str, str]]):
        self.jobs = list(dict.fromkeys(jobs))
        self.log = tempfile.TemporaryFile(mode="w+")
        pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        # One thread: the subprocess runs beside the test session, whose CPUs it shares.
        env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=pythonpath, OMP_NUM_THREADS="1")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.kernels.triton_interpreter", *(f"{f}::{k}" for f, k in self.jobs)],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT, text=True)
        self.started = time.monotonic()
        self.results: dict[tuple[str, str], dict] | None = None

    def wait(self) -> dict[tuple[str, str], dict]:
        if self.results is None:
            try:
                self.process.wait(timeout=max(1.0, TIMEOUT_S - (time.monotonic() - self.started)))
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.log.seek(0)
            output = self.log.read()
            self.log.close()
            self.results = {}
            for line in output.splitlines():
                if line.startswith(RESULT):
                    result = json.loads(line[len(RESULT):])
                    self.results[result["file"], result["kind"]] = result
            for key in self.jobs:  # the kinds the subprocess did not report on: what it said is all there is
                if key not in self.results:
                    status = "unavailable" if self.process.returncode == INTERPRETER_UNAVAILABLE else "missing"
                    self.results[key] = {"status": status, "output": f"exit code {self.process.returncode}\n"
                                                                     f"{output[-10000:]}"}
        return self.results

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


_RUNS: list[InterpreterRun] = []  # the session's subprocess, and any started for a kind it was not given


def start(jobs: list[tuple[str, str]]) -> None:
    """Starts the session's subprocess for these (test file, kind)s, if triton is installed."""
    if jobs and importlib.util.find_spec("triton") is not None:
        _RUNS.append(InterpreterRun([(job(f), k) for f, k in jobs]))
        atexit.register(_RUNS[-1].stop)


def stop() -> None:
    for run in _RUNS:
        run.stop()


def interpreter_result(test_file: str, kind: str) -> dict:
    """The outcome of one kind: {"status": "ok" | "failed" | "unavailable" | "missing", "output": ...}."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    key = (job(test_file), kind)
    run = next((run for run in _RUNS if key in run.jobs), None)
    if run is None:  # not started when collection ended (a test called some other way)
        start([(ROOT / key[0], kind)])
        run = _RUNS[-1]
    return run.wait()[key]


# ---- the subprocess ---------------------------------------------------------------------------------------

def _patch_interpreter_bf16_dot():
    """The interpreter keeps bf16 as raw uint16 bits and feeds them to an integer matmul; widen them first."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    create_dot = interpreter.InterpreterBuilder.create_dot

    def widen(x):
        if x.dtype == tl.bfloat16 and x.data.dtype == np.uint16:
            return interpreter.TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return x

    def patched(self, a, b, *args, **kwargs):
        return create_dot(self, widen(a), widen(b), *args, **kwargs)

    interpreter.InterpreterBuilder.create_dot = patched


def _patch_interpreter_bf16_rounding():
    """The interpreter truncates float32 to bf16; the GPU rounds to nearest even, as torch does."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    cast_impl = interpreter.InterpreterBuilder.cast_impl

    def patched(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).to(torch.bfloat16)
            return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return cast_impl(self, src, dst_type)

    interpreter.InterpreterBuilder.cast_impl = patched


def _patch_interpreter_device_calls():
    """The interpreter patches triton.language again on every call of a @triton.jit function from a
    kernel (one tl.rand makes several), which costs more than the arithmetic. Those patches are never
    undone, so patching on the first call of each function is enough."""
    from triton.runtime import interpreter

    call = interpreter.InterpretedFunction.__call__
    patched = set()

    def call_once_patched(self, *args, **kwargs):
        if self.fn not in patched:
            patched.add(self.fn)
            return call(self, *args, **kwargs)
        return self.rewrite()(*args, **kwargs)

    interpreter.InterpretedFunction.__call__ = call_once_patched


def _patch_interpreter_fp8_rounding():
    """The interpreter flushes float32 -> float8 e4m3 results below the normal range to zero; the GPU
    keeps the subnormals, as torch does."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    create_fp_to_fp = interpreter.InterpreterBuilder.create_fp_to_fp

    def patched(self, src, dst_type, rounding_mode):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.float8e4nv:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).to(torch.float8_e4m3fn)
            return interpreter.TensorHandle(rounded.view(torch.uint8).numpy(), tl.float8e4nv)
        return create_fp_to_fp(self, src, dst_type, rounding_mode)

    interpreter.InterpreterBuilder.create_fp_to_fp = patched


def _report(file: str, kind: str, status: str, output: str, seconds: float) -> None:
    print(RESULT + json.dumps({"file": file, "kind": kind, "status": status, "output": output,
                               "seconds": round(seconds, 2)}), flush=True)


def interpreter_main(jobs: list[str]) -> None:
    """Runs the small cases of each "test file::kind" under the interpreter, reporting each kind on a line."""
    os.environ["TRITON_INTERPRET"] = "1"
    torch.set_num_threads(1)
    try:
        import triton
        import triton.language as tl

        @triton.jit
        def probe(x_ptr):
            tl.store(x_ptr + tl.arange(0, 16), tl.arange(0, 16).to(tl.float32))

        x = torch.zeros(16)
        probe[(1,)](x)
        assert torch.equal(x, torch.arange(16.0))
        _patch_interpreter_bf16_dot()
        _patch_interpreter_bf16_rounding()
        _patch_interpreter_device_calls()
        _patch_interpreter_fp8_rounding()
    except Exception as e:  # any failure here means the interpreter itself is unusable
        print(f"{type(e).__name__}: {e}")
        sys.exit(INTERPRETER_UNAVAILABLE)
    for spec in jobs:
        file, kind = spec.split("::")
        start, done = time.perf_counter(), []
        try:
            module = importlib.import_module(file.removesuffix(".py").replace("/", "."))
            cases, run = module.KINDS[kind]
            for case in cases(True):
                run("cpu", case)
                done.append(case)
        except BaseException:  # reported as the kind's failure; the other kinds still run
            _report(file, kind, "failed", f"passed cases: {done}\n{traceback.format_exc()}", time.perf_counter() - start)
        else:
            _report(file, kind, "ok", f"passed cases: {done}", time.perf_counter() - start)


if __name__ == "__main__":
    interpreter_main(sys.argv[1:])
