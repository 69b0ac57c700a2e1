"""The attention/FFN decode pipeline (enable_pipeline): a decode forward whose micro-batches ping-pong
between an attention partition and an FFN partition of the GPU, added to the runner's decode paths."""
from nanovllm.modes.pipeline.extension import pipeline_extension

__all__ = ["pipeline_extension"]
