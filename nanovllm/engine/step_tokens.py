import torch

from nanovllm.partitions.streams import StreamTimer


class StepTokens:
    """A launched step's sampled token ids on their way to the host: the copy is queued behind the
    sampling, and result() waits only for it. `timer`, where the step was timed, marks its work on its
    stream: ready() polls it. token_ids is None on tensor-parallel ranks > 0, which sample nothing."""

    def __init__(self, token_ids: torch.Tensor | None, timer: StreamTimer | None = None):
        self.timer = timer
        if timer is not None:
            timer.stop()
        self.event = None
        self.host = token_ids
        if token_ids is not None and token_ids.is_cuda:
            self.host = torch.empty(token_ids.shape, dtype=token_ids.dtype, pin_memory=True)
            self.host.copy_(token_ids, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()

    def ready(self) -> bool:
        return self.timer.done()

    def result(self) -> list[list[int]]:
        """The tokens each sequence of the step takes, in the step's order: one each from a sampler."""
        if self.event is not None:
            self.event.synchronize()
        return [[token] for token in self.host.tolist()]
