import torch

from nanovllm.config import Config
from nanovllm.disagg.streams import StreamTimer, use_streams
from nanovllm.engine.model_runner import ModelRunner
from nanovllm.engine.sampled_tokens import SampledTokens
from nanovllm.engine.sequence import Sequence


class PendingTokens:
    """A launched batch's sampled token ids on their way to the host, with the marks of its work on
    the runner's stream: ready() polls, result() waits."""

    def __init__(self, token_ids: torch.Tensor, timer: StreamTimer):
        self.tokens = SampledTokens(token_ids)
        timer.stop()
        self.timer = timer

    def ready(self) -> bool:
        return self.timer.done()

    def result(self) -> list[int]:
        return self.tokens.tolist()


class RoleRunner(ModelRunner):
    """A ModelRunner that serves one role ("prefill" or "decode") of the PD engine. Its batches go to
    its own stream (a high-priority one for decode) and are launched without waiting for their
    tokens. The decode runner is given the prefill runner: it takes its float8 KV scales (the caches
    exchange KV bytes, which must mean the same on both sides) and, on the same device, its weight
    tensors instead of a second copy."""

    def __init__(self, config: Config, device: torch.device, role: str, prefill_runner: ModelRunner | None = None):
        self.role = role
        self.prefill_runner = prefill_runner
        super().__init__(config, device)
        self.stream = None
        if device.type == "cuda":
            # On a shared device, decode kernels get SMs ahead of prefill kernels as blocks retire
            # (a graph replay takes the priority of the stream it is launched on).
            self.stream = torch.cuda.Stream(device, priority=-1 if role == "decode" else 0)
            # The cache was zeroed on the default stream, which this runner's stream does not wait for.
            torch.cuda.synchronize(device)

    def load_weights(self, model) -> None:
        if self.prefill_runner is None or self.prefill_runner.device != self.device:
            super().load_weights(model)
            return
        source = dict(self.prefill_runner.model.named_parameters())
        for name, param in model.named_parameters():
            param.data = source[name].data

    def calibrate_kv_scales(self) -> torch.Tensor:
        if self.prefill_runner is None:
            return super().calibrate_kv_scales()
        return self.prefill_runner.kv_scales.to(self.device)

    def launch(self, seqs: list[Sequence], is_prefill: bool) -> PendingTokens:
        with use_streams(self.stream):
            timer = StreamTimer(self.stream)
            return PendingTokens(self.sample(seqs, is_prefill), timer)
