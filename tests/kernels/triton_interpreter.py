"""Runs Triton kernel checks on CPU under the Triton interpreter, in a subprocess, because
TRITON_INTERPRET must be set before triton is imported.

A test file defines KINDS = {kind: (cases(small) -> list, run(device, case))}, takes its tests from
kernel_tests(KINDS, __file__), and calls interpreter_main(KINDS, kind) from __main__.
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
INTERPRETER_UNAVAILABLE = 77


def kernel_tests(kinds: dict, test_file: str):
    """(test_cuda, test_interpreter): every case compiled on CUDA, or the small cases of each kind
    under the interpreter on CPU."""
    cuda = torch.cuda.is_available()

    @pytest.mark.skipif(not cuda, reason="needs CUDA; the CPU run is test_interpreter")
    @pytest.mark.parametrize("kind,case", [(kind, case) for kind, (cases, _) in kinds.items() for case in cases(False)],
                             ids=str)
    def test_cuda(kind, case):
        kinds[kind][1]("cuda", case)

    @pytest.mark.skipif(cuda, reason="CUDA present: test_cuda runs the compiled kernels")
    @pytest.mark.parametrize("kind", list(kinds))
    def test_interpreter(kind):
        _check_in_interpreter(test_file, kind)

    return test_cuda, test_interpreter


def _check_in_interpreter(test_file: str, kind: str):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=pythonpath)
    proc = subprocess.run([sys.executable, test_file, kind], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode == INTERPRETER_UNAVAILABLE:
        pytest.skip(f"Triton interpreter unavailable: {proc.stdout.strip()[-500:]}")
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]


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


def interpreter_main(kinds: dict, kind: str):
    os.environ["TRITON_INTERPRET"] = "1"
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
    cases, run = kinds[kind]
    for case in cases(True):
        run("cpu", case)
        print("ok", kind, case, flush=True)
