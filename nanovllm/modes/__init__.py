"""The modes. Each plugs into the engine core through its two seams only: a step loop (engine/step_loop.py)
and decode-path extensions (engine/decode_paths.py). Imports point one way: the modes use the core, and
the core never imports a mode; multiplexing builds on the disaggregation loop."""
from nanovllm.config import Config
from nanovllm.engine.decode_paths import DecodeExtension
from nanovllm.engine.step_loop import SequentialLoop, StepLoop
from nanovllm.modes import disaggregation, multiplexing
from nanovllm.modes.fused_decode import fused_decode_extension
from nanovllm.modes.pipeline import pipeline_extension


def build_loop(config: Config, tokenizer) -> StepLoop:
    """The step loop the options ask for, its decoding runner extended by the pipeline and the fused decode
    forward where they are on."""
    if config.mux.enable_pd_multiplexing:
        return multiplexing.build_loop(config, tokenizer, decode_extensions(config, config.device))
    decode_device = disaggregation.devices(config)[1] if config.pd.enable_two_gpu_pd else config.device
    extensions = decode_extensions(config, decode_device)
    if config.pd.enable_two_gpu_pd:
        return disaggregation.build_loop(config, tokenizer, extensions)
    return SequentialLoop(config, tokenizer, extensions)


def decode_extensions(config: Config, device) -> tuple[DecodeExtension, ...]:
    """Those the options ask for, of the decoding runner on `device`."""
    fused = fused_decode_extension(config, device)  # first: it may refuse the options, before any GPU work
    pipeline = pipeline_extension(config, device) if config.pipeline.enable_pipeline else None
    return tuple(e for e in (pipeline, fused) if e is not None)
