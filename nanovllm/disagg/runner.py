import torch

from nanovllm.config import Config
from nanovllm.disagg.streams import Lane, StreamTimer, order_after, use_streams
from nanovllm.engine.model_runner import ModelRunner
from nanovllm.engine.sampled_tokens import SampledTokens
from nanovllm.engine.sequence import Sequence
from nanovllm.models.qwen3 import Qwen3ForCausalLM
from nanovllm.utils.sm_limit import on_sms


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
    """A ModelRunner that serves one role ("prefill" or "decode") of the PD engine, with the CUDA graphs
    of that role alone. Its batches go to its own stream (a high-priority one for decode) and are
    launched without waiting for their tokens. The decode runner is given the prefill runner: it takes
    its float8 KV scales (the caches exchange KV bytes, which must mean the same on both sides), on the
    same device its weight tensors instead of a second copy, and with share_kv_cache its KV cache
    itself (then config.num_kvcache_blocks must be that cache's size)."""

    def __init__(self, config: Config, device: torch.device, role: str, prefill_runner: ModelRunner | None = None,
                 share_kv_cache: bool = False):
        self.role = role
        self.prefill_runner = prefill_runner
        self.share_kv_cache = share_kv_cache
        super().__init__(config, device)
        self.stream = None
        if device.type == "cuda":
            # On a shared device, decode kernels get SMs ahead of prefill kernels as blocks retire
            # (a graph replay takes the priority of the stream it is launched on).
            self.stream = torch.cuda.Stream(device, priority=-1 if role == "decode" else 0)
            # The cache was zeroed on the default stream, which this runner's stream does not wait for.
            torch.cuda.synchronize(device)

    def capture_cudagraphs(self) -> None:
        if self.role == "prefill":
            self.capture_prefill_graphs()
        else:
            self.capture_decode_graphs()

    def build_model(self) -> Qwen3ForCausalLM:
        if self.prefill_runner is None or self.prefill_runner.device != self.device:
            return super().build_model()
        # Modules of its own (their caches and backends) around the prefill runner's weight and buffer
        # tensors, built on the meta device: a second copy of the weights would not fit beside the cache.
        with torch.device("meta"):
            model = Qwen3ForCausalLM(self.config.hf_config)
        for module, shared in zip(model.modules(), self.prefill_runner.model.modules(), strict=True):
            module._parameters.update(shared._parameters)
            module._buffers.update(shared._buffers)
        return model

    def calibrate_kv_scales(self) -> torch.Tensor:
        if self.prefill_runner is None:
            return super().calibrate_kv_scales()
        return self.prefill_runner.kv_scales.to(self.device)

    def allocate_kv_cache(self, num_blocks: int) -> int:
        if not self.share_kv_cache:
            return super().allocate_kv_cache(num_blocks)
        source = self.prefill_runner
        self.kv_cache = source.kv_cache
        for layer, shared in zip(self.attention_layers(), source.attention_layers(), strict=True):
            layer.k_cache, layer.v_cache, layer.kv_scales = shared.k_cache, shared.v_cache, shared.kv_scales
        return source.num_kvcache_blocks

    def launch(self, seqs: list[Sequence], is_prefill: bool, lane: Lane | None = None,
               after: tuple[StreamTimer | None, ...] = ()) -> PendingTokens:
        """Launches the batch on this runner's stream, or on lane's stream with its kernels sized for
        lane's SMs, once the work that the timers in `after` mark is done."""
        stream = self.stream if lane is None else lane.stream
        with use_streams(stream), on_sms(lane and lane.num_sms):
            order_after(after, stream)
            timer = StreamTimer(stream)
            return PendingTokens(self.sample(seqs, is_prefill), timer)
