"""The fused decode forward of a Qwen3 model: per layer, six launches where the model's own forward has
nine (up to eight where the tensor cores multiply: there the RMSNorms run ahead of their GEMMs). It
reuses the model's weights and attention layers as they are."""
import torch

from nanovllm import kernels
from nanovllm.utils.context import Context, set_context


class FusedForward:
    """forward(input_ids, positions, ctx) -> hidden states after the final norm, like the model's forward.
    A layer runs: RMSNorm + qkv_proj; q/k norm + RoPE (+ KV store); attention; o_proj + residual;
    RMSNorm + gate_up_proj + SiLU·mul; down_proj + residual."""

    def __init__(self, model):
        self.model = model

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: Context) -> torch.Tensor:
        set_context(ctx)
        linear, norm_linear = kernels.decode_linear.linear, kernels.decode_linear.norm_linear
        # The residual stream is the only activation between layers: o_proj and down add it in their
        # epilogues as round(round(x @ W.T) + residual), which is the reference's own rounding (F.linear's
        # output, then the next RMSNorm's add), so each norm prologue reads one tensor.
        residual = self.model.embed(input_ids)
        for layer in self.model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            norm = layer.input_layernorm
            qkv = norm_linear(residual, norm.weight, norm.eps, attn.qkv_proj.weight)
            residual = linear(attn.attend(positions, qkv), attn.o_proj.weight, residual)
            norm = layer.post_attention_layernorm
            hidden = norm_linear(residual, norm.weight, norm.eps, mlp.gate_up_proj.weight, silu=True)
            residual = linear(hidden, mlp.down_proj.weight, residual)
        return self.model.model.norm(residual)
