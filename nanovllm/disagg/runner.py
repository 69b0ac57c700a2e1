import torch

from nanovllm.attention.triton_kernels import on_sms
from nanovllm.config import Config
from nanovllm.disagg.streams import Lane, StreamTimer, use_streams
from nanovllm.engine.model_runner import ModelRunner
from nanovllm.engine.sequence import Sequence
from nanovllm.layers.attention import Attention


class PendingTokens:
    """A launched batch's sampled token ids on their way to pinned host memory: ready() polls,
    result() waits."""

    def __init__(self, token_ids: torch.Tensor, timer: StreamTimer):
        if token_ids.is_cuda:
            self.host = torch.empty(token_ids.shape, dtype=token_ids.dtype, pin_memory=True)
            self.host.copy_(token_ids, non_blocking=True)
        else:
            self.host = token_ids
        timer.stop()
        self.timer = timer

    def ready(self) -> bool:
        return self.timer.done()

    def result(self) -> list[int]:
        self.timer.wait()
        return self.host.tolist()


class RoleRunner(ModelRunner):
    """A ModelRunner that serves one role ("prefill" or "decode") of the PD engine. Its batches go to
    its own stream (a high-priority one for decode) and are launched without waiting for their
    tokens. With weights_from (both roles on one device) it uses that runner's weight tensors instead
    of loading a second copy; with kv_from, that runner's KV cache (config.num_kvcache_blocks must be
    its size)."""

    def __init__(self, config: Config, device: torch.device, role: str, weights_from: ModelRunner | None = None,
                 kv_from: ModelRunner | None = None):
        self.role = role
        self.weights_from = weights_from
        self.kv_from = kv_from
        super().__init__(config, device)
        self.stream = None
        if device.type == "cuda":
            # On a shared device, decode kernels get SMs ahead of prefill kernels as blocks retire
            # (a graph replay takes the priority of the stream it is launched on).
            self.stream = torch.cuda.Stream(device, priority=-1 if role == "decode" else 0)
            # The cache was zeroed on the default stream, which this runner's stream does not wait for.
            torch.cuda.synchronize(device)

    def load_weights(self, model) -> None:
        if self.weights_from is None:
            super().load_weights(model)
            return
        source = dict(self.weights_from.model.named_parameters())
        for name, param in model.named_parameters():
            param.data = source[name].data

    def allocate_kv_cache(self, num_blocks: int) -> int:
        if self.kv_from is None:
            return super().allocate_kv_cache(num_blocks)
        self.kv_cache = self.kv_from.kv_cache
        for layer, source in zip(self.attention_layers(), self.kv_from.attention_layers(), strict=True):
            layer.k_cache, layer.v_cache = source.k_cache, source.v_cache
        return self.kv_from.num_kvcache_blocks

    def attention_layers(self) -> list[Attention]:
        return [m for m in self.model.modules() if isinstance(m, Attention)]

    def launch(self, seqs: list[Sequence], is_prefill: bool, lane: Lane | None = None) -> PendingTokens:
        """Launches the batch on this runner's stream, or on lane's stream with its kernels sized for
        lane's SMs."""
        stream = self.stream if lane is None else lane.stream
        with use_streams(stream), on_sms(lane and lane.num_sms):
            timer = StreamTimer(stream)
            return PendingTokens(self.sample(seqs, is_prefill), timer)
