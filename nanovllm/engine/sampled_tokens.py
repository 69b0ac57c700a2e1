import torch


class SampledTokens:
    """A step's sampled token ids on their way to the host: the copy is queued behind the sampling,
    and tolist() waits only for it."""

    def __init__(self, token_ids: torch.Tensor):
        self.event = None
        if token_ids.is_cuda:
            self.host = torch.empty(token_ids.shape, dtype=token_ids.dtype, pin_memory=True)
            self.host.copy_(token_ids, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = token_ids

    def tolist(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()
