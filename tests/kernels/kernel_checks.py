"""Runs the Triton kernel checks in one subprocess beside the rest of the suite: compiled on CUDA where there is
a device, otherwise on CPU under the Triton interpreter.

A test file defines KINDS = {kind: (cases(small) -> list, run(device, case))} and takes its tests from
kernel_tests(KINDS, __file__): test_cuda[kind-case] checks one case compiled on CUDA; test_interpreter[kind] the
small cases of a kind under the interpreter on CPU.

Both wait for a subprocess that tests/kernels/conftest.py starts in the background as soon as collection ends,
with every selected check, so that the checks run beside the rest of the suite: on CUDA most of their time is
Triton compiling kernels on the CPU, which overlaps the engine tests' work; under the interpreter
TRITON_INTERPRET must be set before triton is imported anyway. One subprocess serves the session (each pays some
3 s of imports). A check's failure is its test's failure, with the check's output and traceback.
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

from tests.helpers import gpu

ROOT = Path(__file__).resolve().parents[2]
INTERPRETER_UNAVAILABLE = 77
RESULT = "KERNEL-CHECK-RESULT "  # the subprocess's line for one check: this prefix, then JSON
TIMEOUT_S = 900
EVERY_CASE = -1  # the case index of a check that runs every case of its kind (the interpreter's unit)


def kernel_tests(kinds: dict, test_file: str):
    """(test_cuda, test_interpreter): each case compiled on CUDA, or the small cases of each kind under the
    interpreter on CPU."""
    @gpu
    @pytest.mark.parametrize("kind,index", [pytest.param(kind, i, id=f"{kind}-{case}")
                                            for kind, (cases, _) in kinds.items() for i, case in enumerate(cases(False))])
    def test_cuda(kind, index):
        outcome = check_result(test_file, kind, index, interpret=False)
        assert outcome["status"] == "ok", outcome["output"]

    @pytest.mark.slow
    @pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: test_cuda runs the compiled kernels")
    @pytest.mark.parametrize("kind", list(kinds))
    def test_interpreter(kind):
        outcome = check_result(test_file, kind, EVERY_CASE, interpret=True)
        if outcome["status"] == "unavailable":
            pytest.skip(f"Triton interpreter unavailable: {outcome['output'][-500:]}")
        assert outcome["status"] == "ok", outcome["output"]

    return test_cuda, test_interpreter


# ---- the session's subprocess (the pytest side) -----------------------------------------------------------

Check = tuple[str, str, int]  # (test file from the repository root, kind, case index or EVERY_CASE)


def check(test_file, kind: str, index: int) -> Check:
    return Path(test_file).resolve().relative_to(ROOT).as_posix(), kind, index


class CheckRun:
    """One subprocess running `checks`, its output in a temporary file that result() reads as it grows."""

    def __init__(self, checks: list[Check], interpret: bool):
        self.checks = list(dict.fromkeys(checks))
        self.log = tempfile.TemporaryFile(mode="w+b")
        pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        # Few threads: the subprocess shares the CPUs of the test session it runs beside.
        env = dict(os.environ, PYTHONPATH=pythonpath, OMP_NUM_THREADS="1" if interpret else "2")
        if interpret:
            env["TRITON_INTERPRET"] = "1"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.kernels.kernel_checks", "interpreter" if interpret else "cuda",
             *(f"{f}::{k}::{i}" for f, k, i in self.checks)],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.started = time.monotonic()
        self.output = b""
        self.parsed = 0  # the bytes of output whose lines are taken in
        self.results: dict[Check, dict] = {}

    def result(self, key: Check) -> dict:
        """The check's outcome once the subprocess has reported it, or has ended (or timed out) without it."""
        while key not in self.results:
            running = self.process.poll() is None
            self._read()
            if not running:
                break
            if time.monotonic() - self.started > TIMEOUT_S:
                self.stop()
            time.sleep(0.05)
        if key not in self.results:  # what the subprocess said is all there is
            status = "unavailable" if self.process.returncode == INTERPRETER_UNAVAILABLE else "missing"
            text = self.output.decode(errors="replace")
            self.results[key] = {"status": status, "output": f"exit code {self.process.returncode}\n{text[-10000:]}"}
        return self.results[key]

    def _read(self) -> None:
        """Takes in the complete lines the subprocess has written since the last call."""
        self.log.seek(len(self.output))
        self.output += self.log.read()
        end = self.output.rfind(b"\n") + 1
        for line in self.output[self.parsed:end].decode(errors="replace").splitlines():
            if line.startswith(RESULT):
                result = json.loads(line[len(RESULT):])
                self.results[result["file"], result["kind"], result["index"]] = result
        self.parsed = end

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


_RUNS: list[CheckRun] = []  # the session's subprocesses


def start(checks: list[Check], interpret: bool) -> CheckRun | None:
    """Starts a subprocess for these checks, if there are any and triton is installed."""
    if not checks or importlib.util.find_spec("triton") is None:
        return None
    _RUNS.append(CheckRun(checks, interpret))
    atexit.register(_RUNS[-1].stop)
    return _RUNS[-1]


def stop() -> None:
    for run in _RUNS:
        run.stop()


def check_result(test_file: str, kind: str, index: int, interpret: bool) -> dict:
    """The outcome of one check: {"status": "ok" | "failed" | "unavailable" | "missing", "output": ...}. A check
    that no subprocess was started for (a test selected some other way) gets one of its own."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    key = check(test_file, kind, index)
    run = next((run for run in _RUNS if key in run.checks), None) or start([key], interpret)
    return run.result(key)


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


def _report(check: Check, status: str, output: str, seconds: float) -> None:
    file, kind, index = check
    print(RESULT + json.dumps({"file": file, "kind": kind, "index": index, "status": status, "output": output,
                               "seconds": round(seconds, 2)}), flush=True)


def _start_interpreter() -> None:
    """Exits with INTERPRETER_UNAVAILABLE (the checks skip) where the interpreter cannot run a kernel at all.
    The patches come after the probe and outside its try: where one no longer fits Triton's internals, the
    subprocess dies with the traceback and every check fails."""
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
    except Exception as e:
        print(f"{type(e).__name__}: {e}")
        sys.exit(INTERPRETER_UNAVAILABLE)
    _patch_interpreter_bf16_dot()
    _patch_interpreter_bf16_rounding()
    _patch_interpreter_device_calls()
    _patch_interpreter_fp8_rounding()


def checks_main(mode: str, specs: list[str]) -> None:
    """Runs each "test file::kind::case index" check, compiled on CUDA (mode "cuda": the kind's full cases) or
    under the interpreter on CPU (mode "interpreter": its small cases), reporting each check on a line."""
    interpret = mode == "interpreter"
    if interpret:
        _start_interpreter()
    device = "cpu" if interpret else "cuda"
    for spec in specs:
        file, kind, index = spec.split("::")
        key, start, done = (file, kind, int(index)), time.perf_counter(), []
        try:
            module = importlib.import_module(file.removesuffix(".py").replace("/", "."))
            cases, run = module.KINDS[kind]
            cases = cases(interpret)
            for case in cases if key[2] == EVERY_CASE else [cases[key[2]]]:
                run(device, case)
                done.append(case)
        except BaseException:  # reported as the check's failure; the other checks still run
            _report(key, "failed", f"passed cases: {done}\n{traceback.format_exc()}", time.perf_counter() - start)
        else:
            _report(key, "ok", f"passed cases: {done}", time.perf_counter() - start)


if __name__ == "__main__":
    checks_main(sys.argv[1], sys.argv[2:])
