"""The modes. Each plugs into the engine core through its two seams only: a step loop (engine/step_loop.py)
and decode-path extensions (engine/decode_paths.py). Imports point one way: the modes use the core, and
the core never imports a mode; multiplexing builds on the disaggregation loop."""
from nanovllm.config import Config
from nanovllm.engine.step_loop import SequentialLoop, StepLoop
from nanovllm.modes import disaggregation, multiplexing
from nanovllm.modes.pipeline import pipeline_extension


def build_loop(config: Config, tokenizer) -> StepLoop:
    """The step loop the options ask for, its decoding runner extended by the pipeline where it is on."""
    if config.mux.enable_pd_multiplexing:
        return multiplexing.build_loop(config, tokenizer)
    decode_device = disaggregation.devices(config)[1] if config.pd.enable_two_gpu_pd else config.device
    extensions = (pipeline_extension(config, decode_device),) if config.pipeline.enable_pipeline else ()
    if config.pd.enable_two_gpu_pd:
        return disaggregation.build_loop(config, tokenizer, extensions)
    return SequentialLoop(config, tokenizer, extensions)
