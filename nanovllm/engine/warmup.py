"""Forwards a runner makes before serving: a random prefill that measures the activation peak or the
ranges of keys and values, and the kernels compiled now rather than in the middle of serving."""
import torch

from nanovllm.utils.context import Context, reset_context, set_context


@torch.inference_mode()
def random_prefill(model, vocab_size: int, device: torch.device, num_tokens: int, seq_len: int) -> None:
    """A prefill of num_tokens random tokens in sequences of seq_len (the last one shorter) that stores
    no KV cache."""
    seq_len = min(seq_len, num_tokens)
    lengths = [seq_len] * (num_tokens // seq_len) + ([num_tokens % seq_len] if num_tokens % seq_len else [])
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in lengths])
    # The same tokens on every rank; zeros would give keys and values unlike any real prompt's.
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(vocab_size, (num_tokens,), generator=generator)
    set_context(Context(is_prefill=True, cu_seqlens_q=cu.to(device), cu_seqlens_k=cu.to(device),
                        max_seqlen_q=seq_len, max_seqlen_k=seq_len))
    model.compute_logits(model(input_ids.to(device), positions.to(device))[cu[1:].long() - 1])
    reset_context()


@torch.inference_mode()
def paged_prefill(model, block_size: int, device: torch.device) -> None:
    """A one-token prefill behind a cached block, storing nothing (slot -1): the kernels of a prompt that
    continues a chunk or hits the prefix cache compile now, not in the middle of serving, where they
    stalled the first such prefill for up to a second. The cache has at least two blocks."""
    def on_device(values, dtype):
        return torch.tensor(values, dtype=dtype, device=device)

    set_context(Context(is_prefill=True, cu_seqlens_q=on_device([0, 1], torch.int32),
                        cu_seqlens_k=on_device([0, block_size + 1], torch.int32), max_seqlen_q=1,
                        max_seqlen_k=block_size + 1, slot_mapping=on_device([-1], torch.int64),
                        block_tables=on_device([[0, 1]], torch.int32)))
    model.compute_logits(model(on_device([0], torch.int64), on_device([0], torch.int64)))
    reset_context()
