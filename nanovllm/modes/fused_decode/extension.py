import torch

from nanovllm import kernels
from nanovllm.config import Config
from nanovllm.modes.fused_decode.forward import FusedForward
from nanovllm.utils.log import get_logger

logger = get_logger("ModelRunner")
FUSED = "fused"


class FusedDecodeCandidate:
    """The fused decode forward as a candidate of the decode paths (engine/decode_paths.py)."""
    name = FUSED

    @staticmethod
    def bind(model) -> FusedForward:
        return FusedForward(model)

    @staticmethod
    def setup_key() -> dict:
        return {}  # its kernels are in the setup's source digest (engine/decode_paths.py)


class FusedDecodeExtension:
    """fused_decode as a decode-path extension: its candidate, forced with "on", and which batch buckets
    replay it."""
    name = "fused_decode"

    def __init__(self, forced: bool):
        self.candidates = [FusedDecodeCandidate()]
        self.probes = []
        self.forced = FUSED if forced else None
        self.cache_timings = True
        self.path_per_bucket: dict[int, str] = {}

    def observe(self, run, batch: int) -> torch.Tensor:
        return run()

    def chosen(self, choice: dict[int, str], timings: dict[int, list[dict]]) -> None:
        self.path_per_bucket = dict(choice)

    def statistics(self) -> dict:
        return {"forced": self.forced is not None,
                "fused_buckets": sorted(b for b, path in self.path_per_bucket.items() if path == FUSED),
                "buckets": len(self.path_per_bucket)}

    def report(self) -> str:
        stats = self.statistics()
        return "\n".join(["[Fused Decode]", f"  Forced: {stats['forced']}",
                          f"  Fused batch buckets: {stats['fused_buckets'] or 'none'} of {stats['buckets']}"])


def unusable(config: Config, device: torch.device) -> str | None:
    """Why the fused decode forward cannot run on device; None where it can."""
    hf, tp = config.hf_config, config.parallel.tensor_parallel_size
    if device.type != "cuda":
        return f"its Triton kernels run on a CUDA device, not on {device}"
    if kernels.fused is None:
        return "its Triton kernels need triton, which is not installed"
    if tp > 1:
        return f"it runs one GPU's whole model, not tensor_parallel_size={tp} shards"
    bias = getattr(hf, "attention_bias", False)
    if hf.model_type != "qwen3" or bias:
        return (f"it runs Qwen3 layers without attention biases, not model_type={hf.model_type!r}, "
                f"attention_bias={bias}")
    return None


def fused_decode_extension(config: Config, device: torch.device) -> FusedDecodeExtension | None:
    """The fused decode forward for the decoding runner on `device`, as the fused_decode option asks: "on"
    forces it, a ValueError where it cannot run; "auto" adds it to the candidates where it can run and where
    graphs are timed, and says in one line why not elsewhere. Called before any runner is built."""
    option = config.runner.fused_decode
    if option == "off":
        return None
    why = unusable(config, device)
    if why and option == "on":
        raise ValueError(f"invalid fused_decode: must be 'auto' or 'off' here ({why})")
    if why:
        logger.info("fused_decode='auto': %s; decode runs the sequential forward", why)
        return None
    if option == "auto" and config.runner.enforce_eager:
        logger.info("fused_decode='auto': enforce_eager=True captures no graphs to time it by; decode runs the "
                    "sequential forward")
        return None
    return FusedDecodeExtension(forced=option == "on")
