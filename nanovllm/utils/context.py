from dataclasses import dataclass, replace

import torch


@dataclass
class Context:
    """Attention metadata of the batch being run; see the attention backends for its use."""
    is_prefill: bool = False
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    slot_mapping: torch.Tensor | None = None
    context_lens: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    # The decode rows longest first, computed by the attention backend at the first layer that needs it;
    # valid because a Context is built for each step and each captured forward, never carried over.
    decode_order: torch.Tensor | None = None

    def decode_rows(self, rows: slice) -> "Context":
        """The decode context of a slice of the batch's sequences."""
        assert not self.is_prefill
        return replace(self, slot_mapping=self.slot_mapping[rows], context_lens=self.context_lens[rows],
                       block_tables=self.block_tables[rows], decode_order=None)


@dataclass
class KVStore:
    """This step's values and where they and the keys go in a layer's cache (16 or 32-bit), for a kernel
    that computes the keys to store them itself (the fused q/k norm and RoPE) in place of store_kv."""
    v: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    slot_mapping: torch.Tensor


_CONTEXT = Context()


def get_context() -> Context:
    return _CONTEXT


def set_context(context: Context) -> None:
    global _CONTEXT
    _CONTEXT = context


def reset_context() -> None:
    set_context(Context())
