"""What the benchmarks share: the model to run, the engine options of each mode, and engines that are
freed before the next one is built."""
import gc
from collections.abc import Callable
from typing import TypeVar

import torch
from transformers import AutoConfig

from benchmarks.workloads import max_model_len
from nanovllm import LLM, SamplingParams
from nanovllm.tools.make_model import PRESETS, default_preset, ensure_model

T = TypeVar("T")
MODES = {
    "eager": {"enforce_eager": True},
    "graph": {},
    "graph-sync": {"async_scheduling": False},
    "graph-unfused": {"fused_decode": "off"},
    "fused": {"fused_decode": "on"},
    "pipeline": {"enable_pipeline": True},
    "pipeline-forced": {"enable_pipeline": True, "pipeline_force": True},
    "two-gpu": {"enable_two_gpu_pd": True},
    "two-gpu-sync": {"enable_two_gpu_pd": True, "async_scheduling": False},
    "pd-mux": {"enable_pd_multiplexing": True},
    "pd-mux-sync": {"enable_pd_multiplexing": True, "async_scheduling": False},
}


def vocab_size(model: str) -> int:
    return AutoConfig.from_pretrained(model).vocab_size


def on_gpu() -> bool:
    return torch.cuda.is_available()


def device_name() -> str:
    return torch.cuda.get_device_name() if on_gpu() else "cpu"


def synchronize() -> None:
    if on_gpu():
        torch.cuda.synchronize()


def preset_model(preset: str) -> str:
    """The checkpoint of a make_model preset (written on first use); any other name is a checkpoint directory."""
    return str(ensure_model(preset)) if preset in PRESETS else preset


def model_path(args) -> str:
    """--model, or the random-weight preset of this machine (qwen3-0.6b on a GPU, tiny on CPU)."""
    return args.model or preset_model(default_preset())


def engine_options(args, **options) -> dict:
    """The options every mode's engine gets from the command line, and `options`."""
    return {"max_model_len": max_model_len(args), "pd_max_itl_ms": args.pd_max_itl_ms,
            "pd_max_ttft_ms": args.pd_max_ttft_ms, **options}


def mode_options(mode: str, options: dict) -> dict:
    """The LLM options of a mode on top of `options`; two-gpu takes GPUs 0 and 1, or runs same-device mode
    on one device."""
    options = {**options, **MODES[mode]}
    if options.get("enable_two_gpu_pd"):
        decode_device = 1 if torch.cuda.device_count() >= 2 else 0
        if decode_device == 0:
            print("[bench] two-gpu: fewer than 2 GPUs here, running same-device mode (both runners on one device)")
        options.update(prefill_device_id=0, decode_device_id=decode_device)
    if not options.get("enable_pd_multiplexing"):
        for option in ("pd_max_itl_ms", "pd_max_ttft_ms"):  # the flags are for the multiplexing modes only
            options.pop(option, None)
    return options


def with_engine(model: str, options: dict, run: Callable[[LLM], T], warm_up: bool = True) -> T:
    """run(llm) on a new engine, warmed up by a short request first; the engine is exited and its memory
    freed on return, so that the caller can build the next one (two would not fit on one GPU)."""
    llm = LLM(model, **options)
    try:
        if warm_up:
            llm.generate([[1, 2, 3]], SamplingParams(max_tokens=8), use_tqdm=False)
        return run(llm)
    finally:
        llm.exit()
        del llm
        free_gpu()


def free_gpu() -> None:
    gc.collect()
    if on_gpu():
        torch.cuda.empty_cache()


def label(mode: str, llm: LLM) -> str:
    """The mode as it ran: where this device has no CUDA graphs or no pipeline partitions, it says so."""
    runner = llm.statistics()["runner"]
    notes = []
    if "pipeline" in runner and not runner["pipeline"]["enabled"]:
        notes.append("sequential")
    if not MODES[mode].get("enforce_eager") and not runner["decode_paths"]["path_per_bucket"]:
        notes.append(f"eager on {llm.config.device.type}")
    return f"{mode} ({', '.join(notes)})" if notes else mode


def print_pd_statistics(llm: LLM) -> dict:
    """The prefill/decode statistics of a two-runner mode, printed; {} for the others."""
    stats = llm.get_pd_statistics()
    if stats:
        llm.print_pd_statistics()
    return stats
