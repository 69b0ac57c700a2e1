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


@dataclass
class DecodeRope:
    """A decode step's new tokens, for an attention kernel that applies Qwen3's q/k norm and RoPE and stores
    the keys and values itself: the raw keys and values [B, Hkv, D] (strided views of the qkv projection
    allowed), the norms' weights [D] and eps, the RoPE table cos_sin_cache [2, max_positions, D] float32
    with each row's two halves equal (rotate-half layout), each row's position and cache slot (-1: none)."""
    k: torch.Tensor
    v: torch.Tensor
    q_norm_weight: torch.Tensor
    k_norm_weight: torch.Tensor
    eps: float
    cos_sin_cache: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor


_CONTEXT = Context()


def get_context() -> Context:
    return _CONTEXT


def set_context(context: Context) -> None:
    global _CONTEXT
    _CONTEXT = context


def reset_context() -> None:
    set_context(Context())
