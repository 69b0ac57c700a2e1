import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

# RoPE types whose frequencies are fixed at load ('dynamic' ones depend on the sequence length).
ROPE_TYPES = ("default", *(t for t in ROPE_INIT_FUNCTIONS if t != "dynamic"))


def rope_parameters(config: PretrainedConfig) -> dict:
    """The RoPE settings in the form of transformers 5 (rope_parameters) from either config style."""
    params = getattr(config, "rope_parameters", None)
    if params:
        return dict(params)
    params = dict(getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_type", params.pop("type", "default"))
    params["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    return params


def inverse_frequencies(config: PretrainedConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    params = rope_parameters(config)
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        return 1.0 / (params["rope_theta"] ** exponent), 1.0
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    return inv_freq.float(), float(scaling)


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE with a precomputed cos/sin table indexed by position."""

    def __init__(self, config: PretrainedConfig, head_dim: int):
        super().__init__()
        inv_freq, scaling = inverse_frequencies(config, head_dim)
        positions = torch.arange(config.max_position_embeddings, dtype=torch.float)
        freqs = torch.outer(positions, inv_freq.to(positions.device))  # rope-type tables come from the CPU
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_sin_cache", torch.stack((emb.cos() * scaling, emb.sin() * scaling)),
                             persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        cos, sin = self.cos_sin_cache[:, positions].to(q.dtype).unsqueeze(-2)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat((-x2, x1), -1) * sin
