import torch

from nanovllm.config import Config
from nanovllm.modes.pipeline.schedule import PipelineScheduler
from nanovllm.modes.pipeline.stats import PipelineStatistics
from nanovllm.partitions.green import GreenContextManager, GreenContextUnavailable
from nanovllm.utils.log import get_logger

logger = get_logger("ModelRunner")


class PipelineCandidate:
    """The pipelined decode forward: micro-batches whose attention and FFN halves ping-pong between the
    two partitions' streams (or run in order on one stream, without partitions)."""
    name = "pipeline"

    def __init__(self, green: GreenContextManager | None):
        self.green = green

    def bind(self, model):
        green = self.green
        streams = (green.get_attention_stream(), green.get_ffn_stream(), green.attention_sm_count) if green else ()
        return PipelineScheduler(model, *streams).forward

    def setup_key(self) -> dict:
        green = self.green
        return {"sm_counts": [green.attention_sm_count, green.ffn_sm_count, green.remaining_sm_count] if green else None}


class StageProbe:
    """Every layer's attention half, or FFN half, alone on the whole batch: a stage's cost, for the statistics."""

    def __init__(self, stage: str):
        self.name = f"{stage}_only"

    def bind(self, model):
        return getattr(PipelineScheduler(model), self.name)

    @staticmethod
    def setup_key() -> dict:
        return {}


class PipelineExtension:
    """The attention/FFN pipeline as a decode-path extension (engine/decode_paths.py): its candidate, the
    stage probes when profiling, and its statistics, which observe every decode step."""
    name = "pipeline"

    def __init__(self, config: Config, device: torch.device, green: GreenContextManager | None, enabled: bool):
        options = config.pipeline
        self.forced = "pipeline" if enabled and options.pipeline_force else None
        self.candidates = [PipelineCandidate(green)] if enabled else []
        profiling = enabled and options.pipeline_enable_profiling
        self.probes = [StageProbe("attention"), StageProbe("ffn")] if profiling and device.type == "cuda" else []
        self.cache_timings = not profiling
        sm_counts = (green.attention_sm_count, green.ffn_sm_count, green.remaining_sm_count) if green else (None,) * 3
        self.stats = PipelineStatistics(enabled, profiling and device.type == "cuda", sm_counts)

    def observe(self, run, batch: int) -> torch.Tensor:
        return self.stats.observe(run, batch) if self.stats.enabled else run()

    def chosen(self, choice: dict[int, str], timings: dict[int, list[dict]]) -> None:
        self.stats.path_per_bucket, self.stats.bucket_timings = dict(choice), timings

    def statistics(self) -> dict:
        return self.stats.as_dict()

    def report(self) -> str:
        return self.stats.report()


def pipeline_extension(config: Config, device: torch.device) -> PipelineExtension:
    """The pipeline for the runner on `device`, with the log lines users know; where green contexts cannot
    be used it is off (the ordinary decode path runs) unless pipeline_force asks for its schedule anyway."""
    options = config.pipeline
    attention, ffn = options.pipeline_attention_sm_count, options.pipeline_ffn_sm_count
    if device.type != "cuda" and not options.pipeline_force:
        logger.info("enable_pipeline: the pipeline runs on SM partitions of a CUDA GPU; on %s decode runs the "
                    "sequential forward", device)
        return PipelineExtension(config, device, None, enabled=False)
    logger.info("Initializing pipeline with Attn=%d, FFN=%d SMs", attention, ffn)
    try:
        green = GreenContextManager(device, attention, ffn)
    except GreenContextUnavailable as e:
        get_logger("GreenContextManager").warning("Failed to initialize Green Context: %s", e.reason)
        if not options.pipeline_force:
            logger.warning("Falling back to sequential execution (with CUDA graphs where enabled)")
            return PipelineExtension(config, device, None, enabled=False)
        logger.info("pipeline_force=True: running the micro-batch schedule on one stream, without partitions")
        return PipelineExtension(config, device, None, enabled=True)
    logger.info("Pipeline initialized successfully")
    return PipelineExtension(config, device, green, enabled=True)
