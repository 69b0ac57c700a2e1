from contextlib import nullcontext

import torch

from nanovllm.utils.context import Context, set_context
from nanovllm.partitions.sm_limit import on_sms


class PipelineScheduler:
    """A decode step whose batch is split into micro-batches that ping-pong between two streams.

    Layer i's attention of micro-batch k+1 runs on the attention stream while layer i's FFN of
    micro-batch k runs on the FFN stream. Within one micro-batch the layers stay in order (layer i's
    attention needs layer i-1's FFN output); events carry those dependencies. Without streams
    (no partitions, or CPU) the same schedule runs in order on the current stream.
    """

    def __init__(self, model, attention_stream: torch.cuda.Stream | None = None,
                 ffn_stream: torch.cuda.Stream | None = None, attention_sm_count: int | None = None,
                 num_micro_batches: int = 2):
        self.model = model
        self.attention_stream = attention_stream
        self.ffn_stream = ffn_stream
        self.attention_sm_count = attention_sm_count
        self.num_micro_batches = num_micro_batches
        # Tensors handed from one stream to the other. They stay referenced until the next step so
        # the allocator cannot give their memory to the producing stream while the other still reads.
        self.handed_over: list[torch.Tensor] = []

    @property
    def uses_streams(self) -> bool:
        return self.attention_stream is not None

    def micro_batches(self, batch: int) -> list[slice]:
        count = min(self.num_micro_batches, batch)
        bounds = [batch * k // count for k in range(count + 1)]
        return [slice(bounds[k], bounds[k + 1]) for k in range(count)]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: Context) -> torch.Tensor:
        """Hidden states after the final norm, equal to the model's sequential forward. The model is a
        nanovllm.models.DecoderModel: its layers run in halves (forward_attention, forward_ffn)."""
        self.handed_over = []
        parts = self.micro_batches(input_ids.size(0))
        contexts = [ctx.decode_rows(part) for part in parts]
        main = torch.cuda.current_stream() if self.uses_streams else None
        if main is not None:
            self.attention_stream.wait_stream(main)
            self.ffn_stream.wait_stream(main)
        with self._on(self.attention_stream):
            hidden = self.model.embed(input_ids)
        states = [(hidden[p], None) for p in parts]
        ffn_done = [None] * len(parts)
        for layer in range(self.model.num_layers):
            for k, part in enumerate(parts):
                # Its kernels size their grids for the attention partition's SMs.
                with self._on(self.attention_stream), on_sms(self.attention_sm_count):
                    self._wait(self.attention_stream, ffn_done[k])
                    set_context(contexts[k])
                    states[k] = self.model.forward_attention(layer, positions[part], *states[k])
                    attention_done = self._record(self.attention_stream, states[k])
                with self._on(self.ffn_stream):
                    self._wait(self.ffn_stream, attention_done)
                    states[k] = self.model.forward_ffn(layer, *states[k])
                    ffn_done[k] = self._record(self.ffn_stream, states[k])
        if main is not None:
            main.wait_stream(self.ffn_stream)
            main.wait_stream(self.attention_stream)
        return torch.cat([self.model.norm(*state) for state in states])

    def attention_only(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: Context) -> torch.Tensor:
        """Every layer's attention half on the whole batch, the FFN skipped: the attention stage's cost."""
        set_context(ctx)
        hidden = self.model.embed(input_ids)
        for layer in range(self.model.num_layers):
            out, _ = self.model.forward_attention(layer, positions, hidden, hidden)
        return out

    def ffn_only(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: Context) -> torch.Tensor:
        """Every layer's FFN half on the whole batch, attention skipped: the FFN stage's cost."""
        hidden = self.model.embed(input_ids)
        for layer in range(self.model.num_layers):
            out, _ = self.model.forward_ffn(layer, hidden, hidden)
        return out

    def _on(self, stream):
        return torch.cuda.stream(stream) if stream is not None else nullcontext()

    def _record(self, stream, tensors) -> torch.cuda.Event | None:
        if stream is None:
            return None
        self.handed_over.extend(t for t in tensors if t is not None)
        event = torch.cuda.Event()
        event.record(stream)
        return event

    @staticmethod
    def _wait(stream, event) -> None:
        if stream is not None and event is not None:
            stream.wait_event(event)
