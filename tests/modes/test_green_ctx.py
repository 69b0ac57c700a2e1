"""CUDA green contexts (green_ctx.py) and the partitions every mode takes from them (nanovllm/partitions/green.py):
validation and error paths on CPU with a fake driver, real partitions on a GPU."""
from types import SimpleNamespace

import pytest
import torch

from nanovllm.partitions import green as green_manager
from nanovllm.partitions.green import GreenContextManager, GreenContextUnavailable
from tests.helpers import logged, needs_green

needs_bindings = pytest.mark.skipif(green_manager.green_ctx is None, reason="cuda-python not installed")


# ---- CPU: validation and the manager's error paths ----

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_unavailable_without_cuda():
    with pytest.raises(GreenContextUnavailable, match="^CUDA is not available$"):
        GreenContextManager(torch.device("cuda:0"), 16, 16)


def test_unavailable_on_cpu_device():
    with pytest.raises(GreenContextUnavailable, match="not a CUDA device"):
        GreenContextManager(torch.device("cpu"), 16, 16)


@needs_bindings
def test_rounded_sm_counts():
    rounded = green_manager.green_ctx.rounded_sm_counts
    assert rounded([1, 8, 9, 16, 20, 66], 8) == [8, 8, 16, 16, 24, 72]
    assert rounded([1, 5, 6], 4) == [4, 8, 8]


@needs_bindings
def test_driver_error_names_call_and_result(monkeypatch):
    gc = green_manager.green_ctx
    result = gc.driver.CUresult
    fake = SimpleNamespace(CUresult=result, cuDriverGetVersion=lambda: (result.CUDA_ERROR_NOT_SUPPORTED, 0))
    monkeypatch.setattr(gc, "driver", fake)
    with pytest.raises(gc.GreenContextError, match="cuDriverGetVersion failed: CUDA_ERROR_NOT_SUPPORTED"):
        gc.driver_version()


@pytest.fixture
def fake_driver(monkeypatch):
    """Pretend to be a 132-SM Hopper with a 13.0 driver, without touching a GPU."""
    if green_manager.green_ctx is None:
        pytest.skip("cuda-python not installed")
    gc = green_manager.green_ctx
    splits = []

    def split_device(index, counts):
        splits.append((index, *counts))
        sizes = gc.rounded_sm_counts(counts, 8)
        if sum(sizes) > 120:  # an H100 hands out 15 units of 8 SMs
            raise gc.SmCountError(counts, sizes, 120, 8)
        return SimpleNamespace(sm_counts=sizes, remaining_sm_count=132 - sum(sizes), streams=["attn", "ffn"])

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gc, "driver_version", lambda: 13000)
    monkeypatch.setattr(gc, "split_device", split_device)
    monkeypatch.setattr(green_manager, "_PARTITIONS", {})
    return SimpleNamespace(gc=gc, splits=splits, monkeypatch=monkeypatch)


def test_manager_logs_allocation(fake_driver, caplog):
    manager = GreenContextManager(torch.device("cuda:0"), 16, 16)
    assert logged(caplog, "GreenContextManager") == [
        "Initialized with SM allocation:\n"
        "  - Attention: 16 SMs\n"
        "  - FFN: 16 SMs\n"
        "  - Remaining: 100 SMs"
    ]
    assert (manager.attention_sm_count, manager.ffn_sm_count, manager.remaining_sm_count) == (16, 16, 100)
    assert manager.get_attention_stream() == "attn" and manager.get_ffn_stream() == "ffn"


def test_engines_asking_for_the_same_split_share_one(fake_driver):
    first = GreenContextManager(torch.device("cuda:0"), 16, 16)
    second = GreenContextManager(torch.device("cuda:0"), 16, 16)
    other = GreenContextManager(torch.device("cuda:0"), 24, 16)
    assert fake_driver.splits == [(0, 16, 16), (0, 24, 16)]
    assert first.partitions is second.partitions and other.partitions is not first.partitions


def test_manager_reports_rounded_sizes(fake_driver):
    manager = GreenContextManager(torch.device("cuda:0"), 20, 12)
    assert (manager.attention_sm_count, manager.ffn_sm_count, manager.remaining_sm_count) == (24, 16, 92)


@pytest.mark.parametrize("attn, ffn", [(66, 66), (64, 64), (112, 16), (200, 16)])
def test_manager_rejects_oversubscription(fake_driver, attn, ffn):
    with pytest.raises(ValueError, match=r"pipeline_attention_sm_count.*pipeline_ffn_sm_count.*at most 120"):
        GreenContextManager(torch.device("cuda:0"), attn, ffn)


@pytest.mark.parametrize("attn, ffn", [(16, 16), (20, 12), (56, 64), (1, 1), (48, 72)])
def test_manager_accepts_what_fits(fake_driver, attn, ffn):
    manager = GreenContextManager(torch.device("cuda:0"), attn, ffn)
    assert fake_driver.splits == [(0, attn, ffn)]
    assert [manager.attention_sm_count, manager.ffn_sm_count] == fake_driver.gc.rounded_sm_counts([attn, ffn], 8)


def test_manager_old_driver(fake_driver):
    fake_driver.monkeypatch.setattr(fake_driver.gc, "driver_version", lambda: 12020)
    with pytest.raises(GreenContextUnavailable, match="12.2.*12.4"):
        GreenContextManager(torch.device("cuda:0"), 16, 16)


def test_manager_driver_failure(fake_driver):
    def failing_split(index, counts):
        raise fake_driver.gc.GreenContextError("cuGreenCtxCreate failed: CUDA_ERROR_NOT_SUPPORTED")

    fake_driver.monkeypatch.setattr(fake_driver.gc, "split_device", failing_split)
    with pytest.raises(GreenContextUnavailable) as info:
        GreenContextManager(torch.device("cuda:0"), 16, 16)
    assert info.value.reason == "cuGreenCtxCreate failed: CUDA_ERROR_NOT_SUPPORTED"


# ---- CUDA: real partitions ----

@needs_green
@pytest.mark.parametrize("counts", [[16, 16], [20, 12], [8, 24, 40]])
def test_split_sizes(counts):
    gc = green_manager.green_ctx
    with gc.split_device(0, counts) as parts:
        assert parts.sm_counts == gc.rounded_sm_counts(counts, parts.unit)
        # The remainder counts every SM outside the groups, those no group can take included.
        assert sum(parts.sm_counts) + parts.remaining_sm_count == torch.cuda.get_device_properties(0).multi_processor_count
        assert len(parts.streams) == len(counts)


@needs_green
def test_kernel_on_each_stream():
    gc = green_manager.green_ctx
    x = torch.randn(1024, 1024, device="cuda")
    expected = x @ x + 1
    with gc.split_device(0, [16, 16], include_remaining=True) as parts:
        for s in [*parts.streams, parts.remaining_stream]:
            if s is None:
                continue
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                y = x @ x + 1
            s.synchronize()
            torch.testing.assert_close(y, expected)


@needs_green
def test_manager_on_device(caplog):
    manager = GreenContextManager(torch.device("cuda:0"), 16, 16)
    [line] = logged(caplog, "GreenContextManager")
    assert line.startswith("Initialized with SM allocation:\n  - Attention: ")
    total = torch.cuda.get_device_properties(0).multi_processor_count
    assert manager.attention_sm_count >= 16 and manager.ffn_sm_count >= 16
    assert manager.attention_sm_count + manager.ffn_sm_count + manager.remaining_sm_count == total
    attn, ffn = manager.get_attention_stream(), manager.get_ffn_stream()
    assert attn.cuda_stream != ffn.cuda_stream
